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
recording = False  # a fork server's child: note the models it loads
_threads: int | None = None  # the intra-op threads a child gets (the server's before loading)


def dtype_name(dtype) -> str | None:
    """The dtype a load asked for, as a name in DTYPES; None for one we do not keep."""
    if dtype is None or dtype == "auto":
        return "auto"
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPES else None


def stamp(path: str | Path) -> tuple:
    """What the folder's files are now (name, size, modification time): a kept model is used
    only while its files are unchanged (a folder outside the lab can be rewritten in place,
    and its registered content hash would then be stale)."""
    out = []
    try:
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.is_file(follow_symlinks=True):
                st = entry.stat()
                out.append((entry.name, st.st_size, st.st_mtime_ns))
    except OSError:
        return ()
    return tuple(out)


def take(path, content_hash: str, dtype):
    """The kept model for this checkpoint and dtype, once per process (None if there is
    none, or its files changed): this process's copy-on-write view of the server's."""
    name = dtype_name(dtype)
    if not content_hash or name is None:
        return None
    kept = KEPT.pop((str(path), content_hash, name), None)
    if kept is None or kept[1] != stamp(path):
        return None
    return kept[0]


def note_loaded(path, content_hash: str, dtype) -> None:
    """In a fork server's child: say that this job loaded the model (the server keeps it)."""
    name = dtype_name(dtype)
    if not recording or not content_hash or name is None:
        return
    line = json.dumps({"path": str(path), "hash": content_hash, "dtype": name}) + "\n"
    try:
        with open(NOTE_FILE, "a", encoding="utf-8") as f:  # the job folder is the cwd
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
                and entry.get("dtype") in DTYPES and Path(entry["path"]).is_dir() \
                and entry not in out:
            out.append(entry)
    return out


def keep(entry: dict, budget_bytes: int, log=print) -> None:
    """The server's side: load the noted model (or mark it used) and evict the least
    recently used beyond the budget. Runs torch with one thread (see the module's note)."""
    global _threads
    key = (entry["path"], entry["hash"], entry["dtype"])
    if key in KEPT:
        if KEPT[key][1] == stamp(entry["path"]):
            KEPT.move_to_end(key)
            return
        del KEPT[key]
    if budget_bytes <= 0:
        return
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
        # safetensors only: the note is the job's word, and a pickle can run code when loaded
        model = AutoModelForCausalLM.from_pretrained(entry["path"], dtype=dtype,
                                                     use_safetensors=True).eval()
    except Exception as e:  # noqa: BLE001 - the job that loaded it reported any real problem
        log(f"forkserver: not keeping {entry['path']}: {type(e).__name__}: {e}")
        return
    finally:
        if saved is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = saved
    size = sum(t.numel() * t.element_size()
               for t in [*model.parameters(), *model.buffers()])
    if size > budget_bytes or stamp(entry["path"]) != before:
        return
    while KEPT and sum(k[2] for k in KEPT.values()) + size > budget_bytes:
        KEPT.popitem(last=False)
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
