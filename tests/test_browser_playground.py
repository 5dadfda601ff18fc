"""The Playground in a real browser (Debian's chromium, driven by playwright): pick a
checkpoint, add its parent, type a prompt, Generate, and watch the text stream into both
boxes side by side; then Stop. Screenshots go to test-artifacts/screenshots/playground-*.png."""

import re
import time

import pytest

from tests.test_browser import CHROMIUM, FLAGS, SHOTS, serve  # skips without chromium
from tests.test_playground import make_child, register

playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect


@pytest.fixture
def playground_page(lab_dir, tiny_model_dir, tmp_path):
    from app.lab import Lab

    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text("auto_eval = false\n")
    lab = Lab(lab_dir)
    base = register(lab, tiny_model_dir, "tiny")
    # a longer context than its parent, so that its box is still streaming when Stop comes
    register(lab, make_child(tiny_model_dir, tmp_path / "child", max_positions=4096),
             "tiny-merged", "merge", [{"id": base["id"]}])
    proc, url = serve(lab_dir, "--no-demo")
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(url)
            page.get_by_role("button", name="Run").first.wait_for(state="attached")
            yield page
            browser.close()
    finally:
        proc.terminate()
        proc.wait(20)


def shot(page, name):
    page.screenshot(path=str(SHOTS / f"playground-{name}.png"), full_page=True)


def open_playground(page):
    nav = page.locator("#nav-playground")
    if nav.count():
        nav.click()
    else:
        page.get_by_role("tab", name="Playground", exact=True).click()
    page.locator("#playground-generate").wait_for()


def box_text(page, i) -> str:
    return page.locator(f"#playground-out-{i} textarea").input_value()


@pytest.mark.slow
def test_two_checkpoints_stream_side_by_side_then_stop(playground_page):
    page = playground_page
    open_playground(page)
    picks = page.locator("#playground-picks input")
    picks.click()
    page.keyboard.type("tiny-merged")
    page.get_by_role("option", name=re.compile("tiny-merged")).first.click()
    page.get_by_role("button", name="Add its parents").click()
    # both checkpoints picked: the merge and its parent, each with a column of its own
    expect(page.locator("#playground-head-1")).to_contain_text("tiny (", timeout=15_000)
    expect(page.locator("#playground-head-0")).to_contain_text("tiny-merged")
    page.locator("#playground-prompt textarea").fill("The river ran past the mill and")
    page.get_by_label("max new tokens (1 to 1024)").fill("1024")
    page.get_by_label("max new tokens (1 to 1024)").press("Tab")
    shot(page, "1-picked")
    page.get_by_role("button", name="Generate", exact=True).click()

    status = page.locator("#playground-status")
    lengths = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = (len(box_text(page, 0)), len(box_text(page, 1)))
        if now[0] and now[1]:
            lengths.append(now)
            if len(lengths) == 1:
                shot(page, "2-streaming")
            if len({n[0] for n in lengths}) >= 3:
                break
        time.sleep(0.05)
    assert lengths, "no text arrived in both boxes"
    # the merge's box grew over several looks while the page stayed live: it streamed
    assert len({n[0] for n in lengths}) >= 3, lengths
    assert "done" not in status.inner_text()
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(status).to_contain_text("stopped", timeout=15_000)
    expect(page.locator("#playground-head-0")).to_contain_text("tokens (stopped")
    expect(page.locator("#playground-head-1")).to_contain_text("tokens (")
    assert box_text(page, 0) and box_text(page, 1) and box_text(page, 0) != box_text(page, 1)
    shot(page, "3-stopped")
