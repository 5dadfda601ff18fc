"""The demo lab: a few-million-parameter Llama and its BPE tokenizer, built and pre-trained
locally on the shipped corpus (about a minute on 2 CPU cores, once; cached in the lab)."""

from __future__ import annotations

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
    return {"base": row["id"], "name": row["name"], "built": True}
