"""A person's path through the workbench, in a real browser (Debian's chromium, driven by
playwright): evaluate the demo model by clicking, watch the job, open the lineage graph,
reload mid-job. Screenshots of each view go to test-artifacts/screenshots/."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, run_cli, wait_for
from tests.test_ui import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = REPO / "test-artifacts" / "screenshots"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("chromium is missing: the README's test command installs it")
    pytest.skip("chromium is not installed (apt-get install -y chromium)",
                allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect


@pytest.fixture(scope="module")
def demo_lab(tmp_path_factory):
    """A lab with the demo base (20 pre-training steps), built once for this module's tests:
    (the lab's folder, a pristine copy of it). The registry holds absolute paths, so each
    test gets the pristine copy back at the lab's own folder (`demo_lab_again`) instead of
    building the demo again."""
    root = tmp_path_factory.mktemp("browser-demo")
    lab_dir = root / "lab"
    lab_dir.mkdir()
    (lab_dir / "lab.toml").write_text("auto_eval = false\n")  # only the jobs the test starts
    run_cli(lab_dir, "demo", "--pretrain-steps", "20", "--no-skills", check=True)
    shutil.copytree(lab_dir, root / "pristine", symlinks=True)
    return lab_dir, root / "pristine"


@pytest.fixture
def demo_lab_again(demo_lab, lab_dir, monkeypatch):
    """The module's demo lab as the demo left it, whatever an earlier test did to it; the
    test's environment (lab_dir's) names it as the lab."""
    demo_dir, pristine = demo_lab
    shutil.rmtree(demo_dir)
    shutil.copytree(pristine, demo_dir, symlinks=True)
    monkeypatch.setenv("WEIGHTSMITH_LAB", str(demo_dir))
    return demo_dir


@pytest.fixture
def app_url(demo_lab_again):
    proc, url = serve(demo_lab_again, "--no-skills")
    yield url
    proc.terminate()
    proc.wait(20)


def serve(lab_dir, *flags):
    """`weightsmith serve` on the lab, answering; (process, URL). Only the test plugin this
    file uses: with all four, the tab strip overflows at 1280 px and Gradio folds the Jobs
    tab into its "..." menu."""
    import urllib.request

    port = free_port()
    env = dict(cli_env(lab_dir), WEIGHTSMITH_PLUGINS="tests.plugins_for_tests:SLEEPER")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                             *flags], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200
        except OSError:
            assert proc.poll() is None, "the server exited"
            return False

    wait_for(up, 120, interval=0.5, what="the server")
    return proc, f"http://127.0.0.1:{port}/"


@pytest.fixture
def page(app_url):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(30_000)
        page.goto(app_url)
        page.get_by_role("button", name="Run").first.wait_for()
        yield page
        browser.close()


def shot(page, name):
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def open_tab(page, name):
    """Click the navigation bar's button for the tab labelled `name`."""
    page.locator("#ws-nav").get_by_role("button", name=name, exact=True).click()


def run_button(page):
    return page.get_by_role("button", name="Run", exact=True).locator("visible=true").first


def select_first_row(page, text=None):
    """Click the first row of the visible table; with `text`, once that row shows it (the
    Jobs table refreshes on a timer, and the demo's pretrain job is already listed)."""
    cell = page.locator("[data-testid=cell-0-0]:visible").first
    if text:
        expect(cell).to_contain_text(text, timeout=30_000)
    cell.click()


def test_evaluate_demo_by_clicking_then_lineage(page):
    open_tab(page, "Evaluate")
    field = page.get_by_label("checkpoint *").locator("visible=true").first
    field.click()
    page.keyboard.type("demo-base")
    page.get_by_role("option", name=re.compile("demo-base")).first.click()
    page.get_by_role("button", name="Show YAML / CLI").first.click()
    page.get_by_text("weightsmith run evaluate").first.wait_for()
    shot(page, "1-evaluate-form")
    run_button(page).click()
    message = page.locator("#message-evaluate")
    expect(message).to_contain_text("Queued job-")
    job_id = re.search(r"job-[0-9a-f]{8}", message.inner_text()).group(0)

    open_tab(page, "Jobs")
    select_first_row(page, job_id)
    expect(page.locator("#job-status")).to_contain_text("succeeded", timeout=90_000)
    expect(page.locator("#job-log textarea")).to_have_value(re.compile(r"perplexity [0-9.]+"))
    shot(page, "2-jobs-succeeded")

    open_tab(page, "Registry")
    select_first_row(page)
    graph = page.locator("#lineage svg[aria-roledescription]").first  # mermaid's diagram
    graph.wait_for()
    text = wait_for(lambda: "demo-base" in (t := graph.text_content() or "") and t, 30,
                    what="the lineage graph")
    assert "perplexity" in text  # the score is on the node
    shot(page, "3-registry-lineage")
    ck_id = page.get_by_label("Selected checkpoint").input_value()
    expect(page.locator("#use-plugin input")).to_have_value("Evaluate", timeout=30_000)
    page.get_by_role("button", name="Use as input").click()  # opens Evaluate, filled in
    expect(page.locator("#nav-plugin-evaluate")).to_have_class(re.compile("ws-nav-on"),
                                                                timeout=30_000)
    expect(page.get_by_label("checkpoint *").locator("visible=true").first).to_have_value(
        re.compile(ck_id))

    open_tab(page, "Compare")
    shot(page, "4-compare")


