"""ops/merge against mergekit on tiny sharded models: the same tensors, bit for bit,
for every native method; the working set stays bounded and shards are written as it goes;
bad input fails with named causes; the merge plugin's engine choice."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from ops.merge import METHODS, TensorSpec, Unsupported, stream_merge
from tests.test_merge import family, merge, tensors as checkpoint_tensors  # noqa: F401

SMALL = dict(chunk_elements=4096, part_elements=12_288)  # many chunks and parts per tensor


def save_variant(state: dict, folder, dtype, config):
    """HF-style sharded checkpoint (index + shards of at most 40 KB) of a state dict."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(state, max_shard_size="40KB")
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, folder / filename, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
             "weight_map": split.tensor_to_filename}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """base and three fine-tunes (seeded noise; ft-c mirrors ft-a's task vector, so signs
    conflict; one ft-a tensor equals the base, so its task vector is zero), in float32 and
    bfloat16, each sharded into many files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=384, hidden_size=48, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    noise = lambda v: 0.02 * torch.randn(v.shape, generator=gen)  # noqa: E731
    a = {k: v + noise(v) for k, v in base.items()}
    a["model.layers.0.mlp.up_proj.weight"] = base["model.layers.0.mlp.up_proj.weight"].clone()
    b = {k: v + noise(v) for k, v in base.items()}
    c = {k: 2 * base[k] - a[k] + 0.5 * noise(v) for k, v in base.items()}
    root = tmp_path_factory.mktemp("merge-stream")
    out = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        for name, state in (("base", base), ("ft-a", a), ("ft-b", b), ("ft-c", c)):
            out[tag, name] = save_variant(state, root / tag / name, dtype, config)
    return out


CASES = {
    "linear": ({"weight": [0.3, 0.55, 0.25]}, {}),
    "task_arithmetic": ({"weight": [0.3, 0.55, 0.7]}, {"lambda": 0.85}),
    "ties": ({"weight": [0.6, 0.4, 0.3], "density": [0.5, 0.7, 0.33]}, {}),
    "dare_linear": ({"weight": [0.6, 0.4, 0.3], "density": [0.5, 0.7, 0.9]}, {}),
    "dare_ties": ({"weight": [0.6, 0.4, 0.3], "density": [0.5, 0.7, 0.9]}, {}),
}


def mergekit_yaml(method, sharded, tag, dtype, out_dtype=None, params=None, models=3):
    per_model, shared = CASES[method]
    names = ["ft-a", "ft-b", "ft-c"][:models]
    data = {"merge_method": method, "dtype": dtype,
            "models": [{"model": str(sharded[tag, n]),
                        "parameters": {k: v[i] for k, v in per_model.items()}}
                       for i, n in enumerate(names)]}
    if method != "linear":
        data["base_model"] = str(sharded[tag, "base"])
    if out_dtype:
        data["out_dtype"] = out_dtype
    if {**shared, **(params or {})}:
        data["parameters"] = {**shared, **(params or {})}
    return data


def run_mergekit(data, out, seed=7):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(data), str(out),
              MergeOptions(random_seed=seed, quiet=True, copy_tokenizer=False,
                           write_model_card=False, out_shard_size=30_000))
    return out


def run_native(data, out, seed=7, **kw):
    models = [m["model"] for m in data["models"]]
    per = [m.get("parameters", {}) for m in data["models"]]
    return stream_merge(
        data["merge_method"], models, data.get("base_model"),
        weights=[p["weight"] for p in per],
        densities=[p["density"] for p in per] if "density" in per[0] else None,
        params=data.get("parameters"), out_dir=out, dtype=data.get("dtype"),
        out_dtype=data.get("out_dtype"), seed=seed, max_shard_bytes=30_000, **{**SMALL, **kw})


def tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_bit_identical(ours, theirs):
    a, b = tensors(ours), tensors(theirs)
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(-1).view(torch.uint8), b[key].view(-1).view(torch.uint8)), (
            f"{key}: {(a[key] != b[key]).sum()} elements differ")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tag,dtype", [("f32", "float32"), ("bf16", "bfloat16")])
def test_native_engine_equals_mergekit_bit_for_bit(sharded, tmp_path, method, tag, dtype):
    data = mergekit_yaml(method, sharded, tag, dtype)
    stats = run_native(data, tmp_path / "ours")
    run_mergekit(data, tmp_path / "theirs")
    assert_bit_identical(tmp_path / "ours", tmp_path / "theirs")
    # the same shard layout and index as mergekit, and its config.json
    assert stats.shards == sorted(p.name for p in (tmp_path / "theirs").glob("*.safetensors"))
    ours = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "model.safetensors.index.json").read_text())
    assert ours["weight_map"] == theirs["weight_map"]
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    assert (json.loads((tmp_path / "ours" / "config.json").read_text())
            == json.loads((tmp_path / "theirs" / "config.json").read_text()))


@pytest.mark.parametrize("method,params,models", [
    ("ties", {"normalize": False, "int8_mask": True}, 2),
    ("ties", {"rescale": True, "lambda": 1.5}, 2),
    ("task_arithmetic", {"normalize": True}, 2),
    ("task_arithmetic", {"lambda": 0.5}, 1),
    ("linear", {"normalize": False}, 2),
    ("dare_ties", {"rescale": False}, 2),
])
def test_parameters_and_mixed_dtypes_equal_mergekit(sharded, tmp_path, method, params, models):
    """bf16 inputs merged in float32 and stored in bf16; one or two models; shared
    parameters."""
    data = mergekit_yaml(method, sharded, "bf16", "float32", out_dtype="bfloat16",
                         params=params, models=models)
    run_native(data, tmp_path / "ours")
    run_mergekit(data, tmp_path / "theirs")
    assert_bit_identical(tmp_path / "ours", tmp_path / "theirs")


@pytest.fixture
def no_c_kernels(monkeypatch):
    """The numpy/torch forms of what ops/native does in C (as on a machine without cc)."""
    from ops import native

    monkeypatch.setattr(native, "library", lambda: None)


def c_kernels():
    from ops import native

    if native.library() is None:
        pytest.skip(f"no C kernels here: {native.status()}")
    return native


@pytest.fixture(scope="module")
def portable_build(tmp_path_factory):
    """The kernels built without -march=native (what a compiler that refuses it gives:
    4-lane vectors and the scalar partition), into a folder of their own."""
    from ops import native

    lib, status = native.build(tmp_path_factory.mktemp("kernels"), [native.FLAGS])
    if lib is None:
        pytest.skip(status)
    return lib, status


@pytest.fixture(params=["native", "portable"])
def kernel_build(request, monkeypatch):
    """Each C test runs on the cached (native) build and on the portable one."""
    from ops import native

    if request.param == "portable":
        lib, status = request.getfixturevalue("portable_build")
        monkeypatch.setattr(native, "_LIB", lib)
        monkeypatch.setattr(native, "_STATUS", status)
    return c_kernels()


def test_without_a_compiler_the_kernels_say_why(monkeypatch, tmp_path):
    from ops import native

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    lib, status = native.build(tmp_path)
    assert lib is None and "no C compiler" in status and "no-such-cc" in status
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    lib, status = native.build(tmp_path)
    assert lib is None and "failed" in status
    assert not list(tmp_path.iterdir())  # nothing half-written left in the cache


@pytest.mark.parametrize("method,tag,dtype,names,weights,params", [
    ("ties", "bf16", "bfloat16", ("ft-a", "ft-c"), [0.6, 0.4], {}),  # opposed signs
    ("ties", "bf16", "bfloat16", ("ft-a", "ft-b"), [0.6, -0.6], {}),  # divisors 0 and < 0
    ("ties", "bf16", "bfloat16", ("ft-c", "ft-b"), [0.5, 0.5],
     {"normalize": False, "lambda": 0.7}),
    ("ties", "bf16", "float16", ("ft-a", "ft-c"), [0.3, 0.9], {"int8_mask": True}),
    ("ties", "f32", "float32", ("ft-a", "ft-c"), [0.6, 0.4], {}),
    ("ties", "bf16", "bfloat16", ("ft-a", "ft-c"), [0.6, 0.4], {"rescale": True}),
    ("dare_ties", "bf16", "bfloat16", ("ft-a", "ft-c"), [0.6, 0.4], {}),
    ("task_arithmetic", "bf16", "bfloat16", ("ft-a", "ft-c"), [0.6, -0.3], {"lambda": 0.7}),
    ("task_arithmetic", "bf16", "bfloat16", ("ft-b",), [1.3], {}),
])
def test_ties_of_two_models_equals_mergekit(sharded, tmp_path, monkeypatch, method, tag, dtype,
                                            names, weights, params):
    """Two models take TIES' bit-operation path (ties_pair), and bf16 throughout the C
    kernels' (ops/native: the trim and the element-wise steps in one pass, as do one or two
    models of task arithmetic): sign conflicts, zero task vectors, negative and cancelling
    weights, each dtype they cover. Each path is checked bit for bit against mergekit."""
    from ops import native
    from ops.merge import kernels

    calls = {"pair": 0, "c": 0, "c_keep": 0}
    real = kernels.ties_pair
    monkeypatch.setattr(kernels, "ties_pair",
                        lambda *a: calls.__setitem__("pair", calls["pair"] + 1) or real(*a))
    for name, key in (("ties_pair_bf16", "c"), ("task_arithmetic_bf16", "c"),
                      ("ties_keep_bf16", "c_keep")):
        def counted(*a, _real=getattr(native, name), _key=key):
            result = _real(*a)
            ok = result if isinstance(result, bool) else result[0] == native.OK
            calls[_key] += bool(ok)
            return result
        monkeypatch.setattr(native, name, counted)
    data = {"merge_method": method, "dtype": dtype, "base_model": str(sharded[tag, "base"]),
            "models": [{"model": str(sharded[tag, name]),
                        "parameters": {"weight": w, "density": d}}
                       for name, w, d in zip(names, weights, (0.5, 0.7))]}
    if params:
        data["parameters"] = params
    run_mergekit(data, tmp_path / "theirs")
    run_native(data, tmp_path / "torch", native_kernels=False)
    assert calls["c"] == calls["c_keep"] == 0
    if method != "task_arithmetic":
        assert calls["pair"]  # the path under test was taken
    assert_bit_identical(tmp_path / "torch", tmp_path / "theirs")
    if native.library() is not None:
        calls.update(pair=0)
        run_native(data, tmp_path / "c")
        c_applies = dtype == "bfloat16" and tag == "bf16" and not params.get("rescale") \
            and method != "dare_ties"
        assert bool(calls["c"]) == c_applies
        assert bool(calls["c_keep"]) == (c_applies and method == "ties")
        assert_bit_identical(tmp_path / "c", tmp_path / "theirs")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_chunks_that_the_c_kernels_hand_back_are_done_by_torch_in_place(sharded, tmp_path,
                                                                         monkeypatch, method):
    """Where the C kernel gives a chunk back (a NaN or Inf on the way), torch does it; the
    kernel's chunks go straight into the mapped file and torch's through the staging
    buffer, in any interleaving, and the file is still mergekit's bit for bit."""
    from ops import native

    c_kernels()
    name = "task_arithmetic_bf16" if method == "task_arithmetic" else "ties_pair_bf16"
    real, seen = getattr(native, name), []

    def every_third_refused(*a):
        seen.append(1)
        return len(seen) % 3 != 1 and real(*a)

    monkeypatch.setattr(native, name, every_third_refused)
    data = {"merge_method": method, "dtype": "bfloat16",
            "base_model": str(sharded["bf16", "base"]),
            "models": [{"model": str(sharded["bf16", m]),
                        "parameters": {"weight": w, "density": 0.6}}
                       for m, w in (("ft-a", 0.7), ("ft-c", 0.4))]}
    run_native(data, tmp_path / "ours", threads=2)
    assert len(seen) > 20
    run_mergekit(data, tmp_path / "theirs")
    assert_bit_identical(tmp_path / "ours", tmp_path / "theirs")


