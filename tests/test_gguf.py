"""GGUF import (issue 20): a tiny Llama written as GGUF here with the gguf package's writer,
tensor-name map and quantizers, dequantized into the lab through the CLI, a job's checkpoint
field and the Registry's Import box; the logits agree with the source model; the file's
hash, tensor types and metadata are recorded; bad files are refused cleanly.

The imported weights are exactly the file's dequantized values (gguf.quants.dequantize);
what differs from the source model is the file's own rounding. Measured on these models
(logits of a (2, 24) batch, relative to the source logits' standard deviation, 2.9 here):

  file -> import     max |diff|   rms diff   the tests allow (max, rms)
  F32  -> float32    0            0          1e-6, 1e-6
  F16  -> bfloat16   1.2 %        0.23 %     2.5 %, 0.5 %   (bf16 rounding dominates)
  Q8_0 -> float32    3.9 %        0.73 %     8 %, 1.5 %     (8-bit blocks of 32, one scale)
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: the q/k rows of each head in
    GGML's rotary order (transformers undoes it when it reads the file)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_llama_gguf(model_dir: Path, out: Path, qtype: str = "F32",
                     chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Write an HF Llama folder as a GGUF file, as llama.cpp's converter would: metadata,
    the byte-level BPE tokenizer (llama.cpp's "gpt2" model), GGUF tensor names, q/k permuted;
    1-D tensors stay F32, the rest in `qtype` (F32, F16, or a block type such as Q8_0)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    special = set(tok.all_special_ids)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                       for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_add_bos_token(True)
    if chat_template:
        w.add_chat_template(chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    quant = getattr(gguf.GGMLQuantizationType, qtype)
    for name, tensor in model.state_dict().items():
        if c.tie_word_embeddings and name == "lm_head.weight":
            continue  # a tied model's file has no output.weight
        base, suffix = name.rsplit(".", 1)
        array = tensor.numpy()
        if base.endswith("q_proj"):
            array = _permute(array, c.num_attention_heads)
        elif base.endswith("k_proj"):
            array = _permute(array, c.num_key_value_heads)
        target = f"{names.get_name(base)}.{suffix}"
        if array.ndim == 1 or qtype == "F32":
            w.add_tensor(target, array.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(target, array.astype(np.float16))
        else:
            w.add_tensor(target, gguf.quants.quantize(array.astype(np.float32), quant),
                         raw_dtype=quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def sources(tiny_model_dir, tmp_path_factory):
    """Two source models with logits of order 1 (at init scale the tiny model's are ~0.1,
    which would hide any error): the tiny model with a larger LM head (untied), and a tied
    variant (as SmolLM2: no output.weight in the file), with its GGUF files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("gguf")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    untied = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        untied.lm_head.weight.mul_(25)
    untied.save_pretrained(root / "untied")
    config = untied.config
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    tied = type(untied)(config)
    with torch.no_grad():
        tied.model.embed_tokens.weight.mul_(25)
    tied.tie_weights()
    tied.save_pretrained(root / "tied")
    for folder in ("untied", "tied"):
        tok.save_pretrained(root / folder)
    return {"untied": root / "untied", "tied": root / "tied",
            "F32": write_llama_gguf(root / "untied", root / "tiny-f32.gguf", "F32"),
            "F16": write_llama_gguf(root / "tied", root / "tiny-f16.gguf", "F16"),
            "Q8_0": write_llama_gguf(root / "tied", root / "tiny-q8_0.gguf", "Q8_0")}


