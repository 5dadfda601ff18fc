"""evaluate: score a checkpoint; sliding-window perplexity and bits-per-byte on local text."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field, model_validator

from plugins import CheckpointRef, LocalFile, Plugin, PluginConfig

from app.demo import HELDOUT as DEMO_TEXT  # the shipped held-out text (cheap import)


class Config(PluginConfig):
    checkpoint: CheckpointRef = Field(
        description="Checkpoint to evaluate: registry id, name, local folder or Hub id.")
    text_file: Optional[LocalFile] = Field(
        None, description="UTF-8 text file to score. Empty: the demo held-out text shipped in "
                          "assets/demo/heldout.txt.")
    window: int = Field(256, ge=2, le=131072,
                        description="Tokens per window (context length used for scoring).")
    stride: Optional[int] = Field(
        None, ge=1, description="Tokens between window starts; each window scores only its new "
                                "tokens. Empty: half the window.")
    batch_size: int = Field(8, ge=1, le=1024, description="Windows per forward pass.")
    max_tokens: Optional[int] = Field(
        None, ge=2, description="Score only the first N tokens of the text (quick checks).")
    task: Optional[str] = Field(
        None, min_length=1, max_length=100,
        description="Name the scores are stored under. Empty: 'ppl:<file name>'.")

    @model_validator(mode="after")
    def _stride_fits(self):
        if self.stride is not None and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        return self


def run(config: Config, ctx) -> None:
    import torch

    from ops.perplexity import sliding_window_nll

    path = Path(config.text_file).expanduser() if config.text_file else DEMO_TEXT
    if not path.is_file():
        raise FileNotFoundError(f"text_file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text_file {path} is empty")
    ck = ctx.open(config.checkpoint)
    ctx.log(f"evaluating {ck.name} ({ck.id}) on {path} with device {ctx.device}")
    tokenizer = ck.load_tokenizer()
    model = ck.load_model(device=ctx.device)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if config.max_tokens:
        ids = ids[:config.max_tokens]
        text = tokenizer.decode(ids, skip_special_tokens=True)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and config.window > max_pos:
        raise ValueError(f"window ({config.window}) exceeds the model's "
                         f"max_position_embeddings ({max_pos})")
    stride = config.stride or max(1, config.window // 2)
    result = sliding_window_nll(
        model, ids, config.window, stride, config.batch_size,
        progress=lambda done, total: ctx.progress(done / total, f"windows {done}/{total}"))
    task = config.task or f"ppl:{path.name}"
    n_bytes = len(text.encode("utf-8"))
    details = {"tokens": result.tokens, "windows": result.windows, "window": config.window,
               "stride": stride, "bytes": n_bytes, "file": str(path)}
    ctx.evaluation(ck, task, "perplexity", result.perplexity, details=details)
    ctx.evaluation(ck, task, "nll_per_token", result.nll_per_token)
    ctx.evaluation(ck, task, "bits_per_byte", result.bits_per_byte(n_bytes))
    ctx.log(f"{task}: perplexity {result.perplexity:.4f}, bits/byte "
            f"{result.bits_per_byte(n_bytes):.4f} over {result.tokens} tokens")


PLUGIN = Plugin(
    name="evaluate",
    title="Evaluate",
    description="Score a checkpoint: sliding-window perplexity and bits-per-byte on a text "
                "file; scores are recorded on the checkpoint.",
    Config=Config,
    run=run,
)
