"""Text generation for the Playground: load a checkpoint folder (a full causal LM, or a peft
adapter applied unmerged on its base) with its tokenizer, format a prompt (the tokenizer's
chat template, or plain completion), and generate token by token with sampling settings and a
seed, stoppable between tokens.

Sampling follows the usual recipe (temperature, then top-k, then nucleus/top-p sampling:
Holtzman et al., "The Curious Case of Neural Text Degeneration", https://arxiv.org/abs/1904.09751),
using transformers' own logits warpers. Temperature 0 is greedy decoding (argmax).

Why a hand-written decoding loop rather than `model.generate` with a streamer: generate draws
from torch's global random generator and runs one model to the end, while the Playground
steps up to three models in turn for the same prompt, and each must give the same sample for
the same seed whatever the others do. Here each stream owns a `torch.Generator`; the model's
forward pass, the KV cache (transformers' DynamicCache) and the warpers are the library's.
Greedy output is token for token what `model.generate(do_sample=False)` gives.

Tensors: input ids (1, prompt_len) int64; logits of the last position (1, vocab) in float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "tokenizer.tiktoken")


class GenerateError(ValueError):
    """A checkpoint that cannot be loaded or a prompt that cannot be formatted; the message
    says which and why."""


@dataclass
class Loaded:
    """A model ready to generate: `model` in eval mode on `device`, and its tokenizer."""

    model: Any
    tokenizer: Any
    device: str
    is_adapter: bool = False
    max_positions: int | None = None  # the model's context length, when its config says

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def pick_device(preferred: str | None = None) -> str:
    """`preferred` if given, else 'cuda' when torch sees a GPU, else 'cpu'."""
    if preferred:
        return preferred
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(path: str | Path, base_path: str | Path | None = None, device: str = "cpu",
         trust_remote_code: bool = False) -> Loaded:
    """Load a checkpoint folder for generation.

    A folder with adapter_config.json and no config.json is a peft adapter: its base
    (`base_path`) is loaded, and the adapter applied on top with PeftModel.from_pretrained,
    unmerged (the LoRA matrices stay separate layers, as trained). The tokenizer comes from
    the adapter folder when it has one, else from the base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    is_adapter = (folder / "adapter_config.json").exists() and \
        not (folder / "config.json").exists()
    model_folder = folder
    if is_adapter:
        if not base_path:
            raise GenerateError(f"{folder} is an adapter; its base checkpoint is needed")
        model_folder = Path(base_path)
    tokenizer_folder = folder if has_tokenizer(folder) else model_folder
    if not has_tokenizer(tokenizer_folder):
        raise GenerateError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    model = AutoModelForCausalLM.from_pretrained(str(model_folder), dtype="auto",
                                                 trust_remote_code=trust_remote_code)
    if device == "cpu":
        model = model.float()  # half precision is slow, and some kernels lack it, on CPU
    if is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder),
                                              trust_remote_code=trust_remote_code)
    config = json.loads((model_folder / "config.json").read_text())
    return Loaded(model=model, tokenizer=tokenizer, device=device, is_adapter=is_adapter,
                  max_positions=config.get("max_position_embeddings"))


def format_prompt(tokenizer, text: str, mode: str) -> tuple[str, bool, str | None]:
    """(the text to tokenize, whether a chat template wrote it, a note for the reader or
    None). `mode` 'chat' wraps the prompt
    as one user turn in the tokenizer's chat template, with the assistant's turn opened; a
    tokenizer without a template falls back to plain completion, and the note says so."""
    if mode == "chat":
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False,
                add_generation_prompt=True), True, None
        return text, False, ("this checkpoint's tokenizer has no chat template: the prompt was "
                      "sent as plain completion")
    return text, False, None


def encode(loaded: Loaded, text: str, templated: bool):
    """Input ids (1, prompt_len) on the model's device. A chat template writes its own
    special tokens (BOS), so they are not added twice."""
    batch = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=not templated)
    return batch["input_ids"].to(loaded.device)


def eos_ids(loaded: Loaded) -> set[int]:
    ids = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = loaded.tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}


@dataclass
class Sampling:
    """Sampling settings. temperature 0: greedy. top_k 0 and top_p 1: no cut-off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


@dataclass
class Step:
    """One generated token: its id, the text it adds (empty while a multi-byte character is
    incomplete) and the whole text generated so far. When decoding the longer sequence
    changed earlier text, `delta` is None: show `full` instead."""

    token_id: int
    delta: str | None
    full: str


@dataclass
class Finished:
    """Why a stream ended: 'eos', 'length', 'context' (the model's context is full) or
    'stopped'; the generated tokens and their whole text (including a last incomplete
    character, which the Steps held back)."""

    reason: str
    tokens: list[int] = field(default_factory=list)
    text: str = ""


def stream(loaded: Loaded, input_ids, sampling: Sampling,
           should_stop: Callable[[], bool] = lambda: False) -> Iterator[Step | Finished]:
    """Generate up to `sampling.max_new_tokens` tokens after `input_ids` (1, prompt_len),
    yielding a Step per token and a Finished last. `should_stop` is checked before every
    token. Each call owns its random generator, seeded from `sampling.seed`."""
    import torch
    from transformers import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    device = loaded.device
    generator = torch.Generator(device=device).manual_seed(int(sampling.seed))
    warpers = LogitsProcessorList()
    if sampling.temperature > 0:
        if sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(float(sampling.temperature)))
        if sampling.top_k > 0:
            warpers.append(TopKLogitsWarper(int(sampling.top_k)))
        if sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(float(sampling.top_p)))
    stops = eos_ids(loaded)
    limit = int(sampling.max_new_tokens)
    if loaded.max_positions:
        limit = min(limit, max(0, loaded.max_positions - input_ids.shape[1]))
    generated: list[int] = []
    shown = ""
    all_ids = input_ids
    next_input = input_ids
    past = None
    reason = "length" if limit == sampling.max_new_tokens else "context"
    for _ in range(limit):
        if should_stop():
            reason = "stopped"
            break
        with torch.inference_mode():
            out = loaded.model(input_ids=next_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            if sampling.temperature > 0:
                scores = warpers(all_ids, logits)
                probs = torch.softmax(scores, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)  # (1, 1)
            else:
                token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        token_id = int(token[0, 0])
        if token_id in stops:
            reason = "eos"
            break
        generated.append(token_id)
        all_ids = torch.cat([all_ids, token], dim=-1)
        next_input = token
        # decode everything so far: a token may complete a character begun by the last one
        text = loaded.tokenizer.decode(generated, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            yield Step(token_id, "", shown)
            continue
        delta = text[len(shown):] if text.startswith(shown) else None
        shown = text
        yield Step(token_id, delta, text)
    yield Finished(reason, generated,
                   loaded.tokenizer.decode(generated, skip_special_tokens=True))


def generate_text(loaded: Loaded, prompt: str, sampling: Sampling, mode: str = "completion",
                  should_stop: Callable[[], bool] = lambda: False) -> tuple[str, list[int], str]:
    """The whole of a generation at once: (text, token ids, finish reason)."""
    text, templated, _ = format_prompt(loaded.tokenizer, prompt, mode)
    ids = encode(loaded, text, templated)
    for item in stream(loaded, ids, sampling, should_stop):
        if isinstance(item, Finished):
            return item.text, item.tokens, item.reason
    raise AssertionError("unreachable")  # stream always ends with Finished
