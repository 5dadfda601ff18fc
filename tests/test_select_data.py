"""select_data: LESS (ops/less.py) on tensors; the plugin through an in-memory job context on
the tiny model; and the miniature of the issue on the demo model (slow): a pool of the demo
suite's formats and distractors, eight sums examples as targets."""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import plugins
from ops import less
from plugins import ConfigError, validate_config
from tests.conftest import REPO

SUITE = REPO / "assets" / "suites" / "demo"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the gradients are taken one short example at a time, and on a
    shared 2-core machine torch's thread pool makes such small matrix products about 20
    times slower (measured: 0.21 s against 0.01 s per gradient on the tiny model)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------- a job context
@dataclass
class Opened:
    id: str
    name: str
    path: Path
    metadata: dict = field(default_factory=dict)

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def load_model(self, device=None, dtype=None, **kw):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).to(device or "cpu")

    def load_tokenizer(self, **kw):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)


class FakeCtx:
    """The job context, in memory: what run() logged, measured, registered and suggested."""

    def __init__(self, tmp: Path, model_dir: Path):
        self.tmp, self.model_dir = tmp, model_dir
        self.work_dir = tmp / "job"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = tmp / "cache"
        self.device, self.job_id, self.rank, self.world_size = "cpu", "job-1", 0, 1
        self.messages, self.metrics, self.progressed = [], [], []
        self.datasets, self.suggestions = [], []

    def open(self, ref):
        return Opened(id="ck-base", name="base", path=self.model_dir)

    def log(self, message):
        self.messages.append(message)

    def progress(self, fraction, message="", total=None):
        self.progressed.append(fraction)

    def metric(self, name, value, step=None):
        self.metrics.append((name, value, step))

    def new_dataset(self, path, name, metadata=None):
        kept = self.tmp / "datasets" / Path(path).name
        kept.parent.mkdir(exist_ok=True)
        Path(path).rename(kept)  # moved into the lab, as the app does
        self.datasets.append({"id": f"ds-{len(self.datasets)}", "name": name, "path": kept,
                              "metadata": metadata or {}})
        return {k: self.datasets[-1][k] for k in ("id", "name", "path")}

    def suggest(self, plugin, config, label):
        self.suggestions.append((plugin, config, label))


