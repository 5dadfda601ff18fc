"""The training core shared by the train and continue_pretrain plugins: example encoding,
trainable-parameter selection (LoRA/DoRA through peft, layer freezing, HFT), and a Trainer
set-up with callbacks for live metrics and intermediate checkpoints.

Built on transformers' Trainer (optimizer, schedule, gradient accumulation, bf16, saving and
exact resume of optimizer, scheduler, RNG and data position) and peft (LoRA, DoRA). Nothing
here writes files except through the Trainer's output_dir.

References:
- LoRA: https://arxiv.org/abs/2106.09685 ; DoRA: https://arxiv.org/abs/2402.09353 (peft's
  `use_dora`); QLoRA: https://arxiv.org/abs/2305.14314 (4-bit base through bitsandbytes).
- HFT: "HFT: Half Fine-Tuning for Large Language Models", https://arxiv.org/abs/2404.18466 :
  half of the parameters are chosen at the category level and updated, the other half frozen.
- Block expansion training (train only the new blocks): "LLaMA Pro",
  https://arxiv.org/abs/2401.02415
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ops.layers import LayoutError, decoder_layers as layers_of

IGNORE = -100  # label id the loss skips


class TrainError(ValueError):
    """A training request that does not fit the data or the model; names the setting."""


# ----------------------------------------------------------------------- example encoding
def encode_prompt_completion(tokenizer, prompt: str, completion: str, completion_only: bool,
                             max_length: int) -> dict:
    """input_ids = tokens(prompt) + tokens(completion) + EOS; labels mask the prompt when
    `completion_only`. Truncated on the right to max_length."""
    batch = encode_prompt_completion_batch(tokenizer, [prompt], [completion], completion_only,
                                           max_length)
    return {key: rows[0] for key, rows in batch.items()}


def encode_prompt_completion_batch(tokenizer, prompts: list[str], completions: list[str],
                                   completion_only: bool, max_length: int) -> dict:
    """encode_prompt_completion over lists, in two tokenizer calls (a fast tokenizer encodes a
    list in one Rust call, with the same ids as one by one); {"input_ids": [...], "labels":
    [...]}."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: dict = {"input_ids": [], "labels": []}
    for p, c in zip(tokenizer(list(prompts))["input_ids"],
                    tokenizer(list(completions), add_special_tokens=False)["input_ids"]):
        c = c + eos
        ids = (p + c)[:max_length]
        out["input_ids"].append(ids)
        out["labels"].append(([IGNORE] * len(p) + c)[:max_length] if completion_only
                             else list(ids))
    return out


def encode_text(tokenizer, text: str, max_length: int) -> dict:
    batch = encode_text_batch(tokenizer, [text], max_length)
    return {key: rows[0] for key, rows in batch.items()}


