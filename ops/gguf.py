"""GGUF files (llama.cpp's format) as Hugging Face models: what a file says about itself, and
its tensors dequantized into a plain transformers model.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (a header of key/value
metadata, tensor infos, then the tensor data, each tensor in one GGML type: F32, F16, BF16,
or blocks such as Q8_0 = 32 int8 values and one float16 scale, Q4_1 = 32 4-bit values, a
scale and a minimum).

transformers reads GGUF (`from_pretrained(folder, gguf_file=...)`): it maps the metadata to a
config, the tensor names to its own, undoes llama.cpp's Q/K row permutation, and dequantizes
every block through the gguf package. The model it returns is marked quantized (it keeps a
GGUF quantizer) and refuses `save_pretrained`, so `dequantized_model` moves its weights into a
plain model built from the same config. Reading the header needs only the standard library
and the gguf package's type tables (it runs in the server, on every submit that names a
.gguf file); the conversion imports torch and transformers inside the function.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
DTYPES = ("bfloat16", "float16", "float32")  # what a GGUF can be dequantized into

# GGUF architecture names transformers' loader renames before it looks them up (as
# transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint does).
ARCHITECTURE_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                        "minimax-m2": "minimax_m2"}
# Keys of transformers' GGUF config table that are no architecture, and architectures it reads
# that are no causal language model (T5 is an encoder-decoder): the lab cannot use them.
NOT_CAUSAL_LM = {"general", "tokenizer", "t5", "t5encoder", "umt5"}


class GGUFError(ValueError):
    """A file that is not a usable GGUF; the message names the file and what was expected."""


@dataclass
class GGUFInfo:
    """What a GGUF file says about itself, read from its header without its tensor data."""

    path: str
    size_bytes: int
    version: int
    architecture: str
    name: str | None
    context_length: int | None
    chat_template: str | None
    file_type: str | None  # general.file_type as llama.cpp names it (MOSTLY_Q4_1, ALL_F32...)
    quantization: dict[str, int]  # GGML tensor type -> number of tensors ({"Q4_1": 211, ...})
    tensor_count: int
    parameters: int
    fields: dict[str, Any] = field(default_factory=dict)  # other scalar metadata that matters

    def as_metadata(self) -> dict:
        """The JSON-ready record an import stores on its checkpoint."""
        return asdict(self)


# GGUF value types (gguf.GGUFValueType): struct formats of the scalars; 8 is a string
# (u64 length + UTF-8 bytes), 9 an array (u32 element type, u64 count, the elements).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Header:
    """A walk over a GGUF header (metadata, then tensor infos) that checks every read against
    the file's length. By hand, because gguf.GGUFReader builds numpy views of every array
    element: 7.6 s on SmolLM2's 49,152 tokens and merges, where this walk takes a fraction of
    a second (and a checkpoint reference is resolved on every submit, in the server)."""

    def __init__(self, data, order: str):
        self.data, self.order, self.at = data, order, 0

    def take(self, fmt: str):
        size = struct.calcsize(self.order + fmt)
        if self.at + size > len(self.data):
            raise _Truncated()
        value = struct.unpack_from(self.order + fmt, self.data, self.at)
        self.at += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        if self.at + n > len(self.data):
            raise _Truncated()
        text = bytes(self.data[self.at:self.at + n]).decode("utf-8", "replace")
        self.at += n
        return text

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            n = self.take("Q")
            if self.at + n > len(self.data):
                raise _Truncated()
            self.at += n

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        element, count = self.take("I"), self.take("Q")
        if element == _STRING:
            self.skip_strings(count)
            return count
        if element not in _SCALARS:
            raise ValueError(f"array of unknown value type {element}")
        size = struct.calcsize(_SCALARS[element]) * count
        if self.at + size > len(self.data):
            raise _Truncated()
        self.at += size
        return count  # arrays are counted, not decoded: nothing we record is one


def read_info(path: str | Path) -> GGUFInfo:
    """Read and check a GGUF file's header: the magic, the metadata, and that every tensor's
    data lies inside the file (a truncated download is caught here, not half-way through a
    conversion). Raises GGUFError naming the file."""
    import mmap

    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise GGUFError(f"{p}: cannot be read ({e.strerror or e})") from None
    if not p.is_file():
        raise GGUFError(f"{p} is not a file; expected a .gguf file")
    if head[:4] != MAGIC:
        raise GGUFError(f"{p} is not a GGUF file: it starts with {head[:4]!r}; a GGUF file "
                        f"starts with {MAGIC!r}")
    if len(head) < 8:
        raise GGUFError(f"{p} is truncated: it ends inside its header ({size} bytes)")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    version = struct.unpack_from("<I", head, 4)[0]
    order = "<"
    if version & 0xFFFF == 0:  # a big-endian file (llama.cpp writes one on request)
        order, version = ">", struct.unpack_from(">I", head, 4)[0]
    if version not in (2, 3):
        raise GGUFError(f"{p}: GGUF version {version}; expected version 2 or 3")
    with p.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        walk = _Header(data, order)
        walk.at = 8
        try:
            tensor_count, kv_count = walk.take("Q"), walk.take("Q")
            meta: dict[str, Any] = {}
            for _ in range(kv_count):
                key = walk.string()
                meta[key] = walk.value(walk.take("I"))
            tensors = []  # (name, type, elements, offset)
            for _ in range(tensor_count):
                name = walk.string()
                n_dims = walk.take("I")
                if n_dims > 8:  # GGML tensors have at most 4
                    raise ValueError(f"tensor {name} has {n_dims} dimensions")
                dims = [walk.take("Q") for _ in range(n_dims)]
                kind, offset = walk.take("I"), walk.take("Q")
                tensors.append((name, kind, math.prod(dims), offset))
            alignment = meta.get("general.alignment", 32)
            if not isinstance(alignment, int) or alignment <= 0:
                raise ValueError(f"general.alignment is {alignment!r}")
            start = -(-walk.at // alignment) * alignment
        except _Truncated:
            raise GGUFError(f"{p} is truncated or corrupt: its header runs past the end of "
                            f"the file ({size:,} bytes)") from None
        except (ValueError, struct.error, OverflowError, MemoryError) as e:
            raise GGUFError(f"{p} is corrupt: {e}; expected a GGUF header") from None
    quantization: dict[str, int] = {}
    for name, kind, elements, offset in tensors:
        try:
            qtype = GGMLQuantizationType(kind)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(f"{p} is corrupt: tensor {name} has unknown type {kind}") from None
        end = start + offset + elements // block * type_size
        if end > size:
            raise GGUFError(f"{p} is truncated: tensor {name} needs bytes up to {end:,}, and "
                            f"the file has {size:,}")
        quantization[qtype.name] = quantization.get(qtype.name, 0) + 1
    architecture = meta.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise GGUFError(f"{p} has no general.architecture in its metadata; expected the "
                        f"model's architecture (llama, qwen2, ...)")
    file_type = meta.get("general.file_type")
    try:
        file_type_name = LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    fields = {}
    for key in ("general.basename", "general.size_label", "general.finetune",
                "general.license", "general.quantization_version",
                f"{architecture}.block_count", f"{architecture}.embedding_length",
                f"{architecture}.feed_forward_length", f"{architecture}.attention.head_count",
                f"{architecture}.attention.head_count_kv", f"{architecture}.rope.freq_base",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if isinstance(meta.get(key), (str, int, float, bool)):
            fields[key] = meta[key]  # tokenizer.ggml.tokens: the vocabulary's size
    context, template, name = (meta.get(f"{architecture}.context_length"),
                               meta.get("tokenizer.chat_template"), meta.get("general.name"))
    return GGUFInfo(
        path=str(p.resolve()), size_bytes=size, version=version, architecture=architecture,
        name=name if isinstance(name, str) else None,
        context_length=int(context) if isinstance(context, int) else None,
        chat_template=template if isinstance(template, str) else None,
        file_type=file_type_name, quantization=quantization, tensor_count=len(tensors),
        parameters=sum(t[2] for t in tensors), fields=fields)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def supported_architectures() -> list[str]:
    """GGUF architectures transformers can load as a causal LM: its legacy table (dequantized
    at load) and the packed loader's (lfm2, qwen35, ...). Imports torch."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    names = set(GGUF_CONFIG_MAPPING)
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:  # an older transformers has only the legacy loader
        pass
    return sorted(names - NOT_CAUSAL_LM)