def plugin():
    return plugins.discover()["select_data"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_sum(row: dict) -> bool:
    return " plus " in row["prompt"] and row["prompt"].startswith("Question: What is")


# ------------------------------------------------------------------------ the pieces
def test_the_adam_feature_is_the_step_adamw_would_take():
    """Gamma(z) (the paper's Eq. 2) equals (theta - theta') / lr for the step torch's Adam
    takes from the checkpoint's moments with z's gradient alone."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50))
    opt = torch.optim.Adam([p], lr=0.01, betas=less.ADAM_BETAS, eps=less.ADAM_EPS)
    for _ in range(3):
        p.grad = torch.randn(50)
        opt.step()
    state = opt.state[p]
    checkpoint = less.WarmupCheckpoint(
        step=int(state["step"]), weights={}, exp_avg=state["exp_avg"].clone(),
        exp_avg_sq=state["exp_avg_sq"].clone(), learning_rate=0.01, loss=0.0)
    g = torch.randn(50)
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    step = (before - p.detach()) / 0.01
    feature = less.adam_feature(g[None], checkpoint)[0]
    assert torch.allclose(feature, step, rtol=1e-4, atol=1e-5)
    # unlike the plain gradient: Adam divides by the moments' scale
    assert torch.nn.functional.cosine_similarity(feature, g, dim=0) < 0.99


def test_the_projection_is_seeded_blockwise_and_keeps_angles():
    x = torch.randn(6, 5000)
    whole = less.RandomProjection(5000, 512, seed=3, block_rows=5000)
    blocks = less.RandomProjection(5000, 512, seed=3, block_rows=5000, cache_bytes=0)
    assert blocks.cache is None and whole.cache is not None
    assert torch.equal(whole(x), whole(x)) and torch.equal(blocks(x), whole(x))
    assert set(whole.block(0).unique().tolist()) == {-1.0, 1.0}
    other = less.RandomProjection(5000, 512, seed=4, block_rows=5000)
    assert not torch.equal(other(x), whole(x))
    # memory-bounded: blocks of 1000 rows (a different matrix, the same guarantee)
    small = less.RandomProjection(5000, 512, seed=3, block_rows=1000, cache_bytes=0)
    assert small.block(4).shape == (1000, 512)
    for proj in (whole, small, less.RandomProjection(5000, 512, seed=3, kind="gaussian")):
        y = proj(x)
        cos_x = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
        cos_y = torch.nn.functional.normalize(y, dim=1) @ torch.nn.functional.normalize(y, dim=1).T
        assert (cos_x - cos_y).abs().max() < 4 / math.sqrt(512)
        assert abs(y.norm(dim=1) / x.norm(dim=1) - 1).max() < 0.2
    with pytest.raises(less.LessError, match="5000"):
        whole(torch.randn(2, 4999))


def test_checkpoints_weights_and_the_kept_fraction():
    assert less.checkpoint_steps(20, 4) == [5, 10, 15, 20]
    assert less.checkpoint_steps(7, 1) == [7]
    with pytest.raises(less.LessError, match="checkpoints: got 9; expected 1 to 8"):
        less.checkpoint_steps(8, 9)
    assert less.checkpoint_weights([3e-4, 1e-4]) == pytest.approx([0.75, 0.25])
    lrs = [less.linear_schedule(s, 100, 3, 1e-3) for s in range(100)]
    assert lrs[2] == pytest.approx(1e-3) and lrs[0] < lrs[1] < lrs[2]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] > 0
    scores = torch.tensor([0.1, 0.5, -math.inf, 0.5, 0.3, 0.2, 0.0, -0.1, 0.4, 0.05])
    assert less.top_fraction(scores, 0.3) == [1, 3, 8]  # ties by index
    assert less.top_fraction(scores, 0.01) == [1]       # at least one row
    assert 2 not in less.top_fraction(scores, 1.0)      # nothing to learn: never kept
    with pytest.raises(less.LessError, match="fraction"):
        less.top_fraction(scores, 0)


def test_warmup_keeps_the_optimizer_moments_and_the_scores_rank_like_examples(
        tiny_model_dir):
    """On the tiny model with a LoRA: the warm-up keeps a checkpoint at each step asked
    (weights that moved, Adam's moments of every LoRA parameter); a candidate identical to a
    target scores highest, and an unlearnable one -inf."""
    from transformers import AutoModelForCausalLM

    from ops.training import PadCollator, lora_wrap

    torch.manual_seed(0)
    model = lora_wrap(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=4, alpha=8,
                      dropout=0.0, target_modules=["q_proj", "v_proj"])
    rng = random.Random(0)
    examples = [{"input_ids": [rng.randrange(5, 300) for _ in range(12)]} for _ in range(12)]
    for e in examples:
        e["labels"] = [-100] * 6 + e["input_ids"][6:]
    collate = PadCollator(0)
    batches = (collate(examples[i:i + 4]) for _ in range(3) for i in range(0, 12, 4))
    kept = less.warmup_lora(model, batches, 9, 1e-2, [3, 9])
    assert [c.step for c in kept] == [3, 9]
    dim = sum(p.numel() for _, p in less.trainable_parameters(model))
    assert kept[0].exp_avg.shape == kept[0].exp_avg_sq.shape == (dim,)
    assert (kept[1].exp_avg_sq > 0).any() and kept[0].learning_rate > kept[1].learning_rate
    name = next(n for n in kept[0].weights if "lora_B" in n)
    assert not torch.equal(kept[0].weights[name], kept[1].weights[name])  # it trained
    with pytest.raises(less.LessError, match="gave 2 batches; 5 were needed"):
        less.warmup_lora(model, iter([collate(examples[:4])] * 2), 5, 1e-3, [5])

    silent = {"input_ids": examples[0]["input_ids"], "labels": [-100] * 12}
    candidates = [examples[7], examples[0], silent, examples[5]]
    scores = less.less_scores(model, candidates, [examples[0]], kept)
    assert scores[2] == -math.inf
    assert int(torch.argmax(scores)) == 1
    with pytest.raises(less.LessError, match="targets: row 0 has no learned token"):
        less.less_scores(model, candidates, [silent], kept)


# ------------------------------------------------------------------------ the config
EXAMPLE = {"checkpoint": "ck-12345678", "pool": "pool.jsonl", "targets": "targets.jsonl",
           "fraction": 0.05, "projection_dim": 1024, "checkpoints": 4, "name": "pool-less"}


@pytest.mark.parametrize("change, message", [
    ({"fraction": 0}, "field 'fraction': got 0; expected: input should be greater than 0"),
    ({"fraction": 1.5}, "field 'fraction': got 1.5; expected: input should be less than or "
                        "equal to 1"),
    ({"warmup_fraction": -0.1}, "field 'warmup_fraction'"),
    ({"checkpoints": 0}, "field 'checkpoints': got 0"),
    ({"projection_dim": 10 ** 6}, "field 'projection_dim': got 1000000"),
    ({"name": "../etc/passwd"}, "field 'name': got '../etc/passwd'; expected: value error, "
                                "letters, digits"),
    ({"target_modules": ["q_proj", "x; rm"]}, "field 'target_modules'"),
    ({"targets": "pool.jsonl"}, "targets: the same data as pool"),
    ({"pool": "a\x00b"}, "field 'pool'.*control characters"),
])
def test_bad_settings_are_refused_naming_the_field(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       if ".*" not in message else message):
        validate_config(plugin(), {**EXAMPLE, **change})


def test_pool_and_targets_are_data_fields():
    """Marked DataRef like train's data: the form gives Upload and the dataset dropdown, and
    submit records both as the job's input datasets."""
    props = plugin().Config.model_json_schema()["properties"]
    assert props["pool"]["x-weightsmith"] == props["targets"]["x-weightsmith"] == "data"
    assert props["checkpoint"]["x-weightsmith"] == "checkpoint"


# ----------------------------------------------------------------- the plugin, end to end
def small_pool(tmp_path: Path) -> tuple[Path, Path]:
    rows = [json.loads(line) for line in (SUITE / "train_capitals.jsonl").read_text()
            .splitlines()]
    sums = [json.loads(line) for line in (SUITE / "train_sums.jsonl").read_text().splitlines()]
    rows += sums[:16]
    random.Random(0).shuffle(rows)
    pool = tmp_path / "pool.jsonl"
    # odd spacing and key order: kept byte for byte
    pool.write_text("".join(json.dumps(r, indent=None, separators=(",", ":")) + "\n\n"
                            for r in rows))
    return pool, write_jsonl(tmp_path / "targets.jsonl", sums[100:104])


def test_run_registers_the_best_rows_verbatim_with_their_lineage(tmp_path, tiny_model_dir):
    pool, targets = small_pool(tmp_path)
    ctx = FakeCtx(tmp_path, tiny_model_dir)
    config = validate_config(plugin(), {
        "checkpoint": "base", "pool": str(pool), "targets": str(targets), "fraction": 0.25,
        "warmup_fraction": 0.25, "batch_size": 5, "checkpoints": 2, "warmup_epochs": 2,
        "projection_dim": 64, "learning_rate": 1e-3})
    plugin().run(config, ctx)
    (ds,) = ctx.datasets
    assert ds["name"] == "pool-less-25pct" and ds["path"].suffix == ".jsonl"
    lines = ds["path"].read_text().splitlines()
    pool_lines = [line for line in pool.read_text().splitlines() if line]
    assert len(lines) == 10 and set(lines) <= set(pool_lines)  # 25% of 40, verbatim
    assert lines == [line for line in pool_lines if line in lines]  # in pool order
    meta = ds["metadata"]
    assert meta["pool"] == str(pool) and meta["targets"] == str(targets)
    assert meta["fraction"] == 0.25 and meta["projection_dim"] == 64 and meta["seed"] == 0
    assert meta["pool_rows"] == 40 and meta["rows"] == 10 and len(meta["pool_sha256"]) == 64
    assert [c["step"] for c in meta["warmup"]["checkpoints"]] == [2, 4]
    assert sum(c["weight"] for c in meta["warmup"]["checkpoints"]) == pytest.approx(1)
    assert meta["scores"]["selected_min"] >= meta["scores"]["mean"]
    assert sum(b["rows"] for b in meta["scores"]["histogram"]) == 40
    kept = [pool_lines.index(line) for line in lines]
    assert sorted(meta["selected_rows"]) == kept
    (suggested,) = ctx.suggestions
    assert suggested[0] == "train" and suggested[1]["data"] == ds["id"]
    assert validate_config(plugins.discover()["train"], suggested[1])
    assert ctx.progressed == sorted(ctx.progressed) and ctx.progressed[-1] == 1.0
    names = {m[0] for m in ctx.metrics}
    assert {"warmup_loss", "score_by_rank", "selected_min_score"} <= names
    assert any(m.startswith("  #1 row ") for m in ctx.messages)
    assert any(m.startswith("score histogram: ") for m in ctx.messages)
    assert not list(ctx.work_dir.glob(".*tmp*"))  # nothing half-written left behind


def test_a_csv_pool_gives_a_csv_selection_and_bad_data_names_its_field(tmp_path,
                                                                      tiny_model_dir):
    import csv

    rows = [json.loads(line) for line in (SUITE / "train_sums.jsonl").read_text()
            .splitlines()][:12]
    pool = tmp_path / "pool.csv"
    with open(pool, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    targets = write_jsonl(tmp_path / "t.jsonl", rows[:2])
    ctx = FakeCtx(tmp_path, tiny_model_dir)
    base = {"checkpoint": "base", "pool": str(pool), "targets": str(targets),
            "fraction": 0.5, "warmup_fraction": 0.5, "checkpoints": 1, "warmup_epochs": 1,
            "projection_dim": 0, "name": "half"}
    plugin().run(validate_config(plugin(), base), ctx)
    (ds,) = ctx.datasets
    assert ds["path"].name == "half.csv" and ds["metadata"]["projection_dim"] == 0
    with open(ds["path"], newline="") as fh:
        got = list(csv.DictReader(fh))
    assert len(got) == 6 and all(r in rows for r in got)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "x"}])
    with pytest.raises(ValueError, match="targets: missing column .prompt. for data_format "
                                         "prompt_completion"):
        plugin().run(validate_config(plugin(), {**base, "targets": str(bad)}), ctx)
    with pytest.raises(ValueError, match="checkpoints: got 5; expected 1 to 1"):
        plugin().run(validate_config(plugin(), {**base, "checkpoints": 5}), ctx)


