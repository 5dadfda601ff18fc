"""The merge's executor: the memory budget, the worker threads, the streaming loop over the
plan's tensors, and the writing of each result into its shard. Methods never see a file
here: what a method does is its entry in methods.TABLE, its chunk kernels (kernels.py) and
its trim (trim.py); this module reads those properties and never a method's name.

Why by hand: mergekit's executor is a general task graph that keeps every input file mapped,
runs one tensor at a time on one Python thread and buffers a whole output shard before
writing it. This engine reads tensor by tensor with `safe_open`, releases each input mapping
when its tensor is done, writes every output chunk straight to its place in a pre-laid-out
safetensors shard (shards.py), and spreads the work over a few threads, so the peak memory
is a bounded working set rather than the inputs.

Random methods (DARE) are bit-identical to mergekit for the same seed: mergekit seeds the
global torch generator with the seed (`transformers.set_seed`) and draws one
`torch.bernoulli` mask per (tensor, model) in its execution order, which is the tensors
sorted by name. This engine draws from its own `torch.Generator(seed)` in that same order,
one tensor at a time, and computes the whole-tensor L1 sums of the rescale with the default
intra-op thread count, as mergekit does (a float sum's last bits depend on how it is split
across threads). Random methods and any rescale therefore run one tensor at a time
(intra-op parallelism only).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ops import native
from ops.checkpoint_files import numel
from ops.merge import kernels, trim
from ops.merge.methods import Method, Unsupported, lookup
from ops.merge.plan import TORCH_DTYPES, Checkpoint, Item, TensorSpec, plan
from ops.merge.shards import DEFAULT_SHARD_BYTES, ShardWriter, shard_layout, write_config

DEFAULT_WORKING_BYTES = 320 * 2**20


@dataclass
class MergeStats:
    tensors: int = 0
    bytes_written: int = 0
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    threads: int = 1
    peak_in_flight: int = 0  # tensors whose inputs were open at the same time
    peak_reserved_bytes: int = 0  # the working-set budget actually reserved at once


# ---------------------------------------------------------------------------------------------
# Scheduling: a byte budget and a few worker threads.


class _Budget:
    """At most `limit` bytes reserved at once; a single larger request runs alone."""

    def __init__(self, limit: int):
        self.limit, self.used, self.count = limit, 0, 0
        self.peak_bytes, self.peak_count = 0, 0
        self.lock = threading.Lock()

    def try_acquire(self, n: int) -> bool:
        with self.lock:
            if self.used and self.used + n > self.limit:
                return False
            self.used += n
            self.count += 1
            self.peak_bytes = max(self.peak_bytes, self.used)
            self.peak_count = max(self.peak_count, self.count)
            return True

    def release(self, n: int) -> None:
        with self.lock:
            self.used -= n
            self.count -= 1


class _single_intraop:
    """On the calling thread, torch ops use one intra-op thread inside the block (when
    `on`): element-wise work on cache-sized chunks does not gain from OpenMP, which on a busy
    machine mostly waits at its barriers."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            self.previous = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.on:
            torch.set_num_threads(self.previous)


def _one_intraop_thread():
    """Worker initializer: torch ops on this thread use one intra-op thread, so N workers use
    N cores without OpenMP oversubscription. get_num_threads() first runs torch's lazy
    per-thread initialisation, which would otherwise reset the count at the first op."""
    torch.get_num_threads()
    torch.set_num_threads(1)


