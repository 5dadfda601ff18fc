"""The Playground's worker process: `python -m app.playground_worker [--idle S] [--max-models N]
[--device D]`, started and fed by app/playground.py. It is the only Playground process that
imports torch (through ops.generate).

Protocol: one JSON object per line. Requests on stdin:
  {"op": "generate", "run": ID, "models": [{"key", "path", "base", "trust"}], "prompt",
   "mode": "chat" | "completion", "sampling": {max_new_tokens, temperature, top_p, top_k, seed}}
  {"op": "stop", "run": ID}      end that run's generation before its next token
  {"op": "stats"}                answered with {"event": "stats", "loads", "loaded", ...}
Events on stdout, each with the run's "run" id:
  status / note / error (with "index": which model), token ("index", "delta", or "full" when
  earlier text changed), done ("index", "reason", "tokens", "seconds"), and last "end" (with
  "loads": models loaded since the worker started, so a caller sees whether it reloaded).

The worker keeps up to --max-models models loaded (least recently used out first). It exits
after --idle seconds without a request, or when stdin closes (the server went away), which
releases the models with the process. It never reads the registry: the server checked
every path it sends. stdout carries the protocol only; anything libraries print goes to
stderr (a log file the server names).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from collections import OrderedDict


class Worker:
    def __init__(self, out, max_models: int, device: str | None):
        self.out = out
        self.max_models = max_models
        self.device_pref = device
        self.device: str | None = None
        self.models: OrderedDict = OrderedDict()  # key -> ops.generate.Loaded
        self.loads = 0
        self.requests: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.guard = threading.Lock()  # current run and stopped runs, shared with the reader
        self.current: str | None = None
        self.stopped: set[str] = set()
        self.closed = False  # stdout is gone: nobody reads what this worker says

    # ------------------------------------------------------------------------------ I/O
    def send(self, **event) -> None:
        if self.closed:
            return
        try:
            self.out.write(json.dumps(event) + "\n")
            self.out.flush()
        except (OSError, ValueError):  # the server went away: stop, and exit when idle
            self.closed = True
            self.stop.set()
            self.requests.put({"op": "exit"})

    def read_stdin(self, stdin) -> None:
        """Reader thread: a stop takes effect at once; everything else waits its turn."""
        for line in stdin:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(message, dict):
                continue
            if message.get("op") == "stop":
                with self.guard:
                    self.stopped.add(str(message.get("run")))
                    if self.current == str(message.get("run")):
                        self.stop.set()
            else:
                self.requests.put(message)
        self.stop.set()
        self.requests.put({"op": "exit"})

    # --------------------------------------------------------------------------- models
    def model(self, spec: dict):
        from ops import generate

        key = spec["key"]
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        while len(self.models) >= self.max_models:
            self.models.popitem(last=False)
            _free_memory()
        if self.device is None:
            self.device = generate.pick_device(self.device_pref)
        loaded = generate.load(spec["path"], spec.get("base"), device=self.device,
                               trust_remote_code=bool(spec.get("trust")))
        self.loads += 1
        self.models[key] = loaded
        return loaded

    # ------------------------------------------------------------------------------ runs
    def generate(self, request: dict) -> None:
        from ops import generate

        run = str(request.get("run"))
        with self.guard:
            self.current = run
            self.stop.clear()
            if run in self.stopped:
                self.stop.set()
        reason = "done"
        try:
            sampling = generate.Sampling(**request["sampling"])
            streams = {}
            for index, spec in enumerate(request["models"]):
                if self.stop.is_set():
                    break
                self.send(event="status", run=run, index=index, text="loading")
                try:
                    loaded = self.model(spec)
                    text, templated, note = generate.format_prompt(
                        loaded.tokenizer, request["prompt"], request["mode"])
                    if note:
                        self.send(event="note", run=run, index=index, text=note)
                    ids = generate.encode(loaded, text, templated)
                except Exception as e:  # noqa: BLE001 - reported on this model's box
                    self.send(event="error", run=run, index=index, message=_brief(e))
                    continue
                self.send(event="status", run=run, index=index,
                          text=f"generating on {self.device}")
                streams[index] = (generate.stream(loaded, ids, sampling, self.stop.is_set),
                                  time.monotonic())
            # one token of each model in turn: the boxes fill side by side
            while streams:
                for index in list(streams):
                    gen, started = streams[index]
                    try:
                        item = next(gen)
                    except Exception as e:  # noqa: BLE001 - out of memory, say
                        self.send(event="error", run=run, index=index, message=_brief(e))
                        del streams[index]
                        continue
                    if isinstance(item, generate.Finished):
                        self.send(event="done", run=run, index=index, reason=item.reason,
                                  tokens=len(item.tokens), text=item.text,
                                  seconds=round(time.monotonic() - started, 3))
                        del streams[index]
                    elif item.delta is None:
                        self.send(event="token", run=run, index=index, full=item.full)
                    elif item.delta:
                        self.send(event="token", run=run, index=index, delta=item.delta)
            if self.stop.is_set():
                reason = "stopped"
        finally:
            with self.guard:
                self.current = None
                self.stopped.discard(run)
            self.send(event="end", run=run, reason=reason, loads=self.loads,
                      loaded=list(self.models), device=self.device)

    def serve(self, idle: float) -> int:
        while True:
            try:
                request = self.requests.get(timeout=idle)
            except queue.Empty:
                return 0  # idle: exiting releases every model
            op = request.get("op")
            if op == "exit":
                return 0
            if op == "stats":
                self.send(event="stats", loads=self.loads, loaded=list(self.models),
                          device=self.device, pid=os.getpid())
            elif op == "generate":
                try:
                    self.generate(request)
                except Exception as e:  # noqa: BLE001 - a malformed request; keep serving
                    self.send(event="error", run=str(request.get("run")), index=-1,
                              message=_brief(e))


def _brief(error: BaseException) -> str:
    """One line for a person: the error's type and message, capped."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text[:500]


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="weightsmith-playground-worker")
    parser.add_argument("--idle", type=float, default=600.0,
                        help="exit after this many seconds without a request")
    parser.add_argument("--max-models", type=int, default=3)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    args = parser.parse_args(argv)
    # the protocol gets the real stdout; whatever a library prints goes to stderr
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    worker = Worker(out, max(1, args.max_models), args.device or None)
    threading.Thread(target=worker.read_stdin, args=(sys.stdin,), daemon=True).start()
    return worker.serve(max(0.1, args.idle))


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown with torch loaded (see app/worker.py)