def test_preview_counts_the_rows_and_the_work(tmp_path):
    from types import SimpleNamespace

    pool, targets = small_pool(tmp_path)
    config = validate_config(plugin(), {"checkpoint": "base", "pool": str(pool),
                                        "targets": str(targets), "checkpoints": 2})
    text = plugin().preview(config, SimpleNamespace(cache_dir=tmp_path / "cache"))
    assert "**pool** 40 rows · format **prompt_completion**" in text
    assert "**targets** 4 rows" in text and "(88 backward passes)" in text
    assert "keeps the best 2 rows (5.0%)" in text


def test_a_lab_job_registers_the_selection_with_pool_and_targets_as_its_sources(
        lab, tiny_model_dir, tmp_path):
    """Through the lab: submit records pool and targets as the datasets the job reads; the
    selection is registered as a dataset the job made, whose sources are the two; and the
    job offers a train job on it."""
    from app import jobs
    from app.checkpoints import import_checkpoint
    from tests.test_jobs import run_to_end

    pool, targets = small_pool(tmp_path)
    with lab.registry() as reg:
        import_checkpoint(lab, reg, str(tiny_model_dir), name="tiny")
    job = jobs.submit(lab, "select_data", {
        "checkpoint": "tiny", "pool": str(pool), "targets": str(targets), "fraction": 0.25,
        "checkpoints": 1, "warmup_epochs": 1, "projection_dim": 64, "name": "chosen"})
    assert run_to_end(lab, job["id"], timeout=300) == "succeeded"
    with lab.registry() as reg:
        (made,) = reg.datasets.made_by(job["id"])
        read = {row["field"]: row["id"] for row in reg.datasets.of_job(job["id"])}
        sources = {row["field"]: row["id"] for row in reg.datasets.sources(made["id"])}
        (offer,) = reg.job_suggestions(job["id"])
    assert made["name"] == "chosen" and made["rows"] == 10
    assert set(read) == {"pool", "targets"} and sources == read
    assert Path(made["path"]).read_text().splitlines()[0] in pool.read_text()
    assert offer["plugin"] == "train" and offer["config"]["data"] == made["id"]


