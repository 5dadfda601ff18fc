"""A job's registry on a node that must not open the lab's registry.db.

SQLite's locking is not safe over a network file system, so a worker that a cluster engine
runs on another node (app/executors) never opens registry.db. The server writes a snapshot of
the registry into the job folder before it hands the job over; the worker copies it to its
own disk and opens a `JournalRegistry` on the copy. Reads see the snapshot and the job's own
writes. Every write goes to the copy (so a read after it sees it, and ids and names come out
as the lab's would) and, as one JSON line naming the Registry call and its arguments, to the
job folder's journal. The server, the registry's only writer, replays the journal's new lines
on every scheduler pass (app/ingest.py), after checking each one against what a job may
write.

Why calls and not SQL: a replayed call goes through the same checks as a local job's (a
parent must exist, a relation must be known), and the server can refuse a call a job has no
business making (another job's row, a column outside the list) by name.

Only the calls in `CALLS` are journaled; any other write on a JournalRegistry raises, so a
new kind of write cannot be lost silently on the node.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Iterator

from registry.common import RegistryError
from registry.store import Registry

SNAPSHOT = "registry-snapshot.db"
MAX_LINE = 1 << 20  # bytes in one journal line (a call's arguments: metadata, a config)
READ_BYTES = 8 << 20  # what the server reads of a journal per pass
JOURNAL = "registry-journal.jsonl"
# The ranks of a job launched as several processes on a cluster (app/worker.py): the
# launching worker's copy after it imported the job's inputs, which the server's snapshot
# lacks. Every rank reads it from its own copy; rank 0 alone journals, to the same journal.
RANKS_SNAPSHOT = "registry-snapshot-ranks.db"

# Registry calls a job may make (methods of Registry, and of its `datasets`), journaled on
# the node and replayed by the server
CALLS = ("update_job", "add_metric", "add_evaluation", "add_job_suggestion", "add_checkpoint",
         "add_edge", "update_checkpoint", "datasets.add", "datasets.remember_file")
# what the app records besides registry calls: ("auto_eval", checkpoint=..., source_plugin=...)
NOTES = ("auto_eval",)


def remove_snapshots(job_dir: str | Path) -> None:
    """A cluster job's snapshots, once no worker can read them (the job ended, or its
    hand-over failed): a whole copy of the registry each."""
    for name in (SNAPSHOT, RANKS_SNAPSHOT):
        (Path(job_dir) / name).unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    """JSON for a call's argument: numbers from numpy or torch scalars become floats."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RegistryError(f"a journaled registry call got {type(value).__name__} "
                            f"{value!r}, which JSON cannot carry") from None


class Journal:
    """The job folder's journal file: appended to by the worker, read by the server."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, entry: dict) -> None:
        # one write() of a whole line in append mode, then fsync: the server reads only
        # complete lines, and a line it has read is on the shared disk
        line = (json.dumps(entry, sort_keys=True, allow_nan=True) + "\n").encode()
        if len(line) > MAX_LINE:
            raise RegistryError(f"a journal line of {len(line)} bytes (at most {MAX_LINE})")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, offset: int) -> Iterator[tuple[int, dict | None, str]]:
        """(offset after the line, the entry or None when the line is not JSON, the raw
        line) for each complete line from byte `offset` on, reading at most READ_BYTES: the
        rest waits for the next call. The file must be a regular file (never a FIFO, a
        device or a link to one, which could hang or flood the reader); a line longer than
        MAX_LINE is returned as not JSON."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return
        except OSError as e:
            raise RegistryError(f"{self.path} cannot be read as a journal ({e})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RegistryError(f"{self.path} is not a regular file")
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, READ_BYTES)
        finally:
            os.close(fd)
        at = offset
        while True:
            end = data.find(b"\n", at - offset)
            if end < 0:
                if len(data) - (at - offset) > MAX_LINE:  # never a line: say so
                    yield offset + len(data), None, data[at - offset:][:200].decode(
                        "utf-8", "replace")
                return  # a line still being written
            raw = data[at - offset:end].decode("utf-8", "replace")
            at = offset + end + 1
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = None
            yield at, entry if isinstance(entry, dict) else None, raw


class _JournaledDatasets:
    """The `datasets` of a JournalRegistry: its calls in CALLS are journaled."""

    def __init__(self, inner, owner: "JournalRegistry"):
        self._inner, self._owner = inner, owner

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if f"datasets.{name}" in CALLS:
            return lambda *a, **k: self._owner._call(f"datasets.{name}", attr, *a, **k)
        return attr


