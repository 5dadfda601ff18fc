"""Warm workers: a fork server that has torch, transformers and peft imported, and forks one
process per job.

A job's worker used to be a fresh `python -m app.worker`: on 2 cores it spent most of a short
job importing torch, transformers and peft (several seconds before the plugin's first line).
The server's scheduler now starts one fork server per lab (`python -m app.forkserver`), which
imports those once and then, per job, forks a child that becomes exactly what `app.worker`
was: a session leader (so Stop still kills its whole process group), with the job's log as
stdout and stderr, the job folder as its working directory and the job's environment
(CUDA_VISIBLE_DEVICES included), running `app.worker.main`. Cancellation, failure isolation
(one process per job), progress and the registry contract are the worker's own, unchanged.

Why by hand: multiprocessing's "forkserver" start method runs a function in a child whose
stdio, session and lifetime belong to the multiprocessing machinery; a job needs its own
session, its log file as fd 1 and 2, and must outlive the server (as cold workers do), and
the scheduler must learn its exit code. That is a fork, a setsid and two dup2 calls.

Fork safety: the server never initialises CUDA (CUDA_VISIBLE_DEVICES is read at a child's
first CUDA call, so each child still sees only its GPUs), never runs a torch operation
(GNU OpenMP's thread pool does not survive a fork once used) and opens no SQLite connection
before forking; it is single-threaded in Python (the libraries' own idle native threads,
OpenBLAS and jemalloc, have fork handlers). Each child reseeds Python's, NumPy's and torch's
random generators, as a fresh process would be seeded.

The scheduler's side (starting this server, forking through it, exit codes) is app/warm.py,
so that the scheduler never imports the worker this module imports.

Models the jobs load are kept loaded here for the next jobs, by content hash, within the
request's "keep_mb" (app/warm_models.py).

Protocol (JSON lines): the scheduler writes {"job": ID, "lab": DIR, "cwd": DIR, "log": FILE,
"env": {...}, "keep_mb": N} to the server's stdin; the server answers {"ready": seconds}
once, when its imports are done, then {"job": ID, "pid": PID} per fork, {"exit": PID, "code": CODE} when
a child ends (it reaps them), {"keeping": FOLDER} before it loads a model to keep and
{"kept": [[FOLDER, HASH, DTYPE, BYTES], ...]} after, and {"job": ID, "stale": true} for a
request read after its "deadline" (time.time()), which it does not fork. End of stdin ends the server; running jobs go on, as cold
workers outlive the server that started them.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time

# What a job imports before its first useful line, in the order the worker imports it. The
# plugins import torch and transformers inside `run`; these make those imports free.
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.llama.modeling_llama",
    "safetensors.torch",
    "peft",
    "transformers.trainer",
    "datasets",
)


def _preload() -> None:
    import importlib

    import app.worker  # noqa: F401  (plugins, the job context, the registry)
    import plugins

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a missing optional package: the job imports it
            print(f"forkserver: could not preload {name}: {e}", file=sys.stderr, flush=True)
    plugins.discover()


def _child(request: dict) -> None:
    """In the forked child: become the job's worker process, run it, and exit."""
    code = 1
    try:
        os.setsid()
        log_fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)  # (closes the server's request pipe in this process)
        os.dup2(log_fd, 1)   # (and its reply pipe)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.close(null_fd)
        import io
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (the worker sets its own)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.stdin = open(0, closefd=False)
        sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False),
                                      encoding="utf-8", errors="backslashreplace",
                                      write_through=True)
        sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False),
                                      encoding="utf-8", errors="backslashreplace",
                                      write_through=True)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _reseed()
        from app import warm_models

        warm_models.recording = request["cwd"]  # its models are kept for the next jobs
        warm_models.child_threads()
        args = [request["job"], "--lab", request["lab"]]
        sys.argv = [os.path.join(os.path.dirname(__file__), "worker.py"), *args]
        from app import worker

        code = worker.main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the job's log; the scheduler sees the code
        import traceback

        traceback.print_exc()
    finally:
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)  # never return into the server's loop


def _reseed() -> None:
    """Fresh random state, as a new process has: a fork copies the server's."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def _write(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def _reap(children: dict, to_keep: list) -> None:
    """Report ended children; queue the models each loaded (app/warm_models.py)."""
    from app import warm_models

    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _write({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        request = children.pop(pid, None)
        if request is not None:
            budget = request.get("keep_mb")
            budget = budget << 20 if isinstance(budget, int) and budget > 0 else 0
            to_keep += [(entry, budget) for entry in warm_models.read_notes(request["cwd"])]


def main() -> int:
    started = time.perf_counter()
    _preload()
    _write({"ready": round(time.perf_counter() - started, 3)})
    pending = b""
    children: dict[int, dict] = {}  # pid -> its request
    to_keep: list[tuple[dict, int]] = []  # models ended jobs loaded, to load here
    while True:
        readable, _, _ = select.select([0], [], [], 0.2)
        _reap(children, to_keep)
        if not readable:
            if to_keep:  # one at a time, and only while no fork request waits
                from app import warm_models

                entry, budget = to_keep.pop(0)
                _write({"keeping": entry["path"]})  # the scheduler forks nothing meanwhile
                warm_models.keep(entry, budget,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
                _write({"kept": warm_models.kept()})
            continue
        chunk = os.read(0, 65536)
        if not chunk:  # the scheduler went away: stop taking jobs; running ones go on
            return 0
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            try:
                request = json.loads(line)
            except ValueError:
                continue
            deadline = request.get("deadline")
            if isinstance(deadline, (int, float)) and time.time() > deadline:
                # the scheduler has given up on this fork (this loop was busy) and starts the
                # job cold: forking it now would run the job twice
                _write({"job": request.get("job"), "stale": True})
                continue
            pid = os.fork()
            if pid == 0:
                _child(request)
            children[pid] = request
            _write({"job": request.get("job"), "pid": pid})


if __name__ == "__main__":
    sys.exit(main())