# -------------------------------------------------------------- the miniature (slow)
def demo_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SUITE / name).read_text().splitlines()]


def miniature_pool(tmp_path: Path, seed: int = 0):
    """(pool, targets, held-out sums) files: a pool of 400 prompt/completion rows mixing
    the demo suite's capitals (24), colours (24, from the multiple-choice file's right
    answers) and sums (40) with 312 distractors (sentences of the demo corpus, cut before
    their last word); eight other sums as targets, 24 more held out for the loss."""
    from plugins.kit.assets import DEMO_CORPUS

    r = random.Random(seed)
    capitals = demo_rows("train_capitals.jsonl")
    colours = [{"prompt": row["context"], "completion": row["choices"][row["answer"]] + "\n"}
               for row in demo_rows("colours.jsonl")]
    sums = demo_rows("train_sums.jsonl")
    r.shuffle(sums)
    targets, heldout, pool_sums = sums[:8], sums[8:32], sums[32:72]
    sentences = sorted({s.strip() + "." for p in DEMO_CORPUS.read_text().split("\n\n")
                        for s in p.split(". ") if len(s.split()) >= 5 and '"' not in s
                        and " plus " not in s and " minus " not in s})
    distractors = []
    for s in r.sample(sentences, 312):
        head, last = s.rsplit(" ", 1)
        distractors.append({"prompt": head, "completion": " " + last + "\n"})
    pool = capitals + colours + pool_sums + distractors
    r.shuffle(pool)
    return (write_jsonl(tmp_path / "pool.jsonl", pool),
            write_jsonl(tmp_path / "targets.jsonl", targets), heldout)


