"""Models the warm workers' fork server keeps loaded between jobs, by content hash (issue 21).

A job forked by the fork server (app/forkserver.py) inherits the server's memory copy-on-write.
When that memory holds a model a job is about to load, with the same content hash and dtype,
`OpenCheckpoint.load_model` takes it instead of reading and building it again: the job gets its
own private copy for free (the kernel copies a page only when the job writes it, as training
does), and the server's copy is untouched.

How the server learns what to keep: a forked job notes each model it loads
(`note_loaded`: one JSON line in its job folder's `warm-models.jsonl`); when the job ends, the
server reads the note and loads those models itself, while no fork request waits, newest
last, within the lab's `warm_model_mb` (least recently used evicted first). A second job on
the same checkpoint (the usual auto-evaluation after a training job, a sweep of evaluations,
a merge of the same base) then starts with the model loaded.

Fork safety: the server loads with one intra-op thread (a load copies and converts tensors;
with one thread PyTorch runs them inline and never starts OpenMP's thread pool, which does not
survive a fork), without transformers' loading thread pool and without progress bars (whose
tqdm monitor is a thread), so it forks with no more threads than before; each child sets the
thread count it would have had (`child_threads`). Nothing here touches CUDA: kept models live in the server's CPU memory.

Why by hand: neither transformers nor torch keeps models across processes; the fork itself is
the sharing mechanism (as in PyTorch's own `torch.multiprocessing` fork start method).
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path

NOTE_FILE = "warm-models.jsonl"
MAX_NOTE_BYTES = 64 << 10  # a job loads a few models; more than this is not ours
DTYPES = ("auto", "float32", "float16", "bfloat16")
_HASH = re.compile(r"(sha256:)?[0-9a-f]{16,128}")  # registry/folder.py hash_files

# (folder, content hash, dtype) -> (model, stamp of its files, bytes); the oldest first
KEPT: "OrderedDict[tuple[str, str, str], tuple[object, tuple, int]]" = OrderedDict()
recording = ""  # in a fork server's child: its job folder, where it notes the models it loads
_threads: int | None = None  # the intra-op threads a child gets (the server's before loading)


def dtype_name(dtype) -> str | None:
    """The dtype a load asked for, as a name in DTYPES; None for one we do not keep."""
    if dtype is None or dtype == "auto":
        return "auto"
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPES else None


def stamp(path: str | Path) -> tuple:
    """What the folder's files are now (name, size, times, inode): a kept model is used
    only while its files are unchanged (a folder outside the lab can be rewritten in place,
    and its registered content hash would then be stale)."""
    out = []
    try:
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.is_file(follow_symlinks=True):
                st = entry.stat()
                out.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                            st.st_ino))
    except OSError:
        return ()
    return tuple(out)


def take(path, content_hash: str, dtype):
    """The kept model for this checkpoint and dtype, once per process (None if there is
    none, or its files changed): this process's copy-on-write view of the server's."""
    name = dtype_name(dtype)
    if not content_hash or name is None:
        return None
    kept = KEPT.pop((str(Path(path).resolve()), content_hash, name), None)
    if kept is None or kept[1] != stamp(path):
        return None
    return kept[0]


def note_loaded(path, content_hash: str, dtype) -> None:
    """In a fork server's child: say that this job loaded the model (the server keeps it)."""
    name = dtype_name(dtype)
    if not recording or not content_hash or name is None:
        return
    line = json.dumps({"path": str(Path(path).resolve()), "hash": content_hash,
                       "dtype": name}) + "\n"
    try:
        with open(os.path.join(recording, NOTE_FILE), "a", encoding="utf-8") as f:
            f.write(line)
    except OSError:
        pass  # a note is an optimisation; the job goes on


def read_notes(job_dir: str | Path) -> list[dict]:
    """The server's side: the models a finished job loaded, checked (the note is written by
    job code), and the note removed."""
    note = Path(job_dir) / NOTE_FILE
    try:
        fd = os.open(note, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        import stat as st

        if not st.S_ISREG(os.fstat(fd).st_mode):
            return []
        data = os.read(fd, MAX_NOTE_BYTES)
    finally:
        os.close(fd)
        note.unlink(missing_ok=True)
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) \
                and isinstance(entry.get("hash"), str) and _HASH.fullmatch(entry["hash"]) \
                and entry.get("dtype") in DTYPES and os.path.isabs(entry["path"]) \
                and Path(entry["path"]).is_dir() \
                and entry not in out:
            out.append(entry)
    return out


BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
         "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
WIDTH = {"float32": 4, "float16": 2, "bfloat16": 2}


def estimate(path: str | Path, dtype: str) -> int | None:
    """The bytes a load of the folder's safetensors would take in `dtype` ("auto": as
    stored), from the files' headers alone (8 bytes of length, then JSON): the budget is
    checked before anything is loaded. None when the folder has no readable safetensors."""
    total, files = 0, sorted(Path(path).glob("*.safetensors"))
    for file in files:
        try:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size <= 100 << 20:
                    return None
                header = json.loads(f.read(size))
        except (OSError, ValueError):
            return None
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            count = 1
            for dim in info.get("shape", ()):
                count *= int(dim)
            stored = BYTES.get(info.get("dtype"), 4)
            # a conversion changes floating tensors only
            floating = info.get("dtype") in ("F64", "F32", "F16", "BF16")
            total += count * (WIDTH[dtype] if dtype in WIDTH and floating else stored)
    return total if files else None


def _evict(budget_bytes: int) -> None:
    """Drop the kept models whose files changed or went, then the least recently used until
    the rest fit in `budget_bytes`."""
    for key in [k for k, v in KEPT.items() if stamp(k[0]) != v[1]]:
        del KEPT[key]
    while KEPT and sum(v[2] for v in KEPT.values()) > budget_bytes:
        KEPT.popitem(last=False)


def keep(entry: dict, budget_bytes: int, log=print) -> None:
    """The server's side: load the noted model (or mark it used), within the budget: least
    recently used evicted first, and a model that cannot fit is not loaded at all (its size
    is read from the safetensors headers). Runs torch with one thread and no loader threads
    (see the module's note). The kept copy is the server's own memory, not a map of the
    checkpoint's file: a deleted checkpoint frees its disk at once."""
    global _threads
    key = (entry["path"], entry["hash"], entry["dtype"])
    _evict(max(0, budget_bytes))
    if key in KEPT:
        KEPT.move_to_end(key)
        return
    size = estimate(entry["path"], entry["dtype"])
    if size is None or size > budget_bytes:
        if size:
            log(f"forkserver: not keeping {entry['path']}: {size >> 20} MiB is more than "
                f"warm_model_mb")
        return
    _evict(budget_bytes - size)  # the peak is the budget, not the budget plus this model
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if _threads is None:
        _threads = torch.get_num_threads()
        torch.set_num_threads(1)
    # No thread may outlive the load: transformers loads tensors in a thread pool (whose
    # threads would run torch with their own OpenMP settings, and linger after it returns)
    # unless HF_DEACTIVATE_ASYNC_LOAD is set, and a progress bar starts tqdm's monitor thread.
    hf_logging.disable_progress_bar()
    saved = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    before = stamp(entry["path"])
    dtype = entry["dtype"] if entry["dtype"] == "auto" else getattr(torch, entry["dtype"])
    try:
        # safetensors only and nothing from the Hub: the note is the job's word, a pickle
        # can run code when loaded, and an adapter folder would fetch its base
        model, info = AutoModelForCausalLM.from_pretrained(
            entry["path"], dtype=dtype, use_safetensors=True, local_files_only=True,
            output_loading_info=True)
        if any(info.get(k) for k in ("missing_keys", "mismatched_keys")):
            # initialised from the server's random state, not the job's seed: a job must
            # draw those itself
            log(f"forkserver: not keeping {entry['path']}: it loads with missing weights")
            return
        with torch.no_grad():  # into the server's own memory (see the docstring)
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()
        model.eval()
    except Exception as e:  # noqa: BLE001 - the job that loaded it reported any real problem
        log(f"forkserver: not keeping {entry['path']}: {type(e).__name__}: {e}")
        return
    finally:
        if saved is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = saved
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if size > budget_bytes or stamp(entry["path"]) != before:
        return
    _evict(budget_bytes - size)
    KEPT[key] = (model, before, size)
    log(f"forkserver: keeping {entry['path']} ({entry['dtype']}, {size >> 20} MiB; "
        f"{len(KEPT)} kept)")


def child_threads() -> None:
    """In a freshly forked child: the thread count a cold worker would have (the server set
    one thread for its loads)."""
    if _threads is not None:
        import torch

        torch.set_num_threads(_threads)


def kept() -> list[list]:
    """What the server keeps, oldest first: [folder, content hash, dtype, bytes] each."""
    return [[*key, value[2]] for key, value in KEPT.items()]
