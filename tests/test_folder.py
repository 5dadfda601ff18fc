import json
import shutil

import pytest

from registry import CheckpointError, inspect_checkpoint


def test_inspect_tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    info = inspect_checkpoint(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert info.param_count == sum(p.numel() for p in model.parameters())
    assert info.architecture == "LlamaForCausalLM"
    assert info.dtype == "float32"
    assert info.content_hash.startswith("sha256:")
    assert inspect_checkpoint(tiny_model_dir).content_hash == info.content_hash


def test_content_hash_changes_with_weights(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert inspect_checkpoint(copy).content_hash != inspect_checkpoint(tiny_model_dir).content_hash


def test_not_a_checkpoint_names_the_missing_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="no config.json"):
        inspect_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nope")


def test_corrupt_safetensors_names_the_file(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        inspect_checkpoint(copy)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        inspect_checkpoint(copy)


def test_missing_shard_is_named(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "model.safetensors").rename(copy / "model-00001-of-00002.safetensors")
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        inspect_checkpoint(copy)


def test_checkpoint_files_is_the_one_reader_of_a_folder(tiny_model_dir, tmp_path):
    """ops/checkpoint_files.py: the registry's names are its names; the safetensors files
    the merge reads are the weight files; tensors come by name with their header's shape;
    and importing it (as the server does) imports no torch."""
    import subprocess
    import sys

    from ops import checkpoint_files
    from registry import folder

    assert folder.weight_files is checkpoint_files.weight_files
    assert folder.CheckpointError is checkpoint_files.CheckpointError
    files = checkpoint_files.weight_files(tiny_model_dir)
    assert checkpoint_files.safetensors_files(tiny_model_dir) == files
    tensors = checkpoint_files.TensorFiles(files)
    name = tensors.keys()[0]
    assert list(tensors.get(name).shape) == tensors.shape(name) and tensors.is_float(name)
    assert checkpoint_files.safetensors_files(tmp_path) is None  # no safetensors weights
    probe = "import sys, registry.folder, ops.merge; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
