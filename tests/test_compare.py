"""The Compare tab reads at a glance: one row per metric on its own scale, which way each
metric is better, changes against parents green when better and red when worse, a mark on
scores measured on fewer items than the ones beside them, members' names as text."""

import re

import pytest

from plugins.kit import metrics

HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.mark.parametrize("metric, way", [
    ("ppl:heldout.txt/perplexity", "lower"), ("lm-eval:wikitext/word_perplexity", "lower"),
    ("lm-eval:wikitext/byte_perplexity", "lower"), ("demo/heldout/bits_per_byte", "lower"),
    ("ppl:x/nll_per_token", "lower"), ("train/loss", "lower"), ("lm-eval:x/ter", "lower"),
    ("asr/wer", "lower"), ("lm-eval:x/brier_score", "lower"),
    ("demo/arith/acc", "higher"), ("demo/arith/acc_norm", "higher"),
    ("demo/capitals/exact_match", "higher"), ("demo/capitals/contains", "higher"),
    ("demo/capitals/regex", "higher"), ("lm-eval:gsm8k/exact_match[strict-match]", "higher"),
    ("lm-eval:squad/f1", "higher"), ("lm-eval:x/bleu", "higher"),
    ("lm-eval:x/rouge2_max", "higher"), ("lm-eval:x/rougeLsum", "higher"),
    ("lm-eval:x/mcc", "higher"),
])
def test_each_metric_says_which_way_is_better(metric, way):
    assert metrics.better(metric) == way
    assert metrics.known(metric)
    assert metrics.direction(metric) == (way, "table")


def test_an_unknown_metric_is_read_as_higher_and_says_so():
    assert metrics.better("t/wibble") == "higher" and not metrics.known("t/wibble")
    assert metrics.direction("t/wibble") == ("higher", "unknown")
    # what the evaluation recorded wins over the table (lm-eval's higher_is_better)
    assert metrics.direction("t/wibble", {"higher_is_better": False}) == ("lower", "recorded")
    assert metrics.direction("t/acc", {"higher_is_better": "no"}) == ("higher", "table")
    assert metrics.is_gain(-0.5, "lower") is True and metrics.is_gain(0.5, "lower") is False
    assert metrics.is_gain(0.0, "higher") is None


def scored_lineage(lab, child_name="child"):
    """base -> child (fine-tune: better accuracy, worse perplexity) and base -> quick (its
    accuracy measured with limit 4 of the 24 items)."""
    with lab.registry() as reg:
        base = reg.add_checkpoint(name="base", relation="import")
        child = reg.add_checkpoint(name=child_name, relation="finetune",
                                   parents=[{"id": base["id"]}])
        quick = reg.add_checkpoint(name="quick", relation="finetune",
                                   parents=[{"id": base["id"]}])
        rows = [(base, "ppl:heldout.txt", "perplexity", 2.80, {"tokens": 5000}),
                (child, "ppl:heldout.txt", "perplexity", 3.10, {"tokens": 5000}),
                (quick, "ppl:heldout.txt", "perplexity", 2.75, {"tokens": 5000}),
                (base, "demo/arith", "acc", 0.25, {"n": 24}),
                (child, "demo/arith", "acc", 0.50, {"n": 24}),
                (quick, "demo/arith", "acc", 0.75, {"n": 4}),
                (base, "demo/arith", "wibble", 1.0, {"n": 24}),
                (child, "demo/arith", "wibble", 2.0, {"n": 24})]
        for ck, task, metric, value, details in rows:
            reg.add_evaluation(checkpoint_id=ck["id"], task=task, metric=metric, value=value,
                               details=details)
    return base, child, quick


def test_deltas_are_coloured_by_the_metrics_direction(lab):
    from app.ui.compare_view import comparison, heat_table

    base, child, quick = scored_lineage(lab)
    data = comparison(lab, [base["id"], child["id"], quick["id"]])
    rows = {r.metric: r for r in data.rows}
    assert [c["name"] for c in data.checkpoints] == ["base", "child", "quick"]
    ppl, acc = rows["ppl:heldout.txt/perplexity"], rows["demo/arith/acc"]
    assert ppl.direction == "lower" and acc.direction == "higher"
    (worse_ppl,), (better_acc,) = ppl.cells[1].deltas, acc.cells[1].deltas
    assert worse_ppl.gain is False and worse_ppl.delta == pytest.approx(0.30)
    assert better_acc.gain is True and better_acc.parent_name == "base"
    assert ppl.cells[0].deltas == []  # base has no parents

    html = heat_table(data)
    cells = re.findall(r"<div class='ws-delta (\w+)'[^>]*>([^<]*)", html)
    assert ("worse", "▼ +0.3 vs base") in cells      # a higher perplexity: red
    assert ("better", "▲ +0.25 vs base") in cells    # a higher accuracy: green
    assert ("better", "▲ -0.05 vs base") in cells    # a lower perplexity: green
    worse = re.search(r"<div class='ws-delta worse'[^>]*style='color:([^;]+)", html).group(1)
    better = re.search(r"<div class='ws-delta better'[^>]*style='color:([^;]+)", html).group(1)
    assert (worse, better) == ("#991b1b", "#166534")  # red, green
    assert "↓ lower is better" in html and "↑ higher is better" in html
    assert "direction unknown" in html  # wibble: said, not silently guessed


