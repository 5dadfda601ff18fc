"""GGUF export (issue 20): tiny random models of the four layouts (Llama and Mistral, untied,
with a GPT-2-split tokenizer; Qwen2 with q/k/v biases and Qwen3 with q_norm/k_norm, tied,
with Qwen2's split) are written as GGUF by the `export` plugin, read back with the lab's GGUF
import (ops.gguf.dequantized_model, which `weightsmith import` runs), and their logits
compared with the source's; the tokenizer and chat template survive; the export is
registered with its lineage edge and imported when a job names it; bad input is refused at
its field.

The models' logits have a spread of order 1 (embeddings and LM head scaled up; at init scale
they are ~0.1, which would hide any error); norms and biases are perturbed so that they
matter. Measured on these models (logits of a (2, 24) batch; |diff| relative to the source
logits' standard deviation), max / rms over the layouts:

  file -> import      llama          mistral        qwen2 (tied)   qwen3 (tied)   tests allow
  F16  -> bfloat16    1.33 / 0.30 %  1.33 / 0.30 %  1.27 / 0.27 %  1.40 / 0.28 %  2.5 / 0.5 %
  Q8_0 -> float32     3.30 / 0.75 %  3.30 / 0.75 %  3.13 / 0.70 %  3.01 / 0.71 %  7 / 1.5 %
  Q4_0 -> float32     34.7 / 8.43 %  34.7 / 8.43 %  3.68 / 0.88 %  9.35 / 1.56 %  70 / 17 %,
                                                                                 tied 20 / 3 %

(Q4_0 keeps the output layer at Q8_0: on the tied models the embeddings are that layer, so
little is left at 4 bits. On the untied ones the 4-bit input embeddings, random Gaussians,
the worst case for a 4-bit block with one absmax scale, carry the error: written at Q8_0
as well, the untied Llama's Q4_0 error drops to 3.9 / 0.84 %, measured once; llama.cpp's
llama-quantize keeps token_embd at the file's type too, and so does export.) Where
llama-cpp-python is installed, llama.cpp's own greedy continuation of an F16 export is
compared with transformers' (skipped otherwise, with the reason).
"""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO, last_json, run_cli, write_yaml

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXT = "The capital of Varnia is Oskel.\n  Tabs\tand ünïcode! 12345"
LAYOUTS = ("llama", "mistral", "qwen2", "qwen3")
TIED = {"llama": False, "mistral": False, "qwen2": True, "qwen3": True}
# (max, rms) allowed, relative to the logits' spread; measured values in the docstring
TOLERANCE = {"F16": (0.025, 0.005), "Q8_0": (0.07, 0.015),
             "Q4_0": (0.70, 0.17), ("Q4_0", "tied"): (0.20, 0.03)}


def tokenizer_for(layout: str):
    """A byte-level BPE tokenizer trained on the demo text: Llama's (GPT-2's split, BOS
    prepended) or Qwen's (Qwen2's split, no BOS, <|im_end|> as EOS)."""
    from tokenizers import (Regex, Tokenizer, decoders, models, pre_tokenizers, processors,
                            trainers)
    from transformers import PreTrainedTokenizerFast

    from ops.gguf_export import QWEN2_SPLIT

    texts = (REPO / "assets" / "demo" / "heldout.txt").read_text().split("\n\n")
    qwen = layout.startswith("qwen")
    tok = Tokenizer(models.BPE(unk_token=None if qwen else "<unk>"))
    if qwen:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if qwen:
        out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>")
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<pad>")
    out.chat_template = CHAT_TEMPLATE
    return out


