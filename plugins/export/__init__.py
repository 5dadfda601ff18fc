"""export: write a checkpoint as one GGUF file (llama.cpp, Ollama, LM Studio), in F32, F16,
BF16, Q8_0 or a 5- or 4-bit block type, with its tokenizer and chat template in the file's
metadata (ops/gguf_export.py does the writing). The file is registered as a new checkpoint
of relation `export` whose parent is the source checkpoint (role `source`); its folder holds
the one .gguf file, which the Registry offers for download. A job that names an export in a
checkpoint field gets its file imported (dequantized to bfloat16) first."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator

from ops.gguf_export import ARCHITECTURES, OUTPUT_TYPES
from plugins import CheckpointRef, NextStep, Plugin, PluginConfig

FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
OutputType = Literal["F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]
assert set(OutputType.__args__) == set(OUTPUT_TYPES)  # one list, the writer's


class Config(PluginConfig):
    checkpoint: CheckpointRef = Field(description=(
        "The model to write as GGUF: a registry id or name, or a model folder. Layouts: "
        + ", ".join(ARCHITECTURES) + " (Mistral is written as llama.cpp's llama), with a "
        "byte-level BPE tokenizer (tokenizer.json)."))
    output_type: OutputType = Field("Q8_0", description=(
        "Tensor type of the 2-D weights. F32, F16, BF16: plain floats; Q8_0: 8-bit blocks of "
        "32 with one scale (about half of F16); Q5_1, Q5_0, Q4_1, Q4_0: 5- and 4-bit blocks "
        "(their output layer is kept at Q8_0). Norms and biases stay F32 in every type."))
    name: Optional[str] = Field(None, min_length=1, max_length=100, description=(
        "Name of the new checkpoint, and of its file (NAME.gguf): letters, digits, '.', "
        "'_', '+' and '-', starting with a letter or digit. Empty: <source name>-<type>."))

    @field_validator("name")
    @classmethod
    def _file_name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and (not FILE_NAME.match(value) or ".." in value):
            raise ValueError("a file name of letters, digits, '.', '_', '+' and '-', starting "
                             "with a letter or digit (it names the .gguf file)")
        return value


def default_name(source_name: str, output_type: str) -> str:
    """<source name>-<type>, made a safe file name."""
    base = re.sub(r"[^A-Za-z0-9._+-]+", "_", source_name).strip("._+-")[:80] or "model"
    return f"{base}-{output_type.lower()}"


def run(config: Config, ctx) -> None:
    from ops.gguf_export import export_gguf

    source = ctx.open(config.checkpoint)
    if source.kind != "model":
        raise ValueError(f"checkpoint: {source.name} ({source.id}) is a {source.kind}, not a "
                         f"model; export writes a full model (merge an adapter first with "
                         f"merge_adapter, apply a task vector with task_vector)")
    name = config.name or default_name(source.name, config.output_type)
    out = ctx.new_checkpoint("export", parents=[{"checkpoint": source, "role": "source"}],
                             name=name)
    ctx.log(f"writing {source.name} ({source.id}) as {name}.gguf ({config.output_type})")
    result = export_gguf(source.path, out.path / f"{name}.gguf", config.output_type,
                         name=name, what="checkpoint",
                         progress=lambda f, m: ctx.progress(0.05 + 0.9 * f, m))
    record = result.as_metadata()
    record.pop("path")  # the temporary folder's; the file lies in the checkpoint's folder
    out.metadata.update({"file": f"{name}.gguf", "source": source.id, **record})
    types = ", ".join(f"{n} {t}" for t, n in result.tensor_types.items())
    ctx.log(f"wrote {name}.gguf: {result.size_bytes / 2 ** 20:.2f} MiB, {result.architecture}, "
            f"{types} tensors, tokenizer.ggml.pre {result.tokenizer_pre}, sha256 "
            f"{result.sha256[:16]}...")
    if result.fallbacks:
        ctx.log(f"written F16 (rows not a multiple of the block size): "
                f"{', '.join(result.fallbacks[:10])}")
    ctx.progress(1.0, "done")


PLUGIN = Plugin(
    name="export",
    order=80,
    title="Export GGUF",
    description="Write a checkpoint as a GGUF file for llama.cpp, Ollama or LM Studio (F16, "
                "BF16, Q8_0, Q5/Q4 block types), tokenizer and chat template included; the "
                "file is registered as a checkpoint whose parent is the source.",
    Config=Config,
    run=run,
    uses_gpu=False,
    next_steps={"export": NextStep(
        "evaluate", "Evaluate the export against its source: the job imports (dequantizes) "
                    "its GGUF file first, so the scores are the file's.")},
)