MINIATURE = {"fraction": 0.05, "warmup_fraction": 0.05, "warmup_epochs": 4, "checkpoints": 4,
             "batch_size": 4, "learning_rate": 1e-3, "seed": 0}


@pytest.fixture(scope="module")
def miniature(tmp_path_factory, demo_model_dir):
    tmp = tmp_path_factory.mktemp("less")
    pool, targets, heldout = miniature_pool(tmp)
    ctx = FakeCtx(tmp, demo_model_dir)
    config = validate_config(plugin(), {"checkpoint": "demo", "pool": str(pool),
                                        "targets": str(targets), **MINIATURE})
    plugin().run(config, ctx)
    return {"tmp": tmp, "pool": read_jsonl(pool), "targets": read_jsonl(targets),
            "heldout": heldout, "selected": read_jsonl(ctx.datasets[0]["path"]),
            "model": demo_model_dir, "ctx": ctx}


@pytest.mark.slow
def test_less_keeps_mostly_sums_from_the_mixed_pool(miniature):
    """Measured (seed 0, the default 4096-dimension projection): 20 of 20 are sums; the pool
    is 10% sums."""
    selected, pool = miniature["selected"], miniature["pool"]
    share = sum(map(is_sum, selected)) / len(selected)
    print(f"\nLESS-5%: {sum(map(is_sum, selected))} of {len(selected)} rows are sums "
          f"({share:.0%}); the pool has {sum(map(is_sum, pool))} of {len(pool)}")
    assert len(selected) == 20
    assert share >= 0.8