def encode_text_batch(tokenizer, texts: list[str], max_length: int) -> dict:
    """Plain text + EOS, truncated to max_length; every token is learned."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [(row + eos)[:max_length] for row in tokenizer(list(texts))["input_ids"]]
    return {"input_ids": ids, "labels": [list(row) for row in ids]}


def encode_messages(tokenizer, messages: list[dict], completion_only: bool, max_length: int,
                    chat_template: str | None = None) -> dict:
    """Render a conversation with the chat template; with `completion_only`, only the
    assistant turns are learned. Each assistant turn's character span is found by rendering
    the conversation up to it (with the generation prompt) and up to its end, so any template
    whose renderings extend each other works; the spans map to tokens by offsets."""
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                             chat_template=chat_template)

    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            start = len(render(messages[:i], gen=True)) if i else 0
            end = len(render(messages[:i + 1]))
            if text[:end] != render(messages[:i + 1]):
                raise TrainError("the chat template does not render a conversation as an "
                                 "extension of its prefixes; completion_only cannot find the "
                                 "assistant turns")
            spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    if not completion_only:
        return {"input_ids": ids, "labels": list(ids)}
    labels = []
    for tok, (a, b) in zip(ids, enc["offset_mapping"]):
        # a token overlapping a turn is learned (BPE may glue the prompt's space to it)
        inside = any(a < e and b > s for s, e in spans)
        labels.append(tok if inside else IGNORE)
    return {"input_ids": ids, "labels": labels}


class PadCollator:
    """Pads a list of {"input_ids", "labels"} to the longest in the batch (right padding)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)  # (B, L)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackCollator:
    """Padding-free batches: a list of {"input_ids", "labels"} packed into rows as wide as the
    batch's longest example (best-fit decreasing), each example keeping its own position ids
    (0, 1, ...) and no attention mask, so the model's attention keeps examples apart.

    transformers builds a block-diagonal causal mask from position ids that restart
    (masking_utils.find_packed_sequence_indices, for sdpa, eager and flex attention; flash
    attention takes them as varlen boundaries). Each example's first label is IGNORE, since
    the shifted loss would otherwise predict it from the previous example's last token; in
    a padded batch that label is never predicted either, so both batches predict the same
    tokens and the loss (summed over them, divided by their count) is the same.

    Written here rather than transformers' DataCollatorWithFlattening, which puts the whole
    batch in one row: where the mask is dense (sdpa, eager: CPU and non-flash GPUs) attention
    then costs the square of the batch's total tokens, more than the padded batch it
    replaces. Rows no wider than the longest example cost at most what padding did, less the
    pad tokens. The tail of a row that no example fills is padding with its own positions
    and no labels (it attends only to itself).
    """

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    @staticmethod
    def rows(lengths: list[int]) -> list[list[int]]:
        """Example indices per row: best-fit decreasing into rows of the longest length."""
        width = max(lengths)
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
            if fits:
                best = min(fits, key=lambda r: room[r])
                rows[best].append(i)
                room[best] -= lengths[i]
            else:
                rows.append([i])
                room.append(width - lengths[i])
        return rows

    def __call__(self, examples: list[dict]) -> dict:
        lengths = [len(e["input_ids"]) for e in examples]
        width = max(lengths)
        packed = self.rows(lengths)
        ids = torch.full((len(packed), width), self.pad, dtype=torch.long)  # (R, W)
        labels = torch.full((len(packed), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(packed), width), dtype=torch.long)
        for r, members in enumerate(packed):
            at = 0
            for i in members:
                n = lengths[i]
                ids[r, at:at + n] = torch.as_tensor(examples[i]["input_ids"])
                labels[r, at:at + n] = torch.as_tensor(examples[i]["labels"])
                labels[r, at] = IGNORE
                positions[r, at:at + n] = torch.arange(n)
                at += n
            positions[r, at:] = torch.arange(width - at)  # the tail: a run of its own
        # use_cache=False: a model in training mode otherwise makes a KV cache, and with one
        # transformers skips the packed-sequence mask (the examples would see each other)
        return {"input_ids": ids, "labels": labels, "position_ids": positions,
                "use_cache": False}


