"""The whole demo story in the real browser, by clicking only, from an empty lab: the server
builds the demo (a pretrain job, two skill fine-tunes, their auto-evaluations); the Home
tab's story then merges the two fine-tunes (TIES), opens the merge's lineage, compares it
with its parents, prunes it with Wanda, evaluates it, and talks to it in the Playground next
to a parent; a LoRA train job on an uploaded JSONL is started and stopped; a reload lands
back on that job. Every step's screenshot is saved as test-artifacts/screenshots/journey-*."""

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env, wait_for
from tests.test_browser import CHROMIUM, FLAGS, SHOTS, expect, playwright
from tests.test_ui import free_port

pytestmark = pytest.mark.slow
DEMO_STEPS = "40"     # pre-training steps of the demo base: the story, not the model, is tested
DEMO_TIMEOUT = 900    # s for the demo's jobs (about 2.5 minutes alone on 2 cores)
JOB_TIMEOUT = 300     # s for one job of the story (auto-evaluations queue beside it)


def shot(page, name):
    page.screenshot(path=str(SHOTS / f"journey-{name}.png"), full_page=True)


@pytest.fixture
def served(lab_dir):
    """`weightsmith serve` on an empty lab with the built-in plugins only and the demo on."""
    import urllib.request

    env = {k: v for k, v in cli_env(lab_dir).items() if k != "WEIGHTSMITH_PLUGINS"}
    port = free_port()
    log = open(lab_dir.parent / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                             "--demo-steps", DEMO_STEPS], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)

    def up():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200
        except OSError:
            assert proc.poll() is None, "the server exited"
            return False

    wait_for(up, 120, interval=0.5, what="the server")
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture
def page(served):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(30_000)
        page.add_init_script("window.__xss = 0")
        page.goto(served)
        yield page
        browser.close()


def on_tab(page, tab_id):
    expect(page.locator(f"#nav-{tab_id}")).to_have_class(re.compile("ws-nav-on"))
    expect(page).to_have_url(re.compile(rf"[?&]tab={re.escape(tab_id)}(&|$)"),
                             timeout=10_000)


def story(page, key):
    """Click a step of Home's demo story (it opens that step's view, filled in)."""
    page.locator("#nav-home").click()
    button = page.locator(f"#story-{key}")
    expect(button).to_be_visible(timeout=JOB_TIMEOUT * 1000)
    button.click()


def run_and_follow(page, plugin, what):
    """Click the plugin tab's Run, follow the "Queued" link to the job, wait for success;
    returns the job id."""
    panel = page.locator(f"#tab-plugin-{plugin}")
    panel.get_by_role("button", name="Run", exact=True).click()
    message = page.locator(f"#message-{plugin}")
    expect(message).to_contain_text("Queued job-")
    link = message.get_by_role("link", name=re.compile(r"job-[0-9a-f]{8}"))
    job_id = link.inner_text()
    link.click()
    on_tab(page, "jobs")
    expect(page).to_have_url(re.compile(f"job={job_id}"))
    expect(page.locator("#job-status")).to_contain_text(f"{job_id} · {plugin} · succeeded",
                                                        timeout=JOB_TIMEOUT * 1000)
    shot(page, f"{what}-job")
    return job_id