def job_progress(page) -> float:
    text = page.locator("#job-progress .ws-progress + div").first.inner_text()
    return float(text.split("%")[0])


def test_reload_mid_job_shows_the_same_live_job(page, tmp_path):
    open_tab(page, "Sleep")
    page.get_by_label("seconds").locator("visible=true").first.fill("25")
    page.get_by_label("pid file *").locator("visible=true").first.fill(str(tmp_path / "pids"))
    run_button(page).click()
    message = page.locator("#message-test_sleep")
    expect(message).to_contain_text("Queued job-")
    job_id = re.search(r"job-[0-9a-f]{8}", message.inner_text()).group(0)

    status = page.locator("#job-status")
    open_tab(page, "Jobs")
    select_first_row(page, job_id)
    expect(status).to_contain_text(f"{job_id} · test_sleep · running", timeout=60_000)
    wait_for(lambda: job_progress(page) > 0, 30, what="progress")
    before = job_progress(page)
    shot(page, "5-jobs-running")

    page.reload()
    page.get_by_role("button", name="Run").first.wait_for()
    open_tab(page, "Jobs")
    select_first_row(page)
    expect(status).to_contain_text(f"{job_id} · test_sleep · running")
    time.sleep(3)
    after = wait_for(lambda: (p := job_progress(page)) > before and p, 30,
                     what="progress after reload")
    assert after > before
    shot(page, "6-jobs-after-reload")
    page.get_by_role("button", name="Stop").click()
    expect(status).to_contain_text(f"{job_id} · test_sleep · cancelled", timeout=30_000)


@pytest.fixture
def hostile_page(lab_dir):
    """A served lab whose registry carries markup in every text a member controls (a
    checkpoint name, a parent role, a task and metric label, a job's progress message and
    error), before the browser opens it. No users: the same pages an admin sees."""
    from app.lab import Lab
    from tests.test_security import hostile_lab_rows

    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text("auto_eval = false\n")
    ck, job = hostile_lab_rows(Lab(lab_dir))
    proc, url = serve(lab_dir, "--no-demo")
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(30_000)
            # a payload that ran would set window.__xss (or open a dialog)
            page.add_init_script("window.__xss = 0")
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(url)
            page.get_by_role("button", name="Run").first.wait_for()
            yield page, ck, job, dialogs
            browser.close()
    finally:
        proc.terminate()
        proc.wait(20)


def test_markup_a_member_types_shows_as_text_and_never_runs(hostile_page):
    from tests.test_security import XSS_IMG, XSS_SCRIPT

    page, ck, job, dialogs = hostile_page
    # a form field: the refusal repeats the value (no checkpoint name matches it, so the
    # dropdown keeps it as typed)
    open_tab(page, "Evaluate")
    field = page.get_by_label("checkpoint *").locator("visible=true").first
    field.click()
    page.keyboard.type(XSS_SCRIPT)
    page.keyboard.press("Enter")
    run_button(page).click()
    message = page.locator("#message-evaluate")
    expect(message).to_contain_text("Not submitted")
    expect(message).to_contain_text(XSS_SCRIPT)
    shot(page, "xss-1-form-message")

    open_tab(page, "Jobs")
    page.get_by_label("Selected job").fill(job["id"])
    page.get_by_label("Selected job").press("Enter")
    expect(page.locator("#job-progress")).to_contain_text(f"scoring {XSS_IMG}")
    expect(page.locator("#job-status")).to_contain_text(XSS_SCRIPT)  # the error, verbatim
    expect(page.locator("#job-status")).to_contain_text(f"{XSS_IMG}/acc")
    shot(page, "xss-2-job")

    open_tab(page, "Registry")
    page.get_by_label("Selected checkpoint").fill(ck["id"])
    page.get_by_label("Selected checkpoint").press("Enter")
    graph = page.locator("#lineage svg[aria-roledescription]").first
    graph.wait_for()
    text = wait_for(lambda: "evil" in (t := graph.text_content() or "") and t, 30,
                    what="the lineage graph")
    assert XSS_IMG in text and f"task {XSS_SCRIPT}" in text  # the label, as typed
    assert "Syntax error" not in (page.locator("#lineage").text_content() or "")
    heading = page.get_by_role("heading", name=re.compile(re.escape(f"evil {XSS_IMG} | [x]")))
    expect(heading).to_be_visible()  # the summary's title: the name as typed
    shot(page, "xss-3-registry")

    assert page.evaluate("window.__xss") == 0 and not dialogs
    assert page.locator("img[src=x]").count() == 0
