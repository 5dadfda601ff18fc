"""The Playground's server side: check a request (checkpoints a user may read, a prompt,
sampling settings), and run it in one long-lived worker process (app/playground_worker.py),
which loads the models through ops.generate and keeps them loaded between prompts.

No torch here: the server only spawns the worker and talks to it over its stdin and stdout,
one JSON object a line (the protocol is in app/playground_worker.py).

- The worker starts on the first Generate and exits after IDLE_SECONDS without a request
  (env WEIGHTSMITH_PLAYGROUND_IDLE_SECONDS), releasing its models; the next request starts
  a fresh one. It keeps up to MAX_MODELS models loaded, least recently used out first.
- One generation at a time per lab: a request that arrives while another runs (a second
  browser tab, another member) waits its turn, and its boxes say so while it waits.
- Stop ends the run before the worker's next token. A worker that does not answer a stop
  within STOP_GRACE seconds (stuck loading a big model, say) is killed.
- A worker that dies mid-run gives a message on the boxes; the next request starts a fresh
  worker.
- Device: CUDA when the worker's torch sees a GPU, else CPU (env WEIGHTSMITH_PLAYGROUND_DEVICE
  forces one). It does not take a GPU slot from the scheduler.
"""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from app.lab import Lab
from registry import CheckpointError, inspect_checkpoint
from registry import hub

REPO = Path(__file__).resolve().parent.parent


