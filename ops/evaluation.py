"""Task scoring for causal LMs: multiple choice by log-likelihood, and greedy generation
scored by exact match, containment or a regular expression.

The scoring rules follow lm-evaluation-harness (Gao et al., "A framework for few-shot language
model evaluation", 2023) so that numbers read the same way:
- a multiple-choice item's choice log-likelihood is sum log p(choice tokens | context); `acc`
  picks the highest, `acc_norm` the highest per character of the choice (lm-eval's acc_norm);
- context and choice are tokenized as one string, and the choice's tokens are those after the
  context's (trailing spaces of the context move to the choice, as lm-eval's `_encode_pair`);
- generation is greedy, stops at the first stop string, and is compared after stripping.

We write this by hand rather than calling lm-eval for the local suites: lm-eval's fixed cost
(about 5 s indexing its task YAMLs plus imports, per run) dominates small models, and a suite
should reuse one loaded model for every task.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

GENERATION_METRICS = ("exact_match", "contains", "regex")


@dataclass
class ChoiceScore:
    loglikelihood: float  # nats, summed over the choice's tokens
    tokens: int
    chars: int
    greedy: bool  # every choice token is the argmax: lm-eval's is_greedy


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids); their concatenation is the tokenization of the whole
    string, so a BPE merge across the boundary is scored as the model would see it."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    if whole[:len(ctx)] != ctx:  # a merge across the boundary: split where the context ends
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return ctx, cont
    return ctx, whole[len(ctx):]


def _max_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)


@torch.no_grad()
def continuation_loglikelihoods(model, requests: Sequence[tuple[list[int], list[int]]],
                                batch_size: int = 16,
                                progress: Callable[[int, int], None] | None = None
                                ) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), all tokens greedy) for each (context ids,
    continuation ids) pair. Sequences are right-padded in batches; a sequence longer than the
    model's context is cut from the left (the continuation is always kept whole)."""
    device = next(model.parameters()).device
    limit = _max_length(model)
    out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    # longest first: similar lengths share a batch (less padding), as lm-eval sorts
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows = []
        for i in chunk:
            ctx, cont = requests[i]
            if not cont:
                raise ValueError(f"request {i}: the continuation has no tokens")
            seq = (list(ctx) + list(cont))[-(limit + 1):]
            # the last token is predicted, never input
            rows.append((seq[:-1], min(len(cont), len(seq) - 1)))
        width = max(len(s) for s, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, (seq, _) in enumerate(rows):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, L, V), float32 whatever the dtype
        for r, (i, (seq, n)) in enumerate(zip(chunk, rows)):
            cont = torch.tensor(requests[i][1][-n:], device=device)
            rows_logp = logp[r, len(seq) - n:len(seq)]  # (n, V): positions predicting cont
            picked = rows_logp.gather(-1, cont[:, None]).squeeze(-1)
            greedy = bool((rows_logp.argmax(-1) == cont).all())
            out[i] = (float(picked.sum()), greedy)
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return out


def score_multiple_choice(model, tokenizer, items: Sequence[dict], batch_size: int = 16,
                          progress: Callable[[int, int], None] | None = None) -> dict:
    """`items`: {"context": str, "choices": [str, ...], "answer": int}. Returns {"acc",
    "acc_norm", "acc_stderr", "acc_norm_stderr", "n", "predictions": [(pred, pred_norm)]}."""
    requests, owners = [], []
    for k, item in enumerate(items):
        for c, choice in enumerate(item["choices"]):
            requests.append(encode_pair(tokenizer, item["context"], choice))
            owners.append((k, c))
    scores = continuation_loglikelihoods(model, requests, batch_size, progress)
    per_item: list[list[ChoiceScore]] = [[] for _ in items]
    for (k, c), (ll, greedy), (_, cont) in zip(owners, scores, requests):
        per_item[k].append(ChoiceScore(ll, len(cont), len(items[k]["choices"][c]), greedy))
    hits, hits_norm, predictions = [], [], []
    for item, choice_scores in zip(items, per_item):
        pred = max(range(len(choice_scores)), key=lambda c: choice_scores[c].loglikelihood)
        pred_norm = max(range(len(choice_scores)),
                        key=lambda c: choice_scores[c].loglikelihood
                        / max(1, choice_scores[c].chars))
        hits.append(float(pred == item["answer"]))
        hits_norm.append(float(pred_norm == item["answer"]))
        predictions.append((pred, pred_norm))
    return {"acc": mean(hits), "acc_stderr": mean_stderr(hits),
            "acc_norm": mean(hits_norm), "acc_norm_stderr": mean_stderr(hits_norm),
            "n": len(items), "predictions": predictions}


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    until: Sequence[str] = ("\n",), batch_size: int = 16,
                    progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Greedy continuations of `prompts`, cut at the first stop string in `until`.

    Left-padded batches through `model.generate` (do_sample=False). Shape: prompts (B, L) in,
    (B, L + max_new_tokens) out; only the new tokens are decoded.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; generation needs "
                         "one to pad batches")
    limit = _max_length(model)
    encoded = [tokenizer(p)["input_ids"][-max(1, limit - max_new_tokens):] for p in prompts]
    out = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, i in enumerate(chunk):  # left padding: every prompt ends at the same column
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=pad, num_beams=1)
        for r, i in enumerate(chunk):
            text = tokenizer.decode(generated[r, width:], skip_special_tokens=True)
            out[i] = cut_at_stop(text, until)
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return out


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def generation_match(metric: str, output: str, target: str, ignore_case: bool = False) -> bool:
    """One generation metric on one item.

    - exact_match: the stripped output equals the stripped target;
    - contains: the target occurs in the output;
    - regex: the target is a regular expression that `re.search` finds in the output.
    """
    if metric not in GENERATION_METRICS:
        raise ValueError(f"unknown generation metric {metric!r}; expected one of "
                         f"{', '.join(GENERATION_METRICS)}")
    flags = re.IGNORECASE if ignore_case else 0
    if metric == "regex":
        return re.search(target, output, flags) is not None
    a, b = output.strip(), target.strip()
    if ignore_case:
        a, b = a.lower(), b.lower()
    return a == b if metric == "exact_match" else b in a


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample variance (ddof 1), as lm-eval reports."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)
