"""The lineage graph in a real browser (chromium via playwright).

1. Hostile registries, generated (hypothesis): names, roles, task and metric labels full of
   quotes, brackets, pipes, `#`, `;`, backticks, unicode (emoji, RTL), HTML and Mermaid
   keywords, with merges, adapters and datasets (cylinders, dashed edges), up to 300
   checkpoints. Each is drawn by the same Gradio Markdown (its bundled Mermaid) and
   lineage.js the app uses, as the Registry view writes it and as `weightsmith registry
   lineage ID --mermaid` prints it: no Mermaid error,
   every node's name shown exactly as typed, nothing injected.
2. A person's path: open a merge of three parents, zoom and pan, pick the scores on the nodes,
   click a parent's node to open it, draw the whole lab, download a checkpoint as a zip.
Screenshots go to test-artifacts/screenshots/lineage-*.png."""

import contextlib
import io
import re
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.conftest import wait_for
from tests.test_browser import CHROMIUM, FLAGS, SHOTS, expect, playwright, serve, shot
from tests.test_lineage_graph import merged_lab
from tests.test_ui import free_port

pytestmark = pytest.mark.slow

XSS = "<img src=x onerror=window.__xss=1>"
FRAGMENTS = ['"', "'", "[", "]", "(", ")", "{", "}", "|", "#", ";", "`", "&", "&amp;", "<", ">",
             "<b>b</b>", XSS, "end", "graph", "click", "style", "classDef", "subgraph", "-->",
             "%%", ":::", "\\", "/", "_", "-", ".", " ", "a", "Z", "7", "é", "😀", "👩‍🔬",
             "שלום", "مرحبا", "\u202e", "☃", "#60;", "<br/>"]
RELATIONS = ["import", "finetune", "merge", "adapter", "prune", "task_vector_apply"]


def hostile(max_size=4):
    return st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=max_size).map("".join)


@st.composite
def lab_specs(draw, max_nodes=30):
    """[{name, relation, parents: [(index, weight, role)], scores: [(task, metric, value)]}]"""
    n = draw(st.integers(1, max_nodes))
    spec = []
    for i in range(n):
        parents = draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else []
        spec.append({
            "name": draw(hostile()),
            "relation": "adapter" if parents and draw(st.booleans()) and len(parents) == 1
            else draw(st.sampled_from(RELATIONS)),
            "parents": [(p, draw(st.one_of(st.none(), st.floats(-2, 2, allow_nan=False))),
                         draw(st.one_of(st.none(), hostile(2)))) for p in parents],
            "scores": draw(st.lists(st.tuples(hostile(2), hostile(2),
                                              st.floats(-1e3, 1e3, allow_nan=False)),
                                    max_size=2)),
            # datasets its job read: (name, config field), drawn as cylinders
            "data": draw(st.lists(st.tuples(hostile(3), hostile(2)), max_size=2))})
    return spec


def big_spec(n=300):
    """300 checkpoints: chains of fine-tunes, a three-parent merge every tenth, an adapter
    every seventh, hostile names and labels throughout."""
    spec = []
    for i in range(n):
        frag = FRAGMENTS[i % len(FRAGMENTS)] if FRAGMENTS[i % len(FRAGMENTS)] != XSS or \
            i < 50 else "x"
        parents = []
        relation = "import" if i == 0 else "finetune"
        if i and i % 10 == 0:
            relation, parents = "merge", [(i - 1, 0.5, "model"), (i - 4, 0.3, "m|o"),
                                          (i - 9, None, "base")]
        elif i and i % 7 == 0:
            relation, parents = "adapter", [(i - 3, None, "base")]
        elif i:
            parents = [(i - 1, None, None)]
        spec.append({"name": f"{frag}{i}", "relation": relation, "parents": parents,
                     "scores": [(f"t{i % 3}{frag}", "acc", i / 300)] if i % 2 else []})
    return spec


