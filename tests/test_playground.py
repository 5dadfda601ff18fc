"""The Playground: ops/generate.py (loading, chat templates, seeded token-by-token sampling,
adapters applied unmerged), the server-side checks of app/playground.py, and its worker
process (streaming, reuse of loaded models, Stop, idle exit, crashes)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_for


# ---------------------------------------------------------------------------------- fixtures
def make_child(tiny_model_dir: Path, out: Path, seed: int = 1,
               max_positions: int | None = None) -> Path:
    """A sibling of the tiny model: the same tokenizer, other weights (and optionally a longer
    context), as a merge or fine-tune of it would be."""
    from transformers import AutoTokenizer

    from ops.tiny_llama import build_llama, llama_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = llama_config(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=64, max_positions=max_positions or 256)
    build_llama(config, seed=seed).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_adapter(base_dir: Path, out: Path) -> Path:
    """A LoRA adapter (peft) on the tiny model, with non-zero B so that it changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                                "v_proj"],
                                            init_lora_weights=False))
    lora.save_pretrained(out)
    return out


def register(lab, path: Path, name: str, relation: str = "import", parents=()) -> dict:
    from app.checkpoints import row_fields
    from registry import inspect_checkpoint

    info = inspect_checkpoint(path)
    with lab.registry() as reg:
        return reg.add_checkpoint(name=name, relation=relation, path=info.path,
                                  parents=[dict(p) for p in parents], created_by="test",
                                  **row_fields(info))


@pytest.fixture(scope="module")
def family(tiny_model_dir, tmp_path_factory):
    """A lab holding the tiny model, a child of it, a long-context model and a LoRA adapter
    on the tiny model: {"lab", "base", "child", "long", "adapter"} (rows)."""
    from app.lab import Lab

    root = tmp_path_factory.mktemp("playground")
    lab = Lab(root / "lab")
    base = register(lab, tiny_model_dir, "tiny")
    child = register(lab, make_child(tiny_model_dir, root / "child"), "tiny-child",
                     "finetune", [{"id": base["id"]}])
    long = register(lab, make_child(tiny_model_dir, root / "long", seed=2,
                                    max_positions=4096), "tiny-long")
    adapter = register(lab, make_adapter(tiny_model_dir, root / "adapter"), "tiny-lora",
                       "adapter", [{"id": base["id"], "role": "base"}])
    yield {"lab": lab, "base": base, "child": child, "long": long, "adapter": adapter}
    from app.playground import playground

    playground(lab).shutdown()


def collect(views):
    """Each yielded View as a snapshot (a View is updated in place as events arrive)."""
    return [(v.status, [(b.status, b.text, list(b.notes)) for b in v.boxes]) for v in views]


def settings(**overrides):
    values = {"mode": "Completion", "prompt": "The river", "temperature": 0, "top_p": 1,
              "top_k": 0, "max_new_tokens": 24, "seed": 0}
    values.update(overrides)
    return values


def run(lab, ck_ids, min_interval=0.05, **overrides):
    from app.playground import generate

    s = settings(**overrides)
    return collect(generate(lab, None, ck_ids, s["mode"], s["prompt"], s["temperature"],
                            s["top_p"], s["top_k"], s["max_new_tokens"], s["seed"],
                            min_interval=min_interval))