@pytest.mark.parametrize("tag,dtype", [("f32", "float32"), ("bf16", "bfloat16")])
def test_ties_in_low_memory_equals_mergekit(sharded, tmp_path, monkeypatch, no_c_kernels,
                                           tag, dtype):
    """With a tiny budget, TIES still selects by replaying the sort in numpy (on CPU it
    always does; 16-bit deltas are freed before the replay) and reserves less than
    torch.argsort would take."""
    from ops.merge import trim as engine

    assert engine._introsort_ok()  # its own probe is a replay too: done before counting
    calls = []
    real = engine._replay
    monkeypatch.setattr(engine, "_replay",
                        lambda packed, n, k: calls.append(k) or real(packed, n, k))
    argsorts = []
    real_argsort = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **kw: argsorts.append(1) or
                        real_argsort(*a, **kw))
    data = mergekit_yaml("ties", sharded, tag, dtype)
    stats = run_native(data, tmp_path / "ours", max_working_bytes=20_000, native_kernels=False)
    # 3 models x (7 matrices and 2 norms x 2 layers, 2 embeddings and the final norm)
    assert len(calls) == 3 * (2 * 9 + 3) and not argsorts
    assert stats.peak_reserved_bytes < 384 * 48 * 24  # argsort alone would take 24 B/element
    monkeypatch.setattr(torch, "argsort", real_argsort)
    run_mergekit(data, tmp_path / "theirs")
    assert_bit_identical(tmp_path / "ours", tmp_path / "theirs")


