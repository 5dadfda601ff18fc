"""Datasets: every data file a job reads (an upload, a path on the server, a Hub dataset id)
is recorded by content hash, with its format, row count and the jobs that read it, so the
lineage shows which data trained or calibrated which checkpoint (registry/datasets.py stores
them). A data field also takes a registered dataset's id (`ds-...`), resolved to its file at
submit.

A file's hash is its SHA-256 (what `sha256sum` prints); a folder's is the SHA-256 of
"relative path NUL file hash" lines of its regular files, sorted; symbolic links inside a
folder are skipped, here and in the preview (a link could point outside the lab's roots).
A file whose size and modification time are unchanged is not hashed again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

import plugins
from app.lab import Lab
from registry.refs import is_hub_id

DATA_MARKERS = ("data", "file")  # config fields that name data (app/paths.path_values)
DATASET_REF = re.compile(r"ds-[0-9a-f]{12}")
TEXT_SUFFIXES = (".txt", ".text", ".md")
PREVIEW_ROWS = 20
PREVIEW_COLUMNS = 12
CELL_CHARS = 300
MAX_JSON_BYTES = 64 << 20  # a .json document is parsed whole; above this its rows are unknown
MAX_NAME = 120
BINARY_FORMATS = ("arrow",)
# Files and folders up to this size are hashed at submit (about a second per GiB here);
# larger ones are recorded by path, size and modification time (metadata "hashed": false),
# so a submit never reads a large corpus in the server's request.
MAX_HASH_BYTES = 1 << 30


class DatasetError(ValueError):
    """A dataset that cannot be recorded or shown: unreadable, or not a dataset."""


# ------------------------------------------------------------------------------ files
def _walk(root: Path) -> Iterator[Path]:
    """The regular files under a folder, sorted, symbolic links and hidden files skipped."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if not name.startswith(".") and not path.is_symlink() and path.is_file():
                yield path


def fingerprint(path: Path) -> tuple[int, int]:
    """(size in bytes, newest modification time in ns) of a file, or of a folder's files and
    subfolders (a folder's time changes when a file is added, removed or renamed in it)."""
    st = path.stat()
    if path.is_file():
        return st.st_size, st.st_mtime_ns
    size, newest = 0, st.st_mtime_ns
    for folder, dirs, files in os.walk(path, followlinks=False):
        newest = max(newest, os.stat(folder).st_mtime_ns)
        for name in files:
            f = Path(folder) / name
            if not f.is_symlink() and f.is_file():
                fst = f.stat()
                size += fst.st_size
                newest = max(newest, fst.st_mtime_ns)
    return size, newest


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(path: Path) -> tuple[str, int]:
    """(SHA-256 hex, number of files) of a file or folder (see the module's docstring)."""
    if path.is_file():
        return _file_hash(path), 1
    h, count = hashlib.sha256(), 0
    for f in _walk(path):
        h.update(f"{f.relative_to(path).as_posix()}\0{_file_hash(f)}\n".encode())
        count += 1
    return h.hexdigest(), count


def file_format(path: Path) -> str:
    """"jsonl", "csv", "text", "parquet", ... from the suffix; "folder" for a folder."""
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet", ".arrow": "arrow", ".yaml": "yaml", ".yml": "yaml",
            ".txt": "text", ".text": "text", ".md": "text"}.get(suffix, suffix.lstrip(".")
                                                                 or "file")


def _count_lines(path: Path, nonblank: bool) -> int:
    """Lines of a file (with `nonblank`, only those holding more than whitespace), read in
    1 MiB chunks: a file of one 5 GB line costs no more memory than any other."""
    count, content, last = 0, False, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            lines = chunk.split(b"\n")
            for done in lines[:-1]:  # every complete line in this chunk
                count += 1 if (not nonblank or content or done.strip()) else 0
                content = False
            content = content or bool(lines[-1].strip())
            last = chunk[-1:]
    if last != b"\n" and (content or not nonblank):  # a last line without its newline
        count += 1
    return count


