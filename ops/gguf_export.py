"""Write an HF checkpoint folder as one GGUF file (llama.cpp's format), as llama.cpp's
convert_hf_to_gguf.py would for the layouts we support, with the gguf package's writer,
tensor-name map and quantizers.

What the file holds, and why (the facts come from convert_hf_to_gguf.py and llama.cpp's
loader):

- Architecture: LlamaForCausalLM and MistralForCausalLM are written as GGUF `llama` (llama.cpp
  converts Mistral as Llama, and its llama has no sliding window: beyond a Mistral's
  sliding_window tokens llama.cpp attends further than the model did); Qwen2ForCausalLM as `qwen2` (q/k/v biases), Qwen3ForCausalLM as
  `qwen3` (per-head q_norm/k_norm, an explicit head_dim).
- Q/K rows: for `llama` the rows of each head's q_proj and k_proj (and their biases) are
  permuted into GGML's rotary order (convert's LlamaModel.permute; transformers undoes it when
  it reads the file). Qwen2 and Qwen3 use the NeoX rotary order and are written unpermuted.
- Tensor types: 1-D tensors and `*_norm.weight` (norms, biases, q_norm/k_norm) stay F32 in
  every output type, as convert does. For F16, BF16 and Q8_0 every 2-D tensor takes the type. For the 4- and 5-bit
  types the output layer (output.weight, or token_embd.weight when the embeddings are tied,
  since it is then the output layer too) is Q8_0: llama-quantize keeps it at Q6_K by default,
  which the gguf package cannot write. A tensor whose rows are not a multiple of the block
  size (32) falls back to F16, as convert does.
- Tied embeddings: a tied model's file has no output.weight (llama.cpp and transformers then
  use token_embd.weight).
- Tokenizer: byte-level BPE only (tokenizer.ggml.model `gpt2`): the tokens in id order (ids the
  tokenizer lacks below the model's vocab_size are `[PADn]`, UNUSED), their types (CONTROL for
  special added tokens, USER_DEFINED for other added tokens, NORMAL otherwise), the merges, the
  bos/eos/unk/pad ids, add_bos/add_eos and the chat template (gguf.SpecialVocab, which reads
  tokenizer.json, tokenizer_config.json, chat_template.jinja and config.json as convert does).
  `tokenizer.ggml.pre` names how text is split before BPE; llama.cpp recognizes a tokenizer by
  hashing its output on a test text, here the pre-tokenizer in tokenizer.json is matched
  against the splits llama.cpp implements: GPT-2's ByteLevel regex (`gpt2`), Llama 3's split
  (`llama-bpe`), Qwen2's (`qwen2`) and single digits before GPT-2's (`smollm`). Any other
  split, and SentencePiece-style tokenizers, are refused: a file whose tokenizer llama.cpp
  would split differently from the model's own would quietly feed it other tokens.

Tensors are streamed: the header is written from the safetensors headers, then each tensor is
read, converted and written in turn, so memory holds one tensor at a time. Imports numpy and
the gguf package at module level; torch (to read bfloat16 safetensors) inside functions.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# output type -> (GGML type of 2-D tensors, llama.cpp file type name)
OUTPUT_TYPES = {
    "F32": ("F32", "ALL_F32"),
    "F16": ("F16", "MOSTLY_F16"),
    "BF16": ("BF16", "MOSTLY_BF16"),
    "Q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "Q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "Q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "Q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "Q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
LOW_BIT = ("Q5_1", "Q5_0", "Q4_1", "Q4_0")  # their output layer is written as Q8_0
OUTPUT_LAYER_TYPE = "Q8_0"

# HF architecture -> (GGUF architecture, whether q/k rows are permuted to GGML's rope order)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}

# The pre-tokenizer splits llama.cpp implements under these tokenizer.ggml.pre names (the
# regexes as transformers and the models' tokenizer.json files spell them).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
PRE_NAMES = ("gpt2", "llama-bpe", "qwen2", "smollm")


class ExportError(ValueError):
    """A checkpoint this exporter cannot write; the message starts with the config field."""


@dataclass
class ExportResult:
    path: str
    architecture: str          # the GGUF architecture written
    output_type: str
    file_type: str             # general.file_type as llama.cpp names it
    size_bytes: int
    sha256: str
    tensor_types: dict[str, int]   # GGML type -> number of tensors
    tensor_count: int
    parameters: int
    tokenizer_pre: str
    vocab_size: int
    chat_template: bool
    tied_embeddings: bool
    fallbacks: list[str] = field(default_factory=list)  # tensors written F16 (row size)

    def as_metadata(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


# ------------------------------------------------------------------------------ checks
def _config(folder: Path, what: str) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise ExportError(f"{what}: {folder} has no config.json; export writes a full model "
                          f"checkpoint (not an adapter, a task vector or a GGUF file)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{what}: {file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ExportError(f"{what}: {file} is not a JSON object")
    return config


def supported() -> str:
    return ", ".join(ARCHITECTURES)


def check_architecture(config: dict, what: str = "checkpoint") -> tuple[str, bool]:
    """(GGUF architecture, permute q/k) of an HF config, or ExportError naming `what`."""
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch not in ARCHITECTURES:
        raise ExportError(f"{what}: architecture {arch or config.get('model_type')!r} cannot "
                          f"be exported to GGUF; export writes {supported()}")
    scaling = config.get("rope_scaling") or {}
    params = config.get("rope_parameters") or {}
    kind = (scaling.get("rope_type") or scaling.get("type")) if isinstance(scaling, dict) \
        else None
    kind = kind or (params.get("rope_type") if isinstance(params, dict) else None)
    if kind not in (None, "default"):
        raise ExportError(f"{what}: rope scaling {kind!r} is not written by this exporter "
                          f"(only unscaled rotary embeddings)")
    return ARCHITECTURES[arch]


def _rope_theta(config: dict) -> float | None:
    params = config.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("rope_theta"), (int, float)):
        return float(params["rope_theta"])
    theta = config.get("rope_theta")
    return float(theta) if isinstance(theta, (int, float)) else None


# --------------------------------------------------------------------------- tokenizer
def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json's pre-tokenizer, or None when it
    splits text in a way llama.cpp has no name for."""
    pre = tokenizer_json.get("pre_tokenizer")
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        return "gpt2" if pre.get("use_regex", True) else None
    if pre.get("type") != "Sequence":
        return None
    items = [p for p in pre.get("pretokenizers") or [] if isinstance(p, dict)]
    types = [p.get("type") for p in items]
    if types == ["Split", "ByteLevel"] and not items[1].get("use_regex", True):
        pattern = items[0].get("pattern") or {}
        if items[0].get("behavior") == "Isolated" and not items[0].get("invert"):
            return PRE_SPLITS.get(pattern.get("Regex"))
    if types == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and \
            items[1].get("use_regex", True):
        return "smollm"
    return None