@pytest.mark.parametrize("n,distinct,dtype", [(70_000, 3, torch.int16), (200_001, 40, torch.int16),
                                              (5_000, 1, torch.int16), (17, 2, torch.int16),
                                              (150_000, 1000, torch.float32)])
@pytest.mark.parametrize("pairs", [None, 777, "C"])
def test_introsort_top_keeps_what_torch_argsort_keeps(n, distinct, dtype, pairs, monkeypatch):
    """The first k of torch's (introsort) argsort, ties at the k-th place included, in numpy
    (pairs: swaps done in many batches) and in C (the int16 keys)."""
    from ops import native
    from ops.merge import trim as engine
    from ops.merge.trim import introsort_top

    if pairs == "C":
        if dtype != torch.int16:
            pytest.skip("the C replay takes 16-bit keys")
        c_kernels()
    else:
        monkeypatch.setattr(native, "library", lambda: None)
    if isinstance(pairs, int):
        monkeypatch.setattr(engine, "_PAIRS", pairs)

    gen = torch.Generator().manual_seed(n)
    keys = torch.randint(0, distinct, (n,), generator=gen).to(dtype)
    for k in (1, n // 3, n // 2, n - 1):
        expected = torch.argsort(keys, descending=True)[:k]
        got = introsort_top(keys.numpy().copy(), k)
        assert got is not None
        assert torch.equal(torch.from_numpy(got.astype("int64")).sort().values,
                           expected.sort().values), k


def test_c_replay_equals_argsort_on_random_and_ordered_keys(kernel_build):
    """ws_topk_keep_u16 on 400 small arrays (random, sorted either way, organ pipes, runs of
    one key) at random k: the first k of torch.argsort each time, or, where it says the sort
    would heapsort, the numpy replay says so too."""
    import numpy as np

    from ops.merge.trim import _introsort_keep_unchecked

    native = kernel_build
    rng = np.random.default_rng(11)
    for case in range(400):
        n = int(rng.integers(17, 5000))
        keys = rng.integers(0, int(rng.integers(1, 60)), n)
        kind = case % 5
        if kind == 1:
            keys.sort()
        elif kind == 2:
            keys = -np.sort(-keys)
        elif kind == 3:
            keys = np.concatenate([np.sort(keys[: n // 2]), -np.sort(-keys[n // 2:])])
        elif kind == 4:
            keys = np.repeat(keys[: n // 50 + 1], 50)[:n]
        keys = torch.from_numpy(keys.astype(np.int16))
        k = int(rng.integers(1, n))
        rc, keep = native.topk_keep_16(keys, k, 0x7FFF)
        if rc == native.HEAPSORT:
            assert _introsort_keep_unchecked(keys.numpy().copy(), k) is None, case
            continue
        assert rc == native.OK, (case, rc)
        expected = torch.zeros(n, dtype=torch.bool)
        expected[torch.argsort(keys, descending=True)[:k]] = True
        assert torch.equal(keep.bool(), expected), (case, n, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", ["noise", "few", "equal", "zeros", "wide"])
@pytest.mark.parametrize("kernels", ["C", "C-portable", "numpy"])
def test_magnitude_keep_breaks_ties_as_mergekit_argsort(dtype, case, kernels, monkeypatch,
                                                        request):
    """TIES' trim keeps exactly the elements of mergekit's argsort of |delta| in float32,
    with thousands of equal magnitudes at the k-th place (16-bit deltas have few distinct
    values), over each packing introsort_keep uses (int32 keys, dense ranks, int64), in numpy
    and in C; for bf16 also C's trim from the model and its base (ties_keep_bf16)."""
    from ops import native
    from ops.merge.trim import magnitude_keep, magnitude_keep_owned

    if kernels == "C-portable":
        lib, status = request.getfixturevalue("portable_build")
        monkeypatch.setattr(native, "_LIB", lib)
        monkeypatch.setattr(native, "_STATUS", status)
    if kernels.startswith("C"):
        c_kernels()
    else:
        monkeypatch.setattr(native, "library", lambda: None)

    gen = torch.Generator().manual_seed(7)
    if case == "noise":  # bf16 task vectors as the bench makes them: ~1000 distinct values
        delta = 0.002 * torch.randn(300_001, generator=gen)
    elif case == "few":  # a handful of magnitudes, both signs and -0
        delta = torch.randint(-3, 4, (100_000,), generator=gen).float() * 0.25
        delta[::7] = -0.0
    elif case == "equal":  # one magnitude: the tags outnumber 16 bits (dense ranks)
        delta = torch.where(torch.rand(200_000, generator=gen) < 0.5, 1.0, -1.0)
    elif case == "zeros":
        delta = torch.zeros(50_000)
    else:  # many distinct keys and a large block of ties (int64 packing)
        delta = torch.rand(1_200_000, generator=gen) * 60_000
        delta[::2] = 20_000.0
    delta = delta.to(dtype)
    for density in (0.5, 0.3, 0.9, 1e-5):
        k = max(1, int(density * delta.numel()))
        expected = torch.zeros(delta.numel(), dtype=torch.bool)
        expected[torch.argsort(delta.abs().float(), descending=True)[:k]] = True
        got = magnitude_keep(delta.clone(), density, in_place=True)
        assert torch.equal(got, expected), (case, density, int((got != expected).sum()))
        got = magnitude_keep_owned(lambda: delta.clone(), density)
        assert torch.equal(got, expected), (case, density, int((got != expected).sum()))
        if kernels != "numpy" and dtype == torch.bfloat16 and k < delta.numel():
            # a base and a model whose bf16 difference is delta (a base of 0 and of 1s)
            for base in (torch.zeros_like(delta), torch.ones_like(delta)):
                model = (base.float() + delta.float()).bfloat16()
                made = model - base  # torch's bf16 subtraction: the delta the trim sorts
                expected = torch.zeros(delta.numel(), dtype=torch.bool)
                expected[torch.argsort(made.abs().float(), descending=True)[:k]] = True
                rc, got = native.ties_keep_bf16(model, base, k)
                assert rc == native.OK and torch.equal(got.bool(), expected), (case, density)


def test_c_element_wise_kernels_equal_the_torch_steps_on_every_kind_of_value(kernel_build):
    """elementwise.c against the torch functions it mirrors (ties_pair, gta_chunk) on all
    65536 bf16 values of x0 against random bases and models: subnormals, signed zeros,
    values near overflow, Inf and NaN (where the kernels give False and the torch path takes
    over), with and without the trim masks, normalize and lambda."""
    import numpy as np

    from ops.merge.kernels import gta_chunk, pair_divisors, ties_pair

    native = kernel_build
    gen = torch.Generator().manual_seed(5)
    x0 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    m = x0.numel()
    base = (torch.randn(m, generator=gen) * torch.logspace(-40, 38, m)[torch.randperm(
        m, generator=gen)]).bfloat16()
    x1 = (base.float() + 0.01 * torch.randn(m, generator=gen)).bfloat16()
    keeps = (torch.rand(m, generator=gen) < 0.5, torch.rand(m, generator=gen) < 0.5)
    finite = torch.isfinite(x0.float()) & torch.isfinite(x1.float())
    for weights, lam, normalize, keep in [([0.6, 0.4], 1.0, True, True),
                                          ([0.3, -0.7], 0.7, True, False),
                                          ([1.0, 1.0], 1.0, False, True),
                                          ([2.5, 1e-3], 1.3, False, True)]:
        w = torch.tensor(weights, dtype=torch.bfloat16).unsqueeze(-1)  # (2, 1)
        wf = [float(v) for v in w[:, 0].tolist()]
        divisors = pair_divisors(w, torch.int16) if normalize else None
        for rows in (finite, ~finite):
            a, b, c = x0[rows].contiguous(), x1[rows].contiguous(), base[rows].contiguous()
            k0, k1 = (keeps[0][rows].contiguous(), keeps[1][rows].contiguous()) if keep \
                else (None, None)
            deltas = torch.stack([a - c, b - c])  # (2, m')
            for i, kk in enumerate((k0, k1)):
                if kk is not None:
                    deltas[i].view(torch.int16).bitwise_and_(-kk.to(torch.int16))
            out = torch.empty_like(a)
            expected = ties_pair(c, deltas, wf, divisors, lam, torch.empty_like(a))
            bits = [None if kk is None else  # the masks as the kernel takes them
                    torch.from_numpy(np.packbits(kk.numpy(), bitorder="little")) for kk in (k0, k1)]
            ok = native.ties_pair_bf16(a, b, c, *bits, wf, divisors, lam, out)
            if rows is finite and expected is not None and bool(torch.isfinite(expected).all()):
                assert ok and torch.equal(out.view(torch.int16), expected.view(torch.int16))
            if rows is not finite:
                assert not ok  # NaN or Inf in: the torch path decides
            for xs in ([a, b], [a]):
                deltas = torch.stack([x - c for x in xs])
                expected = gta_chunk(c, deltas, wf, w[:len(xs)], False, False, False, lam,
                                      None, torch.empty_like(a))
                ok = native.task_arithmetic_bf16(xs, c, wf, lam, out)
                assert ok == bool(torch.isfinite(expected).all())
                if ok:
                    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_magnitude_keep_that_frees_the_delta_keeps_the_same(dtype, monkeypatch):
    """magnitude_keep_owned (which drops the delta before the replay) keeps exactly what
    magnitude_keep keeps: any density, NaN, and where the replay gives way to argsort."""
    from ops.merge import trim as engine

    gen = torch.Generator().manual_seed(3)
    delta = (0.002 * torch.randn(50_001, generator=gen)).to(dtype)
    with_nan = delta.clone()
    with_nan[17] = float("nan")
    made = []

    def maker(x):
        return lambda: made.append(1) or x.clone()

    for x in (delta, with_nan):
        for density in (0.0, 1e-5, 0.3, 0.5, 0.999, 1.0):
            expected = engine.magnitude_keep(x.clone(), density)
            got = engine.magnitude_keep_owned(maker(x), density)
            assert (got is None) == (expected is None), density
            assert got is None or torch.equal(got, expected), (density, x is with_nan)
    assert len(made) == 10  # density 1 needs no delta
    monkeypatch.setattr(engine, "_replay", lambda packed, n, k: None)  # "would heapsort"
    from ops import native

    monkeypatch.setattr(native, "library", lambda: None)  # (the numpy replay)
    made.clear()
    expected = torch.zeros(delta.numel(), dtype=torch.bool)
    expected[torch.argsort(delta.abs().float(), descending=True)[:25_000]] = True
    assert torch.equal(engine.magnitude_keep_owned(maker(delta), 0.5), expected)
    assert len(made) == (2 if dtype != torch.float32 else 1)  # the delta was made again


def test_dare_depends_on_the_seed_and_keeps_density_on_average(sharded, tmp_path):
    """Another seed gives another mask; the kept fraction is the density and the L1 rescale
    keeps the task vector's mean magnitude (a statistical check of what is dropped)."""
    data = mergekit_yaml("dare_linear", sharded, "f32", "float32", models=1)
    data["models"][0]["parameters"] = {"weight": 1.0, "density": 0.3}
    run_native(data, tmp_path / "s7", seed=7)
    run_native(data, tmp_path / "s8", seed=8)
    base, one, two = (tensors(p) for p in (sharded["f32", "base"], tmp_path / "s7",
                                           tmp_path / "s8"))
    ft = tensors(sharded["f32", "ft-a"])
    key = "model.layers.1.mlp.down_proj.weight"
    d7, d8, full = one[key] - base[key], two[key] - base[key], ft[key] - base[key]
    assert not torch.equal(d7, d8)
    kept = (d7 != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.02  # 6144 Bernoulli(0.3) draws: 4 sigma is 0.024
    assert d7.abs().sum().item() == pytest.approx(full.abs().sum().item(), rel=1e-4)
    ratio = (d7[d7 != 0] / full[d7 != 0]).mean().item()
    assert ratio == pytest.approx(full.abs().sum().item() / full[d7 != 0].abs().sum().item(),
                                  rel=1e-3)


def test_working_set_is_bounded(sharded, tmp_path, monkeypatch):
    """Input tensors are mapped only while their output tensor is in flight, the byte budget
    bounds what is in flight, and every mapping is released at the end."""
    import threading
    import weakref

    from ops.merge import plan as engine

    live, peak, lock = [0], [0], threading.Lock()  # bytes of input tensors mapped now
    opened = engine.Checkpoint.open

    def counting_open(self, key):
        tensor = opened(self, key)
        with lock:
            live[0] += tensor.nbytes
            peak[0] = max(peak[0], live[0])

        def release(nbytes=tensor.nbytes):
            with lock:
                live[0] -= nbytes

        weakref.finalize(tensor, release)
        return tensor

    monkeypatch.setattr(engine.Checkpoint, "open", counting_open)
    budget = 100_000
    for method in ("task_arithmetic", "ties"):
        data = mergekit_yaml(method, sharded, "f32", "float32")
        peak[0] = 0
        stats = run_native(data, tmp_path / method, threads=2, max_working_bytes=budget)
        assert stats.threads == 2 and stats.peak_in_flight >= 2
        # The 384x48 f32 tensors exceed the budget on their own, so each ran alone (task
        # arithmetic reserves its four mapped inputs, 16 bytes an element; ties its argsort,
        # 24, and three keep-masks). Everything else shared the 100 KB.
        largest = 384 * 48 * (16 if method == "task_arithmetic" else 24 + 3)
        assert stats.peak_reserved_bytes <= largest
        assert peak[0] <= max(budget, 384 * 48 * 16)
        assert live[0] == 0


def test_output_is_written_progressively(sharded, tmp_path):
    """While the merge runs, tensors already reported can be read back from their shard."""
    data = mergekit_yaml("linear", sharded, "bf16", "bfloat16")
    run_mergekit(data, tmp_path / "theirs")
    expected = tensors(tmp_path / "theirs")
    out = tmp_path / "ours"
    checked = []

    def on_tensor(name):
        index = out / "model.safetensors.index.json"
        assert not index.exists()  # the index is written last
        for file in out.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                if name in f.keys():
                    assert torch.equal(f.get_tensor(name), expected[name])
                    checked.append(name)

    run_native(data, out, on_tensor=on_tensor, threads=1)
    assert len(checked) == len(expected)


def test_config_from_another_transformers_version_is_saved_as_mergekit_saves_it(sharded,
                                                                               tmp_path):
    """A donor config.json written by another transformers version goes through AutoConfig,
    as in mergekit (the same version's is copied as JSON)."""
    old = tmp_path / "old-base"
    shutil.copytree(sharded["f32", "base"], old)
    config = json.loads((old / "config.json").read_text())
    config["transformers_version"] = "4.46.0"
    config["torch_dtype"] = config.pop("dtype", "float32")
    (old / "config.json").write_text(json.dumps(config))
    data = mergekit_yaml("task_arithmetic", sharded, "f32", "bfloat16", models=1)
    data["base_model"] = str(old)
    run_native(data, tmp_path / "ours")
    run_mergekit(data, tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert ours["dtype"] == "bfloat16" and ours["transformers_version"] != "4.46.0"
    assert ours == json.loads((tmp_path / "theirs" / "config.json").read_text())


def test_shape_mismatch_names_the_tensor_and_both_shapes(sharded, tmp_path):
    wide = tmp_path / "wide"
    shutil.copytree(sharded["f32", "ft-b"], wide)
    index = json.loads((wide / "model.safetensors.index.json").read_text())
    key = "model.layers.1.self_attn.o_proj.weight"
    shard = wide / index["weight_map"][key]
    from safetensors.torch import load_file, save_file

    state = load_file(shard)
    state[key] = torch.zeros(48, 40)
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor {key} differs in shape: \[48, 48\] in "
                                         rf"ft-a, \[48, 40\] in wide"):
        stream_merge("linear", [sharded["f32", "ft-a"], wide], weights=[1, 1],
                     out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_in_an_input_fails_naming_the_tensor_and_model(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded["f32", "ft-b"], broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    key = "model.norm.weight"
    from safetensors.torch import load_file, save_file

    shard = broken / index["weight_map"][key]
    state = load_file(shard)
    state[key][3] = float("nan")
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"NaN or Inf in model.norm.weight \(already in "
                                         r"broken\)"):
        stream_merge("task_arithmetic", [sharded["f32", "ft-a"], broken],
                     sharded["f32", "base"], weights=[1, 1], out_dir=tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors"))  # no half-written shards


def test_unsupported_cases_say_why(sharded, tmp_path):
    with pytest.raises(Unsupported, match="method slerp is not one of"):
        stream_merge("slerp", [sharded["f32", "ft-a"]], sharded["f32", "base"], weights=[1],
                     out_dir=tmp_path / "o1")
    with pytest.raises(Unsupported, match="tensor extra.weight is missing from ft-a, ft-b"):
        stream_merge("linear", [sharded["f32", "ft-a"], sharded["f32", "ft-b"]],
                     weights=[1, 1], out_dir=tmp_path / "o2",
                     tensors=[TensorSpec("extra.weight")])
    with pytest.raises(Unsupported, match="two outputs read model.embed_tokens.weight"):
        stream_merge("dare_ties", [sharded["f32", "ft-a"]], sharded["f32", "base"],
                     weights=[1], densities=[0.5], out_dir=tmp_path / "o3",
                     tensors=[TensorSpec("model.embed_tokens.weight"),
                              TensorSpec("lm_head.tied", tied=("model.embed_tokens.weight",))])


# ------------------------------------------------------------------ the merge plugin's engine
def job_log(row):
    return open(row["log_path"]).read()


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_plugin_auto_runs_native_and_matches_engine_mergekit(lab, family, method):
    data = {"method": method, "models": ["ft-a", "ft-b"], "base_model": "base",
            "weights": [0.7, 0.4], "density": 0.6, "seed": 5}
    ours, _, ours_job = merge(lab, {**data, "name": "ours"})
    theirs, _, theirs_job = merge(lab, {**data, "name": "theirs", "engine": "mergekit"})
    assert json.loads(ours["metadata"])["engine"] == "native"
    assert json.loads(theirs["metadata"])["engine"] == "mergekit"
    assert "engine: native (auto: the native engine covers this configuration)" in job_log(
        ours_job)
    assert "engine: mergekit (engine: mergekit was asked for)" in job_log(theirs_job)
    a, b = checkpoint_tensors(lab, ours["id"]), checkpoint_tensors(lab, theirs["id"])
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("tokenizer.json", "config.json", "mergekit_config.yml"):
        assert (lab.checkpoints_dir / ours["id"] / name).exists(), name


def test_plugin_auto_falls_back_to_mergekit_and_says_why(lab, family):
    ck, _, job = merge(lab, {"method": "slerp", "models": ["ft-a"], "base_model": "base",
                             "t": 0.5})
    assert json.loads(ck["metadata"])["engine"] == "mergekit"
    assert ("engine: mergekit (auto: falling back to mergekit, because method slerp is not "
            "one of linear, task_arithmetic, ties, dare_linear, dare_ties") in job_log(job)


def test_plugin_engine_native_on_what_it_cannot_run_is_a_config_error(lab, family):
    from app import jobs
    from plugins import ConfigError

    with pytest.raises(ConfigError, match=r"field 'engine'.*engine 'native' cannot run this "
                                          r"merge: method slerp is not one of"):
        jobs.submit(lab, "merge", {"method": "slerp", "models": ["ft-a"], "base_model": "base",
                                   "t": 0.5, "engine": "native"})
    gradient = ("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                "  - model: ft-a\n    parameters: {weight: [0.2, 1.0]}\n")
    with pytest.raises(ConfigError, match=r"field 'engine'.*weight is \[0.2, 1.0\], not one "
                                          r"number"):
        jobs.submit(lab, "merge", {"mergekit_yaml": gradient, "engine": "native"})
    with pytest.raises(ConfigError, match=r"field 'engine': got 'fast'"):
        jobs.submit(lab, "merge", {"models": ["ft-a"], "engine": "fast"})


def test_every_method_of_the_table_is_checked_here():
    """A method added to ops/merge/methods.py is a case of the bit-for-bit comparison with
    mergekit above (CASES), names C kernels that exist, and a mergekit YAML that uses it
    plainly is one the native engine accepts."""
    from ops.merge import TABLE, kernels, native_refusal

    assert set(CASES) == set(METHODS) == set(TABLE)
    for method in TABLE.values():
        assert method.native.chunk is None or method.native.chunk in kernels.NATIVE_CHUNKS
        data = {"merge_method": method.name, "models": [{"model": "a"}]}
        if method.uses_base:
            data["base_model"] = "b"
        assert native_refusal(data) is None, method.name
    assert native_refusal({"merge_method": "linear", "base_model": "b"}).startswith("linear")