def sums_loss_after_training(model_dir: Path, rows: list[dict], heldout: list[dict],
                             steps: int = 40, seed: int = 0) -> float:
    """Mean completion loss on the held-out sums after `steps` AdamW steps (batch 4, lr
    1e-3, LoRA r=8 on every linear layer) on `rows`: the same budget for every selection."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ops.training import PadCollator, encode_prompt_completion_batch, lora_wrap

    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = lora_wrap(AutoModelForCausalLM.from_pretrained(model_dir), r=8, alpha=16,
                      dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"])

    def encode(part):
        enc = encode_prompt_completion_batch(tok, [r["prompt"] for r in part],
                                             [r["completion"] for r in part], True, 128)
        return [dict(zip(enc, values)) for values in zip(*enc.values())]

    train, test = encode(rows), encode(heldout)
    collate = PadCollator(tok.pad_token_id if tok.pad_token_id is not None else 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    order, r = [], random.Random(seed)
    model.train()
    for _ in range(steps):
        if len(order) < 4:
            order += r.sample(range(len(train)), len(train))
        batch = collate([train[i] for i in order[:4]])
        del order[:4]
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return sum(model(**collate([t])).loss.item() for t in test) / len(test)


@pytest.mark.slow
def test_training_on_the_less_selection_lowers_the_sums_loss_more_than_random(miniature):
    """Measured: 1.30 after LESS-5%, against 1.50, 1.61 and 5.45 after three random 5%
    selections (9.12 before training)."""
    pool, heldout = miniature["pool"], miniature["heldout"]
    less_loss = sums_loss_after_training(miniature["model"], miniature["selected"], heldout)
    random_losses = [sums_loss_after_training(miniature["model"],
                                              random.Random(s).sample(pool, 20), heldout)
                     for s in range(3)]
    print(f"\nheld-out sums loss after 40 steps: LESS-5% {less_loss:.4f}; random-5% "
          + ", ".join(f"{x:.4f}" for x in random_losses))
    assert less_loss < min(random_losses)


@pytest.fixture(scope="module")
def rankings(miniature):
    """The pool's scores from the full LoRA gradients (57,344 values) and from a
    128-dimension Rademacher projection of them, at the same four warm-up checkpoints (a
    warm-up as the plugin's, on the miniature's settings)."""
    from transformers import AutoModelForCausalLM

    from ops.training import PadCollator, lora_wrap
    from plugins.select_data import Config, _encoded, _token_rows

    ctx = miniature["ctx"]
    config = Config(checkpoint="demo", pool=str(miniature["tmp"] / "pool.jsonl"),
                    targets=str(miniature["tmp"] / "targets.jsonl"), **MINIATURE,
                    max_length=512)
    tok = Opened("ck", "demo", miniature["model"]).load_tokenizer()
    pool = _token_rows(_encoded(config, ctx, tok, config.pool, "pool")[1])
    targets = _token_rows(_encoded(config, ctx, tok, config.targets, "targets")[1])
    torch.manual_seed(0)
    model = lora_wrap(AutoModelForCausalLM.from_pretrained(miniature["model"]), r=8,
                      alpha=32, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj",
                                                             "o_proj"])
    collate, r = PadCollator(tok.pad_token_id or 0), random.Random(0)
    warm = r.sample(range(len(pool)), 20)
    batches = [collate([pool[i] for i in warm[s:s + 4]]) for _ in range(4)
               for s in range(0, 20, 4)]
    kept = less.warmup_lora(model, batches, 20, 1e-3, less.checkpoint_steps(20, 4))
    dim = sum(p.numel() for _, p in less.trainable_parameters(model))
    with same_gradients_once():  # both rankings take the same 4 x 408 gradients
        full = less.less_scores(model, pool, targets, kept)
        projected = less.less_scores(model, pool, targets, kept,
                                     less.RandomProjection(dim, 128, seed=0))
    return {"full": full, "projected": projected, "dim": dim,
            "sums": [is_sum(row) for row in miniature["pool"]]}


@contextlib.contextmanager
def same_gradients_once():
    """Within the block, ops.less takes each example's gradient at each warm-up checkpoint
    once: a second less_scores over the same examples and checkpoints (another projection of
    the same gradients) gets the tensors the first computed, instead of the same backward
    passes again (half of `rankings`' time). Keyed by the checkpoint loaded (its step) and
    the example's tokens and labels; a gradient depends on nothing else here."""
    real_load, real_gradient = less.load_checkpoint, less.example_gradient
    loaded, done = {}, {}

    def load_checkpoint(model, checkpoint):
        loaded["step"] = checkpoint.step
        real_load(model, checkpoint)

    def example_gradient(model, params, example):
        key = (loaded["step"], tuple(int(t) for t in example["input_ids"]),
               tuple(int(t) for t in example["labels"]))
        if key not in done:
            done[key] = real_gradient(model, params, example)
        return done[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(less, "load_checkpoint", load_checkpoint)
        patch.setattr(less, "example_gradient", example_gradient)
        yield


@pytest.mark.slow
def test_a_128_dimension_projection_keeps_the_top_of_the_ranking(rankings):
    """What the selection needs: the 5% kept from the projected scores is mostly the 5% the
    full gradients keep, and as much sums. Measured: 18 of 20 shared, 20 of 20 sums."""
    from scipy.stats import spearmanr

    full, projected = rankings["full"], rankings["projected"]
    rho = spearmanr(full.numpy(), projected.numpy()).statistic
    top_full, top_projected = less.top_fraction(full, 0.05), less.top_fraction(projected, 0.05)
    overlap = len(set(top_full) & set(top_projected)) / len(top_full)
    share = sum(rankings["sums"][i] for i in top_projected) / len(top_projected)
    print(f"\nprojection to 128 of {rankings['dim']} dimensions: Spearman {rho:.4f} over the "
          f"pool; top-5% overlap {overlap:.0%}; sums in the projected top 5% {share:.0%}; "
          f"full scores' interquartile range {full.quantile(0.25):.4f} to "
          f"{full.quantile(0.75):.4f}, mean |projected - full| "
          f"{(projected - full).abs().mean():.4f}")
    assert overlap >= 0.8 and share >= 0.8


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "Measured on the demo model, not tuned away: the 128-dimension projection ranks the "
    "whole pool with a Spearman correlation of 0.68 against the full gradients (1024 "
    "dimensions: 0.70; 4096, the plugin's default: 0.94). Most of the pool (distractors) "
    "scores within a few hundredths of each other, less than a projection's error on a "
    "cosine (about 1/sqrt(d): 0.09 at 128), so their order is noise; the top of the "
    "ranking is kept (the test above). A seed per checkpoint instead of the paper's one "
    "projection: 0.72. strict: if this starts passing, update the README and this note."))
def test_a_128_dimension_projection_ranks_like_the_full_gradients(rankings):
    from scipy.stats import spearmanr

    assert spearmanr(rankings["full"].numpy(), rankings["projected"].numpy()).statistic > 0.9