@dataclass
class Vocabulary:
    tokens: list[str]
    types: list[int]     # gguf.TokenType values
    pre: str
    special: object      # a gguf.SpecialVocab


def read_vocabulary(folder: Path, vocab_size: int, what: str = "checkpoint") -> Vocabulary:
    """The byte-level BPE vocabulary of a checkpoint folder, as llama.cpp's converter lays it
    out; ExportError naming `what` for a tokenizer it cannot write."""
    import gguf

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ExportError(f"{what}: {folder} has no tokenizer.json; export writes the "
                          f"tokenizer into the GGUF file and reads it from a fast (byte-level "
                          f"BPE) tokenizer's tokenizer.json")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{what}: {file} is not valid JSON ({e})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or \
            not isinstance(model.get("vocab"), dict):
        kind = model.get("type") if isinstance(model, dict) else None
        raise ExportError(f"{what}: its tokenizer is a {kind or 'non-BPE'} model; export "
                          f"writes byte-level BPE tokenizers only")
    pre = pre_tokenizer_name(data)
    if pre is None:
        shown = json.dumps(data.get("pre_tokenizer"))[:200]
        raise ExportError(f"{what}: its tokenizer splits text before BPE in a way llama.cpp "
                          f"has no name for (pre_tokenizer {shown}); export knows the "
                          f"splits {', '.join(PRE_NAMES)} (tokenizer.ggml.pre), and "
                          f"SentencePiece-style tokenizers are not written")
    by_id: dict[int, str] = {}
    for token, index in model["vocab"].items():
        if isinstance(index, int) and 0 <= index:
            by_id[index] = token
    added = {a["id"]: a for a in data.get("added_tokens") or []
             if isinstance(a, dict) and isinstance(a.get("id"), int)
             and isinstance(a.get("content"), str)}
    for index, entry in added.items():
        by_id[index] = entry["content"]
    size = max(vocab_size, max(by_id, default=-1) + 1)
    if size > vocab_size:
        raise ExportError(f"{what}: its tokenizer has ids up to {size - 1}, past the model's "
                          f"vocab_size {vocab_size}")
    tokens, types = [], []
    for index in range(size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif index in added:
            tokens.append(token)
            types.append(int(gguf.TokenType.CONTROL if added[index].get("special")
                             else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(token)
            types.append(int(gguf.TokenType.NORMAL))
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=size)
    if not special.merges:
        raise ExportError(f"{what}: {file} has no merges; a BPE tokenizer needs them")
    return Vocabulary(tokens, types, pre, special)


# ------------------------------------------------------------------------------ tensors
def permute_rows(weights, n_head: int):
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows in GGML's rotary order
    (the two halves of the head interleaved)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@dataclass
class _Planned:
    source: str          # the safetensors tensor name
    name: str            # the GGUF tensor name
    shape: tuple
    qtype: object        # gguf.GGMLQuantizationType
    permute_heads: int   # 0: none


def _plan(files, config: dict, gguf_arch: str, permute: bool, output_type: str,
          what: str) -> tuple[list[_Planned], bool, list[str]]:
    import gguf

    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == gguf_arch)
    n_layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(arch_enum, n_layers)
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    tied = bool(config.get("tie_word_embeddings", False))
    main = getattr(gguf.GGMLQuantizationType, OUTPUT_TYPES[output_type][0])
    f32, f16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    plan, fallbacks = [], []
    for source in files.keys():
        if source.endswith((".rotary_emb.inv_freq", ".masked_bias", ".attn.bias")):
            continue  # buffers llama.cpp recomputes (as convert skips them)
        if tied and source == "lm_head.weight":
            continue  # a tied model's file has no output.weight
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{what}: tensor {source} has no GGUF name for {gguf_arch}; "
                              f"expected a plain {', '.join(ARCHITECTURES)} checkpoint")
        shape = tuple(files.shape(source))
        if not files.is_float(source):
            raise ExportError(f"{what}: tensor {source} is not a float tensor "
                              f"({files.entries[source].dtype}); a quantized checkpoint "
                              f"(bitsandbytes, GPTQ, ...) cannot be exported")
        heads = 0
        if permute and source.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_head
        elif permute and source.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_kv
        qtype = main
        if len(shape) <= 1 or name.endswith("_norm.weight"):
            qtype = f32  # norms and biases stay F32 (convert's rule)
        elif output_type in LOW_BIT and (name == "output.weight" or
                                         (tied and name == "token_embd.weight")):
            qtype = getattr(gguf.GGMLQuantizationType, OUTPUT_LAYER_TYPE)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if shape[-1] % block:
            fallbacks.append(name)
            qtype = f16
        plan.append(_Planned(source, name, shape, qtype, heads))
    if not any(p.name == "token_embd.weight" for p in plan):
        raise ExportError(f"{what}: the checkpoint has no token embedding "
                          f"(model.embed_tokens.weight)")
    return plan, tied, fallbacks


