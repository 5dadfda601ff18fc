"""The method-aware forms in a real browser (Debian's chromium, driven by playwright), served
with the real plugins on a lab without GPUs: Merge shows only the fields the chosen method
reads, a bad value comes back under its field in words, GPU fields are absent, and Train's
data field takes an uploaded JSONL. Screenshots go to test-artifacts/screenshots/forms-*.png."""

import json
import re
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import REPO, cli_env, wait_for
from tests.test_browser import CHROMIUM, FLAGS, SHOTS
from tests.test_ui import free_port

playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect

pytestmark = pytest.mark.slow


def serve_builtin(lab_dir):
    """`weightsmith serve --no-demo` on the lab with every built-in plugin (no
    WEIGHTSMITH_PLUGINS), answering; (process, URL)."""
    env = cli_env(lab_dir)
    env.pop("WEIGHTSMITH_PLUGINS", None)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-demo", "--port",
                             str(port)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"

    def up():
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            assert proc.poll() is None, "the server exited"
            return False

    try:
        wait_for(up, 120, interval=0.5, what="the server")
    except BaseException:
        proc.terminate()
        proc.wait(20)
        raise
    return proc, url


@pytest.fixture
def page(lab_dir):
    """`weightsmith serve --no-demo` on an empty lab without GPUs, every built-in plugin (no
    WEIGHTSMITH_PLUGINS), and a 1280x800 page on it."""
    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text("auto_eval = false\ngpus = []\n")
    proc, url = serve_builtin(lab_dir)
    try:
        SHOTS.mkdir(parents=True, exist_ok=True)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(30_000)
            page.goto(url)
            page.get_by_role("button", name="Run").first.wait_for()
            yield page
            browser.close()
    finally:
        proc.terminate()
        proc.wait(20)


def shot(page, name, at=None):
    """The 1280x800 view, scrolled to `at` (a locator) when given."""
    if at is not None:
        at.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / f"forms-{name}.png"))


def open_tab(page, plugin):
    """Open a plugin's tab: through the app's navigation bar where it has one (it replaces
    Gradio's tab strip, which folds tabs that do not fit into a "..." menu), else the tab."""
    nav = page.locator(f"#nav-plugin-{plugin}")
    if nav.count():
        nav.click()
    else:
        page.get_by_role("tab", name=TITLES[plugin], exact=True).click()
    expect(page.locator(f"#tab-plugin-{plugin}")).to_be_visible()


TITLES = {"merge": "Merge", "train": "Train"}


def choose(page, plugin, field, option):
    """Pick `option` in a plugin form's dropdown field."""
    box = page.locator(f"#tab-plugin-{plugin}").get_by_label(field, exact=True)
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(box).to_have_value(option)


def field(page, plugin, name):
    return page.locator(f"#field-{plugin}-{name.replace('_', '-')}")


def test_merge_shows_what_each_method_reads_and_errors_sit_by_their_field(page):
    open_tab(page, "merge")
    merge = page.locator("#tab-plugin-merge")
    density, t, weights = (field(page, "merge", n) for n in ("density", "t", "weights"))
    base = field(page, "merge", "base_model")
    # linear (the default) reads weights only
    expect(weights).to_be_visible()
    expect(density).to_be_hidden()
    expect(t).to_be_hidden()
    expect(base).to_be_hidden()
    expect(merge.get_by_label("engine")).to_be_hidden()  # under Advanced, closed
    shot(page, "1-merge-linear")

    choose(page, "merge", "method", "ties")
    expect(density).to_be_visible()
    expect(base).to_be_visible()
    expect(t).to_be_hidden()
    shot(page, "2-merge-ties")

    choose(page, "merge", "method", "slerp")
    expect(t).to_be_visible()
    expect(density).to_be_hidden()
    expect(weights).to_be_hidden()
    shot(page, "3-merge-slerp")

    # a bad value: the error is written under its field, naming it, in words
    choose(page, "merge", "method", "ties")
    density.get_by_label("density").fill("1.5")
    merge.get_by_role("button", name="Run", exact=True).click()
    error = page.locator("#error-merge-density")
    expect(error).to_be_visible()
    expect(error).to_contain_text("density: got 1.5; expected a number of at most 1")
    message = page.locator("#message-merge")
    expect(message).to_contain_text("Not submitted")
    expect(message).to_contain_text("density")
    assert "{" not in message.inner_text()  # never the config dict
    # the error line sits right under the density box (and above the next field)
    box = density.get_by_label("density").bounding_box()
    line = error.bounding_box()
    assert box["y"] + box["height"] <= line["y"] < box["y"] + box["height"] + 60
    shot(page, "4-merge-error-by-field", at=error)

    # once fixed, the line goes; the form now names what else is missing (models, base)
    density.get_by_label("density").fill("0.5")
    merge.get_by_role("button", name="Run", exact=True).click()
    expect(error).to_be_hidden()
    expect(page.locator("#error-merge-models")).to_contain_text("models")


def test_train_hides_gpu_fields_and_uploads_its_data(page, tmp_path):
    open_tab(page, "train")
    train = page.locator("#tab-plugin-train")
    expect(field(page, "train", "gpus")).to_be_hidden()  # a lab without GPUs
    lora = field(page, "train", "lora_r")
    expect(lora).to_be_visible()  # lora is the default method
    choose(page, "train", "method", "full")
    expect(lora).to_be_hidden()
    choose(page, "train", "method", "lora")
    expect(lora).to_be_visible()
    # the learning rate is a number box holding 2e-4, not a 0-1 slider
    rate = train.get_by_label("learning rate", exact=True)
    expect(rate).to_have_attribute("type", "number")
    assert float(rate.input_value()) == pytest.approx(2e-4)

    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                            for i in range(4)))
    with page.expect_file_chooser() as chooser:  # the data field's Upload button
        page.locator("#upload-train-data").click()
    chooser.value.set_files(str(rows))
    data = page.locator("#upload-train-data").locator("xpath=..").get_by_role("textbox")
    expect(data).to_have_value(re.compile(r"/uploads/[0-9a-f]{8}-pairs\.jsonl$"))
    kept = data.input_value()
    assert open(kept).read() == rows.read_text()
    shot(page, "5-train-upload", at=data)
    train.get_by_role("button", name="Show YAML / CLI").click()
    expect(train.locator(".cm-content")).to_contain_text("pairs.jsonl")
    expect(train.locator(".cm-content")).not_to_contain_text("gpus")
    open_advanced = train.locator("#advanced-train").get_by_text("Advanced").first
    open_advanced.click()
    expect(field(page, "train", "cpu_processes")).to_be_visible()
    expect(field(page, "train", "distributed")).to_be_hidden()
    shot(page, "6-train-advanced-and-yaml", at=train.locator(".cm-content"))