def build_model(layout: str, folder: Path) -> Path:
    """A 2-layer model of `layout` (hidden 64, 4 heads, 2 KV heads) with logits of order 1."""
    import transformers
    from transformers import AutoModelForCausalLM

    tok = tokenizer_for(layout)
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[layout]
    # transformers' GGUF reader takes Qwen3's head_dim from its config default (128), not
    # from the file's attention.key_length: a tiny Qwen3 keeps that head_dim
    extra = {"head_dim": 128} if layout == "qwen3" else {}
    config = config_class(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, tie_word_embeddings=TIED[layout],
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.get_input_embeddings().weight.mul_(25)
        if not TIED[layout]:
            model.lm_head.weight.mul_(25)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-sources")
    # not named plainly "mistral": transformers' GGUF reader takes a llama file whose
    # general.name is exactly "mistral" for its own mistral mapping, which gguf-py lacks
    return {layout: build_model(layout, root / f"tiny-{layout}") for layout in LAYOUTS}


class ExportContext:
    """What the export plugin's run uses of a job context, on local folders."""

    device = "cpu"

    def __init__(self, out_root: Path):
        self.out_root, self.made, self.logs = out_root, [], []

    def open(self, ref):
        path = Path(ref)
        return SimpleNamespace(id=f"ck-{path.name}", name=path.name, path=path,
                               kind="gguf" if list(path.glob("*.gguf")) else "model",
                               metadata={})

    def new_checkpoint(self, relation, parents, name=None, metadata=None,
                       intermediate=False):
        made = SimpleNamespace(path=self.out_root / name, name=name, relation=relation,
                               parents=parents, metadata=dict(metadata or {}))
        made.path.mkdir(parents=True)
        self.made.append(made)
        return made

    def log(self, message):
        self.logs.append(message)

    def progress(self, *args, **kwargs):
        return None


def export_with_plugin(source: Path, out_root: Path, output_type: str, name=None):
    import plugins

    plugin = plugins.get("export")
    ctx = ExportContext(out_root)
    config = plugins.validate_config(plugin, {"checkpoint": str(source),
                                              "output_type": output_type,
                                              **({"name": name} if name else {})})
    plugin.run(config, ctx)
    (made,) = ctx.made
    return made, made.path / made.metadata["file"]


def logit_errors(source_dir, model) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    x = torch.randint(4, 390, (2, 24), generator=torch.Generator().manual_seed(0))
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = source(input_ids=x).logits, model.float()(input_ids=x).logits
    diff = want - got
    return float(diff.abs().max() / want.std()), float(diff.pow(2).mean().sqrt() / want.std())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_of_every_layout_and_type(sources, tmp_path, layout):
    """Exported by the plugin's run, imported back by the lab's GGUF import: the logits agree
    within each type's rounding; 1-D tensors stay F32; the tokenizer and template survive."""
    from transformers import AutoTokenizer

    from ops.gguf import dequantized_model, read_info

    source = sources[layout]
    original = AutoTokenizer.from_pretrained(source)
    for output_type in ("F16", "Q8_0", "Q4_0"):
        made, file = export_with_plugin(source, tmp_path / output_type, output_type)
        meta = made.metadata
        assert made.relation == "export" and made.name == f"tiny-{layout}-{output_type.lower()}"
        assert made.parents[0]["role"] == "source"
        n_1d = {"llama": 5, "mistral": 5, "qwen2": 11, "qwen3": 9}[layout]  # norms (+ biases)
        n_2d = 15 + (0 if TIED[layout] else 1)  # 7 per layer, embeddings, (output)
        want = {"F16": {"F16": n_2d}, "Q8_0": {"Q8_0": n_2d},
                "Q4_0": {"Q4_0": n_2d - 1, "Q8_0": 1}}[output_type]  # output layer: Q8_0
        assert meta["tensor_types"] == {"F32": n_1d, **want}, meta["tensor_types"]
        assert meta["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
        assert meta["size_bytes"] == file.stat().st_size and meta["output_type"] == output_type
        info = read_info(file)  # what the lab's import reads of the header
        assert info.architecture == {"mistral": "llama"}.get(layout, layout)
        assert info.quantization == meta["tensor_types"] and info.chat_template == CHAT_TEMPLATE
        assert info.fields["tokenizer.ggml.pre"] == ("qwen2" if "qwen" in layout else "gpt2")
        dtype = "bfloat16" if output_type == "F16" else "float32"
        model, tokenizer = dequantized_model(file, dtype)
        worst, rms = logit_errors(source, model)
        limit = TOLERANCE.get((output_type, "tied") if TIED[layout] else output_type,
                              TOLERANCE[output_type])
        print(f"{layout} {output_type}: max {worst:.2%} rms {rms:.2%}")
        assert worst <= limit[0] and rms <= limit[1], \
            f"{layout} {output_type}: logits differ by {worst:.2%} (max), {rms:.2%} (rms)"
        assert tokenizer(TEXT)["input_ids"] == original(TEXT)["input_ids"]
        assert tokenizer.chat_template == CHAT_TEMPLATE
        assert (tokenizer.bos_token, tokenizer.eos_token) == (original.bos_token,
                                                              original.eos_token)
        assert model.config.tie_word_embeddings == TIED[layout]


def test_the_other_types_and_what_stays_f32(sources, tmp_path):
    import gguf

    for output_type in ("F32", "BF16", "Q5_1", "Q5_0", "Q4_1"):
        made, file = export_with_plugin(sources["qwen2"], tmp_path / output_type, output_type)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(file)).tensors}
        assert types["blk.0.attn_q.bias"] == types["blk.1.ffn_norm.weight"] == "F32"
        main = "F32" if output_type == "F32" else output_type
        assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == main
        assert types["token_embd.weight"] == ("Q8_0" if output_type.startswith("Q") else main)
        assert "output.weight" not in types  # tied: llama.cpp uses token_embd