def logit_errors(source_dir, imported) -> tuple[float, float]:
    """(max, rms) |logit difference| over the spread of the source logits."""
    from transformers import AutoModelForCausalLM

    x = torch.randint(4, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    a = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = a(input_ids=x).logits, imported.float()(input_ids=x).logits
    diff = want - got
    return float(diff.abs().max() / want.std()), float(diff.pow(2).mean().sqrt() / want.std())


def file_values(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized by the gguf package, by GGUF name."""
    import gguf

    return {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            for t in gguf.GGUFReader(str(path)).tensors}


def cli_import(lab_dir, path, *extra):
    proc = run_cli(lab_dir, "import", path, *extra, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.parametrize("qtype,source,dtype,max_error,rms_error", [
    ("F32", "untied", "float32", 1e-6, 1e-6),
    ("F16", "tied", None, 0.025, 0.005),  # the default dtype: bfloat16
    ("Q8_0", "tied", "float32", 0.08, 0.015),
])
def test_import_dequantizes_to_a_checkpoint_with_the_same_logits(lab_dir, sources, qtype,
                                                                 source, dtype, max_error,
                                                                 rms_error):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = sources[qtype]
    proc = cli_import(lab_dir, path, *(["--dtype", dtype] if dtype else []))
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["relation"] == "import" and row["source"] == str(path.resolve())
    assert row["name"] == path.stem and row["dtype"] == (dtype or "bfloat16")
    folder = Path(row["path"])
    assert folder.parent == lab_dir / "checkpoints"  # in the lab, as safetensors
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    imported = AutoModelForCausalLM.from_pretrained(folder).eval()
    if dtype == "float32":  # exactly what the file holds, block by block
        values = file_values(path)
        assert torch.equal(imported.model.embed_tokens.weight, values["token_embd.weight"])
        assert torch.equal(imported.model.layers[1].mlp.down_proj.weight,
                           values["blk.1.ffn_down.weight"])
    worst, rms = logit_errors(sources[source], imported)
    assert worst <= max_error and rms <= rms_error, \
        f"{qtype}: logits differ by {worst:.2%} (max), {rms:.2%} (rms) of their spread"
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        stored = {str(f.get_tensor(k).dtype) for k in keys}
    assert ("lm_head.weight" in keys) == (source == "untied")  # tied stays tied
    assert stored == {f"torch.{dtype or 'bfloat16'}"}

    meta = row["metadata"]["gguf"]
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["architecture"] == "llama" and meta["context_length"] == 256
    assert meta["chat_template"] == CHAT_TEMPLATE and meta["dtype"] == (dtype or "bfloat16")
    assert meta["quantization"] == ({"F32": 21} if qtype == "F32" else {qtype: 15, "F32": 5})
    assert meta["file_type"] == {"F32": "ALL_F32", "F16": "MOSTLY_F16",
                                 "Q8_0": "MOSTLY_Q8_0"}[qtype]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    original = AutoTokenizer.from_pretrained(sources[source])
    text = "The capital of Varnia is Oskel.\n  Tabs\tand ünïcode!"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_the_same_file_is_imported_once_per_dtype_and_feeds_any_checkpoint_field(
        lab, sources):
    """A .gguf path in a job's checkpoint field is imported once (bfloat16); the next job and
    a plain `import` of the same file reuse that checkpoint; another dtype is another one."""
    from app import jobs
    from app.checkpoints import import_checkpoint
    from app.ui.registry_view import import_form
    from tests.test_jobs import run_to_end

    path = str(sources["Q8_0"])
    job = jobs.submit(lab, "evaluate", {"checkpoint": path, "max_tokens": 64, "window": 32})
    assert run_to_end(lab, job["id"], timeout=240) == "succeeded"
    with lab.registry() as reg:
        (imported,) = [c for c in reg.list_checkpoints() if c["relation"] == "import"]
        assert json.loads(imported["metadata"])["gguf"]["dtype"] == "bfloat16"
        assert reg.evaluations(imported["id"])  # the job scored the imported checkpoint
        again = import_checkpoint(lab, reg, path, log=lambda m: None)
        assert again["id"] == imported["id"]
    message = import_form(lab, path, "")  # the Registry view's Import box
    assert imported["id"] in message and "Registered" in message
    message = import_form(lab, str(sources["F16"]), "from-the-box")
    with lab.registry() as reg:
        boxed = reg.find_checkpoint("from-the-box")
        assert boxed is not None and boxed["id"] in message
        as_float = import_checkpoint(lab, reg, path, dtype="float32", log=lambda m: None)
        assert as_float["id"] != imported["id"] and as_float["dtype"] == "float32"


def test_an_architecture_transformers_cannot_read_is_refused_by_name(lab_dir, tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    proc = cli_import(lab_dir, path)
    assert proc.returncode == 2, proc.stderr
    assert "architecture 'rwkv6' cannot be loaded from GGUF by transformers" in proc.stderr
    assert "llama" in proc.stderr  # it says which ones it reads
    assert not list((lab_dir / "checkpoints").iterdir())  # nothing half-written


def test_corrupt_truncated_and_foreign_files_are_refused_cleanly(lab, lab_dir, sources,
                                                                 tmp_path):
    from app import jobs
    from plugins import ConfigError

    data = sources["F32"].read_bytes()
    bad = {"foreign": b"PK\x03\x04 this is a zip, not a model" * 4,
           "empty": b"",
           "header-only": data[:200],
           "corrupt": data[:24] + bytes(range(256)) * 8,  # GGUF v3, then noise
           "truncated": data[:len(data) - 1000]}
    for what, content in bad.items():
        path = tmp_path / f"{what}.gguf"
        path.write_bytes(content)
        proc = cli_import(lab_dir, path)
        assert proc.returncode == 2, (what, proc.stderr)
        line = proc.stderr.strip()
        assert str(path) in line and len(line.splitlines()) == 1, (what, line)
        assert {"foreign": "not a GGUF file", "empty": "not a GGUF file",
                "corrupt": "corrupt"}.get(what, "is truncated") in line, line
        with pytest.raises(ConfigError, match=f"field 'checkpoint'.*{what}.gguf"):
            jobs.submit(lab, "evaluate", {"checkpoint": str(path)})
    assert not list((lab_dir / "checkpoints").iterdir())
    with lab.registry() as reg:
        assert reg.list_checkpoints() == [] and reg.jobs() == []


def test_a_shared_lab_refuses_a_gguf_outside_its_allowed_roots(lab_dir, sources):
    from app.checkpoints import import_checkpoint
    from registry import CheckpointError

    inside = lab_dir / "uploads"
    inside.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text(f"allowed_roots = [{str(inside)!r}]\n")
    proc = cli_import(lab_dir, sources["F32"])
    assert proc.returncode == 2
    assert "outside the lab's allowed roots" in proc.stderr and str(sources["F32"]) in \
        proc.stderr
    from app.lab import Lab

    shared = Lab(lab_dir)
    with shared.registry() as reg, pytest.raises(CheckpointError, match="allowed roots"):
        import_checkpoint(shared, reg, str(sources["F32"]), log=lambda m: None)  # ctx.open
    copy = inside / "tiny.gguf"
    copy.write_bytes(sources["F32"].read_bytes())
    proc = cli_import(lab_dir, copy, "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["metadata"]["gguf"]["dtype"] == "float32"


def test_dtype_is_refused_for_a_folder(lab_dir, tiny_model_dir):
    proc = cli_import(lab_dir, tiny_model_dir, "--dtype", "float32")
    assert proc.returncode == 2 and "only a GGUF import is converted" in proc.stderr