def unsupported_architecture(info: GGUFInfo) -> str | None:
    """Why transformers cannot load this file's architecture, or None."""
    known = supported_architectures()
    arch = info.architecture
    if arch in known or ARCHITECTURE_RENAMES.get(arch) in known:
        return None
    return (f"{info.path}: architecture {arch!r} cannot be loaded from GGUF by transformers "
            f"(it reads {', '.join(known)}); convert the original Hugging Face checkpoint "
            f"instead, or import it as a folder")


def dequantized_model(path: str | Path, dtype: str = "bfloat16"):
    """(model, tokenizer) of a GGUF file: every tensor dequantized (block values times their
    scale, plus the minimum where the type has one) and cast to `dtype`, in a plain
    transformers model that save_pretrained writes as safetensors. Tied embeddings stay tied
    (a file without output.weight shares token_embd.weight)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if dtype not in DTYPES:
        raise GGUFError(f"dtype: got {dtype!r}; expected one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    p = Path(path).resolve()
    # transformers reads the GGUF from a folder; a folder of its own keeps other files next to
    # the .gguf (a config.json, a tokenizer) from being mixed into what it loads
    with tempfile.TemporaryDirectory(prefix="gguf-") as folder:
        os.symlink(p, Path(folder) / "model.gguf")
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file="model.gguf", dtype=torch_dtype,
            quantization_config=GgufConfig(dequantize=True))  # every weight unpacked
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are plain tensors now
        del config.quantization_config
    config.name_or_path = ""  # the temporary folder
    config.dtype = torch_dtype
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = loaded.state_dict()
    model.load_state_dict(state, assign=True, strict=True)
    # non-persistent buffers (rotary inv_freq) are not in a state dict: take the loaded ones
    for name, buffer in loaded.named_buffers():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[attr] = buffer
    for module_name, module in model.named_modules():  # plain tensor attributes (rope copies)
        source = loaded.get_submodule(module_name) if module_name else loaded
        for attr, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(module, attr, getattr(source, attr))
    model.tie_weights()
    stray = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if t.is_meta]
    if stray:
        raise GGUFError(f"{p}: the file gives no values for {', '.join(stray[:5])}")
    del loaded
    return model.eval(), tokenizer