class JournalRegistry(Registry):
    """A Registry over a private copy of the snapshot whose writes are journaled (see the
    module's docstring). `open(job_dir, local_dir)` makes the copy."""

    def __init__(self, copy: str | Path, journal: str | Path):
        self._depth = 1  # the migration check in Registry.__init__ may write the copy
        self._held: list | None = None
        self.journal = Journal(journal)
        super().__init__(copy)
        self._depth = 0
        self._seen = self.db.conn.total_changes
        self.datasets = _JournaledDatasets(self.datasets, self)

    @classmethod
    def open(cls, job_dir: str | Path, local_dir: str | Path,
             snapshot: str = SNAPSHOT) -> "JournalRegistry":
        """The job's registry: the snapshot in `job_dir` (the server's, or RANKS_SNAPSHOT for
        the ranks of a launched job) copied once into `local_dir` (the node's own disk), the
        journal in `job_dir`."""
        job_dir, local_dir = Path(job_dir), Path(local_dir)
        copy = local_dir / SNAPSHOT
        if not copy.exists():
            source = job_dir / snapshot
            if not source.is_file():
                raise RegistryError(f"{source} is missing: the server (for the ranks of a "
                                    f"launched job, its launching worker) writes it before "
                                    f"the job starts")
            local_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy.with_name(copy.name + ".part"))
            os.replace(copy.with_name(copy.name + ".part"), copy)
        return cls(copy, job_dir / JOURNAL)

    def _check_unjournaled(self) -> None:
        """Raise if this connection changed a row since the last journaled call other than
        through one (an audit line, a raw statement): the lab would never see it. SQLite
        counts every row a connection changes (total_changes), autocommit or not."""
        changes = self.db.conn.total_changes
        if changes != self._seen:
            self._seen = changes  # said once; the job's own end can still be recorded
            raise RegistryError("a registry write outside the journaled calls "
                                f"({', '.join(CALLS)}): a job on another node would lose it; "
                                "add the call to registry/journal.py CALLS and to the "
                                "server's replay (app/ingest.py)")

    @contextlib.contextmanager
    def write(self):
        """A write transaction on the copy. Outside a journaled call it may only group
        journaled calls (hub.fill_stub does)."""
        if self._depth or self._held is not None:  # inside a call, or a group's inner group
            with super().write() as db:
                yield db
            return
        self._check_unjournaled()
        self._held = []  # the group's lines: journaled once it commits, dropped if not
        try:
            with super().write() as db:
                yield db
            held = self._held
        finally:
            self._held = None
        for entry in held:
            self.journal.append(entry)
        self._check_unjournaled()

    def _call(self, name: str, method, /, *args, **kwargs):
        """Run one call on the copy and, when it is the outermost, journal it."""
        params = inspect.signature(method).parameters
        call = dict(inspect.signature(method).bind(*args, **kwargs).arguments)
        for key, p in params.items():  # **fields: flat, as the call takes them
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                call.update(call.pop(key, None) or {})
        if name == "add_checkpoint" and not call.get("id"):
            call["id"] = self.free_id("ck")  # the lab gets the same id when it replays
        outermost = self._depth == 0
        if outermost:
            self._check_unjournaled()
        self._depth += 1
        try:
            result = method(**call)
        finally:
            self._depth -= 1
            if outermost:
                self._seen = self.db.conn.total_changes
        if outermost:
            if name == "add_checkpoint":
                call["name"] = result["name"]  # the free name found on the copy
            entry = {"call": name, "args": _plain(call)}
            if self._held is not None:  # inside a group: only if the group commits
                self._held.append(entry)
            else:
                self.journal.append(entry)
        return result

    def close(self) -> None:
        try:
            self._check_unjournaled()
        finally:
            super().close()

    def note(self, name: str, **fields: Any) -> None:
        """Something for the server to do that is no registry call (NOTES)."""
        if name not in NOTES:
            raise RegistryError(f"unknown journal note {name!r}")
        self.journal.append({"note": name, "args": _plain(fields)})


def _journaled(name: str):
    method = getattr(Registry, name)

    def call(self, *args, **kwargs):
        return self._call(name, method.__get__(self), *args, **kwargs)

    call.__name__, call.__doc__ = name, method.__doc__
    return call


for _name in CALLS:
    if "." not in _name:
        setattr(JournalRegistry, _name, _journaled(_name))