def packing_keeps_examples_apart(model, vocab_size: int | None = None) -> bool:
    """Whether `model` attends within each packed example only: logits of two short examples
    packed in one row (PackCollator) equal their logits run one at a time. One forward pass
    of 24 tokens; the model is left in the mode it was in."""
    vocab = int(vocab_size or getattr(model.config, "vocab_size", 0) or 2)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab, (n,), generator=gen) for n in (13, 11))
    row = torch.cat([a, b])[None].to(device)  # (1, 24)
    positions = torch.cat([torch.arange(13), torch.arange(11)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=row, position_ids=positions,
                           use_cache=False).logits[0].float()
            alone = torch.cat([model(input_ids=x[None].to(device),
                                     use_cache=False).logits[0].float() for x in (a, b)])
    except (TypeError, ValueError, RuntimeError):  # no position_ids, or a shape it refuses
        return False
    finally:
        model.train(was_training)
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    scale = max(1.0, float(alone.abs().max()))
    return bool((packed - alone).abs().max() <= tol * scale)


# ------------------------------------------------------------------ trainable parameters
def decoder_layers(model) -> nn.ModuleList:
    try:
        return layers_of(model, "layer selection (freeze, hft)")
    except LayoutError as e:
        raise TrainError(str(e)) from None


def layer_parameter_names(model, layers: list[int]) -> list[str]:
    """Names of every parameter inside the given decoder layers."""
    n = len(decoder_layers(model))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise TrainError(f"trainable_layers {bad} are outside the model's layers 0..{n - 1}")
    wanted = tuple(f"model.layers.{i}." for i in layers)
    return [name for name, _ in model.named_parameters() if name.startswith(wanted)]


# HFT categories within a decoder layer; each category contributes half of its members.
HFT_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
HFT_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
HFT_NORMS = ("input_layernorm", "post_attention_layernorm")


def hft_selection(model, seed: int) -> list[str]:
    """HFT's category-level choice of the half to update (the other half is frozen).

    Per decoder layer: 2 of the 4 attention matrices, and 1 of the 2 norms, chosen at random;
    of the 3 MLP matrices, 2 in even-numbered and 1 in odd-numbered choices (alternating, so
    that half of the MLP is updated over each pair of layers). Outside the layers, one of
    {embeddings, (final norm + LM head)} is chosen. Returns parameter names (weights and
    biases of a chosen module go together)."""
    rng = random.Random(seed)
    names = [n for n, _ in model.named_parameters()]
    chosen: list[str] = []

    def take(prefix: str) -> None:
        chosen.extend(n for n in names if n == prefix or n.startswith(prefix + "."))

    mlp_turn = 0
    for i, _ in enumerate(decoder_layers(model)):
        base = f"model.layers.{i}."
        for m in rng.sample(HFT_ATTENTION, 2):
            take(base + m)
        k = 2 if mlp_turn % 2 == 0 else 1
        mlp_turn += 1
        for m in rng.sample(HFT_MLP, k):
            take(base + m)
        take(base + rng.choice(HFT_NORMS))
    if rng.random() < 0.5:
        take("model.embed_tokens")
    else:
        take("model.norm")
        take("lm_head")
    return chosen


def set_trainable(model, names: list[str]) -> tuple[int, int]:
    """requires_grad only for `names`; returns (trainable, total) parameter counts."""
    wanted = set(names)
    missing = wanted - {n for n, _ in model.named_parameters()}
    if missing:
        raise TrainError(f"no parameters named {sorted(missing)[:3]}")
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        total += p.numel()
        trainable += p.numel() if name in wanted else 0
    return trainable, total


def lora_wrap(model, *, r: int, alpha: int, dropout: float, target_modules: list[str],
              dora: bool = False):
    """peft's LoRA (or DoRA, `use_dora`) on the given module names."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
               if isinstance(m, nn.Linear)}
    absent = [t for t in target_modules if t not in present]
    if absent:
        raise TrainError(f"target_modules {absent} are not linear layers of this model "
                         f"(it has {sorted(present)})")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules), use_dora=dora,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def count_trainable(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ the loop
@dataclass
class StepMetrics:
    step: int
    values: dict  # loss, learning_rate, grad_norm, tokens_per_second, eval_loss, epoch


def report_callback(on_metrics: Callable[[StepMetrics], None] | None = None,
                    on_save: Callable[[int, str], None] | None = None,
                    on_step: Callable[[int, int], None] | None = None):
    """A TrainerCallback forwarding logs (with tokens/s between logs) and saves."""
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        def __init__(self):
            self.last = None  # (time, tokens seen) at the previous log

        def on_train_begin(self, args, state, control, **kw):
            self.last = (time.monotonic(), state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or on_metrics is None:
                return
            values = {k: float(v) for k, v in logs.items() if v is not None and (
                k in ("loss", "learning_rate", "grad_norm", "epoch")
                or (k.startswith("eval_") and k.endswith("loss")))}  # eval_<set>_loss too
            now, seen = time.monotonic(), state.num_input_tokens_seen
            if "loss" in values and self.last and now > self.last[0]:
                values["tokens_per_second"] = (seen - self.last[1]) / (now - self.last[0])
                self.last = (now, seen)
            if values:
                on_metrics(StepMetrics(state.global_step, values))

        def on_save(self, args, state, control, **kw):
            if on_save is not None:
                on_save(state.global_step, f"{args.output_dir}/checkpoint-{state.global_step}")

        def on_step_end(self, args, state, control, **kw):
            if on_step is not None:
                on_step(state.global_step, state.max_steps)

    return Report()


def training_arguments(output_dir: str, *, device: str, **kw):
    """TrainingArguments with the house defaults: no external loggers, no tqdm, tokens counted
    (non-padding), bf16 on a GPU that supports it, float32 on CPU."""
    from transformers import TrainingArguments

    cuda = device.startswith("cuda")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    defaults = dict(output_dir=output_dir, report_to=[], disable_tqdm=True,
                    include_num_input_tokens_seen="non_padding", use_cpu=not cuda, bf16=bf16,
                    dataloader_num_workers=0, save_only_model=False, remove_unused_columns=False,
                    # every trainable parameter takes part in a causal LM's forward pass, so
                    # DDP need not search the graph for unused ones each step
                    ddp_find_unused_parameters=False)
    defaults.update(kw)
    return TrainingArguments(**defaults)


def last_trainer_state(run_dir) -> str | None:
    """The newest `checkpoint-N` folder a Trainer left in run_dir (what Resume continues)."""
    from pathlib import Path

    found = sorted(Path(run_dir).glob("checkpoint-*"),
                   key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit()
                   else -1)
    return str(found[-1]) if found else None