def _env_number(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if math.isfinite(value) and value > 0 else default


IDLE_SECONDS = _env_number("WEIGHTSMITH_PLAYGROUND_IDLE_SECONDS", 600.0)
MAX_MODELS = int(_env_number("WEIGHTSMITH_PLAYGROUND_MAX_MODELS", 3))
STOP_GRACE = 10.0  # seconds a stopped run may take to end before its worker is killed
ABANDONED = 60.0  # a run nobody reads for this long (a closed page) is stopped
LOG_LIMIT = 5 * 2 ** 20  # the workers' log (lab/playground/worker.log) starts afresh past this

MODES = ("Chat", "Completion")
MAX_CHECKPOINTS = 3
MAX_PROMPT_CHARS = 8000
MAX_NEW_TOKENS = 1024
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 1000
MAX_SEED = 2 ** 32 - 1


class PlaygroundError(ValueError):
    """A request refused: the message names the field, what it got and what was expected."""


# ------------------------------------------------------------------------------ requests
@dataclass
class Target:
    """A checkpoint the worker may load: its folder, and for an adapter its base's folder."""

    id: str
    name: str
    path: str
    base: str | None = None
    base_name: str | None = None
    trust: bool = False

    def spec(self) -> dict:
        return {"key": f"{self.path}|{self.base or ''}", "path": self.path, "base": self.base,
                "trust": self.trust}


@dataclass
class Request:
    targets: list[Target]
    prompt: str
    mode: str  # "chat" or "completion"
    sampling: dict


def _shown(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _number(field_name: str, value, low: float, high: float, integer: bool,
            expected: str) -> float | int:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise PlaygroundError(f"field '{field_name}': got {_shown(value)}; expected "
                                  f"{expected}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or (integer and value != int(value)) or \
            not low <= value <= high:
        raise PlaygroundError(f"field '{field_name}': got {_shown(value)}; expected {expected}")
    return int(value) if integer else float(value)


def check_settings(mode, prompt, temperature, top_p, top_k, max_new_tokens,
                   seed) -> tuple[str, str, dict]:
    """(mode, prompt, sampling) from what a form sent, or PlaygroundError."""
    if mode not in MODES:
        raise PlaygroundError(f"field 'mode': got {_shown(mode)}; expected one of "
                              f"{', '.join(MODES)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PlaygroundError("field 'prompt': empty; expected some text to continue or "
                              "answer")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PlaygroundError(f"field 'prompt': {len(prompt)} characters; expected at most "
                              f"{MAX_PROMPT_CHARS}")
    bad = sorted({f"U+{ord(c):04X}" for c in prompt
                  if (ord(c) < 32 and c not in "\n\t\r") or 0xD800 <= ord(c) <= 0xDFFF})
    if bad:
        raise PlaygroundError(f"field 'prompt': holds control characters ({', '.join(bad[:5])}); "
                              f"expected text (newlines and tabs are fine)")
    sampling = {
        "temperature": _number("temperature", temperature, 0, MAX_TEMPERATURE, False,
                               f"a number from 0 (greedy) to {MAX_TEMPERATURE:g}"),
        "top_p": _number("top_p", top_p, 0, 1, False,
                         "a number above 0 and at most 1 (1: no cut-off)"),
        "top_k": _number("top_k", top_k, 0, MAX_TOP_K, True,
                         f"a whole number from 0 (no cut-off) to {MAX_TOP_K}"),
        "max_new_tokens": _number("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, True,
                                  f"a whole number from 1 to {MAX_NEW_TOKENS}"),
        "seed": _number("seed", seed, 0, MAX_SEED, True,
                        f"a whole number from 0 to {MAX_SEED}"),
    }
    if sampling["top_p"] == 0:
        raise PlaygroundError("field 'top_p': got 0; expected a number above 0 and at most 1 "
                              "(1: no cut-off)")
    return mode.lower(), prompt, sampling


def may_read(lab: Lab, user: str | None, row: dict) -> str | None:
    """Why `user` may not use checkpoint `row` in the Playground, or None. Members see the
    whole lab (app/auth.py), so any logged-in member may read any checkpoint that is not
    deleted; a lab with users serves no one who has not logged in."""
    from app.auth import has_users

    if has_users(lab) and not user:
        return "log in first: this lab has users"
    if row.get("deleted_at"):
        return f"checkpoint {row['name']} ({row['id']}) was deleted"
    return None


def resolve(lab: Lab, user: str | None, ck_ids) -> list[Target]:
    """The folders behind the picked checkpoints, or PlaygroundError naming the field."""
    from app.paths import restricted
    from registry import RegistryError

    if isinstance(ck_ids, str):
        ck_ids = [ck_ids]
    if not isinstance(ck_ids, (list, tuple)) or not all(isinstance(c, str) for c in ck_ids):
        raise PlaygroundError(f"field 'checkpoints': got {_shown(ck_ids)}; expected one to "
                              f"{MAX_CHECKPOINTS} checkpoint ids")
    ck_ids = list(dict.fromkeys(c.strip() for c in ck_ids if c and c.strip()))
    if not 1 <= len(ck_ids) <= MAX_CHECKPOINTS:
        raise PlaygroundError(f"field 'checkpoints': {len(ck_ids)} picked; expected one to "
                              f"{MAX_CHECKPOINTS}")
    targets = []
    with lab.registry() as reg:
        shared = restricted(lab)
        for ref in ck_ids:
            try:
                row = reg.checkpoint(ref) if len(ref) <= 200 else None
            except RegistryError:
                row = None
            if row is None:
                raise PlaygroundError(f"field 'checkpoints': unknown checkpoint {_shown(ref)}; "
                                      f"expected a registry id or name")
            if any(t.id == row["id"] for t in targets):
                continue  # the same checkpoint by id and by name: one box
            why = may_read(lab, user, row)
            if why:
                raise PlaygroundError(f"field 'checkpoints': {why}")
            target = Target(id=row["id"], name=row["name"], path=_local_folder(row),
                            trust=lab.settings.allow_trust_remote_code)
            _check_folder(lab, row, target.path, shared)
            if row.get("kind") == "gguf":
                raise PlaygroundError(f"field 'checkpoints': {row['name']} ({row['id']}) is a "
                                      f"GGUF file (an export); the Playground runs Hugging "
                                      f"Face checkpoints: pick its source, or the checkpoint "
                                      f"imported from the file (a job that names the export "
                                      f"imports it, as does `weightsmith import FILE.gguf`)")
            if row.get("kind") == "task_vector":
                raise PlaygroundError(f"field 'checkpoints': {row['name']} ({row['id']}) is a "
                                      f"task vector, not a model; apply it first "
                                      f"(task_vector plugin) and try the result")
            if row.get("kind") == "adapter" or _is_adapter(target.path):
                base = _adapter_base(reg, row, target.path)
                if base is None:
                    raise PlaygroundError(
                        f"field 'checkpoints': adapter {row['name']} ({row['id']}) has no "
                        f"registered base (a lineage edge with role base) that this lab holds; "
                        f"import its base model first")
                why = may_read(lab, user, base)
                if why:
                    raise PlaygroundError(f"field 'checkpoints': the base of {row['name']}: "
                                          f"{why}")
                target.base, target.base_name = _local_folder(base), base["name"]
                _check_folder(lab, base, target.base, shared)
            targets.append(target)
    return targets


def _local_folder(row: dict) -> str:
    if not row.get("path"):
        remote = hub.hub_id(row)
        where = f" (it lives on the Hub as {remote}; bring it here with `weightsmith import " \
                f"{remote}`)" if remote else ""
        raise PlaygroundError(f"field 'checkpoints': {row['name']} ({row['id']}) has no local "
                              f"files{where}")
    if not Path(row["path"]).is_dir():
        raise PlaygroundError(f"field 'checkpoints': the folder of {row['name']} ({row['id']}) "
                              f"is missing ({row['path']}); it was moved or removed")
    return row["path"]


def _is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").exists() and \
        not (Path(path) / "config.json").exists()


def _adapter_base(reg, row: dict, path: str) -> dict | None:
    """The base an adapter was trained on: its `base` lineage edge, else the registered
    checkpoint its adapter_config.json names (by id, name or folder). A Hub id that is not
    registered here is not downloaded by the Playground."""
    for edge in reg.parents(row["id"]):
        if edge["role"] == "base":
            return reg.get_checkpoint(edge["parent_id"])
    try:
        named = json.loads((Path(path) / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
    except (OSError, ValueError):
        return None
    if isinstance(named, str) and named and len(named) <= 1000:
        return reg.find_checkpoint(named)
    return None


def _check_folder(lab: Lab, row: dict, path: str, shared: bool) -> None:
    """What JobContext.open refuses, the Playground refuses too: custom code the lab does
    not trust, and pickled weights in a shared lab."""
    try:
        info = inspect_checkpoint(path, with_hash=False)
    except CheckpointError as e:
        raise PlaygroundError(f"field 'checkpoints': {row['name']} ({row['id']}): {e}") from None
    trust = lab.settings.allow_trust_remote_code
    if info.needs_remote_code and not trust:
        raise PlaygroundError(f"field 'checkpoints': {row['name']} ({row['id']}) asks for custom "
                              f"code (auto_map), which this lab does not allow "
                              f"(allow_trust_remote_code)")
    pickled = [f for f in info.weight_files if not f.endswith(".safetensors")]
    if pickled and shared and not trust:
        raise PlaygroundError(f"field 'checkpoints': {row['name']} ({row['id']}) stores pickled "
                              f"weights, which this shared lab does not load; convert it to "
                              f"safetensors first")


def check_request(lab: Lab, user: str | None, ck_ids, mode, prompt, temperature, top_p,
                  top_k, max_new_tokens, seed) -> Request:
    """Everything a Generate needs, checked; PlaygroundError names the first bad field."""
    mode, prompt, sampling = check_settings(mode, prompt, temperature, top_p, top_k,
                                            max_new_tokens, seed)
    return Request(resolve(lab, user, ck_ids), prompt, mode, sampling)


def playground_defaults(lab: Lab, ck_id: str | None) -> list[str]:
    """The selected checkpoint and its parents (ids, at most MAX_CHECKPOINTS, deleted ones
    left out): what the Playground compares after a merge. [] for an empty or unknown id."""
    from registry import RegistryError

    if not isinstance(ck_id, str) or not ck_id.strip() or len(ck_id) > 200:
        return []
    try:
        with lab.registry() as reg:
            row = reg.checkpoint(ck_id.strip())
            ids = [row["id"]] + [e["parent_id"] for e in reg.parents(row["id"])]
            rows = [reg.get_checkpoint(i) for i in dict.fromkeys(ids)]
    except RegistryError:
        return []
    return [r["id"] for r in rows if r and not r.get("deleted_at")][:MAX_CHECKPOINTS]


# ------------------------------------------------------------------------------- worker
class WorkerProcess:
    """The child process and a thread that reads its events into a queue (None: it ended)."""

    def __init__(self, lab: Lab):
        log_dir = lab.root / "playground"
        log_dir.mkdir(exist_ok=True)
        self.log_path = log_dir / "worker.log"
        if self.log_path.exists() and self.log_path.stat().st_size > LOG_LIMIT:
            self.log_path.unlink()  # the log of many workers: start afresh
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                   TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "app.playground_worker", "--idle", str(IDLE_SECONDS),
               "--max-models", str(MAX_MODELS)]
        device = os.environ.get("WEIGHTSMITH_PLAYGROUND_DEVICE", "")
        if device in ("cpu", "cuda"):
            cmd += ["--device", device]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, cwd=str(REPO), env=env)
        self.events: queue.Queue = queue.Queue()
        self.write_lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True, name="playground-reader").start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.events.put(event)
        self.events.put(None)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, message: dict) -> bool:
        with self.write_lock:
            try:
                self.proc.stdin.write((json.dumps(message) + "\n").encode())
                self.proc.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError):
                return False

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