def _nbytes(shape: tuple, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def _convert(array, qtype):
    import gguf
    import numpy as np

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


# ------------------------------------------------------------------------------- export
def export_gguf(folder: str | Path, out: str | Path, output_type: str = "Q8_0", *,
                name: Optional[str] = None, what: str = "checkpoint",
                progress: Optional[Callable[[float, str], None]] = None) -> ExportResult:
    """Write the HF checkpoint in `folder` as the GGUF file `out` in `output_type` (a key of
    OUTPUT_TYPES). Raises ExportError (a ValueError whose message starts with `what`, the
    config field that named the checkpoint) for a checkpoint it cannot write; nothing is left
    at `out` then."""
    import gguf
    import numpy as np

    from ops.checkpoint_files import TensorFiles, safetensors_files

    if output_type not in OUTPUT_TYPES:
        raise ExportError(f"output_type: got {output_type!r}; expected one of "
                          f"{', '.join(OUTPUT_TYPES)}")
    folder, out = Path(folder), Path(out)
    config = _config(folder, what)
    gguf_arch, permute = check_architecture(config, what)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "intermediate_size"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise ExportError(f"{what}: config.json has no positive integer {key}")
    weights = safetensors_files(folder)
    if not weights:
        raise ExportError(f"{what}: {folder} has no safetensors weights (model.safetensors or "
                          f"a shard index); export reads safetensors only")
    files = TensorFiles(weights)
    vocab = read_vocabulary(folder, int(config["vocab_size"]), what)
    plan, tied, fallbacks = _plan(files, config, gguf_arch, permute, output_type, what)

    hidden, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = config.get("head_dim") if isinstance(config.get("head_dim"), int) else \
        hidden // n_head
    w = gguf.GGUFWriter(str(out), gguf_arch)
    try:
        w.add_type("model")
        w.add_name(name or folder.name)
        if isinstance(config.get("max_position_embeddings"), int):
            w.add_context_length(config["max_position_embeddings"])
        w.add_embedding_length(hidden)
        w.add_block_count(int(config["num_hidden_layers"]))
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
        theta = _rope_theta(config)
        if theta is not None:
            w.add_rope_freq_base(theta)
        if gguf_arch == "llama":
            w.add_rope_dimension_count(head_dim)
        if isinstance(config.get("head_dim"), int):  # convert writes it when config has one
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(len(vocab.tokens))
        w.add_file_type(getattr(gguf.LlamaFileType, OUTPUT_TYPES[output_type][1]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        vocab.special.add_to_gguf(w, quiet=True)  # merges, special ids, add_bos, template

        for p in plan:
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.qtype),
                              raw_dtype=p.qtype)
        w.write_header_to_file(out)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, p in enumerate(plan):
            array = files.get(p.source).float().numpy()
            if p.permute_heads:
                array = permute_rows(array, p.permute_heads)
            w.write_tensor_data(_convert(array, p.qtype))
            if progress:
                progress((i + 1) / len(plan), f"tensor {i + 1}/{len(plan)}")
        w.close()
    except BaseException:
        w.close()
        out.unlink(missing_ok=True)
        raise
    counts: dict[str, int] = {}
    for p in plan:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    h = hashlib.sha256()
    with out.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return ExportResult(
        path=str(out), architecture=gguf_arch, output_type=output_type,
        file_type=OUTPUT_TYPES[output_type][1], size_bytes=out.stat().st_size,
        sha256=h.hexdigest(), tensor_types=counts, tensor_count=len(plan),
        parameters=sum(math.prod(p.shape) for p in plan), tokenizer_pre=vocab.pre,
        vocab_size=len(vocab.tokens), chat_template=vocab.special.chat_template is not None,
        tied_embeddings=tied, fallbacks=fallbacks)