def _lines(f, n: int):
    """Up to `n` lines of a text file, each cut at CELL_CHARS * 4 characters (the rest of a
    longer line is skipped unread into memory)."""
    cap = CELL_CHARS * 4
    got = 0
    while got < n:
        line = f.readline(cap)
        if not line:
            return
        if not line.endswith("\n"):  # cut: skip to the end of this line, a chunk at a time
            while True:
                rest = f.readline(1 << 16)
                if not rest or rest.endswith("\n"):
                    break
        got += 1
        yield line.rstrip("\n")


def count_rows(path: Path) -> int | None:
    """Rows of a data file (JSONL: non-blank lines; CSV/TSV: records after the header; text:
    lines; JSON: items of its top-level list; Parquet: from its footer), summed over a
    folder's data files; None where a file's format has no rows."""
    if path.is_dir():
        counts = [count_rows(f) for f in _walk(path)]
        known = [c for c in counts if c is not None]
        return sum(known) if known else None
    kind = file_format(path)
    if kind == "jsonl":
        return _count_lines(path, nonblank=True)
    if kind == "text":
        return _count_lines(path, nonblank=False)
    if kind in ("csv", "tsv"):
        try:
            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                return max(0, sum(1 for _ in csv.reader(f, delimiter="\t" if kind == "tsv"
                                                         else ",")) - 1)
        except csv.Error:  # e.g. a cell over the csv module's field limit: rows unknown
            return None
    if kind == "json" and path.stat().st_size <= MAX_JSON_BYTES:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        return len(data) if isinstance(data, list) else 1
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 -- not a readable Parquet file: rows unknown
            return None
    return None


# ----------------------------------------------------------------------------- preview
def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS - 1] + "…"


def _table(records: list) -> tuple[list[str], list[list[str]]]:
    """Column names (first seen first) and string cells of JSON-like records."""
    columns: list[str] = []
    for r in records:
        for key in (r if isinstance(r, dict) else {"value": r}):
            if key not in columns and len(columns) < PREVIEW_COLUMNS:
                columns.append(str(key))
    rows = []
    for r in records:
        r = r if isinstance(r, dict) else {"value": r}
        rows.append([_cell(r[c]) if c in r else "" for c in columns])
    return columns, rows


