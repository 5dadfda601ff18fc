"""Job subprocess entry point: `python -m app.worker JOB_ID --lab DIR` (started by the scheduler).

stdout and stderr go to the job's log.txt. The worker records its own final status; if it dies
without doing so, the scheduler records `failed` (or `interrupted` after a restart).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback

import plugins
from app.context import JobCancelled, JobContext
from app.lab import Lab
from app.scheduler import log_tail
from registry.store import now


def _on_sigterm(signum, frame):
    # Once: a second SIGTERM must not interrupt the clean-up of the first. A stuck clean-up
    # still ends with the canceller's SIGKILL after the grace period.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise JobCancelled()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="weightsmith-worker")
    parser.add_argument("job_id")
    parser.add_argument("--lab", required=True)
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _on_sigterm)
    lab = Lab(args.lab)
    reg = lab.registry()
    job = reg.job(args.job_id)
    ctx = JobContext(lab, reg, job)
    ctx.log(f"job {job['id']}: plugin {job['plugin']} on {job['device']}")
    try:
        plugin = plugins.get(job["plugin"])
        config = plugins.validate_config(plugin, json.loads(job["config"]))
        plugin.run(config, ctx)
        created = ctx.publish_all()
        reg.update_job(job["id"], only_if_status=("running",), status="succeeded",
                       progress=1.0, finished_at=now(), exit_code=0)
        ctx.log(f"job {job['id']} succeeded; checkpoints: "
                f"{', '.join(r['id'] for r in created) or 'none'}")
        return 0
    except JobCancelled:
        ctx.discard_all()
        ctx.log("cancelled: partial output removed")
        reg.update_job(job["id"], only_if_status=("running",), status="cancelled",
                       finished_at=now(), error="cancelled by user", exit_code=143)
        return 143
    except BaseException as e:  # noqa: BLE001 - every failure must be recorded on the job
        ctx.discard_all()
        traceback.print_exc()
        ctx.log(f"job failed: {type(e).__name__}: {e}")
        sys.stdout.flush()
        status = "cancelled" if reg.job(job["id"])["cancel_requested"] else "failed"
        reg.update_job(job["id"], only_if_status=("running",), status=status,
                       finished_at=now(), error=f"{type(e).__name__}: {e}\nlast log lines:\n"
                       + log_tail(job["log_path"]), exit_code=1)
        return 1
    finally:
        reg.close()


if __name__ == "__main__":
    sys.exit(main())