def build(lab, spec) -> list[dict]:
    import hashlib

    rows = []
    with lab.registry() as reg:
        for i, node in enumerate(spec):
            job = reg.add_job(plugin="test", config={}) if node.get("data") else None
            for j, (name, field) in enumerate(node.get("data") or []):
                digest = hashlib.sha256(f"{i}/{j}/{name}".encode()).hexdigest()
                ds = reg.datasets.add(content_hash=digest, name=name, source="path")
                reg.datasets.use(job["id"], ds["id"], field)
            rows.append(reg.add_checkpoint(
                name=node["name"], relation=node["relation"],
                kind="adapter" if node["relation"] == "adapter" else "model",
                job_id=job["id"] if job else None,
                parents=[{"id": rows[p]["id"], "weight": w, "role": r}
                         for p, w, r in node["parents"]]))
            for task, metric, value in node["scores"]:
                reg.add_evaluation(checkpoint_id=rows[-1]["id"], task=task, metric=metric,
                                   value=value)
    return rows


# ------------------------------------------------------------------------- 1. rendering
@pytest.fixture(scope="module")
def chromium():
    """One chromium for the module (playwright's sync API allows one at a time)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def renderer(chromium):
    """draw(markdown) -> what the page shows: a Gradio page with the app's CSS and scripts
    and one Markdown of class ws-lineage, as the Registry view and the Home tab use."""
    import gradio as gr

    from app.ui import CSS, HEAD
    from app.ui.shared import text_md

    texts: dict[str, str] = {}
    with gr.Blocks() as demo:
        key = gr.Textbox(elem_id="key")
        probe = text_md(elem_id="probe", elem_classes=["ws-lineage"])
        key.submit(lambda k: texts.get(k, ""), key, probe)
    port = free_port()
    demo.queue().launch(server_port=port, prevent_thread_lock=True, css=CSS, head=HEAD,
                        quiet=True)
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.add_init_script("window.__xss = 0")
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"http://127.0.0.1:{port}/")
        box = page.locator("#key textarea")
        box.wait_for()
        count = [0]

        def draw(markdown: str) -> dict:
            count[0] += 1
            k = f"draw-{count[0]}"
            texts[k] = f"{markdown}\n\n{k} done"
            box.fill(k)
            box.press("Enter")
            expect(page.locator("#probe")).to_contain_text(f"{k} done")
            page.locator("#probe .mermaid[data-processed] svg").first.wait_for()
            wait_for(lambda: page.evaluate(
                "!!document.querySelector('#probe svg[data-ws-ready], "
                "#probe svg[aria-roledescription=error]')"), 30,
                what="lineage.js to take the graph (or Mermaid's error)")
            return page.evaluate("""() => {
              const svg = document.querySelector('#probe .mermaid svg');
              return {
                text: document.querySelector('#probe').textContent,
                role: svg.getAttribute('aria-roledescription'),
                nodes: [...svg.querySelectorAll('g.node')].map(
                  g => [g.dataset.checkpoint || null, g.textContent]),
                edges: [...svg.querySelectorAll('g.edgeLabel')].map(g => g.textContent),
                injected: document.querySelectorAll('img[src=x], #probe script').length,
                xss: window.__xss,
              };
            }""") | {"dialogs": list(dialogs)}

        draw.page = page
        yield draw
    finally:
        context.close()
        demo.close()


def check_drawn(drawn: dict, graph: dict) -> None:
    assert "Syntax error" not in drawn["text"] and drawn["role"] == "flowchart-v2", drawn["text"]
    assert "Maximum text size" not in drawn["text"]
    assert "edge limit" not in drawn["text"].lower()
    assert drawn["injected"] == 0 and drawn["xss"] == 0 and not drawn["dialogs"]
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    shown = {ck: text for ck, text in drawn["nodes"]}
    assert set(shown) == set(names)  # every node, each found by the id lineage.js decodes
    for ck, name in names.items():
        assert shown[ck].startswith(name), (name, shown[ck])  # the name as typed, then scores
    tags = []
    for e in graph["edges"]:
        if e["relation"] == "data":  # a dataset's edge: the field that read it
            tags.append(e["role"])
            continue
        tag = str(e["relation"]) + (f" {e['weight']:g}" if e.get("weight") is not None else "")
        tags.append(tag + (f" ({e['role']})" if e.get("role") else ""))
    assert sorted(drawn["edges"]) == sorted(tags)


def mermaid_block(text: str) -> str:
    return f"```mermaid\n{text.strip()}\n```"


@settings(max_examples=25, deadline=None, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@example(spec=big_spec(), pick=299)
@given(spec=lab_specs(), pick=st.integers(0, 10 ** 6))
def test_hostile_registries_draw_as_typed(renderer, spec, pick):
    from app.cli import main as cli_main
    from app.lab import Lab
    from app.ui import registry_view as rv
    from registry import lineage

    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(Path(tmp) / "lab")
        rows = build(lab, spec)
        with lab.registry() as reg:
            whole = reg.lab_graph(datasets=True)
            root = rows[pick % len(rows)]
            around = reg.lineage(root["id"], datasets=True)
        # the Registry view's whole-lab graph, default scores (every task's headline metric)
        shown, left_out = lineage.fit(whole)
        if len(spec) == 300:
            assert left_out == 0  # 300 checkpoints fit in what Mermaid draws
            assert len(lineage.mermaid(whole)) > 20_000
        drawn = renderer(rv.graph_markdown(whole))
        check_drawn(drawn, shown)
        if len(spec) == 300:
            shot(renderer.page, "lineage-300-whole-lab")
        # the CLI's --mermaid of one checkpoint's lineage, with every score on the nodes
        keys = lineage.score_keys(around)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli_main(["registry", "lineage", root["id"], "--mermaid", "--lab",
                             str(lab.root)] + [f"--scores={k}" for k in keys]) == 0
        drawn = renderer(mermaid_block(out.getvalue()))
        check_drawn(drawn, lineage.fit(around, keys)[0])
        if len(spec) == 300:
            shot(renderer.page, "lineage-300-around-one")


# -------------------------------------------------------------------- 2. a person's path
@pytest.fixture
def lineage_page(lab_dir, chromium):
    from app.lab import Lab

    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text("auto_eval = false\n")
    lab = Lab(lab_dir)
    with lab.registry() as reg:
        rows = merged_lab(reg, lab.checkpoints_dir)
    proc, url = serve(lab_dir, "--no-demo")
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(url)
        page.get_by_role("button", name="Run").first.wait_for()
        yield page, rows
    finally:
        context.close()
        proc.terminate()
        proc.wait(20)


def transform(page) -> tuple[float, float, float]:
    style = page.locator("#lineage svg[data-ws-ready]").first.evaluate("s => s.style.transform")
    x, y, k = map(float, re.match(r"translate\(([-\d.e]+)px, ([-\d.e]+)px\) scale\(([-\d.e]+)\)",
                                  style).groups())
    return x, y, k


def open_registry(page):
    nav = page.locator("#nav-registry")
    if nav.count():
        nav.click()
    else:
        page.locator('button[role="tab"][data-tab-id="registry"]').click()


def test_lineage_graph_clicks_zooms_pans_and_picks_scores(lineage_page):
    page, rows = lineage_page
    open_registry(page)
    box = page.get_by_label("Selected checkpoint")
    box.fill(rows["merged"]["id"])
    box.press("Enter")
    graph = page.locator("#lineage svg[data-ws-ready]").first  # drawn, taken by lineage.js
    graph.wait_for()
    expect(page.locator("#lineage")).to_contain_text("merge 0.3 (model)")
    text = page.locator("#lineage").text_content()
    assert "sums" in text and "acc = 0.5" in text and "loss" not in text  # every task's headline
    shot(page, "lineage-1-merge-of-three")

    # zoom: the + button, then the wheel; pan: a drag
    before = transform(page)
    page.locator("#lineage .ws-lineage-tools button[title='Zoom in']").click()
    zoomed = transform(page)
    assert zoomed[2] == pytest.approx(before[2] * 1.25)
    pane = page.locator("#lineage .ws-lineage-pane").first.bounding_box()
    page.mouse.move(pane["x"] + pane["width"] / 2, pane["y"] + 40)
    page.mouse.wheel(0, 300)
    wait_for(lambda: transform(page)[2] < zoomed[2], 5, what="the wheel to zoom out")
    wheeled = transform(page)
    page.mouse.move(pane["x"] + 30, pane["y"] + 30)
    page.mouse.down()
    page.mouse.move(pane["x"] + 90, pane["y"] + 70, steps=5)
    page.mouse.up()
    panned = transform(page)
    assert panned[0] == pytest.approx(wheeled[0] + 60, abs=1)
    assert panned[1] == pytest.approx(wheeled[1] + 40, abs=1)
    assert box.input_value() == rows["merged"]["id"]  # a drag is not a click
    shot(page, "lineage-2-zoomed-and-panned")
    page.locator("#lineage .ws-lineage-tools button[title='Fit the graph']").click()

    # scores on the nodes: add sums/loss
    scores = page.locator("#lineage-scores input").first
    scores.click()
    page.get_by_role("option", name="sums/loss").click()
    page.keyboard.press("Escape")
    expect(page.locator("#lineage")).to_contain_text("loss = 2")
    node = page.locator(f"#lineage g.node[data-checkpoint='{rows['ft-sums']['id']}']")
    expect(node).to_contain_text("acc = 0.5loss = 2")
    shot(page, "lineage-3-scores-picked")

    # click a parent's node: the Registry selects it (its .change handlers run)
    page.locator(f"#lineage g.node[data-checkpoint='{rows['ft-b']['id']}']").click()
    expect(box).to_have_value(rows["ft-b"]["id"])
    expect(page.get_by_role("heading", name=re.compile(r"^ft-b"))).to_be_visible()
    expect(page.locator("#load-code")).to_contain_text("AutoModelForCausalLM.from_pretrained")
    root = page.locator(f"#lineage g.node.root[data-checkpoint='{rows['ft-b']['id']}'], "
                        f"#lineage g.node[data-checkpoint='{rows['ft-b']['id']}'].root")
    expect(root).to_have_count(1)  # the graph is now drawn around ft-b
    shot(page, "lineage-4-parent-opened")

    # download its folder as a zip
    page.locator("#download-zip").click()
    expect(page.locator("#download-message")).to_contain_text("Zip ready")
    link = page.locator("#download-file a[href*='ft-b.zip']")
    expect(link).to_have_count(1)
    body = page.request.get(link.get_attribute("href")).body()
    assert body[:2] == b"PK" and b"ft-b/model.safetensors" in body

    # the whole lab
    page.get_by_label("Whole lab", exact=True).check()
    expect(page.locator("#lineage")).to_contain_text("lora")
    expect(page.locator("#lineage g.node")).to_have_count(6)
    shot(page, "lineage-5-whole-lab")

    # the same graph on another tab (as the Home tab shows it): a click there opens the
    # Registry tab with that checkpoint
    page.evaluate("""() => {
      const copy = document.createElement('div');
      copy.className = 'ws-lineage';
      copy.id = 'elsewhere';
      copy.innerHTML = document.querySelector('#lineage .mermaid').outerHTML;
      copy.querySelector('svg').removeAttribute('data-ws-ready');
      document.body.prepend(copy);
    }""")
    page.locator("#nav-jobs").click()
    expect(page.locator("#selected-checkpoint")).to_be_hidden()
    page.locator(f"#elsewhere g.node[data-checkpoint='{rows['adapter']['id']}']").click()
    expect(box).to_be_visible()
    expect(box).to_have_value(rows["adapter"]["id"])
    expect(page.locator("#load-code")).to_contain_text("PeftModel.from_pretrained")
    page.evaluate("document.getElementById('elsewhere').remove()")
    time.sleep(0.5)
    shot(page, "lineage-6-adapter-opened-from-another-tab")