@dataclass
class Run:
    """One Generate: its id, its events as they come, and whether its reader went away."""

    id: str
    request: Request
    events: queue.Queue = field(default_factory=queue.Queue)
    stop_requested: bool = False
    last_read: float = field(default_factory=time.monotonic)
    ended: bool = False


class Playground:
    """One per lab (see `playground(lab)`): its worker and the lock that serves one run at a
    time."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.worker: WorkerProcess | None = None
        self.turn = threading.Lock()  # one run (or stats call) at a time
        self.runs: dict[str, Run] = {}
        self.sessions: dict[str, str] = {}  # a page's session -> its latest run, for Stop
        self.started = 0  # workers spawned, for tests and the status line

    # ------------------------------------------------------------------------ running
    def start(self, request: Request, session: str | None = None) -> Run:
        run = Run(id=f"run-{uuid.uuid4().hex[:8]}", request=request)
        self.runs[run.id] = run
        if session:
            self.sessions[session] = run.id
        threading.Thread(target=self._pump, args=(run,), daemon=True,
                         name=f"playground-{run.id}").start()
        return run

    def stop(self, run_id: str | None) -> bool:
        """Ask a run to end before its next token; False if no such run is going."""
        run = self.runs.get(run_id or "")
        if run is None or run.ended:
            return False
        run.stop_requested = True
        worker = self.worker
        if worker is not None:
            worker.send({"op": "stop", "run": run.id})
        return True

    def _ensure_worker(self) -> WorkerProcess:
        if self.worker is None or not self.worker.alive():
            self.worker = WorkerProcess(self.lab)
            self.started += 1
        return self.worker

    def _pump(self, run: Run) -> None:
        """Runs in a thread per Run: waits its turn, hands the request to the worker and
        forwards the worker's events to the run's queue until the run ends."""
        try:
            if not self.turn.acquire(blocking=False):
                run.events.put({"event": "waiting"})
                while not self.turn.acquire(timeout=0.5):
                    if run.stop_requested or time.monotonic() - run.last_read > ABANDONED:
                        run.events.put({"event": "end", "reason": "stopped"})
                        return
            try:
                self._serve(run)
            finally:
                self.turn.release()
        except Exception as e:  # noqa: BLE001 - the boxes say it; the server keeps going
            run.events.put({"event": "crash", "message": f"the playground failed "
                                                         f"({type(e).__name__}: {e})"})
            run.events.put({"event": "end", "reason": "failed"})
        finally:
            run.ended = True
            self.runs.pop(run.id, None)
            for session in [s for s, r in list(self.sessions.items()) if r == run.id]:
                self.sessions.pop(session, None)

    def _serve(self, run: Run) -> None:
        if run.stop_requested:
            run.events.put({"event": "end", "reason": "stopped"})
            return
        message = {"op": "generate", "run": run.id, "prompt": run.request.prompt,
                   "mode": run.request.mode, "sampling": run.request.sampling,
                   "models": [t.spec() for t in run.request.targets]}
        for attempt in (1, 2):
            fresh = self.worker is None or not self.worker.alive()
            worker = self._ensure_worker()
            if fresh:
                run.events.put({"event": "starting"})
            if run.stop_requested:  # asked while waiting for the worker: it needs telling now
                worker.send({"op": "stop", "run": run.id})
            sent = worker.send(message)
            outcome = self._forward(run, worker) if sent else "dead-before"
            if outcome == "ended":
                return
            try:
                code = worker.proc.wait(5)
            except subprocess.TimeoutExpired:
                worker.kill()
                code = worker.proc.returncode
            # a worker that left on its idle timeout just as this request came: try again
            if outcome == "dead-before" and code == 0 and attempt == 1:
                continue
            if outcome == "killed":
                run.events.put({"event": "end", "reason": "stopped"})
                return
            run.events.put({"event": "crash", "message": (
                f"the playground worker stopped unexpectedly (exit code {code}); its log is "
                f"playground/worker.log in the lab folder. The next Generate starts a fresh "
                f"worker")})
            run.events.put({"event": "end", "reason": "failed"})
            return

    def _forward(self, run: Run, worker: WorkerProcess) -> str:
        """Pass the worker's events for `run` on: 'ended' at its end event, 'dead-before' or
        'dead' when the worker died (before or after its first event), 'killed' when it did
        not stop within STOP_GRACE."""
        got_any = False
        stop_sent_at = None
        while True:
            if run.stop_requested and stop_sent_at is None:
                worker.send({"op": "stop", "run": run.id})
                stop_sent_at = time.monotonic()
            if not run.stop_requested and time.monotonic() - run.last_read > ABANDONED:
                run.stop_requested = True  # nobody reads it: a closed page
                continue
            if stop_sent_at is not None and time.monotonic() - stop_sent_at > STOP_GRACE:
                worker.kill()
                return "killed"
            try:
                event = worker.events.get(timeout=0.25)
            except queue.Empty:
                continue
            if event is None:
                worker.events.put(None)  # later readers see the end too
                return "dead" if got_any else "dead-before"
            if event.get("run") != run.id:
                continue  # the tail of an earlier, abandoned run
            got_any = True
            run.events.put(event)
            if event.get("event") == "end":
                return "ended"

    # -------------------------------------------------------------------------- stats
    def stats(self, timeout: float = 60.0) -> dict | None:
        """What the worker reports (loads so far, loaded models, device, pid); None when no
        worker is running. Waits for a running generation to finish first."""
        with self.turn:
            worker = self.worker
            if worker is None or not worker.alive():
                return None
            if not worker.send({"op": "stats"}):
                return None
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    event = worker.events.get(timeout=0.25)
                except queue.Empty:
                    continue
                if event is None:
                    worker.events.put(None)
                    return None
                if event.get("event") == "stats":
                    return event
            return None

    def worker_pid(self) -> int | None:
        worker = self.worker
        return worker.proc.pid if worker is not None and worker.alive() else None

    def shutdown(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.send({"op": "exit"})
            try:
                worker.proc.wait(5)
            except subprocess.TimeoutExpired:
                worker.kill()


_PLAYGROUNDS: dict[Path, Playground] = {}
_PLAYGROUNDS_LOCK = threading.Lock()


def playground(lab: Lab) -> Playground:
    """The lab's Playground (one worker per lab and server process)."""
    with _PLAYGROUNDS_LOCK:
        found = _PLAYGROUNDS.get(lab.root)
        if found is None:
            found = _PLAYGROUNDS[lab.root] = Playground(lab)
        return found


