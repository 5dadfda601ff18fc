"""Continual pre-training pieces: packing with document separators, the re-warm + cosine
learning-rate schedule, replay mixing, and vocabulary extension.

References:
- Re-warming: "Continual Pre-Training of Large Language Models: How to (re)warm your
  model?" (Gupta et al. 2023), https://arxiv.org/abs/2308.04014 : linear warm-up to a
  maximum learning rate, then cosine decay to a minimum; re-warming raises the loss at
  first but helps downstream in the longer run.
- Replay and subset epochs: "Efficient Continual Pre-training by Mitigating the Stability
  Gap" (Wang et al. 2024), https://arxiv.org/abs/2406.14833 . Replay mixes general data in;
  a small pool is repeated for several epochs. The subset itself is a seeded random choice
  (in the plugin), not the paper's high-quality sub-corpus selection.
- Domain upsampling at the end of training: "Does your data spark joy? Performance gains
  from domain upsampling at the end of training" (Blakeney et al. 2024),
  https://arxiv.org/abs/2406.03476 : the mixture changes over the last part of the run to
  give the domain-specific data a larger share; the paper reports the last 10-20% of
  training as the best trade-off. Here: a constant replay ratio for the first steps, then
  `upsample_domain_ratio` domain blocks over the last `upsample_fraction` of the steps.
- Vocabulary extension: "An Empirical Comparison of Vocabulary Expansion and Initialization
  Approaches for Language Models", https://arxiv.org/abs/2407.05841 , gives the rationale:
  new embeddings initialised inside the convex hull of the existing ones, where simple
  initialisations do about as well as advanced ones. What is here is one such simple
  initialisation: a new token's embedding is the mean of the embeddings of the sub-tokens it
  used to be split into (a convex combination). The paper's own method, CW2V (Constrained
  Word2Vec, embeddings learned under a convex-hull constraint), is not implemented.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch


class ContinualError(ValueError):
    """A continual pre-training request that does not fit; the message names the setting."""


def pack_documents(docs: list[list[int]], block_size: int, separator: int) -> torch.Tensor:
    """Concatenate token lists with `separator` after each document and cut the stream into
    (N, block_size) blocks; the ragged tail is dropped."""
    stream: list[int] = []
    for d in docs:
        stream.extend(d)
        stream.append(separator)
    n = len(stream) // block_size
    if n == 0:
        raise ContinualError(f"the text has {len(stream)} tokens, fewer than one block of "
                             f"{block_size}")
    return torch.tensor(stream[:n * block_size], dtype=torch.long).view(n, block_size)


def rewarm_cosine(step: int, total_steps: int, warmup_steps: int, max_lr: float,
                  min_lr: float) -> float:
    """Learning rate at optimizer step `step` (0-based): linear from 0 to max_lr over
    warmup_steps, then cosine from max_lr down to min_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