def test_the_demo_story_by_clicking_only(page, lab_dir, tmp_path):
    expect(page.locator("#home-story")).to_contain_text("The demo story")
    on_tab(page, "home")
    shot(page, "01-home-at-start")

    # the demo's jobs: pre-train, two fine-tunes, their auto-evaluations
    expect(page.locator("#story-merge")).to_be_visible(timeout=DEMO_TIMEOUT * 1000)
    expect(page.locator("#home-story")).to_contain_text("demo-ft-sums")
    shot(page, "02-home-demo-ready")

    # 1. merge the two skill fine-tunes with TIES
    story(page, "merge")
    on_tab(page, "plugin-merge")
    form = page.locator("#tab-plugin-merge")
    expect(form.get_by_label("method").first).to_have_value("ties")
    shot(page, "03-merge-form")
    merge_job = run_and_follow(page, "merge", "04-merge")

    # 2. the merged checkpoint's lineage: its three parents, no Mermaid error; opened by
    # clicking its node in the lab's graph on Home
    page.locator("#nav-home").click()
    graph = page.locator("#home-graph svg[aria-roledescription]").first
    expect(graph).to_contain_text("demo-merge", timeout=30_000)
    graph.locator("g.node", has_text="demo-merge").first.click()
    on_tab(page, "registry")
    expect(page).to_have_url(re.compile(r"ck=ck-"), timeout=20_000)
    lineage = page.locator("#lineage")
    svg = lineage.locator("svg[aria-roledescription]").first
    for name in ("demo-merge", "demo-ft-capitals", "demo-ft-sums", "demo-base",
                 "train_capitals.jsonl", "train_sums.jsonl"):  # the fine-tunes' data too
        expect(svg).to_contain_text(name)
    assert "Syntax error" not in (lineage.text_content() or "")
    with_parents = page.locator("#tab-registry")
    expect(with_parents).to_contain_text("Parents: demo-ft-capitals")
    expect(page.locator("#load-code")).to_contain_text("AutoModelForCausalLM.from_pretrained")
    shot(page, "05-merge-lineage")

    # 3. compare it with both parents
    story(page, "compare")
    on_tab(page, "compare")
    page.locator("#tab-compare").get_by_role("button", name="Compare", exact=True).click()
    compared = page.locator("#tab-compare")
    expect(compared).to_contain_text("demo-ft-sums", timeout=30_000)
    shot(page, "06-compare")

    # 4. prune it with Wanda, then 5. evaluate the pruned model
    story(page, "prune")
    on_tab(page, "plugin-prune")
    expect(page.locator("#tab-plugin-prune").get_by_label("method").first).to_have_value(
        "wanda")
    run_and_follow(page, "prune", "07-prune")
    story(page, "evaluate")
    on_tab(page, "plugin-evaluate")
    run_and_follow(page, "evaluate", "08-evaluate")

    # 6. the Playground: the merge next to its parents, streamed
    story(page, "playground")
    on_tab(page, "playground")
    play = page.locator("#tab-playground")
    expect(page.locator("#playground-head-0")).to_contain_text("demo-merge")
    expect(page.locator("#playground-head-1")).to_contain_text("demo-ft-capitals")
    page.locator("#playground-prompt textarea").fill("The capital of France is")
    play.get_by_role("button", name="Generate", exact=True).click()
    outputs = [page.locator(f"#playground-out-{i} textarea") for i in range(2)]
    wait_for(lambda: all(len(o.input_value().strip()) > 0 for o in outputs), 180,
             interval=1, what="a streamed answer from the merge and a parent")
    shot(page, "09-playground")

    # 7. upload a small JSONL and start a LoRA train job on it; stop it
    data = tmp_path / "my-data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": w}) + "\n"
                            for w in ("yes", "no", "maybe", "never") * 5000))  # a minute
    page.locator("#nav-plugin-train").click()
    train = page.locator("#tab-plugin-train")
    checkpoint = train.get_by_label("checkpoint *").first
    checkpoint.click()
    page.keyboard.type("demo-base")
    page.get_by_role("option", name=re.compile("demo-base")).first.click()
    with page.expect_file_chooser() as chooser:  # the data field's Upload button
        page.locator("#upload-train-data").click()
    chooser.value.set_files(str(data))
    box = page.locator("#upload-train-data").locator("xpath=..").get_by_role("textbox")
    expect(box).to_have_value(re.compile(r"/uploads/[0-9a-f]{8}-my-data\.jsonl$"))
    method = train.get_by_label("method").first
    method.click()
    page.get_by_role("option", name="lora", exact=True).click()
    shot(page, "10-train-form")
    train.get_by_role("button", name="Run", exact=True).click()
    message = page.locator("#message-train")
    expect(message).to_contain_text("Queued job-")
    link = message.get_by_role("link", name=re.compile(r"job-[0-9a-f]{8}"))
    train_job = link.inner_text()
    link.click()
    on_tab(page, "jobs")
    status = page.locator("#job-status")
    expect(status).to_contain_text(f"{train_job} · train · running", timeout=JOB_TIMEOUT * 1000)
    page.locator("#tab-jobs").get_by_role("button", name="Stop", exact=True).click()
    expect(status).to_contain_text(f"{train_job} · train · cancelled", timeout=60_000)
    shot(page, "11-train-stopped")

    # 8. reload: back on the Jobs tab, on the same job
    page.reload()
    on_tab(page, "jobs")
    expect(page.get_by_label("Selected job")).to_have_value(train_job)
    expect(status).to_contain_text(f"{train_job} · train · cancelled")
    shot(page, "12-after-reload")
    assert page.evaluate("window.__xss") == 0
    assert merge_job != train_job