def test_a_score_on_fewer_items_is_marked(lab):
    from app.ui.compare_view import comparison, heat_table

    base, child, quick = scored_lineage(lab)
    data = comparison(lab, [base["id"], child["id"], quick["id"]])
    acc = next(r for r in data.rows if r.metric == "demo/arith/acc")
    assert [c.partial for c in acc.cells] == ["", "", "4 of 24 items"]
    assert acc.cells[2].deltas[0].uneven == "4 vs 24 items"  # its gain is not like for like
    ppl = next(r for r in data.rows if r.metric == "ppl:heldout.txt/perplexity")
    assert [c.partial for c in ppl.cells] == ["", "", ""]
    html = heat_table(data)
    assert "4 of 24 items" in html and "†" in html and "fewer items than the others" in html
    # lm-eval records its own counts: a limited task is partial even on its own
    assert __import__("app.ui.compare_view", fromlist=["x"]).measured_on(
        {"n_samples": {"original": 24, "effective": 4}}) == (4, 24, "items")
    # only base and child: nothing partial, no legend for it
    assert "fewer items" not in heat_table(comparison(lab, [base["id"], child["id"]]))


def test_member_text_in_the_table_is_shown_as_text(lab):
    from app.ui.compare_view import compare_heat

    base, child, _ = scored_lineage(lab, child_name=HOSTILE + "${alert(2)}{{x}}")
    with lab.registry() as reg:
        reg.add_evaluation(checkpoint_id=child["id"], task="<b>t</b>", metric="<i>m</i>",
                           value=1.0)
    html, table = compare_heat(lab, [base["id"], child["id"]])
    assert "<img" not in html and "<b>t" not in html and "<i>m" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "${" not in html and "{{" not in html  # no gr.HTML template syntax either
    assert "&lt;b&gt;t&lt;/b&gt;" in html
    assert len(table) == 4  # the numbers as a table, as compare() gives them


def test_compare_heat_without_picks_or_scores_says_what_to_do(lab):
    from app.ui.compare_view import compare_heat

    assert "Pick two or more" in compare_heat(lab, [])[0]
    with lab.registry() as reg:
        ck = reg.add_checkpoint(name="lonely", relation="import")
    assert "No scores yet for lonely" in compare_heat(lab, [ck["id"]])[0]
    assert "<b>" in compare_heat(lab, ["ck-missing"])[0]  # an unknown id: a message


def open_compare(page, browser_mod):
    """The Compare tab: through the navigation bar's button where the app has one (it
    wraps instead of folding tabs into "..."), else its tab."""
    nav = page.locator("#nav-compare")
    if nav.count():
        nav.click()
    else:
        browser_mod.open_tab(page, "Compare")


def test_compare_tab_in_a_browser(lab_dir):
    """The Compare tab at 1280x800 with a lineage whose scores differ in scale and
    direction, one of them partial, and a hostile name: screenshot for a person to look at."""
    from app.lab import Lab

    browser_mod = pytest.importorskip("tests.test_browser")
    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text("auto_eval = false\n")
    lab = Lab(lab_dir)
    base, child, quick = scored_lineage(lab, child_name="sft " + HOSTILE)
    with lab.registry() as reg:
        for metric, values in (("acc_norm", (0.30, 0.45, 0.70)),
                               ("exact_match", (0.10, 0.20, 0.50))):
            for ck, value in zip((base, child, quick), values):
                reg.add_evaluation(checkpoint_id=ck["id"], task="demo/arith", metric=metric,
                                   value=value, details={"n": 4 if ck is quick else 24})
        for ck, value in zip((base, child, quick), (1.485, 1.632, 1.459)):
            reg.add_evaluation(checkpoint_id=ck["id"], task="ppl:heldout.txt",
                               metric="bits_per_byte", value=value, details={"tokens": 5000})
    proc, url = browser_mod.serve(lab_dir, "--no-demo")
    sync = browser_mod.playwright
    try:
        with sync.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_mod.CHROMIUM,
                                        args=browser_mod.FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(30_000)
            page.add_init_script("window.__xss = 0")
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(url)
            page.get_by_role("button", name="Run").first.wait_for()
            open_compare(page, browser_mod)
            picks = page.get_by_label("Checkpoints to compare (two or more)")
            for name in ("base", "sft", "quick"):
                picks.click()
                page.keyboard.type(name)
                page.get_by_role("option", name=re.compile(re.escape(name))).first.click()
            page.locator("#compare-go").click()
            heat = page.locator("#compare-heat .ws-compare")
            browser_mod.expect(heat).to_contain_text("4 of 24 items")
            browser_mod.expect(heat.locator(".ws-ck-name").nth(1)).to_have_text(
                "sft " + HOSTILE)  # the name, as text
            assert page.locator("#compare-heat img").count() == 0
            assert page.evaluate("window.__xss") == 0 and not dialogs
            heat.scroll_into_view_if_needed()
            browser_mod.SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(browser_mod.SHOTS / "compare-heat.png"))
            page.screenshot(path=str(browser_mod.SHOTS / "compare-tab.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(20)
