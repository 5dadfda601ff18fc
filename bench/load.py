"""Load test of a shared lab: concurrent API clients against one `weightsmith serve`.

    python bench/load.py [--clients 20] [--seconds 60] [--polls 3] [--reuse-scores]
                         [--connections 1000] [--connection-threads 4]
                         [--pollers 20] [--poll-seconds 30] [--idle-seconds 10]
                         [--repo OTHER_CHECKOUT]

Builds a fresh temporary lab (cpu_slots = 2) with a tiny locally built Llama registered as
`tiny`, starts `weightsmith serve --no-demo` on a random 127.0.0.1 port, then runs
`--clients` gradio_client clients, one thread each, for `--seconds`. Each client loops:
submit a small `evaluate` job through the form API (/run_evaluate), poll its status a few
times (/job_detail), list the registry (/checkpoints). Every loop is bounded in count and in
time (a deadline, and a timeout on every call).

Prints the request count, the error count (target 0) with the first error messages, p50/p95/max
latency per endpoint and overall, and the job throughput from the registry at the end (jobs
finished per minute; jobs still queued or running are counted separately). The server, its
job processes and the temporary lab are removed at the end, also on Ctrl-C.

First, the light-server phase: the idle server's CPU use over `--idle-seconds`, then
`--pollers` open pages on the Jobs tab (a finished job selected) for `--poll-seconds`, each
ticking every gr.Timer of the page at its interval and sending back the digests the page
holds; prints each timer's p50/p95 tick latency (target p95 under 200 ms with 20 pages) and
the server's CPU use. `--repo` measures another checkout's server with the same clients
(e.g. a `git worktree` of the previous commit, for before and after).

Then a separate phase measures the server's memory across
`--connections` new browser pages (0: skips it; `--clients 0` runs it alone). Each does what
a browser does when it opens the page: a new session_hash, GET /config, Gradio's heartbeat
connection (when the config asks for one), every `load` event and one tick of every timer
through the queue; then the page closes (the heartbeat connection ends). Prints the server
process's RSS (its threads included, its job processes not) after a warm-up and after the
pages, as `server RSS: before X MiB, after Y MiB (+Z MiB over N new connections)`; target:
within 50 MiB over 1,000 connections.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CALL_TIMEOUT_S = 60.0  # the longest any one API call may take before it counts as an error
MAX_LOOPS = 10_000  # per client; the deadline ends the loops long before this
START_TIMEOUT_S = 120.0
MEMORY_TARGET_MIB = 50.0  # server RSS growth over 1,000 new browser connections
SETTLE_S = 5.0  # after the connections, before reading RSS: the last events finish
# pages opened before the memory phase's "before" figure: more than the app keeps sessions
# for (app.ui.SESSION_CAPACITY), so the figure is the steady state's
WARM_UP_PAGES = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_model(out: Path) -> None:
    """The tests' tiny Llama (tests/conftest.py: tiny_model_dir), built here in a subprocess so
    that this process never imports torch."""
    code = f"""