def rewarm_cosine_scheduler(optimizer, total_steps: int, warmup_steps: int, max_lr: float,
                            min_lr: float):
    """A LambdaLR over an optimizer whose learning rate is max_lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: rewarm_cosine(s, total_steps, warmup_steps, max_lr, min_lr)
        / max_lr)


def rewarm_trainer_arguments(max_steps: int, max_learning_rate: float,
                             min_learning_rate: float, warmup_ratio: float,
                             weight_decay: float) -> dict:
    """The TrainingArguments settings of continual pre-training: the re-warm + cosine
    schedule above as transformers' cosine_with_min_lr, AdamW weight decay, and the stream
    read in order (the mixture is laid out in order by replay_order / phased_order). The
    continue_pretrain and mixture_law plugins both train with these."""
    return dict(learning_rate=max_learning_rate, lr_scheduler_type="cosine_with_min_lr",
                lr_scheduler_kwargs={"min_lr": min_learning_rate},
                warmup_steps=math.ceil(warmup_ratio * max_steps),
                weight_decay=weight_decay, max_steps=max_steps,
                train_sampling_strategy="sequential")


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of `model` over (N, L)
    blocks, every block's L - 1 predictions weighted alike."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, blocks.size(0), batch_size):
        batch = blocks[start:start + batch_size].to(device)  # (b, L) long
        logits = model(input_ids=batch).logits[:, :-1].float()  # (b, L-1, V)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    if was_training:
        model.train()
    return total / max(1, count)


def replay_order(n_domain: int, n_replay: int, samples: int, replay_ratio: float,
                 seed: int) -> list[tuple[str, int]]:
    """The training stream: `samples` items, of which replay_ratio come from the replay
    (general) pool, spread evenly so that every prefix of the stream holds
    floor(prefix * ratio) replay items (every batch gets its share, to within one).
    Within each pool, items are drawn in a seeded shuffle, reshuffled on each pass (so a
    small pool is repeated for several epochs)."""
    return phased_order(n_domain, n_replay, [samples], [replay_ratio], seed)


def phased_order(n_domain: int, n_replay: int, samples: Sequence[int],
                 replay_ratios: Sequence[float], seed: int) -> list[tuple[str, int]]:
    """The training stream in phases: phase k is `samples[k]` items of which
    floor(samples[k] * replay_ratios[k]) come from the replay pool, spread evenly inside the
    phase (each prefix of the phase holds floor(prefix * ratio) replay items). The pools'
    seeded shuffles run on across the phases."""
    if len(samples) != len(replay_ratios):
        raise ContinualError("one replay ratio per phase")
    if any(ratio and n_replay == 0 for ratio in replay_ratios):
        raise ContinualError("replay_ratio > 0 needs replay data")
    rng = random.Random(seed)

    def draws(n: int):
        while True:
            order = list(range(n))
            rng.shuffle(order)
            yield from order

    domain, replay = draws(n_domain), draws(n_replay) if n_replay else None
    out = []
    for count, ratio in zip(samples, replay_ratios):
        for i in range(count):
            if math.floor((i + 1) * ratio) > math.floor(i * ratio):
                out.append(("replay", next(replay)))
            else:
                out.append(("domain", next(domain)))
    return out


def mixture_phases(max_steps: int, samples_per_step: int, replay_ratio: float,
                   schedule: str = "constant", upsample_fraction: float = 0.2,
                   upsample_domain_ratio: float = 1.0) -> list[dict]:
    """The mixture schedule as phases over optimizer steps: "constant" is one phase at
    replay_ratio; "upsample_end" (Blakeney et al. 2024) ends with the last
    round(upsample_fraction * max_steps) steps (at least one) at a domain share of
    upsample_domain_ratio, i.e. a replay ratio of 1 - upsample_domain_ratio. Each phase says
    its steps (first, last; 1-based), its samples, its replay ratio and the exact number of
    domain and replay blocks it serves: replay = floor(samples * ratio)."""
    if max_steps < 1 or samples_per_step < 1:
        raise ContinualError("max_steps and the samples per step must be >= 1")
    if schedule == "constant":
        spans = [("constant", max_steps, replay_ratio)]
    elif schedule == "upsample_end":
        if not 0 < upsample_fraction <= 0.5:
            raise ContinualError(f"upsample_fraction must lie in (0, 0.5], got "
                                 f"{upsample_fraction}")
        if not 0 < upsample_domain_ratio <= 1:
            raise ContinualError(f"upsample_domain_ratio must lie in (0, 1], got "
                                 f"{upsample_domain_ratio}")
        last = min(max_steps, max(1, round(upsample_fraction * max_steps)))
        spans = [("main", max_steps - last, replay_ratio),
                 ("upsample", last, 1.0 - upsample_domain_ratio)]
    else:
        raise ContinualError(f"mixture_schedule {schedule!r} is not constant or upsample_end")
    phases, step = [], 0
    for name, steps, ratio in spans:
        if steps == 0:
            continue
        samples = steps * samples_per_step
        replay = math.floor(samples * ratio)
        phases.append({"phase": name, "first_step": step + 1, "last_step": step + steps,
                       "samples": samples, "replay_ratio": ratio,
                       "blocks": {"domain": samples - replay, "replay": replay}})
        step += steps
    return phases


@torch.no_grad()
def extend_vocabulary(model, tokenizer, new_tokens: list[str]) -> dict[str, list[int]]:
    """Add `new_tokens` to the tokenizer and model; each new row of the input embeddings
    (and of an untied output head) is the mean of the rows of the sub-tokens the old
    tokenizer split the token into, so it lies in the convex hull of the existing rows (the
    paper's rationale; this is the mean-of-sub-tokens initialisation, not its CW2V).
    Returns {token: sub-token ids}."""
    vocab = tokenizer.get_vocab()
    fresh = [t for t in dict.fromkeys(new_tokens) if t not in vocab]
    if not fresh:
        raise ContinualError("every token in new_tokens is already in the vocabulary")
    pieces = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in fresh}
    empty = [t for t, ids in pieces.items() if not ids]
    if empty:
        raise ContinualError(f"new_tokens {empty} encode to nothing")
    old = len(tokenizer)
    tokenizer.add_tokens(fresh)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    inputs = model.get_input_embeddings().weight  # (V', H)
    outputs = model.get_output_embeddings()
    tied = outputs is None or outputs.weight.data_ptr() == inputs.data_ptr()
    for offset, token in enumerate(fresh):
        row = old + offset
        ids = torch.tensor(pieces[token], device=inputs.device)
        inputs[row] = inputs[ids].mean(0)
        if not tied:
            outputs.weight[row] = outputs.weight[ids].mean(0)
    return pieces
