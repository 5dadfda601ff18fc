"""Sliding-window perplexity (the strided scheme of the transformers perplexity guide).

Reference: https://huggingface.co/docs/transformers/perplexity
Each token from position 1 on is scored exactly once, with up to `window - 1` tokens of
context; consecutive windows start `stride` apart (at most `window - 1`), so each window re-reads
`window - stride` tokens of context and scores only the new ones. Windows are batched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class PerplexityResult:
    nll_sum: float  # nats, summed over scored tokens
    tokens: int  # scored tokens (all but the first)
    windows: int

    @property
    def nll_per_token(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    def bits_per_byte(self, n_bytes: int) -> float:
        return self.nll_sum / math.log(2) / n_bytes


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, score_from) per window: score tokens [max(score_from, begin + 1), end)."""
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got {window}, {stride}")
    out, prev_end, begin = [], 1, 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        if end == n_tokens:  # the last window: as much context as fits, at no extra cost
            begin = max(0, end - window)  # (lm-eval's rolling windows do the same)
        out.append((begin, end, prev_end))
        prev_end = end
        # A window's first token has no context inside it, so windows overlap by at least one
        # token (stride == window would otherwise leave one token per window unscored).
        begin = min(begin + stride, prev_end - 1)
    return out


@torch.no_grad()
def sliding_window_nll(model, input_ids: torch.Tensor, window: int, stride: int,
                       batch_size: int = 8,
                       progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Summed next-token NLL of `input_ids` (1-D LongTensor) under a causal LM."""
    if input_ids.dim() != 1 or input_ids.numel() < 2:
        raise ValueError("need a 1-D tensor of at least 2 token ids")
    device = next(model.parameters()).device
    spans = windows(input_ids.numel(), window, stride)
    nll_sum, count = 0.0, 0
    for start in range(0, len(spans), batch_size):
        batch = spans[start:start + batch_size]
        width = max(end - begin for begin, end, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, L), right-padded
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (begin, end, score_from) in enumerate(batch):
            ids[row, :end - begin] = input_ids[begin:end]
            mask[row, :end - begin] = 1
            first = max(score_from, begin + 1) - begin
            labels[row, first:end - begin] = input_ids[begin + first:end]
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        # logits[:, t] predicts token t + 1; score in float32 whatever the model dtype.
        shift_logits = logits[:, :-1].float()  # (B, L-1, V)
        shift_labels = labels[:, 1:].to(device)  # (B, L-1)
        losses = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=-100, reduction="sum")
        nll_sum += losses.item()
        count += int((shift_labels != -100).sum())
        if progress:
            progress(min(start + batch_size, len(spans)), len(spans))
    return PerplexityResult(nll_sum=nll_sum, tokens=count, windows=len(spans))