def preview(path: Path, n: int = PREVIEW_ROWS) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of a data file's first `n` rows, every cell a string of at most
    CELL_CHARS characters; a folder: its files (and the first data file's rows come from
    `preview` of that file)."""
    if path.is_dir():
        rows = []
        for f in _walk(path):
            if len(rows) >= 200:
                break
            rows.append([f.relative_to(path).as_posix(), file_format(f), str(f.stat().st_size)])
        return ["file", "format", "bytes"], rows
    kind = file_format(path)
    if kind == "jsonl":
        records = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in _lines(f, 4 * n):
                if len(records) >= n:
                    break
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError:  # not JSON, or a line too long to show whole
                        records.append({"(not JSON)": line})
        return _table(records)
    if kind in ("csv", "tsv"):
        try:
            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                reader = csv.reader(f, delimiter="\t" if kind == "tsv" else ",")
                header = next(reader, [])[:PREVIEW_COLUMNS]
                rows = []
                for record in reader:
                    if len(rows) >= n:
                        break
                    rows.append([_cell(v) for v in record[:len(header)]])
        except csv.Error as e:  # a cell over the csv module's field limit
            raise DatasetError(f"{path.name} cannot be read as {kind.upper()} ({e})") from None
        return [_cell(h) for h in header], rows
    if kind in BINARY_FORMATS:
        raise DatasetError(f"{path.name} is a binary {kind} file: no preview of its rows")
    if kind == "json" and path.stat().st_size <= MAX_JSON_BYTES:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DatasetError(f"{path.name} is not valid JSON ({e})") from None
        return _table(data[:n] if isinstance(data, list) else [data])
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq

            batch = next(pq.ParquetFile(path).iter_batches(batch_size=n), None)
        except Exception as e:  # noqa: BLE001 -- a broken file: say so, no traceback
            raise DatasetError(f"{path.name} is not a readable Parquet file ({e})") from None
        return _table(batch.to_pylist() if batch is not None else [])
    with open(path, encoding="utf-8", errors="replace") as f:  # text, YAML, anything else
        return ["text"], [[_cell(line)] for line in _lines(f, n)]


# ---------------------------------------------------------------------------- records
def clean_name(name: str) -> str:
    """A dataset's display name: no control characters, at most MAX_NAME characters (it is
    escaped wherever it is shown)."""
    name = "".join(c for c in str(name) if c.isprintable()).strip()
    return name[:MAX_NAME] or "dataset"


def path_facts(lab: Lab, path: str | Path, *, source: str = "path",
               name: str | None = None) -> dict:
    """What a local file or folder is recorded as (its hash, format, rows, size...), read
    without writing anything: a file unchanged since its last hash (same path, size and
    modification time) is not read again, and one larger than MAX_HASH_BYTES is recorded by
    path, size and time. Raises DatasetError if it cannot be read."""
    real = Path(path).expanduser().absolute()
    try:
        size, mtime = fingerprint(real)
        with lab.registry() as reg:
            known = reg.datasets.known_file(str(real), size, mtime)
        if known is not None and not known["deleted_at"]:
            return {"known": known, "path": str(real), "size": size, "mtime": mtime}
        metadata = None
        if size > MAX_HASH_BYTES:
            digest = hashlib.sha256(f"fingerprint\0{real}\0{size}\0{mtime}".encode()).hexdigest()
            files = None if real.is_dir() else 1
            rows = None
            metadata = {"hashed": False, "why": f"over {MAX_HASH_BYTES >> 30} GiB: recorded "
                                                 f"by path, size and modification time"}
        else:
            digest, files = content_hash(real)
            rows = count_rows(real)
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror or e})") from None
    return {"known": None, "content_hash": digest, "name": clean_name(name or real.name),
            "source": source, "path": str(real), "format": file_format(real), "rows": rows,
            "files": files, "size": size, "mtime": mtime, "metadata": metadata}


def record(reg, facts: dict, user: str | None) -> dict:
    """Write what `path_facts` found (inside the caller's registry connection); the row."""
    if facts["known"] is not None:
        return facts["known"]
    row = reg.datasets.add(content_hash=facts["content_hash"], name=facts["name"],
                           source=facts["source"], path=facts["path"], format=facts["format"],
                           rows=facts["rows"], files=facts["files"],
                           size_bytes=facts["size"], created_by=user,
                           metadata=facts["metadata"])
    if facts["path"] is not None:
        reg.datasets.remember_file(facts["path"], facts["size"], facts["mtime"], row["id"])
    return row


def register_path(lab: Lab, path: str | Path, *, user: str | None, source: str = "path",
                  name: str | None = None) -> dict:
    """The dataset row of a local file or folder, recorded if new (`path_facts`)."""
    facts = path_facts(lab, path, source=source, name=name)
    with lab.registry() as reg:
        return record(reg, facts, user or lab.settings.default_user)


def hub_facts(hub_id: str) -> dict:
    return {"known": None, "name": clean_name(hub_id), "source": f"hf://{hub_id}",
            "content_hash": hashlib.sha256(f"hf://{hub_id}".encode()).hexdigest(),
            "path": None, "format": "hub", "rows": None, "files": None, "size": None,
            "mtime": None, "metadata": None}


def register_hub(lab: Lab, hub_id: str, *, user: str | None) -> dict:
    """The dataset row of a Hub dataset id (the lab holds no copy: it is recorded by id)."""
    facts = hub_facts(hub_id)
    with lab.registry() as reg:
        return reg.datasets.add(content_hash=facts["content_hash"], name=facts["name"],
                                source=facts["source"], format="hub",
                                created_by=user or lab.settings.default_user)


def data_fields(plugin: plugins.Plugin) -> list[str]:
    """The top-level config fields of a plugin that name data (markers `data`, `file`)."""
    props = plugin.Config.model_json_schema().get("properties", {})
    return [name for name in plugin.Config.model_fields
            if plugins.field_marker(props.get(name, {})) in DATA_MARKERS]


def resolve_refs(lab: Lab, plugin: plugins.Plugin, data: dict) -> dict:
    """`data` with every registered dataset id in a data field (`ds-` and 12 hex digits)
    replaced by the dataset's file, folder or Hub id; an unknown or deleted id is a
    ConfigError at its field. Other values pass unchanged."""
    if not isinstance(data, dict):
        return data
    out, problems = dict(data), []
    for name in data_fields(plugin):
        value = data.get(name)
        if not isinstance(value, str) or not DATASET_REF.fullmatch(value.strip()):
            continue
        with lab.registry() as reg:
            row = reg.datasets.get(value.strip())
        if row is None or row["deleted_at"]:
            problems.append(f"field '{name}': no dataset {value.strip()} in this lab; "
                            f"expected a registered dataset's id (see the Datasets tab), a "
                            f"path on the server or a Hub dataset id")
        elif row["path"]:
            out[name] = row["path"]
        else:
            out[name] = row["source"].removeprefix("hf://")
    if problems:
        raise plugins.ConfigError(plugin.name, problems)
    return out


def config_datasets(lab: Lab, config, plugin: plugins.Plugin) -> list[tuple[str, dict]]:
    """(field, `path_facts` or `hub_facts`) for every data value of a validated config:
    local files and folders by content hash, Hub dataset ids by id; bare names (a suite)
    are not datasets. Writes nothing (submit `record`s them with the job). An unreadable
    file is a ConfigError at its field."""
    from app.paths import path_values

    found, problems = [], []
    for field, value, marker in path_values(config, plugin):
        if marker not in DATA_MARKERS:
            continue
        path = Path(value).expanduser()
        try:
            if path.exists():
                found.append((field, path_facts(lab, path)))
            elif marker == "data" and is_hub_id(value):
                found.append((field, hub_facts(value)))
        except DatasetError as e:
            problems.append(f"field '{field}': {e}")
    if problems:
        raise plugins.ConfigError(plugin.name, problems)
    return found


def dataset_rows(lab: Lab, search: str | None = None, limit: int = 200) -> list[dict]:
    with lab.registry() as reg:
        return reg.datasets.list(search=search, limit=limit)


def describe(lab: Lab, ds_id: str) -> dict:
    """A dataset's row, its uses, and a preview of its rows ({"row", "uses", "columns",
    "rows", "problem"}); raises DatasetError for an unknown id."""
    with lab.registry() as reg:
        row = reg.datasets.get(ds_id)
        if row is None:
            raise DatasetError(f"no dataset {ds_id!r} in this lab")
        uses = reg.datasets.uses(ds_id)
        uses["sources"] = reg.datasets.sources(ds_id) if row.get("job_id") else []
    columns, rows, problem = [], [], None
    from app.paths import check_path, restricted

    outside = row["path"] and restricted(lab) and check_path(lab, "path", row["path"])
    if outside:  # recorded before the lab had roots: not shown from outside them
        problem = "its file lies outside the lab's allowed roots; no preview"
    elif row["path"]:
        try:
            columns, rows = preview(Path(row["path"]))
        except DatasetError as e:
            problem = str(e)
        except OSError as e:
            problem = f"its file cannot be read now ({e.strerror or e})"
    return {"row": row, "uses": uses, "columns": columns, "rows": rows, "problem": problem}