from pathlib import Path
from ops.tiny_llama import build_llama, llama_config, train_bpe_tokenizer
text = Path({str(REPO / 'assets' / 'demo' / 'heldout.txt')!r}).read_text()
tok = train_bpe_tokenizer(text.split("\\n\\n"), vocab_size=400)
config = llama_config(tok, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_positions=256)
build_llama(config, seed=0).save_pretrained({str(out)!r})
tok.save_pretrained({str(out)!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=300,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise RuntimeError(f"building the tiny model failed:\n{proc.stderr[-3000:]}")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = min(max(1, math.ceil(q * len(sorted_values))), len(sorted_values))
    return sorted_values[rank - 1]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.jobs: list[str] = []

    def record(self, endpoint: str, seconds: float, error: str | None = None) -> None:
        with self.lock:
            self.latency[endpoint].append(seconds)
            if error:
                self.errors.append(f"{endpoint}: {error}")


def client_loop(url: str, values: list, deadline: float, polls: int,
                stats: Stats, stop: threading.Event) -> None:
    from gradio_client import Client

    def call(endpoint: str, *args):
        """One API call with a timeout; (ok, result)."""
        start = time.perf_counter()
        job = None
        try:
            job = client.submit(*args, api_name=endpoint)
            result = job.result(timeout=CALL_TIMEOUT_S)
        except Exception as e:  # every failure is counted and the loop goes on
            if job is not None:
                try:
                    job.cancel()
                except Exception:
                    pass
            stats.record(endpoint, time.perf_counter() - start,
                         f"{type(e).__name__}: {str(e)[:300]}")
            return False, None
        stats.record(endpoint, time.perf_counter() - start)
        return True, result

    start = time.perf_counter()
    try:
        client = Client(url, verbose=False, httpx_kwargs={"timeout": CALL_TIMEOUT_S})
    except Exception as e:
        stats.record("connect", time.perf_counter() - start, f"{type(e).__name__}: {e}")
        return
    stats.record("connect", time.perf_counter() - start)
    try:
        for _ in range(MAX_LOOPS):
            if stop.is_set() or time.monotonic() >= deadline:
                break
            ok, result = call("/run_evaluate", *values)
            job_id = result[1] if ok else ""
            if ok and not job_id:
                stats.record("submitted", 0.0, f"no job id: {result[0][:300]}")
            if job_id:
                with stats.lock:
                    stats.jobs.append(job_id)
                for _ in range(polls):
                    if stop.is_set() or time.monotonic() >= deadline:
                        break
                    ok, detail = call("/job_detail", job_id)
                    if ok and job_id not in (detail[0] or ""):
                        stats.record("polled", 0.0, f"status without the job id: "
                                                    f"{str(detail[0])[:300]}")
                    if ok and any(s in detail[0] for s in ("succeeded", "failed")):
                        break
                    stop.wait(0.5)
            if stop.is_set() or time.monotonic() >= deadline:
                break
            ok, table = call("/checkpoints", "")
            rows = table.get("data") if ok and isinstance(table, dict) else table
            if ok and not rows:
                stats.record("listed", 0.0, f"empty checkpoint table: {str(table)[:300]}")
    finally:
        try:
            client.close()
        except Exception:
            pass


def page_load(http, url: str, ticks: bool = True, config: dict | None = None,
              session: str | None = None) -> str:
    """One new browser page against the app at `url`, as the browser does it (Gradio's sse_v3
    protocol): GET /config, a new session_hash, the heartbeat connection when the config asks
    for one, every `load` event (and, with `ticks`, one tick of every gr.Timer) queued through
    /gradio_api/queue/join and read back from /gradio_api/queue/data until all completed; then
    the page closes, which ends the heartbeat connection. With `config`, that one instead of a
    GET /config; with `session`, that session_hash instead of a new one (the same page's later
    events). Returns the session_hash; raises on any failure."""
    import json

    if config is None:
        config = http.get(url + "config")
        config.raise_for_status()
        config = config.json()
    components = {c["id"]: c for c in config["components"]}

    def value(i):  # the value the page sends for input component i: its initial one
        props = components[i].get("props", {})
        v = props.get("value")
        return "" if v is None and components[i]["type"] == "textbox" else v

    events = [d for d in config["dependencies"]
              if any(t[1] == "load" or (ticks and t[1] == "tick") for t in d["targets"])]
    session = session or uuid.uuid4().hex[:11]
    alive = None
    try:
        if config.get("connect_heartbeat"):
            alive = http.send(http.build_request(
                "GET", f"{url}gradio_api/heartbeat/{session}"), stream=True)
            alive.raise_for_status()
        pending = set()
        for dep in events:
            r = http.post(url + "gradio_api/queue/join", json={
                "data": [value(i) for i in dep["inputs"]], "event_data": None,
                "fn_index": dep["id"], "trigger_id": dep["targets"][0][0],
                "session_hash": session})
            r.raise_for_status()
            pending.add(r.json()["event_id"])
        with http.stream("GET", url + "gradio_api/queue/data",
                         params={"session_hash": session}) as stream:
            stream.raise_for_status()
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    if not message.get("success"):
                        raise RuntimeError(f"event failed: {str(message)[:300]}")
                    pending.discard(message.get("event_id"))
                if not pending or message.get("msg") == "close_stream":
                    break
        if pending:
            raise RuntimeError(f"{len(pending)} event(s) never completed")
    finally:
        if alive is not None:
            alive.close()  # the tab is closed
    return session


def tick_events(config: dict) -> list[tuple[dict, float]]:
    """(dependency, interval in seconds) of every gr.Timer tick in an app's config."""
    timers = {c["id"]: c.get("props", {}).get("value") for c in config["components"]
              if c["type"] == "timer"}
    return [(d, float(timers[t[0]])) for d in config["dependencies"] for t in d["targets"]
            if t[1] == "tick" and t[0] in timers and timers[t[0]]]


def poller(url: str, config: dict, job_id: str, deadline: float, stats: "Stats",
           stop: threading.Event, detail: bool = False) -> None:
    """One open page on the Jobs tab with `job_id` selected, until `deadline`: every timer
    of the page ticks at its interval, as the browser sends them (Gradio's queue), and the
    values its handlers return for components that are also its inputs (the hidden digests
    the page holds) are sent back on the next tick. Records each tick's latency, submit to
    completion, as "tick N s" (with `detail`, per event: "tick N s fn I")."""
    import json

    import httpx

    components = {c["id"]: c for c in config["components"]}
    selected = next(c["id"] for c in config["components"]
                    if c.get("props", {}).get("elem_id") == "selected-job")
    values = {i: ("" if c.get("props", {}).get("value") is None and c["type"] == "textbox"
                  else c.get("props", {}).get("value")) for i, c in components.items()}
    values[selected] = job_id
    session = uuid.uuid4().hex[:11]
    due = {d["id"]: 0.0 for d, _ in tick_events(config)}
    events = {d["id"]: (d, every) for d, every in tick_events(config)}
    with httpx.Client(timeout=CALL_TIMEOUT_S) as http:
        while not stop.is_set() and time.monotonic() < deadline:
            now_ = time.monotonic()
            for fn, (dep, every) in events.items():
                if due[fn] > now_:
                    continue
                first = due[fn] == 0.0
                due[fn] = now_ + every
                start = time.perf_counter()
                # a page's first tick sends everything (it holds no digest yet): counted apart
                name = f"tick {every:g} s" + (" (first)" if first else "") + \
                    (f" fn {fn}" if detail else "")
                try:
                    r = http.post(url + "gradio_api/queue/join", json={
                        "data": [values[i] for i in dep["inputs"]], "event_data": None,
                        "fn_index": fn, "trigger_id": dep["targets"][0][0],
                        "session_hash": session})
                    r.raise_for_status()
                    event = r.json()["event_id"]
                    with http.stream("GET", url + "gradio_api/queue/data",
                                     params={"session_hash": session}) as stream:
                        for line in stream.iter_lines():
                            if not line.startswith("data:"):
                                continue
                            message = json.loads(line[5:])
                            if message.get("event_id") != event or \
                                    message.get("msg") != "process_completed":
                                continue
                            if not message.get("success"):
                                raise RuntimeError(str(message)[:300])
                            for out, v in zip(dep["outputs"], message["output"]["data"]):
                                if out in dep["inputs"] and not (
                                        isinstance(v, dict) and v.get("__type__") == "update"):
                                    values[out] = v
                            break
                    stats.record(name, time.perf_counter() - start)
                except Exception as e:  # counted; the page goes on ticking
                    stats.record(name, time.perf_counter() - start,
                                 f"{type(e).__name__}: {str(e)[:300]}")
            stop.wait(max(0.0, min(due.values()) - time.monotonic()))


def pollers_phase(url: str, pid: int, n: int, seconds: float, idle_seconds: float,
                  job_id: str, stop: threading.Event, detail: bool = False) -> bool:
    """The server idle for `idle_seconds` (its CPU use), then `n` open pages on the Jobs tab
    for `seconds` (`poller`): each timer's p50/p95 tick latency, and the server's CPU use.
    True when no tick failed."""
    import httpx

    start_cpu, start = cpu_seconds(pid), time.monotonic()
    stop.wait(idle_seconds)
    idle = (cpu_seconds(pid) - start_cpu) / max(1e-9, time.monotonic() - start)
    print(f"idle server: {idle * 100:.2f}% of a core over {idle_seconds:.0f} s (target: under "
          f"1%)", flush=True)
    with httpx.Client(timeout=CALL_TIMEOUT_S) as http:
        config = http.get(url + "config").json()
    stats = Stats()
    deadline = time.monotonic() + seconds
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    threads = [threading.Thread(target=poller, daemon=True, name=f"poller-{i}",
                                args=(url, config, job_id, deadline, stats, stop, detail))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + CALL_TIMEOUT_S + 10)
    busy = (cpu_seconds(pid) - start_cpu) / max(1e-9, time.monotonic() - start)
    print(f"{n} pages on the Jobs tab for {seconds:.0f} s: server {busy * 100:.0f}% of a core")
    for name in sorted(k for k in stats.latency if k.startswith("tick")):
        lat = sorted(stats.latency[name])
        print(f"  {name}: {len(lat)} ticks, p50 {percentile(lat, .5) * 1000:.0f} ms, p95 "
              f"{percentile(lat, .95) * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms "
              f"(target p95: under 200 ms)")
    print(f"  errors: {len(stats.errors)}")
    for e in stats.errors[:5]:
        print(f"    {e}")
    return not stats.errors


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` (all its threads; not its child processes)."""
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def connections_phase(url: str, pid: int, n: int, threads: int, stop: threading.Event,
                      warm_up: int = WARM_UP_PAGES) -> tuple[float, float, int, list[str]]:
    """`n` new browser pages (page_load), `threads` at a time, after `warm_up` pages opened
    the same way (first-use imports and caches, and the allocator's per-thread pools, are not
    per-connection); the server's RSS before and after the `n`, how many were opened, the
    errors."""
    import httpx

    errors: list[str] = []
    lock = threading.Lock()

    def pages(count: int, report: bool) -> int:
        counter = iter(range(count))
        done = 0

        def worker():
            nonlocal done
            with httpx.Client(timeout=CALL_TIMEOUT_S) as http:
                while not stop.is_set():
                    with lock:
                        if next(counter, None) is None:
                            return
                    try:
                        page_load(http, url)
                    except Exception as e:  # counted; the phase goes on
                        with lock:
                            errors.append(f"{type(e).__name__}: {str(e)[:300]}")
                    with lock:
                        done += 1
                        if report and done % 100 == 0:
                            print(f"  {done} connections: server RSS {rss_mib(pid):.0f} MiB",
                                  flush=True)

        pool = [threading.Thread(target=worker, daemon=True, name=f"page-{i}")
                for i in range(max(1, threads))]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        stop.wait(SETTLE_S)
        return done

    start = rss_mib(pid)
    pages(warm_up, report=False)
    before = rss_mib(pid)
    print(f"  warm-up: {warm_up} connections, server RSS {start:.0f} -> {before:.0f} MiB",
          flush=True)
    done = pages(n, report=True)
    return before, rss_mib(pid), done, errors


def cpu_seconds(pid: int) -> float:
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def job_counts(lab_dir: Path, since: str) -> dict:
    from app.lab import Lab

    with Lab(lab_dir).registry() as reg:
        rows = list(reg.db.query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"))
        finished = reg.db.execute(
            "SELECT COUNT(*) FROM jobs WHERE status = 'succeeded' AND finished_at >= ?",
            [since]).fetchone()[0]
        failed = list(reg.db.query("SELECT id, error FROM jobs WHERE status = 'failed' "
                                   "ORDER BY created_at LIMIT 3"))
        durations = [r[0] for r in reg.db.execute(
            "SELECT (julianday(finished_at) - julianday(started_at)) * 86400 FROM jobs "
            "WHERE status = 'succeeded'")]
    return {"by_status": {r["status"]: r["n"] for r in rows}, "succeeded_in_window": finished,
            "failed": failed, "durations": sorted(durations)}


def kill_jobs(lab_dir: Path) -> None:
    """Jobs outlive their server by design; a benchmark must not leave them running."""
    from app.jobs import kill_tree
    from app.lab import Lab

    try:
        with Lab(lab_dir).registry() as reg:
            pids = [r["pid"] for r in reg.jobs(status="running", limit=10_000) if r["pid"]]
    except Exception:
        pids = []
    for pid in pids:
        try:
            kill_tree(pid, 2.0)
        except Exception:
            pass


def interrupt(*_):
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--polls", type=int, default=3, help="status polls per submitted job")
    parser.add_argument("--cpu-slots", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--reuse-scores", action="store_true",
                        help="let jobs reuse earlier scores of the same model (default: every "
                             "job evaluates)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary lab")
    parser.add_argument("--connections", type=int, default=1000,
                        help="new browser pages for the server-memory phase (0: skip it)")
    parser.add_argument("--connection-threads", type=int, default=4,
                        help="pages opened at a time in that phase")
    parser.add_argument("--pollers", type=int, default=20,
                        help="open pages on the Jobs tab whose timers tick (0: skip)")
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    parser.add_argument("--tick-detail", action="store_true",
                        help="tick latencies per timer event, not per timer")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="server CPU measured this long with no client, first")
    parser.add_argument("--repo", default=str(REPO),
                        help="the checkout whose `weightsmith serve` is measured (another "
                             "commit's worktree, for before/after)")
    args = parser.parse_args()
    server_repo = Path(args.repo).resolve()

    for sig in (signal.SIGINT, signal.SIGTERM):  # both end the run through `finally` below
        signal.signal(sig, interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="weightsmith-load-"))
    lab_dir = tmp / "lab"
    lab_dir.mkdir()
    (lab_dir / "lab.toml").write_text(f"cpu_slots = {args.cpu_slots}\n")
    env = {**os.environ, "WEIGHTSMITH_LAB": str(lab_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(server_repo),
                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("WEIGHTSMITH_PLUGINS", None)
    for key in [k for k in env if k.startswith("WEIGHTSMITH_") and k != "WEIGHTSMITH_LAB"]:
        env.pop(key)  # the lab's own settings only
    server = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        t0 = time.perf_counter()
        build_tiny_model(tmp / "tiny-llama")
        subprocess.run([sys.executable, "-m", "app.cli", "import", str(tmp / "tiny-llama"),
                        "--name", "tiny"], cwd=server_repo, env=env, check=True, timeout=120,
                       stdout=subprocess.DEVNULL)
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        server_log = open(tmp / "server.log", "wb")
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-demo",
                                   "--port", str(port)], cwd=server_repo, env=env,
                                  stdout=server_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        ready_by = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if urllib.request.urlopen(url, timeout=2).status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > ready_by:
                raise RuntimeError("the server did not start:\n" +
                                   (tmp / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        print(f"set-up (model, lab, server start) {time.perf_counter() - t0:.1f} s; "
              f"{args.clients} clients for {args.seconds:.0f} s against {url}", flush=True)

        ticks_ok = True
        if args.pollers > 0 and args.poll_seconds > 0:
            (tmp / "ev.yaml").write_text(f"checkpoint: tiny\nmax_tokens: {args.max_tokens}\n"
                                         f"window: {args.window}\n")
            done = subprocess.run([sys.executable, "-m", "app.cli", "run", "evaluate",
                                   str(tmp / "ev.yaml"), "--wait"], cwd=server_repo, env=env,
                                  capture_output=True, text=True, timeout=300)
            import json

            job_id = json.loads(done.stdout.strip().splitlines()[-1])["job"]
            print(f"\nlight server: a finished job ({job_id}) selected on every page",
                  flush=True)
            ticks_ok = pollers_phase(url, server.pid, args.pollers, args.poll_seconds,
                                     args.idle_seconds, job_id, stop, args.tick_detail)

        memory_ok = ticks_ok
        if args.connections > 0:
            print(f"\nserver memory: {args.connections} new browser connections, "
                  f"{args.connection_threads} at a time", flush=True)
            start = time.monotonic()
            before, after, opened, page_errors = connections_phase(
                url, server.pid, args.connections, args.connection_threads, stop)
            growth = after - before
            print(f"server RSS: before {before:.0f} MiB, after {after:.0f} MiB "
                  f"({growth:+.0f} MiB over {opened} new connections)")
            print(f"  {time.monotonic() - start:.0f} s; errors: {len(page_errors)}; target: "
                  f"within {MEMORY_TARGET_MIB:.0f} MiB over 1,000 connections")
            for e in page_errors[:5]:
                print(f"  {e}")
            memory_ok = memory_ok and not page_errors and growth <= MEMORY_TARGET_MIB
        if args.clients <= 0 or args.seconds <= 0:
            return 0 if memory_ok else 1
        print(flush=True)

        import plugins
        from app import forms

        values = forms.config_to_values(
            forms.form_spec(plugins.get("evaluate").Config),
            {"checkpoint": "tiny", "max_tokens": args.max_tokens, "window": args.window,
             "reuse_scores": args.reuse_scores})
        stats = Stats()
        from registry.store import now

        since = now()
        server_cpu, own_cpu = cpu_seconds(server.pid), cpu_seconds(os.getpid())
        load_before = os.getloadavg()
        start = time.monotonic()
        deadline = start + args.seconds
        threads = [threading.Thread(target=client_loop, name=f"client-{i}", daemon=True,
                                    args=(url, values, deadline, args.polls, stats, stop))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:  # each call is bounded by CALL_TIMEOUT_S past the deadline
            t.join(timeout=max(0.0, deadline - time.monotonic()) + CALL_TIMEOUT_S + 10)
        elapsed = time.monotonic() - start
        server_cpu = cpu_seconds(server.pid) - server_cpu
        own_cpu = cpu_seconds(os.getpid()) - own_cpu
        alive = sum(t.is_alive() for t in threads)
        counts = job_counts(lab_dir, since)

        report(stats, counts, elapsed, alive, args)
        print(f"CPU use: server process {server_cpu / elapsed:.2f} cores, the clients (this "
              f"process) {own_cpu / elapsed:.2f} cores, on average; machine: "
              f"{os.cpu_count()} cores, load average {load_before[0]:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end")
        return 0 if memory_ok and not stats.errors and not counts["failed"] else 1
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:  # bounded: about 5 s for the clients, 25 s for the server, 2 s per job
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        stop.set()
        until = time.monotonic() + 5
        for t in threads:
            t.join(timeout=max(0.0, until - time.monotonic()))
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(5)
        kill_jobs(lab_dir)
        if args.keep:
            print(f"lab kept at {lab_dir}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def report(stats: Stats, counts: dict, elapsed: float, alive: int, args) -> None:
    total = sum(len(v) for k, v in stats.latency.items() if k.startswith("/"))
    print(f"\nran {elapsed:.1f} s; {args.clients} clients; {alive} client threads still in a "
          f"call at the end")
    print(f"requests: {total}  ({total / elapsed:.1f}/s)")
    print(f"errors: {len(stats.errors)}")
    for e in stats.errors[:5]:
        print(f"  {e}")
    print(f"\n{'endpoint':<16}{'n':>7}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    every: list[float] = []
    for endpoint in ["connect", "/run_evaluate", "/job_detail", "/checkpoints"]:
        values = sorted(stats.latency.get(endpoint, []))
        if endpoint.startswith("/"):
            every += values
        if values:
            print(f"{endpoint:<16}{len(values):>7}{percentile(values, .5) * 1e3:>10.0f}"
                  f"{percentile(values, .95) * 1e3:>10.0f}{values[-1] * 1e3:>10.0f}")
    every.sort()
    print(f"{'all API calls':<16}{len(every):>7}{percentile(every, .5) * 1e3:>10.0f}"
          f"{percentile(every, .95) * 1e3:>10.0f}{every[-1] * 1e3 if every else 0:>10.0f}")
    by = counts["by_status"]
    done = counts["succeeded_in_window"]
    print(f"\njobs submitted: {len(stats.jobs)}; at the end: "
          + ", ".join(f"{s} {n}" for s, n in sorted(by.items())))
    print(f"job throughput: {done} succeeded in {elapsed:.0f} s = {done / elapsed * 60:.1f} "
          f"jobs/min with cpu_slots = {args.cpu_slots} (still queued: {by.get('queued', 0)}, "
          f"running: {by.get('running', 0)})")
    durations = counts["durations"]
    if durations:
        print(f"job run time (start to end): p50 {percentile(durations, .5):.1f} s, "
              f"max {durations[-1]:.1f} s")
    for f in counts["failed"]:
        print(f"  failed {f['id']}: {(f['error'] or '')[-300:]}")


if __name__ == "__main__":
    sys.exit(main())