def greedy_reference(folder: Path, prompt: str, max_new_tokens: int) -> str:
    """transformers' own greedy generate, not streamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    batch = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------------------- ops/generate
def test_greedy_stream_is_transformers_greedy_token_for_token(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from ops import generate

    loaded = generate.load(tiny_model_dir)
    ids = generate.encode(loaded, "The river", templated=False)
    steps = list(generate.stream(loaded, ids, generate.Sampling(max_new_tokens=30)))
    finished = steps[-1]
    assert isinstance(finished, generate.Finished) and finished.reason == "length"
    assert [s.token_id for s in steps[:-1]] == finished.tokens and len(finished.tokens) == 30
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=30, pad_token_id=0)
    assert ref[0, ids.shape[1]:].tolist() == finished.tokens
    assert "".join(s.delta for s in steps[:-1]) == steps[-2].full


def test_sampling_is_seeded_per_stream(tiny_model_dir):
    from ops import generate

    loaded = generate.load(tiny_model_dir)

    def sample(seed, **kw):
        return generate.generate_text(loaded, "The river", generate.Sampling(
            max_new_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=seed, **kw))[1]

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    stopped = generate.generate_text(loaded, "The river", generate.Sampling(max_new_tokens=20),
                                     should_stop=lambda: True)
    assert stopped == ("", [], "stopped")


def test_chat_mode_uses_the_template_or_says_it_has_none(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from ops import generate

    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    text, templated, note = generate.format_prompt(plain, "hello", "chat")
    assert (text, templated) == ("hello", False) and "no chat template" in note
    assert generate.format_prompt(plain, "hello", "completion") == ("hello", False, None)
    plain.chat_template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n"
                           "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    text, templated, note = generate.format_prompt(plain, "hello", "chat")
    assert text == "<s>[user] hello\n[assistant] " and templated and note is None


def test_an_adapter_is_applied_unmerged_on_its_base(family):
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from ops import generate

    base_path, adapter_path = family["base"]["path"], family["adapter"]["path"]
    loaded = generate.load(adapter_path, base_path)
    assert loaded.is_adapter and isinstance(loaded.model, PeftModel)
    layers = [m for m in loaded.model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4 and not any(m.merged for m in layers)  # 2 layers x q, v
    ids = generate.encode(loaded, "The river", templated=False)
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                       adapter_path).merge_and_unload().eval()
    with torch.no_grad():
        got, plain, folded = (m(ids).logits for m in (loaded.model, base, merged))
    assert not torch.allclose(got, plain, atol=1e-4)  # the adapter counts
    assert torch.allclose(got, folded, atol=1e-4)  # and is the adapter the base was given
    with pytest.raises(generate.GenerateError, match="base checkpoint is needed"):
        generate.load(adapter_path)


# ----------------------------------------------------------------------- app/playground checks
def test_hostile_inputs_are_refused_with_the_field_named(family):
    from app.playground import PlaygroundError, check_request

    lab, ck = family["lab"], family["base"]["id"]
    good = settings()

    def refused(ck_ids=(ck,), **overrides):
        s = dict(good, **overrides)
        with pytest.raises(PlaygroundError) as e:
            check_request(lab, None, list(ck_ids) if not isinstance(ck_ids, str) else ck_ids,
                          s["mode"], s["prompt"], s["temperature"], s["top_p"], s["top_k"],
                          s["max_new_tokens"], s["seed"])
        assert "Traceback" not in str(e.value)
        return str(e.value)

    assert "field 'prompt': holds control characters (U+0000)" in refused(prompt="hi\x00there")
    assert "field 'max_new_tokens': got 1000000000000; expected a whole number from 1 to " \
           "1024" in refused(max_new_tokens=10 ** 12)
    assert "field 'temperature': got -1; expected a number from 0" in refused(temperature=-1)
    assert "field 'checkpoints': unknown checkpoint 'nope'" in refused(ck_ids=["nope"])
    markup = "<img src=x onerror=alert(1)>"
    assert f"unknown checkpoint {markup!r}" in refused(ck_ids=[markup])
    assert "field 'temperature'" in refused(temperature=float("nan"))
    assert "field 'top_p': got 0" in refused(top_p=0)
    assert "field 'top_k'" in refused(top_k=2.5)
    assert "field 'seed'" in refused(seed=-3)
    assert "field 'seed'" in refused(seed=True)
    assert "field 'max_new_tokens': got 'lots'" in refused(max_new_tokens="lots")
    assert "field 'mode'" in refused(mode="<b>Chat</b>")
    assert "field 'prompt': empty" in refused(prompt="   ")
    assert "field 'prompt': 9000 characters" in refused(prompt="a" * 9000)
    assert "field 'checkpoints': 4 picked; expected one to 3" in refused(
        ck_ids=[ck, family["child"]["id"], family["long"]["id"], family["adapter"]["id"]])
    assert "field 'checkpoints': 0 picked" in refused(ck_ids=[])
    assert "field 'checkpoints': got" in refused(ck_ids=[{"id": ck}])
    request = check_request(lab, None, [ck, family["base"]["name"]], "Chat", "hello\nthere",
                            "0.5", 1, 0, 12.0, 7)  # a name and an id of one checkpoint: once
    assert [t.id for t in request.targets] == [ck] and request.mode == "chat"
    assert request.sampling == {"temperature": 0.5, "top_p": 1.0, "top_k": 0,
                                "max_new_tokens": 12, "seed": 7}


def test_an_adapter_resolves_to_its_registered_base(family):
    from app.playground import resolve

    (target,) = resolve(family["lab"], None, [family["adapter"]["id"]])
    assert target.path == family["adapter"]["path"] and target.base == family["base"]["path"]
    assert target.spec()["key"] != resolve(family["lab"], None, [family["base"]["id"]])[0] \
        .spec()["key"]


def test_remote_only_missing_and_deleted_checkpoints_are_refused(family, tmp_path):
    from app.auth import soft_delete
    from app.playground import PlaygroundError, resolve

    lab = family["lab"]
    gone = register(lab, make_child(Path(family["base"]["path"]), tmp_path / "gone"), "gone")
    shutil.rmtree(tmp_path / "gone")
    deleted = register(lab, make_child(Path(family["base"]["path"]), tmp_path / "del"), "del")
    with lab.registry() as reg:
        remote = reg.add_checkpoint(name="far", relation="import", source="hf://org/far")
        soft_delete(reg, deleted["id"], "test", "checkpoint.delete", {})
    for row, expected in ((gone, "the folder of gone"), (remote, "has no local files (it lives "
                          "on the Hub as org/far; bring it here with `weightsmith import "
                          "org/far`)"), (deleted, "was deleted")):
        with pytest.raises(PlaygroundError, match="field 'checkpoints'") as e:
            resolve(lab, None, [row["id"]])
        assert expected in str(e.value)


def test_a_lab_with_users_serves_members_only(family):
    from app.auth import add_user
    from app.playground import PlaygroundError, resolve
    from app.lab import Lab

    lab = Lab(family["lab"].root.parent / "shared-lab")
    ck = register(lab, Path(family["base"]["path"]), "tiny")
    add_user(lab, "alice", "correct horse battery")
    with pytest.raises(PlaygroundError, match="log in first"):
        resolve(lab, None, [ck["id"]])
    assert resolve(lab, "alice", [ck["id"]])[0].id == ck["id"]


def test_defaults_are_the_checkpoint_and_its_parents(family):
    from app.playground import playground_defaults

    lab, base, child = family["lab"], family["base"], family["child"]
    assert playground_defaults(lab, child["id"]) == [child["id"], base["id"]]
    assert playground_defaults(lab, "tiny-child") == [child["id"], base["id"]]
    assert playground_defaults(lab, base["id"]) == [base["id"]]
    assert playground_defaults(lab, "nope") == [] and playground_defaults(lab, None) == []


def test_a_refusal_reaches_the_page_as_a_message(family):
    from app.ui.playground_view import playground_generate

    (updates,) = list(playground_generate(family["lab"], ["nope"], "Chat", "hi", 0, 1, 0,
                                          10, 0))
    assert updates[1].startswith("**Not generated: field 'checkpoints': unknown checkpoint")


@pytest.mark.slow
def test_importing_the_playground_loads_no_torch():
    code = ("import sys, app.playground, app.ui.playground_view, app.ui; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'peft')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------ the worker
@pytest.mark.slow
def test_streams_side_by_side_like_greedy_generate_and_keeps_models_loaded(family):
    from app.playground import playground

    lab, base, child = family["lab"], family["base"], family["child"]
    # no batching of the worker's events into 50 ms views: on a fast machine 40 tiny-model
    # tokens come in two or three such views, and the test would measure the machine
    views = run(lab, [base["id"], child["id"]], max_new_tokens=40, min_interval=0)
    status, boxes = views[-1]
    assert status.startswith("done")
    texts = [b[1] for b in boxes]
    assert texts == [greedy_reference(Path(r["path"]), "The river", 40) for r in (base, child)]
    assert texts[0] != texts[1]  # other weights, other text
    # streamed: several growing snapshots of each box, both boxes filling in the same views
    for i in range(2):
        snapshots = [v[1][i][1] for v in views]
        assert len(set(snapshots)) >= 3, snapshots
        assert all(b.startswith(a) for a, b in zip(snapshots, snapshots[1:]))
    assert any(0 < len(v[1][0][1]) < len(texts[0]) and 0 < len(v[1][1][1]) < len(texts[1])
               for v in views)
    assert "40 tokens (max new tokens reached" in boxes[0][0]
    loads = playground(lab).stats()["loads"]
    assert "models loaded by this worker so far" in status
    pid = playground(lab).worker_pid()
    again = run(lab, [child["id"], base["id"]], prompt="Another prompt", max_new_tokens=5)
    assert again[-1][0].startswith("done")
    stats = playground(lab).stats()
    assert stats["loads"] == loads and stats["pid"] == pid  # no reload, same worker
    assert len(stats["loaded"]) == 2


@pytest.mark.slow
def test_the_same_seed_gives_the_same_sample(family):
    lab, ck = family["lab"], family["base"]["id"]
    sampled = dict(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=30)
    first, second = (run(lab, [ck], seed=1234, **sampled)[-1][1][0][1] for _ in range(2))
    other = run(lab, [ck], seed=99, **sampled)[-1][1][0][1]
    assert first == second and first != other


@pytest.mark.slow
def test_chat_mode_without_a_template_says_so_on_the_box(family):
    views = run(family["lab"], [family["base"]["id"]], mode="Chat", max_new_tokens=3)
    notes = views[-1][1][0][2]
    assert any("no chat template" in n and "plain completion" in n for n in notes)


@pytest.mark.slow
def test_an_adapter_generates_through_the_worker(family):
    views = run(family["lab"], [family["adapter"]["id"], family["base"]["id"]],
                max_new_tokens=12)
    status, boxes = views[-1]
    assert status.startswith("done") and boxes[0][1] and boxes[0][1] != boxes[1][1]
    assert "adapter on tiny" in _titles(family, [family["adapter"]["id"]])[0]


def _titles(family, ids):
    from app.playground import _title, resolve

    return [_title(t) for t in resolve(family["lab"], None, ids)]


@pytest.mark.slow
def test_stop_ends_a_long_generation_quickly_and_a_second_request_waits(family):
    from app.playground import generate, playground

    lab, ck = family["lab"], family["long"]["id"]
    long = generate(lab, None, [ck], "Completion", "The river", 0, 1, 0, 1024, 0)
    view = next(long)
    first = wait_for(lambda: (v := next(long)) and v.boxes[0].text and v, 60,
                     what="the first tokens")
    waiting = []
    second = threading.Thread(target=lambda: waiting.extend(
        run(lab, [family["base"]["id"]], max_new_tokens=3)))
    second.start()
    wait_for(lambda: waiting or any(r.id != view.run_id for r in
                                    list(playground(lab).runs.values())), 10,
             what="the second request")
    assert playground(lab).stop(first.run_id)
    t = time.monotonic()
    for view in long:
        pass
    assert time.monotonic() - t < 3.0
    assert view.status.startswith("stopped")
    tokens, rest = view.boxes[0].status.split(" ", 1)
    assert 0 < int(tokens) < 1024 and rest.startswith("tokens (stopped")
    assert view.boxes[0].text
    second.join(60)
    assert any(s.startswith("waiting: another generation is running") for s, _ in waiting)
    assert waiting[-1][0].startswith("done")


@pytest.mark.slow
def test_closing_the_stream_stops_the_run(family):
    from app.playground import generate, playground

    lab = family["lab"]
    stream = generate(lab, None, [family["long"]["id"]], "Completion", "The river", 0, 1,
                      0, 1024, 0)
    run_id = next(stream).run_id
    wait_for(lambda: next(stream).boxes[0].text, 60, what="the first tokens")
    stream.close()  # a page that went away
    wait_for(lambda: run_id not in playground(lab).runs, 5, what="the run to end")


@pytest.mark.slow
def test_a_crashed_worker_gives_a_message_and_the_next_request_a_fresh_worker(family):
    from app.playground import generate, playground

    lab, ck = family["lab"], family["long"]["id"]
    pg = playground(lab)
    stream = generate(lab, None, [ck], "Completion", "The river", 0, 1, 0, 1024, 0)
    next(stream)
    wait_for(lambda: next(stream).boxes[0].text, 60, what="the first tokens")
    pid, started = pg.worker_pid(), pg.started
    os.kill(pid, signal.SIGKILL)
    for view in stream:
        pass
    assert "the playground worker stopped unexpectedly (exit code -9)" in view.status
    assert "The next Generate starts a fresh worker" in view.status
    assert view.boxes[0].status == "interrupted"
    again = run(lab, [family["base"]["id"]], max_new_tokens=3)
    assert again[-1][0].startswith("done")
    assert pg.started == started + 1 and pg.worker_pid() != pid


@pytest.mark.slow
def test_the_idle_timeout_ends_the_worker(family, monkeypatch):
    from app import playground as pg

    monkeypatch.setattr(pg, "IDLE_SECONDS", 1.5)
    lab = family["lab"]
    own = pg.Playground(lab)  # a Playground of its own: the module's keeps its worker
    monkeypatch.setitem(pg._PLAYGROUNDS, lab.root, own)
    assert run(lab, [family["base"]["id"]], max_new_tokens=3)[-1][0].startswith("done")
    proc = own.worker.proc
    assert wait_for(lambda: proc.poll() is not None, 30, what="the idle exit") is not None
    assert proc.returncode == 0 and own.worker_pid() is None
    assert run(lab, [family["base"]["id"]], max_new_tokens=3)[-1][0].startswith("done")
    assert own.started == 2
    own.shutdown()


def test_worker_protocol_ignores_garbage_lines(tmp_path):
    """The worker reads requests as JSON objects; anything else is skipped, never fatal."""
    from app.playground_worker import Worker

    out = tmp_path / "out.jsonl"
    with open(out, "w") as f:
        worker = Worker(f, 1, "cpu")
        worker.read_stdin(iter(["not json\n", "[1, 2]\n", json.dumps({"op": "stats"}) + "\n"]))
        assert worker.serve(0.1) == 0
    (line,) = out.read_text().splitlines()
    assert json.loads(line)["event"] == "stats" and json.loads(line)["loads"] == 0