# ----------------------------------------------------------------------------- streaming
@dataclass
class Box:
    """One checkpoint's column as the page shows it."""

    title: str
    text: str = ""
    status: str = "waiting"
    notes: list[str] = field(default_factory=list)
    tokens: int = 0


@dataclass
class View:
    """What the Playground shows at a moment of a run."""

    run_id: str = ""
    status: str = ""
    boxes: list[Box] = field(default_factory=list)
    done: bool = False


def generate(lab: Lab, user: str | None, ck_ids, mode, prompt, temperature, top_p, top_k,
             max_new_tokens, seed, session: str | None = None, min_interval: float = 0.05):
    """Check a request and run it, yielding a View after each batch of events: the first at
    once (or the refusal, naming the field), then as tokens arrive, the last with
    done=True. Closing the generator early stops the run."""
    try:
        request = check_request(lab, user, ck_ids, mode, prompt, temperature, top_p, top_k,
                                max_new_tokens, seed)
    except PlaygroundError as e:
        yield View(status=f"Not generated: {e}", done=True)
        return
    pg = playground(lab)
    run = pg.start(request, session)
    view = View(run_id=run.id, status="starting",
                boxes=[Box(title=_title(t)) for t in request.targets])
    yield view
    try:
        while True:
            try:
                event = run.events.get(timeout=0.5)
            except queue.Empty:
                run.last_read = time.monotonic()
                continue
            batch = [event]
            deadline = time.monotonic() + min_interval
            while batch[-1].get("event") != "end":
                try:
                    batch.append(run.events.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            for event in batch:
                _apply(view, event)
            run.last_read = time.monotonic()
            yield view
            if view.done:
                return
    finally:
        if not view.done:
            pg.stop(run.id)


def _title(target: Target) -> str:
    if target.base:
        return f"{target.name} ({target.id}), adapter on {target.base_name}"
    return f"{target.name} ({target.id})"


def _apply(view: View, event: dict) -> None:
    kind = event.get("event")
    index = event.get("index")
    box = view.boxes[index] if isinstance(index, int) and 0 <= index < len(view.boxes) else None
    if kind == "waiting":
        view.status = "waiting: another generation is running in this lab; this one starts " \
                      "when it ends"
    elif kind == "starting":
        view.status = "starting the playground worker (loading torch)"
    elif kind == "status" and box is not None:
        box.status = str(event.get("text", ""))
        view.status = "loading models" if box.status == "loading" else "generating"
    elif kind == "note" and box is not None:
        box.notes.append(str(event.get("text", "")))
    elif kind == "error":
        message = str(event.get("message", ""))
        if box is not None:
            box.status = "failed"
            box.notes.append(f"could not generate: {message}")
        else:
            view.status = f"failed: {message}"
    elif kind == "token" and box is not None:
        if "full" in event:
            box.text = str(event["full"])
        else:
            box.text += str(event.get("delta", ""))
        box.tokens += 1
    elif kind == "done" and box is not None:
        if isinstance(event.get("text"), str):
            box.text = event["text"]  # the whole text, with a last character held back
        reason = {"eos": "end of text", "length": "max new tokens reached",
                  "context": "the model's context is full", "stopped": "stopped"}.get(
            event.get("reason"), str(event.get("reason")))
        seconds = float(event.get("seconds") or 0)
        rate = f", {event.get('tokens', 0) / seconds:.1f} tokens/s" if seconds > 0 else ""
        box.status = f"{event.get('tokens', 0)} tokens ({reason}{rate})"
    elif kind == "crash":
        view.status = str(event.get("message", ""))
        for b in view.boxes:
            if b.status not in ("failed",) and "tokens (" not in b.status:
                b.status = "interrupted"
    elif kind == "end":
        view.done = True
        reason = event.get("reason")
        if reason == "stopped":
            view.status = "stopped"
            for b in view.boxes:
                if "tokens (" not in b.status and b.status != "failed":
                    b.status = "stopped"
        elif reason != "failed":
            view.status = "done"
        if "loads" in event:
            view.status += f" · models loaded by this worker so far: {event['loads']}"
