"""Datasets in a real browser (chromium via playwright), on a lab served with the built-in
plugins: upload a JSONL in the Datasets tab and see its rows; "Use in" puts its id into
Train's data field; a data field's "or a registered dataset" picks one; a reload with ?ds=
reopens it; a checkpoint's lineage draws the data its job read as a cylinder, and clicking
it opens the dataset. Screenshots go to test-artifacts/screenshots/datasets-*.png."""

import hashlib
import json
import re

import pytest

from tests.test_browser import CHROMIUM, FLAGS, SHOTS
from tests.test_browser_forms import serve_builtin

playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect

pytestmark = pytest.mark.slow

XSS = "<img src=x onerror=window.__xss=1>"


def shot(page, name):
    page.screenshot(path=str(SHOTS / f"datasets-{name}.png"), full_page=True)


@pytest.fixture
def served(lab_dir):
    """`weightsmith serve --no-demo` with the built-in plugins, on a lab holding a checkpoint
    whose job read a dataset with a hostile name; (page, url, rows)."""
    from app.lab import Lab

    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text("auto_eval = false\ngpus = []\n")
    lab = Lab(lab_dir)
    with lab.registry() as reg:
        base = reg.add_checkpoint(name="base", relation="import")
        job = reg.add_job(plugin="train", config={})
        ds = reg.datasets.add(content_hash=hashlib.sha256(b"x").hexdigest(),
                              name=f"{XSS}skills", source="path", format="jsonl", rows=3)
        reg.datasets.use(job["id"], ds["id"], "data")
        tuned = reg.add_checkpoint(name="tuned", relation="finetune", job_id=job["id"],
                                   parents=[{"id": base["id"]}])
    proc, url = serve_builtin(lab_dir)
    try:
        SHOTS.mkdir(parents=True, exist_ok=True)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.add_init_script("window.__xss = 0")
            page.goto(url)
            page.get_by_role("button", name="Run").first.wait_for()
            yield page, url, {"ds": ds, "tuned": tuned}
            browser.close()
    finally:
        proc.terminate()
        proc.wait(20)


def test_datasets_by_clicking(served, tmp_path):
    page, url, rows = served
    # 1. upload a JSONL in the Datasets tab: recorded by hash, its rows shown
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "completion": str(2 * i)})
                            + "\n" for i in range(7)))
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    page.locator("#nav-datasets").click()
    with page.expect_file_chooser() as chooser:
        page.locator("#dataset-upload").click()
    chooser.value.set_files(str(data))
    expect(page.locator("#dataset-message")).to_contain_text(f"ds-{digest[:12]}")
    expect(page.locator("#dataset-message")).to_contain_text("7 rows")
    selected = page.get_by_label("Selected dataset")
    expect(selected).to_have_value(f"ds-{digest[:12]}")
    expect(page.locator("#dataset-summary")).to_contain_text(digest)
    preview = page.locator("#dataset-preview")
    expect(preview).to_contain_text("What is 6+6?")
    expect(page.locator("#dataset-table")).to_contain_text("pairs.jsonl")
    expect(page).to_have_url(re.compile(rf"ds=ds-{digest[:12]}"), timeout=10_000)
    shot(page, "1-uploaded")

    # 2. "Use in" Train's data field: the Train tab opens with the id in the box
    page.get_by_label("Use in").click()
    page.get_by_role("option", name="Train · data", exact=True).click()
    page.locator("#dataset-use").click()
    expect(page.locator("#nav-plugin-train")).to_have_class(re.compile("ws-nav-on"))
    box = page.locator("#upload-train-data").locator("xpath=..").get_by_role("textbox")
    expect(box).to_have_value(f"ds-{digest[:12]}")
    shot(page, "2-used-in-train")

    # 3. Prune's calibration field picks it from "or a registered dataset"
    page.locator("#nav-plugin-prune").click()
    picker = page.locator("#dataset-prune-calibration-file input").first
    picker.click()
    page.get_by_role("option", name=re.compile(r"pairs\.jsonl")).first.click()
    calib = page.locator("#upload-prune-calibration-file").locator("xpath=..") \
        .get_by_role("textbox").first
    expect(calib).to_have_value(f"ds-{digest[:12]}")
    shot(page, "3-picked-in-prune")

    # 4. a checkpoint's lineage draws its job's data; a click on the cylinder opens it
    page.goto(f"{url}?tab=registry&ck={rows['tuned']['id']}")
    svg = page.locator("#lineage svg[aria-roledescription]").first
    expect(svg).to_contain_text(f"{XSS}skills", timeout=30_000)  # the hostile name, as text
    expect(svg).to_contain_text("tuned")
    expect(page.locator("#tab-registry")).to_contain_text(f"Data: {XSS}skills")
    shot(page, "4-lineage-with-data")
    svg.locator("g.node", has_text="skills").first.click()
    expect(page.locator("#nav-datasets")).to_have_class(re.compile("ws-nav-on"),
                                                          timeout=30_000)
    expect(page.get_by_label("Selected dataset")).to_have_value(rows["ds"]["id"])
    expect(page.locator("#dataset-summary")).to_contain_text("Trained or calibrated")
    expect(page.locator("#dataset-summary")).to_contain_text("tuned")

    # 5. a reload comes back to the dataset
    page.reload()
    expect(page.locator("#nav-datasets")).to_have_class(re.compile("ws-nav-on"),
                                                          timeout=30_000)
    expect(page.get_by_label("Selected dataset")).to_have_value(rows["ds"]["id"])
    expect(page.locator("#dataset-summary")).to_contain_text(f"{XSS}skills")
    shot(page, "5-after-reload")
    assert page.evaluate("window.__xss") == 0