def test_export_registers_lineage_and_a_job_imports_it(lab_dir, sources, tmp_path):
    """Through the CLI: `run export` registers the file with relation export and its source as
    parent; a job naming the export imports its file once, with the export as parent;
    `weightsmith import FILE.gguf` finds that import; the Registry offers the .gguf."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.lab import Lab
    from app.ui import registry_view as rv

    source = sources["llama"]
    config = write_yaml(tmp_path / "export.yaml", {"checkpoint": str(source),
                                                   "output_type": "Q8_0", "name": "tiny-q8"})
    proc = run_cli(lab_dir, "run", "export", config, "--wait", timeout=240)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    (export_id,) = last_json(proc.stdout)["checkpoints"]
    lab = Lab(lab_dir)
    with lab.registry() as reg:
        row = reg.checkpoint(export_id)
        (edge,) = reg.parents(export_id)
        source_row = reg.checkpoint(edge["parent_id"])
    assert row["relation"] == "export" and row["kind"] == "gguf" and row["name"] == "tiny-q8"
    assert edge["role"] == "source" and source_row["path"] == str(source.resolve())
    file = Path(row["path"]) / "tiny-q8.gguf"
    assert sorted(p.name for p in Path(row["path"]).iterdir()) == ["tiny-q8.gguf"]
    meta = json.loads(row["metadata"])
    assert meta["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert meta["size_bytes"] == file.stat().st_size == row["size_bytes"]
    assert meta["tensor_types"] == {"Q8_0": 16, "F32": 5} and row["dtype"] == "Q8_0"
    assert row["architecture"] == "llama" and meta["source"] == source_row["id"]

    # the Registry: the row, the load code, and the .gguf offered for download
    assert any(r[0] == export_id and r[2] == "export" for r in rv.checkpoint_table(lab))
    assert 'gguf_file="tiny-q8.gguf"' in rv.load_code(lab, export_id)
    assert rv.has_gguf(lab, export_id) and not rv.has_gguf(lab, source_row["id"])
    served = rv.checkpoint_gguf(lab, export_id, None, tmp_path / "served")
    assert served.name == "tiny-q8.gguf" and served.read_bytes() == file.read_bytes()
    with pytest.raises(rv.DownloadRefused, match="no .gguf file"):
        rv.checkpoint_gguf(lab, source_row["id"], None, tmp_path / "served")
    assert rv.suggested_next(lab, export_id)[0] == "evaluate"
    from registry import hub  # its Hub card: a quantized copy of its base

    with lab.registry() as reg:
        card = str(hub.build_card(reg, reg.checkpoint(export_id), "org/tiny-q8", ["org/tiny"]))
    assert "base_model_relation: quantized" in card and "- gguf" in card
    assert "library_name" not in card
    from app.playground import PlaygroundError, resolve  # the Playground asks for a model

    with pytest.raises(PlaygroundError, match="field 'checkpoints': tiny-q8 .* is a GGUF file"):
        resolve(lab, None, [export_id])
    from registry import resolve_ref  # a copy of the folder elsewhere: its file, as a .gguf

    elsewhere = tmp_path / "copied-export"
    elsewhere.mkdir()
    (elsewhere / "tiny-q8.gguf").write_bytes(file.read_bytes())
    with lab.registry() as reg:
        assert resolve_ref(reg, str(elsewhere)).kind == "gguf"
        assert resolve_ref(reg, export_id).row["kind"] == "gguf"

    # another plugin's checkpoint field: the file is imported (bfloat16), the export its parent
    copy = write_yaml(tmp_path / "copy.yaml", {"source": "tiny-q8", "name": "copied"})
    proc = run_cli(lab_dir, "run", "test_copy", copy, "--wait", timeout=240)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    with lab.registry() as reg:
        (imported,) = [c for c in reg.list_checkpoints() if c["relation"] == "import"
                       and c["id"] != source_row["id"]]
        assert [(e["parent_id"], e["role"]) for e in reg.parents(imported["id"])] == \
            [(export_id, "gguf")]
        copied = reg.find_checkpoint("copied")
        assert reg.parents(copied["id"])[0]["parent_id"] == imported["id"]
    proc = run_cli(lab_dir, "import", file, timeout=240)  # the same file: that checkpoint
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["id"] == imported["id"]
    model = AutoModelForCausalLM.from_pretrained(imported["path"]).eval()
    worst, rms = logit_errors(source, model)  # Q8_0, then bfloat16
    assert worst <= 0.08 and rms <= 0.02, (worst, rms)
    tokenizer = AutoTokenizer.from_pretrained(imported["path"])
    assert tokenizer(TEXT)["input_ids"] == AutoTokenizer.from_pretrained(source)(TEXT)[
        "input_ids"]
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_bad_input_is_refused_at_its_field(lab, sources, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from app import jobs
    from plugins import ConfigError

    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    for data, field in [
            ({"checkpoint": str(text)}, "checkpoint"),
            ({"checkpoint": str(tmp_path / "nowhere")}, "checkpoint"),
            ({"checkpoint": str(sources["llama"]), "name": "../../etc/passwd"}, "name"),
            ({"checkpoint": str(sources["llama"]), "name": "a/b"}, "name"),
            ({"checkpoint": str(sources["llama"]), "name": ".hidden"}, "name"),
            ({"checkpoint": str(sources["llama"]), "name": "x" * 101}, "name"),
            ({"checkpoint": str(sources["llama"]), "name": "a\x00b"}, "name"),
            ({"checkpoint": str(sources["llama"]), "output_type": "Q3_K"}, "output_type")]:
        with pytest.raises(ConfigError, match=f"field '{field}'"):
            jobs.submit(lab, "export", data)
    with lab.registry() as reg:
        assert reg.jobs() == []

    # an architecture the writer does not know: refused naming the field and the list
    gpt2 = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400)).save_pretrained(
        gpt2)
    with pytest.raises(ValueError, match=r"^checkpoint: architecture 'GPT2LMHeadModel' cannot "
                                         r"be exported to GGUF; export writes LlamaForCausalLM, "
                                         r"MistralForCausalLM, Qwen2ForCausalLM, "
                                         r"Qwen3ForCausalLM$"):
        export_with_plugin(gpt2, tmp_path / "out", "F16")
    # a tokenizer whose split llama.cpp has no name for (Metaspace, SentencePiece-style)
    odd = tmp_path / "odd-tokenizer"
    build_model("llama", odd)
    data = json.loads((odd / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                             "split": True}
    (odd / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="^checkpoint: its tokenizer splits text .* gpt2, "
                                         "llama-bpe, qwen2, smollm"):
        export_with_plugin(odd, tmp_path / "out2", "F16")
    assert not list((tmp_path / "out2").rglob("*.gguf"))  # nothing half-written left

    # through a job: the reason is the job's error, without a traceback
    from tests.test_jobs import run_to_end

    job = jobs.submit(lab, "export", {"checkpoint": str(gpt2)})
    assert run_to_end(lab, job["id"], timeout=120) == "failed"
    with lab.registry() as reg:
        error = reg.job(job["id"])["error"]
        assert not [c for c in reg.list_checkpoints() if c["relation"] == "export"]
    assert error.startswith("ExportError: checkpoint: architecture 'GPT2LMHeadModel' cannot "
                            "be exported")
    assert "Traceback" not in error


def test_llama_cpp_continues_an_export_as_transformers_does(sources, tmp_path):
    """llama.cpp itself (llama-cpp-python) reads the F16 export: same tokens for a text, and
    the same greedy continuation as transformers on the source model."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp for a "
                            "long time; install it to compare llama.cpp's own output)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for layout in LAYOUTS:
        source = sources[layout]
        _, file = export_with_plugin(source, tmp_path / layout, "F16")
        llm = llama_cpp.Llama(model_path=str(file), n_ctx=128, verbose=False, seed=0)
        tok = AutoTokenizer.from_pretrained(source)
        ids = tok(TEXT)["input_ids"]
        assert llm.tokenize(TEXT.encode(), add_bos=tok.bos_token is not None) == ids, layout
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        want = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0][
            len(ids):].tolist()
        got = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            got.append(token)
            if len(got) == 8:
                break
        assert got == want, (layout, got, want)
