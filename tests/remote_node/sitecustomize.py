"""Loaded at start-up by every Python process whose PYTHONPATH holds this folder (the test
engine's workers, tests/fake_engine.py): such a process plays a worker on another node, which
cannot open the lab's registry.db. An audit hook refuses any open of it, by sqlite3 or by
open() (tests run as root in CI, where a chmod would not stop the read)."""

import os
import sys

_LAB = os.environ.get("WEIGHTSMITH_TEST_REMOTE_LAB")
if _LAB:
    _BANNED = os.path.realpath(os.path.join(_LAB, "registry.db"))

    def _refuse(event, args):
        if event not in ("sqlite3.connect", "open") or not args:
            return
        target = args[0]
        if isinstance(target, int) or target is None:
            return
        try:
            path = os.path.realpath(os.fsdecode(target))
        except (TypeError, ValueError):
            return
        if path.startswith(_BANNED):  # registry.db, -wal, -shm
            raise PermissionError(f"this node cannot read {target}: tests/remote_node")

    sys.addaudithook(_refuse)
    if os.environ.get("WEIGHTSMITH_TEST_REMOTE_SAY"):  # for a test to see it was on
        print("[tests/remote_node] registry.db cannot be opened here", file=sys.stderr,
              flush=True)
