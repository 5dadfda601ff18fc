"""Cold start of the workbench: `weightsmith serve` spawned to the first page.

    python bench/startup.py [--runs 3]

Measures, per run, on a lab that already has the demo model: (a) process spawn to the first
HTTP 200 on / (server ready), and (b) spawn to the page rendered in headless chromium (Home's
summary of the lab shown). Then the first start on a fresh lab (c): spawn to the first HTTP
200, and to the page rendered, while the server queues the demo's pretrain job (the job is
cancelled after). Also the import
time of the CLI module, and whether it pulled in torch. Prints medians against the 6 s target.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 6.0
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, port: int) -> None:
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).status == 200:
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the server exited during start-up")
            time.sleep(0.05)


def spawn_serve(lab: Path, port: int) -> tuple[subprocess.Popen, float, dict]:
    """`weightsmith serve` on `lab`: (process, its start time, its environment)."""
    env = {**os.environ, "WEIGHTSMITH_LAB": str(lab)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, start, env


class Browser:
    """Headless chromium, started before the server (a person's browser is already open), so
    its own start-up is not counted; None-like when chromium or playwright is missing."""

    def __init__(self, chromium: str | None):
        self.chromium, self._pw, self._browser = chromium, None, None

    def __enter__(self):
        if self.chromium:
            from playwright.sync_api import sync_playwright

            self._pw = sync_playwright().start()
            self._browser = self._pw.chromium.launch(executable_path=self.chromium,
                                                     args=FLAGS)
        return self

    def __exit__(self, *_):
        if self._browser is not None:
            self._browser.close()
            self._pw.stop()

    def rendered_at(self, port: int, start: float) -> float | None:
        """Seconds from `start` until the page shows: the first view, Home, with the lab's
        summary (None without chromium). A fresh page each time: nothing cached."""
        if self._browser is None:
            return None
        context = self._browser.new_context(viewport={"width": 1280, "height": 800})
        try:
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#home-summary").get_by_text("checkpoint").first.wait_for(
                timeout=60_000)
            return time.perf_counter() - start
        finally:
            context.close()


def one_run(lab: Path, browser: Browser) -> tuple[float, float | None]:
    """Spawn to the first HTTP 200, and to the page rendered, of `weightsmith serve` on `lab`.
    Its jobs (started by the server's scheduler in their own process groups) are cancelled
    after: the next run must not share the CPU with them. On a lab that does not exist yet
    the server queues the demo's pretrain job and answers without waiting for it."""
    port = free_port()
    proc, start, env = spawn_serve(lab, port)
    try:
        wait_ready(proc, port)
        return time.perf_counter() - start, browser.rendered_at(port, start)
    finally:
        proc.terminate()
        proc.wait(20)
        cancel_jobs(env)


def cancel_jobs(env: dict) -> None:
    """Cancel the lab's queued and running jobs (their processes outlive the server)."""
    jobs = subprocess.run([sys.executable, "-m", "app.cli", "jobs", "--json"], env=env,
                          cwd=REPO, capture_output=True, text=True, check=True).stdout
    for job in json.loads(jobs):
        if job["status"] in ("queued", "running"):
            subprocess.run([sys.executable, "-m", "app.cli", "cancel", job["id"]],
                           env=env, cwd=REPO, capture_output=True, check=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if importlib.util.find_spec("playwright") is None:
        chromium = None
    code = ("import sys, time; t = time.perf_counter(); import app.cli, app.server, app.ui; "
            "a = time.perf_counter() - t; import gradio; b = time.perf_counter() - t; "
            "print(f'{a:.2f} {b:.2f} {\"torch\" in sys.modules}')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.split()
    print(f"import app.cli + app.server + app.ui: {out[0]} s; with gradio: {out[1]} s; "
          f"torch imported: {out[2]}")
    with tempfile.TemporaryDirectory() as tmp:
        lab = Path(tmp) / "lab"
        subprocess.run([sys.executable, "-m", "app.cli", "demo", "--lab", str(lab),
                        "--pretrain-steps", "2", "--no-skills"], cwd=REPO, check=True,
                       capture_output=True)
        with Browser(chromium) as browser:
            runs = [one_run(lab, browser) for _ in range(args.runs)]
            fresh = [one_run(Path(tmp) / f"fresh-{i}", browser) for i in range(args.runs)]
    ready = statistics.median(r[0] for r in runs)
    print(f"\n{'measure':40} {'median s':>9} {'target s':>9} {'ratio':>6}   runs")
    print(f"{'spawn to first HTTP 200':40} {ready:9.2f} {TARGET_S:9.1f} {ready / TARGET_S:6.2f}"
          f"   {', '.join(f'{r[0]:.2f}' for r in runs)}")
    if chromium:
        shown = statistics.median(r[1] for r in runs)
        print(f"{'spawn to page rendered (chromium)':40} {shown:9.2f} {TARGET_S:9.1f} "
              f"{shown / TARGET_S:6.2f}   {', '.join(f'{r[1]:.2f}' for r in runs)}")
    else:
        print("chromium or playwright missing: page-render time not measured")
    first = statistics.median(r[0] for r in fresh)
    print(f"{'fresh lab: spawn to first HTTP 200':40} {first:9.2f} {TARGET_S:9.1f} "
          f"{first / TARGET_S:6.2f}   {', '.join(f'{r[0]:.2f}' for r in fresh)}")
    if chromium:
        shown = statistics.median(r[1] for r in fresh)
        print(f"{'fresh lab: spawn to page rendered':40} {shown:9.2f} {TARGET_S:9.1f} "
              f"{shown / TARGET_S:6.2f}   {', '.join(f'{r[1]:.2f}' for r in fresh)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
