"""The `weightsmith` command line. The browser UI calls the same functions (app.jobs, registry).

Exit codes: 0 success, 1 a job or operation failed, 2 bad input (config, reference, usage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import plugins
from app import jobs as jobs_mod
from app.lab import Lab, SettingsError
from registry import CheckpointError, RefError, RegistryError
from registry.store import FINISHED


READ_ONLY = {"jobs", "logs", "cancel", "registry"}  # these never create a lab


def _lab(args) -> Lab:
    return Lab(args.lab, create=args.command not in READ_ONLY)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[str(r.get(c) if r.get(c) is not None else "") for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


# --------------------------------------------------------------------------------- commands
def cmd_serve(args) -> int:
    from app.server import serve

    return serve(_lab(args), host=args.host, port=args.port, build_demo=not args.no_demo,
                 ui=not args.no_ui)


def cmd_demo(args) -> int:
    from app.demo import build_demo

    lab = _lab(args)
    result = build_demo(lab, force=args.force, pretrain_steps=args.pretrain_steps,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    _print_json(result)
    return 0


def cmd_plugins(args) -> int:
    found = plugins.discover()
    if args.json:
        _print_json([{"name": p.name, "title": p.title, "description": p.description,
                      "schema": p.Config.model_json_schema()} for p in found.values()]
                    + [{"error": e} for e in plugins.load_errors()])
        return 0
    for p in found.values():
        print(f"{p.name:20} {p.title}: {p.description}")
        for name, info in p.Config.model_fields.items():
            default = "required" if info.is_required() else f"default {info.default!r}"
            print(f"    {name:18} {default}. {info.description}")
    for e in plugins.load_errors():
        print(f"error: {e}", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    lab = _lab(args)
    data = jobs_mod.load_config_file(args.config)
    job = jobs_mod.submit(lab, args.plugin, data, user=args.user)
    print(f"queued {job['id']} ({job['plugin']})", file=sys.stderr)
    if not args.wait:
        from app.scheduler import Scheduler

        probe = Scheduler(lab)
        if probe.acquire():  # nobody is scheduling this lab: say so rather than hang silently
            probe.release()
            print("note: no `weightsmith serve` is running for this lab; the job starts when "
                  "one does (or use --wait to run it now)", file=sys.stderr)
        print(json.dumps(jobs_mod.job_summary(lab, job["id"])))
        return 0
    return _wait(lab, job["id"])


def cmd_preview(args) -> int:
    lab = _lab(args)
    plugin, config = jobs_mod.check_config(lab, args.plugin,
                                           jobs_mod.load_config_file(args.config))
    if plugin.preview is None:
        print(f"{plugin.name} has no data preview", file=sys.stderr)
        return 2
    try:
        print(plugin.preview(config, lab))
    except ValueError as e:  # bad data: the message names the field
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _wait(lab: Lab, job_id: str) -> int:
    """Follow a job to its end, streaming its log to stderr. If no server schedules this lab,
    this process schedules the job itself (and only that job)."""
    from app.scheduler import Scheduler

    scheduler = Scheduler(lab, poll_seconds=0.2)
    own = scheduler.acquire()
    log_pos = 0
    log_path = lab.job_dir(job_id) / "log.txt"
    reg = lab.registry()  # one connection for the whole wait, not one per poll
    try:
        while True:
            if own:
                scheduler.tick(only=job_id)
            if log_path.exists():
                with open(log_path, "rb") as f:
                    f.seek(log_pos)
                    chunk = f.read()
                    log_pos += len(chunk)
                if chunk:
                    sys.stderr.write(chunk.decode("utf-8", "replace"))
                    sys.stderr.flush()
            status = reg.job(job_id)["status"]
            if status in FINISHED:
                if own:  # let the scheduler reap the worker process
                    for proc in scheduler.children.values():
                        proc.wait(timeout=30)
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: cancelling {job_id}", file=sys.stderr)
        jobs_mod.cancel(lab, job_id)
    finally:
        reg.close()
        scheduler.release()
    summary = jobs_mod.job_summary(lab, job_id)
    if summary["status"] != "succeeded" and summary.get("error"):
        print(summary["error"], file=sys.stderr)
    print(json.dumps(summary))
    return 0 if summary["status"] == "succeeded" else 1


def cmd_jobs(args) -> int:
    lab = _lab(args)
    with lab.registry() as reg:
        rows = reg.jobs(status=args.status, limit=args.limit)
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        r["progress"] = f"{(r['progress'] or 0):.0%}"
    _table(rows, ["id", "plugin", "status", "progress", "user", "device", "created_at",
                  "finished_at"])
    return 0


def cmd_logs(args) -> int:
    lab = _lab(args)
    with lab.registry() as reg:
        job = reg.job(args.job)
    path = Path(job["log_path"] or lab.job_dir(args.job) / "log.txt")
    pos = 0
    while True:
        if path.exists():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
            sys.stdout.write(chunk.decode("utf-8", "replace"))
            sys.stdout.flush()
        if not args.follow:
            return 0
        with lab.registry() as reg:
            if reg.job(args.job)["status"] not in ("queued", "running"):
                if path.exists() and path.stat().st_size > pos:
                    continue
                return 0
        time.sleep(0.3)


def cmd_cancel(args) -> int:
    job = jobs_mod.cancel(_lab(args), args.job)
    print(json.dumps({"job": job["id"], "status": job["status"]}))
    return 0


def cmd_import(args) -> int:
    from app.checkpoints import import_checkpoint, to_json

    lab = _lab(args)
    with lab.registry() as reg:
        row = import_checkpoint(lab, reg, args.ref, name=args.name,
                                log=lambda m: print(m, file=sys.stderr))
    _print_json(to_json(row))
    return 0


def cmd_registry(args) -> int:
    from app.checkpoints import to_json

    lab = _lab(args)
    with lab.registry() as reg:
        if args.registry_cmd == "list":
            rows = reg.list_checkpoints(search=args.search, relation=args.relation,
                                        kind=args.kind, limit=args.limit, offset=args.offset)
            if args.json:
                _print_json([to_json(r) for r in rows])
                return 0
            for r in rows:
                r["parents"] = ",".join(r["parents"])
                r["params"] = f"{r['param_count'] / 1e6:.2f}M" if r["param_count"] else ""
                r["scores"] = " ".join(f"{k}={v:.4g}" for k, v in list(r["scores"].items())[:3])
            _table(rows, ["id", "name", "relation", "parents", "params", "scores",
                          "created_at"])
        elif args.registry_cmd == "show":
            row = to_json(reg.checkpoint(args.id))
            row["parents"] = reg.parents(row["id"])
            row["evaluations"] = reg.evaluations(row["id"])
            _print_json(row)
        elif args.registry_cmd == "lineage":
            if args.mermaid:
                print(reg.lineage_mermaid(args.id, args.depth))
            else:
                _print_json(reg.lineage(args.id, args.depth))
    return 0


# ----------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    lab_help = "lab folder (default: $WEIGHTSMITH_LAB or ./lab)"
    p = argparse.ArgumentParser(prog="weightsmith", description="Weightsmith: train, merge, "
                                "prune, grow and evaluate checkpoints with their lineage.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, func, help):
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--lab", default=None, help=lab_help)
        sp.set_defaults(func=func)
        return sp

    sp = add("serve", cmd_serve, "serve the web app (and run the lab's job scheduler)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=7860)
    sp.add_argument("--no-demo", action="store_true", help="do not build the demo model")
    sp.add_argument("--no-ui", action="store_true", help="run the job scheduler only")

    sp = add("demo", cmd_demo, "build (or with --force rebuild) the demo model; prints its id")
    sp.add_argument("--force", action="store_true")
    sp.add_argument("--pretrain-steps", type=int, default=None,
                    help="pre-training steps (default 300, about a minute on 2 cores)")

    sp = add("plugins", cmd_plugins, "list plugins and their config fields")
    sp.add_argument("--json", action="store_true", help="with config JSON schemas")

    sp = add("run", cmd_run, "submit a job: PLUGIN with the settings in CONFIG.yaml")
    sp.add_argument("plugin")
    sp.add_argument("config", help="YAML file of the plugin's config fields")
    sp.add_argument("--wait", action="store_true",
                    help="follow the job to its end; exit non-zero if it fails")
    sp.add_argument("--user", default=None)

    sp = add("preview", cmd_preview, "show what a config would read: first rows and token "
                                     "lengths of its data (plugins with a preview)")
    sp.add_argument("plugin")
    sp.add_argument("config", help="YAML file of the plugin's config fields")

    sp = add("jobs", cmd_jobs, "list jobs")
    sp.add_argument("--status", choices=["queued", "running", "succeeded", "failed",
                                         "cancelled", "interrupted"])
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")

    sp = add("logs", cmd_logs, "print a job's log")
    sp.add_argument("job")
    sp.add_argument("--follow", "-f", action="store_true")

    sp = add("cancel", cmd_cancel, "cancel a job (stops its whole process tree)")
    sp.add_argument("job")

    sp = add("import", cmd_import, "register an HF checkpoint folder or Hub id (relation import)")
    sp.add_argument("ref", metavar="PATH_OR_HUB_ID")
    sp.add_argument("--name", default=None)

    sp = add("registry", cmd_registry, "list, show and trace checkpoints")
    rsub = sp.add_subparsers(dest="registry_cmd", required=True)
    lp = rsub.add_parser("list", help="list checkpoints, newest first")
    lp.add_argument("--search", default=None, help="part of a name or id")
    lp.add_argument("--relation", default=None)
    lp.add_argument("--kind", default=None)
    lp.add_argument("--limit", type=int, default=50)
    lp.add_argument("--offset", type=int, default=0)
    lp.add_argument("--json", action="store_true")
    shp = rsub.add_parser("show", help="one checkpoint with parents and evaluations")
    shp.add_argument("id")
    lin = rsub.add_parser("lineage", help="ancestors and descendants of a checkpoint")
    lin.add_argument("id")
    lin.add_argument("--depth", type=int, default=None)
    fmt = lin.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="(default)")
    fmt.add_argument("--mermaid", action="store_true")
    for sp2 in (lp, shp, lin):  # SUPPRESS: do not overwrite a --lab given before the verb
        sp2.add_argument("--lab", default=argparse.SUPPRESS, help=lab_help)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo" and args.pretrain_steps is None:
        from app.demo import DEFAULT_STEPS

        args.pretrain_steps = DEFAULT_STEPS
    try:
        return args.func(args)
    except (plugins.ConfigError, plugins.PluginError, RefError, SettingsError,
            CheckpointError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
