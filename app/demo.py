"""The demo lab: a few-million-parameter Llama and its BPE tokenizer, built and pre-trained
locally on the shipped corpus (about a minute on 2 CPU cores, once; cached in the lab)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from app.checkpoints import publish
from app.lab import Lab

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"
CORPUS = ASSETS / "corpus.txt"
HELDOUT = ASSETS / "heldout.txt"
DEMO_NAME = "demo-base"
DEFAULT_STEPS = 300
SUITE_DIR = ASSETS.parent / "suites" / "demo"
# Two fine-tunes of the demo base on two distinct skills of the demo suite, so a newcomer can
# merge them and see both scores on the merged model against its parents. Measured on the
# demo base (held-out perplexity 1.94): capitals acc 0.25 -> 1.00 (perplexity 2.51), sums
# exact match 0.00 -> 0.825 (perplexity 2.45); their task-arithmetic merge (weights 1, 1)
# scores 0.917 and 0.40. At a learning rate of 1e-3 the same fine-tunes forget far more
# (perplexity 82 and 349).
SKILLS = {
    "demo-ft-capitals": {"data": "train_capitals.jsonl", "epochs": 40},
    "demo-ft-sums": {"data": "train_sums.jsonl", "epochs": 20},
}
LAB_TOML = """# Lab settings (see the README's "Lab settings"). The demo lab evaluates every new
# checkpoint on the built-in demo suite; set auto_eval = false to switch it off.
auto_eval = true
"""


def skill_config(name: str, base: str = DEMO_NAME) -> dict:
    skill = SKILLS[name]
    return {"checkpoint": base, "data": str(SUITE_DIR / skill["data"]), "method": "full",
            "epochs": skill["epochs"], "learning_rate": 3e-4, "batch_size": 8,
            "save_steps": 0, "name": name}


def queue_demo_skills(lab: Lab) -> list[dict]:
    """Queue the skill fine-tunes the lab does not have yet (nor has queued or running)."""
    from app.jobs import submit

    out = []
    with lab.registry() as reg:
        pending = {json.loads(j["config"]).get("name") for j in reg.jobs(limit=1000)
                   if j["plugin"] == "train" and j["status"] in ("queued", "running")}
        missing = [n for n in SKILLS if reg.find_checkpoint(n) is None and n not in pending]
    for name in missing:
        out.append(submit(lab, "train", skill_config(name), user="demo"))
    return out


def build_demo(lab: Lab, *, force: bool = False, pretrain_steps: int = DEFAULT_STEPS,
               log=print) -> dict:
    """Build the demo base model unless the lab already has it; returns {"base": id, ...}."""
    with lab.registry() as reg:
        row = reg.find_checkpoint(DEMO_NAME)
        if row and not force and row["path"] and Path(row["path"]).exists():
            return {"base": row["id"], "name": row["name"], "built": False}

    import torch

    from ops.pretrain import pretrain
    from ops.tiny_llama import build_llama, llama_config, pack_blocks, train_bpe_tokenizer

    start = time.monotonic()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    text = CORPUS.read_text()
    log(f"demo: training a BPE tokenizer on {CORPUS.name} ({len(text) / 1e6:.1f} MB)")
    tokenizer = train_bpe_tokenizer(text.split("\n\n"), vocab_size=4096)
    ids = tokenizer(text)["input_ids"]
    blocks = pack_blocks(ids, 128)
    config = llama_config(tokenizer, hidden_size=256, num_layers=4, num_heads=4,
                          num_kv_heads=2, intermediate_size=688, max_positions=512)
    model = build_llama(config, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"demo: pre-training a {n_params / 1e6:.1f}M-parameter Llama for {pretrain_steps} "
        f"steps on {len(ids):,} tokens")
    last = [0.0]

    def on_step(step: int, total: int, loss: float | None) -> None:
        if loss is not None or time.monotonic() - last[0] > 10:
            last[0] = time.monotonic()
            log(f"demo: step {step}/{total}" + (f" loss {loss:.3f}" if loss is not None else ""))

    losses = pretrain(model, blocks, steps=pretrain_steps, batch_size=16, lr=2e-3,
                      on_step=on_step)
    tmp = lab.checkpoints_dir / ".tmp-demo"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with lab.registry() as reg:
            row = publish(lab, reg, tmp, name=DEMO_NAME, relation="import", parents=[],
                          metadata={"origin": "weightsmith demo", "corpus": CORPUS.name,
                                    "pretrain_steps": pretrain_steps,
                                    "final_loss": losses[-1] if losses else None})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"demo: registered {row['id']} ({row['name']}) in {time.monotonic() - start:.0f} s")
    if not (lab.root / "lab.toml").exists():  # a new demo lab: auto-evaluation on
        (lab.root / "lab.toml").write_text(LAB_TOML)
        from app.lab import Settings

        lab.settings = Settings.load(lab.root)
    from app.jobs import queue_auto_eval

    queue_auto_eval(lab, row, log=log)
    return {"base": row["id"], "name": row["name"], "built": True}
