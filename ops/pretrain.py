"""Causal-LM pre-training on packed token blocks, through transformers' Trainer.

Used to give the demo model its first minute of training. The train and continue_pretrain
plugins build on the same Trainer set-up.
"""

from __future__ import annotations

import tempfile
from typing import Callable


class Blocks:
    """A map-style dataset over an (N, L) LongTensor of packed blocks."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.size(0)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def pretrain(model, blocks, *, steps: int, batch_size: int = 16, lr: float = 2e-3,
             warmup_steps: int = 10, seed: int = 0,
             on_step: Callable[[int, int, float | None], None] | None = None) -> list[float]:
    """Train `model` in place for `steps` optimizer steps; returns the logged losses.

    `blocks`: (N, L) LongTensor of token ids. `on_step(step, total, loss_or_None)` is called
    after every step (loss on logging steps only).
    """
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    losses: list[float] = []

    class Report(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                if on_step:
                    on_step(state.global_step, steps, float(logs["loss"]))

        def on_step_end(self, args, state, control, **kw):
            if on_step:
                on_step(state.global_step, steps, None)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size,
            learning_rate=lr, warmup_steps=min(warmup_steps, max(steps - 1, 0)),
            lr_scheduler_type="cosine", weight_decay=0.01, logging_steps=max(1, steps // 20),
            save_strategy="no", report_to=[], disable_tqdm=True, seed=seed, data_seed=seed,
            dataloader_num_workers=0, use_cpu=not _cuda(), bf16=False)
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(blocks),
                          callbacks=[Report()])
        trainer.remove_callback(PrinterCallback)  # progress goes through on_step instead
        trainer.train()
    model.eval()
    return losses


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