class _Engine:
    def __init__(self, method: Method, inputs, n_models, items, writer, *, weights, densities,
                 params, seed, device, threads, budget, chunk_elements, part_elements,
                 check_finite, labels, native_kernels=True):
        self.method, self.inputs, self.n_models = method, inputs, n_models
        self.items, self.writer = items, writer
        self.weights, self.densities, self.params = weights, densities, params
        self.device = torch.device(device)
        self.threads, self.budget = threads, budget
        self.chunk_elements, self.part_elements = chunk_elements, part_elements
        self.check_finite, self.labels = check_finite, labels
        # The C kernels (ops/native), where they built; None: the numpy/torch forms
        self.native = native.library() if self.device.type == "cpu" and native_kernels else None
        chunk = method.native.chunk
        self.native_chunk = kernels.NATIVE_CHUNKS[chunk] if chunk else None
        # TIES without rescale keeps only the trim's masks; the deltas are made again, chunk
        # by chunk, in the element-wise pass
        self.masks_only = method.trim == "magnitude" and not params["rescale"]
        self.generator = None
        if method.random:
            self.generator = torch.Generator(device=self.device)
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed)
        self.stop = threading.Event()
        self.local = threading.local()
        self.finished: deque[str] = deque()  # tensors fully written, for the calling thread

    # -- reading -----------------------------------------------------------------------------

    def _open(self, item: Item) -> list[torch.Tensor]:
        """Flat views (n,) of every input of item in its stored dtype, memory-mapped on CPU:
        nothing is copied here; chunks are cast to the compute dtype when used."""
        xs = [ck.open(key).reshape(-1) for ck, key in zip(self.inputs, item.keys)]
        if self.native is not None:
            for x in xs:
                native.populate(x)
        return xs

    def _cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(self.device)
        return x if x.dtype == dtype else x.to(dtype)

    # -- writing -----------------------------------------------------------------------------

    def _check(self, item: Item, out: torch.Tensor) -> None:
        """Fail on NaN or Inf in out (a chunk of item's result), naming the inputs that
        already had one. A non-finite element makes the sum non-finite (one cheap pass;
        isfinite on bf16 is several times slower); a sum that overflowed is confirmed
        element-wise."""
        if not self.check_finite or not out.is_floating_point():
            return
        total = out.sum(dtype=torch.float32 if out.dtype == torch.float16 else None)
        if torch.isfinite(total) or torch.isfinite(out).all():
            return
        bad = [self.labels[i] for i, x in enumerate(self._open(item))
               if x.is_floating_point() and not torch.isfinite(x).all()]
        raise ValueError(f"the merge produced NaN or Inf in {item.name}"
                         + (f" (already in {', '.join(bad)})" if bad else ""))

    def _write(self, item: Item, start: int, out: torch.Tensor) -> None:
        """out: item's result for elements [start, start + len), in the out dtype."""
        self.writer.write(item.name, start * item.out.itemsize, out.cpu().contiguous())

    def _buffer(self, key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor reused by this thread across chunks (they stay in cache)."""
        cache = self.local.__dict__.setdefault("buffers", {})
        held = cache.get((key, dtype))
        if held is None or held.numel() < numel(shape):
            held = cache[(key, dtype)] = torch.empty(numel(shape), dtype=dtype,
                                                     device=self.device)
        return held[:numel(shape)].view(shape)

    # -- the merge of one tensor -------------------------------------------------------------

    def _split(self, xs):
        """(models, base) among the opened inputs: the base is last when there is one."""
        if not self.method.uses_base:
            return xs, None
        return xs[:self.n_models], xs[-1]

    def _copy_buffer(self, item: Item, xs: list[torch.Tensor]) -> None:
        """mergekit copy_non_floating_buffer: integer buffers must agree and are copied."""
        loaded = [self._cast(x, d) for x, d in zip(xs, item.loaded)]
        first = loaded[0]
        if any(t.dtype != first.dtype or not torch.equal(t, first) for t in loaded[1:]):
            raise ValueError(f"non-floating buffer {item.name} differs between inputs")
        out = first.to(item.out)  # mergekit's SaveTensor casts to out_dtype
        self._check(item, out)
        self._write(item, 0, out)

    def _full_delta(self, x, base, cdt) -> torch.Tensor:
        """x - base over the whole tensor: (n,) compute dtype, made chunk by chunk."""
        out = torch.empty(x.numel(), dtype=cdt, device=self.device)
        for s in range(0, x.numel(), self.chunk_elements):
            e = min(x.numel(), s + self.chunk_elements)
            torch.sub(self._cast(x[s:e], cdt), self._cast(base[s:e], cdt), out=out[s:e])
        return out

    def _sparsify(self, item: Item, xs=None):
        """Whole-tensor trim of every task vector (the method's `trim`): (keeps, sparse).
        masks_only (TIES without rescale): bool keep-masks (n,) from the argsort of |delta|,
        the deltas being made again chunk by chunk later; otherwise the trimmed deltas
        themselves (n,) in the compute dtype. Each model's inputs are mapped only while its
        delta is made, so the sort does not hold them. xs: item's opened inputs when the
        C trim reads them (see _work)."""
        cdt, rescale = item.compute, self.params["rescale"]
        base_ck, base_key = self.inputs[-1], item.keys[-1]
        keeps, sparse = [], []
        for i in range(self.n_models):
            def make_delta(i=i) -> torch.Tensor:
                with _single_intraop(self.threads <= 1):
                    return self._full_delta(self.inputs[i].open(item.keys[i]).reshape(-1),
                                            base_ck.open(base_key).reshape(-1), cdt)

            density = self.densities[i]
            if self.masks_only:
                keep = False
                if xs is not None and cdt == torch.bfloat16:
                    keep = trim.native_keep(xs[i], xs[-1], density)
                if keep is False:
                    keep = trim.magnitude_keep_owned(make_delta, density)
                keeps.append(keep)
            elif self.method.trim == "magnitude":  # with rescale
                delta = make_delta()
                sparse.append(trim.l1_rescaled(delta, trim.magnitude_keep(delta, density)))
                del delta
            else:
                delta = make_delta()
                sparse.append(trim.bernoulli_rescaled(delta, density, rescale, self.generator))
                del delta
        return (keeps or None), (sparse or None)

    def _elementwise(self, item: Item, lo: int, hi: int, xs, keeps=None, sparse=None):
        """The element-wise part of the merge for elements [lo, hi), chunk by chunk."""
        models, base = self._split(xs)
        cdt, dev, p = item.compute, self.device, self.params
        n = len(models)
        if not self.method.uses_base:
            acc = torch.float64 if cdt == torch.float64 else torch.float32
            w = torch.tensor([self.weights], dtype=acc, device=dev)  # (1, N) as mergekit
            denominator = w.sum(dim=1)  # (1,)
            w = w[0]
        else:
            w = torch.tensor(self.weights, dtype=cdt, device=dev).unsqueeze(-1)  # (N, 1)
            wf = [float(v) for v in w[:, 0].tolist()]  # the weights rounded to the dtype
            divisor = w.sum(dim=0)  # (1,) compute dtype
            divisor[divisor.abs() < 1e-8] = 1
            consensus = self.method.consensus
            pair = consensus and n == 2 and cdt in kernels.SIGN_BITS  # see ties_pair
            pair_divisors = kernels.pair_divisors(w, kernels.SIGN_BITS[cdt][0]) \
                if pair and p["normalize"] else None
        kernel = self.native_chunk
        fused = (self.native is not None and sparse is None and kernel is not None
                 and kernel.applies(n, p) and native.element_wise()
                 and all(d == torch.bfloat16 for d in (*item.in_dtypes, cdt, item.out)))
        # Results go to a staging buffer written with one pwrite per part_elements: fewer,
        # larger writes, so two workers rarely queue on the file's lock.
        stage = self._buffer("stage", (min(hi - lo, self.part_elements),), item.out)
        # The C kernels write straight into the output file's pages (a shared mapping): no
        # staging copy, and no pwrite, whose file lock the workers would queue on.
        mapped = self.writer.mapped(item.name, item.out, lo, hi) if fused else None
        start, filled = lo, 0
        for s in range(lo, hi, self.chunk_elements):
            e = min(hi, s + self.chunk_elements)
            if mapped is not None and kernel.run([x[s:e] for x in models], base[s:e], keeps, s,
                                                 wf, pair_divisors, p["lambda"],
                                                 mapped[s - lo:e - lo]):
                if filled:
                    self._write(item, start, stage[:filled])
                start, filled = e, 0
                continue
            if filled + e - s > stage.numel():
                self._write(item, start, stage[:filled])
                start, filled = s, 0
            dest = stage[filled:filled + e - s]  # (m,) out dtype
            if not self.method.uses_base:
                out = kernels.linear_chunk([self._cast(x[s:e], cdt) for x in models], w,
                                           p["normalize"], denominator)
            else:
                out = self._task_vector_chunk(item, models, base, s, e, keeps, sparse, w, wf,
                                              divisor, pair, pair_divisors, dest)
            if out is not dest:
                dest.copy_(out)  # mergekit's SaveTensor cast to out_dtype (same rounding)
            self._check(item, dest)
            filled += e - s
        if filled:
            self._write(item, start, stage[:filled])
        if mapped is not None:
            self.writer.release(item.name, item.out, lo, hi)

    def _task_vector_chunk(self, item: Item, models, base, s: int, e: int, keeps, sparse, w,
                           wf, divisor, pair: bool, pair_divisors, dest) -> torch.Tensor:
        """The chunk [s, e) of a task-vector method (mergekit's generalized task arithmetic):
        the deltas (trimmed), then the combination; into dest where the dtypes allow."""
        cdt, p, n = item.compute, self.params, len(models)
        b = self._cast(base[s:e], cdt)
        deltas = self._buffer("deltas", (n, e - s), cdt)  # (N, m) compute dtype
        direct = item.out == cdt and dest.device == self.device
        target = dest if direct else self._buffer("out", (e - s,), cdt)
        if pair:  # TIES, two models: the same numbers in bit operations
            ints = kernels.SIGN_BITS[cdt][0]
            for i, x in enumerate(models):
                if sparse is not None:
                    deltas[i].copy_(sparse[i][s:e])
                else:
                    torch.sub(self._cast(x[s:e], cdt), b, out=deltas[i])
            # finite deltas only (NaN * 0 is NaN, but masking bits would make +0)
            if bool(torch.isfinite(deltas.sum())):
                for i in range(n):
                    if sparse is None and keeps is not None and keeps[i] is not None:
                        # delta * mask, as +0 where dropped (see ties_pair)
                        keep = self._buffer(f"keep{i}", (e - s,), ints)
                        keep.copy_(keeps[i][s:e]).neg_()  # 0 / -1
                        deltas[i].view(ints).bitwise_and_(keep)
                out = kernels.ties_pair(b, deltas, wf, pair_divisors, p["lambda"], target)
                if out is not None:
                    return out
        for i, x in enumerate(models):
            if sparse is not None:
                deltas[i].copy_(sparse[i][s:e])
                continue
            torch.sub(self._cast(x[s:e], cdt), b, out=deltas[i])
            if keeps is not None and keeps[i] is not None:
                deltas[i].mul_(keeps[i][s:e])  # mergekit: delta * mask
        return kernels.gta_chunk(b, deltas, wf, w, self.method.consensus, p["int8_mask"],
                                 p["normalize"], p["lambda"], divisor, target)

    def _work(self, item: Item, lo: int, hi: int, state: dict) -> None:
        keeps = sparse = None
        floating = all(d.is_floating_point for d in item.loaded)
        # The C trim reads the inputs the element-wise pass reads next: map them once.
        # (The other trims map each model's inputs only while its delta is made.)
        early = self.native is not None and self.method.native.trim and self.masks_only
        xs = self._inputs(item, state) if early else None
        if floating and self.method.trim:
            keeps, sparse = self._sparsify(item, xs)
        if xs is None:
            xs = self._inputs(item, state)
        if not floating:
            self._copy_buffer(item, xs)
            return
        with _single_intraop(self.threads <= 1):
            self._elementwise(item, lo, hi, xs, keeps, sparse)

    def _inputs(self, item: Item, state: dict) -> list[torch.Tensor]:
        """item's opened inputs, shared by its parts (state["xs"])."""
        with state["lock"]:
            if "xs" not in state:
                state["xs"] = self._open(item)
            return state["xs"]

    def _part(self, item: Item, lo: int, hi: int, state: dict) -> None:
        """One part of one tensor (the whole tensor unless it is split for an element-wise
        method). state is shared by a tensor's parts: its open inputs and a countdown; the
        last part drops the memory maps, so their pages leave the RSS, and the budget."""
        try:
            if not self.stop.is_set():
                self._work(item, lo, hi, state)
        except BaseException:
            self.stop.set()
            raise
        finally:
            with state["lock"]:
                state["left"] -= 1
                last = state["left"] == 0
                if last:
                    state.pop("xs", None)
            if last:
                self.budget.release(state["reserved"])
                if not self.stop.is_set():
                    self.finished.append(item.name)

    def _estimate(self, item: Item) -> int:
        """Working bytes of one tensor. Element-wise methods: its mapped inputs (the chunk
        buffers are small). TIES: the selection of the largest |delta| (introsort_keep: the
        keys, 4- or 8-byte packed keys, two masks and the result) and a keep-mask per model.
        Rescaled or random methods: the dense deltas, DARE's mask and probabilities."""
        n = item.numel
        inputs = sum(d.itemsize for d in item.in_dtypes) * n
        c = item.compute.itemsize
        # 16-bit: int32 packed keys; float32 keys: their ordered bits, then int64 packed
        select = n * (c + 7) if c <= 2 else n * (c + 13 + (4 if c > 4 else 0))
        if self.masks_only:
            return max(inputs, select) + n * self.n_models
        if self.method.trim == "magnitude":
            return inputs + select + n * c * self.n_models
        if self.method.trim == "bernoulli":
            return inputs + n * c * (self.n_models + 4)
        return inputs

    def _parts(self, item: Item) -> list[tuple[int, int]]:
        n = item.numel
        if self.method.elementwise and self.threads > 1 and n:
            return [(s, min(n, s + self.part_elements)) for s in range(0, n, self.part_elements)]
        return [(0, n)]

    def run(self, report: Callable[[str], None]) -> None:
        """Merge every item; report(name) is called on this thread as each one is written."""
        if self.threads <= 1:
            for item in self.items:
                state = {"lock": threading.Lock(), "left": 1, "reserved": self._estimate(item)}
                self.budget.try_acquire(state["reserved"])
                self._part(item, 0, item.numel, state)
                while self.finished:
                    report(self.finished.popleft())
            return
        previous = torch.get_num_threads()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="merge",
                                  initializer=_one_intraop_thread)
        pending: list[Future] = []

        def reap(block: bool) -> None:
            if block and pending:
                wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for f in [f for f in pending if f.done()]:
                pending.remove(f)
                f.result()  # re-raises a worker's error here
            while self.finished:
                report(self.finished.popleft())

        try:
            list(pool.map(lambda _: None, range(self.threads)))  # start the workers
            # set_num_threads in a worker also sets the count that new threads start with:
            # put it back for the rest of the process.
            torch.set_num_threads(previous)
            for item in self.items:
                parts = self._parts(item)
                state = {"lock": threading.Lock(), "left": len(parts),
                         "reserved": self._estimate(item)}
                while not self.budget.try_acquire(state["reserved"]):
                    reap(block=True)
                for lo, hi in parts:
                    pending.append(pool.submit(self._part, item, lo, hi, state))
                while len(pending) > 4 * self.threads:
                    reap(block=True)
                reap(block=False)
            while pending:
                reap(block=True)
        except BaseException:
            self.stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(previous)



# ---------------------------------------------------------------------------------------------


def _models(spec: Method, models, base, weights, densities):
    """(models, base, weights, densities) as mergekit merges them: Paths, the base dropped
    from the models when it is also listed, a density of 1 where none is given."""
    models = [Path(m) for m in models]
    if spec.uses_base:
        if base is None:
            raise ValueError(f"method {spec.name} needs a base model")
        base = Path(base)
        # mergekit drops the base from the non-base inputs when it is also listed
        keep = [i for i, m in enumerate(models) if m.resolve() != base.resolve()]
        models = [models[i] for i in keep]
        weights = [weights[i] for i in keep]
        if densities is not None:
            densities = [densities[i] for i in keep]
    if not models:
        raise Unsupported("no model to merge besides the base")
    if len(weights) != len(models):
        raise ValueError(f"weights has {len(weights)} values for {len(models)} models")
    densities = [1.0] * len(models) if densities is None else [float(d) for d in densities]
    return models, base, list(weights), densities


def stream_merge(method: str, models: Sequence, base=None, *, weights: Sequence[float],
                 densities: Optional[Sequence[float]] = None, params: Optional[dict] = None,
                 out_dir, dtype: Optional[str] = None, out_dtype: Optional[str] = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, seed: Optional[int] = None,
                 device: str = "cpu", threads: Optional[int] = None,
                 max_working_bytes: int = DEFAULT_WORKING_BYTES,
                 tensors: Optional[Sequence[TensorSpec]] = None,
                 chunk_elements: int = 1 << 18, part_elements: int = 1 << 22,
                 check_finite: bool = True, write_config_json: bool = True, donor=None,
                 progress: Optional[Callable[[float, str], None]] = None,
                 log: Optional[Callable[[str], None]] = None,
                 on_tensor: Optional[Callable[[str], None]] = None,
                 native_kernels: bool = True) -> MergeStats:
    """Merge `models` (folders of safetensors shards; `base` too for the task-vector methods)
    into out_dir, tensor by tensor, as mergekit would with the same configuration.

    weights/densities: one per model (mergekit's per-model `weight` and `density`; density
    defaults to 1). params: mergekit's shared parameters (`normalize`, `rescale`, `lambda`,
    `int8_mask`), defaulting as in mergekit. dtype: the compute dtype (inputs are cast to it
    on load; None: the inputs' promoted dtype); out_dtype: the stored dtype (None: dtype).
    threads: worker threads for the deterministic methods (default: the torch thread count;
    each worker runs torch ops on one intra-op thread); random methods and any L1 rescale run
    one tensor at a time on the calling thread. max_working_bytes bounds what the tensors in
    flight may hold at once (their memory-mapped inputs and merge buffers); one tensor larger
    than that runs alone. on_tensor(name) is called once a tensor's bytes are all written,
    progress(fraction, name) likewise, both on the calling thread. donor: the folder whose
    config.json is copied (default: the base, else the first model, as mergekit).
    native_kernels: use ops/native's C kernels where they built and apply (False: the
    numpy/torch forms throughout, as on a machine without a C compiler; same results).
    Raises Unsupported, before anything is written, for what mergekit must do instead.
    """
    spec, params = lookup(method, params, has_base=base is not None)
    log = log or (lambda message: None)
    started = time.perf_counter()
    models, base, weights, densities = _models(spec, models, base, weights, densities)
    folders = models + ([base] if base is not None else [])
    labels = [m.name for m in folders]
    inputs = [Checkpoint(f) for f in folders]
    cdt = TORCH_DTYPES[dtype] if dtype else None
    odt = TORCH_DTYPES[out_dtype] if out_dtype else None
    items = plan(inputs, labels, tensors, cdt, odt, log)
    if spec.random:
        seen = set()
        for it in items:
            if it.label in seen:
                raise Unsupported(f"two outputs read {it.label}: mergekit's random draw order "
                                  f"for them is not fixed")
            seen.add(it.label)
    on_cpu = torch.device(device).type == "cpu"
    if threads is None:
        threads = torch.get_num_threads()
    if spec.random or params.get("rescale") or not on_cpu:
        threads = 1  # whole-tensor sums and the random draws run as mergekit runs them
    out_dir = Path(out_dir)
    writer = ShardWriter(out_dir, shard_layout([(it.name, it.out, it.shape) for it in items],
                                               max_shard_bytes))
    log(f"native engine: {method}, {len(items)} tensors into {len(writer.names)} shard(s), "
        f"{threads} thread(s), working set <= {max_working_bytes / 2**20:.0f} MiB")
    if (spec.native.chunk or spec.native.trim) and on_cpu:
        log("kernels: " + (native.status() if native_kernels else "numpy/torch forms (asked)"))
    budget = _Budget(max_working_bytes)
    engine = _Engine(spec, inputs, len(models), items, writer, weights=list(weights),
                     densities=densities, params=params, seed=seed, device=device,
                     threads=threads, budget=budget, chunk_elements=chunk_elements,
                     part_elements=part_elements, check_finite=check_finite, labels=labels,
                     native_kernels=native_kernels)
    done = 0

    def report(name: str) -> None:
        nonlocal done
        done += 1
        if on_tensor:
            on_tensor(name)
        if progress:
            progress(done / max(1, len(items)), name)

    ok = False
    try:
        engine.run(report)
        ok = True
    finally:
        writer.close(ok)
    if write_config_json:
        donor = donor or (folders[-1] if base is not None else folders[0])
        write_config(donor, out_dir, out_dtype or dtype)
    return MergeStats(tensors=len(items), bytes_written=writer.total,
                      shards=list(writer.names), seconds=time.perf_counter() - started,
                      threads=threads, peak_in_flight=budget.peak_count,
                      peak_reserved_bytes=budget.peak_bytes)
