"""Hub sync: publish a checkpoint with a model card the Hub draws as a model tree, sync the
lineage registry through a Hub dataset repo, and read a Hub model's parents from its card.

Everything goes through huggingface_hub's own client (HfApi, CommitOperation*, ModelCard).
huggingface_hub reads HF_ENDPOINT once, when it is imported, so the endpoint is read here on
every call and passed explicitly.

What we add, because the client lacks it: a bounded retry with backoff around whole
operations (the client retries some requests, never a commit); the checkpoint's sync state
in the registry; and the registry's append-only batch format.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from registry import relations
from registry.refs import is_hub_id
from registry.store import Registry, RegistryError, mermaid, now

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKEN_FILE_ENV = "WEIGHTSMITH_HUB_TOKEN_FILE"  # where the token file lives (tests redirect it)
RETRY_WAIT_ENV = "WEIGHTSMITH_HUB_RETRY_WAIT"  # first backoff in seconds (doubles each time)
RETRY_ATTEMPTS = 4

# Weight files a re-push removes when the new checkpoint no longer has them (stale shards).
WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.safetensors\.index\.json|\.bin\.index\.json)$")
EMBEDDED_PATH = re.compile(r"(?<![\w:/.~-])/(?:[\w.-]+/)+[\w.-]+")
SECRET_KEY = re.compile(r"token|secret|password|passwd|api_?key|credential", re.I)

SYNC_TABLES = ("checkpoints", "edges", "jobs", "evaluations")
SYNC_FIELDS = {
    "checkpoints": ("id", "name", "kind", "relation", "source", "architecture", "param_count",
                    "dtype", "size_bytes", "content_hash", "created_at", "created_by", "job_id",
                    "plugin", "config", "versions", "metadata", "hub_repo", "hub_commit",
                    "hub_pushed_at"),
    "edges": ("child_id", "parent_id", "relation", "weight", "density", "role", "position"),
    "jobs": ("id", "plugin", "config", "status", "user", "priority", "created_at",
             "started_at", "finished_at", "device", "versions", "exit_code"),
    "evaluations": ("uid", "checkpoint_id", "job_id", "task", "metric", "value", "stderr",
                    "details", "created_at"),
}
JSON_FIELDS = ("config", "versions", "metadata", "details")


class HubError(Exception):
    """A Hub operation failed: network, permissions, a missing repo, a bad repo id."""


class LocalParentError(HubError):
    """A checkpoint's parent is not on the Hub, so the card cannot name it as base_model."""


# ------------------------------------------------------------------------ endpoint & token
def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


def token_file(user: str | None = None) -> Path:
    """The token file: $WEIGHTSMITH_HUB_TOKEN_FILE, else
    $XDG_CONFIG_HOME/weightsmith/hub_token (~/.config by default), of the account the process
    runs as. Never in a lab folder. With `user` (a lab user logged in to a shared server),
    that user's own file beside it, `hub_token.USER`, so that lab users who share one server
    account publish with their own tokens."""
    if os.environ.get(TOKEN_FILE_ENV):
        path = Path(os.environ[TOKEN_FILE_ENV]).expanduser()
    else:
        config = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
        path = Path(config).expanduser() / "weightsmith" / "hub_token"
    if user is None:
        return path
    if not _USER_NAME.match(user):
        raise HubError(f"user name {user!r} cannot name a token file (letters, digits and "
                       f"._@+- expected)")
    return path.with_name(f"{path.name}.{user}")


def save_token(token: str, lab_root: Path | None = None, user: str | None = None) -> Path:
    """Store the token with mode 0600 in the token file (`user`'s own with a user); returns
    the file."""
    token = (token or "").strip()
    if not token:
        raise HubError("the Hub token is empty")
    path = token_file(user)
    if lab_root is not None and path.resolve().is_relative_to(Path(lab_root).resolve()):
        raise HubError(f"{TOKEN_FILE_ENV} points into the lab folder ({path}); the token "
                       f"must live outside it")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def load_token(user: str | None = None) -> str | None:
    """With `user`: that user's token file when it exists. Otherwise HF_TOKEN when set, else
    the token file; None lets huggingface_hub use its own login."""
    if user is not None:
        path = token_file(user)
        if path.is_file():
            return path.read_text().strip() or None
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"].strip()
    path = token_file()
    if path.is_file():
        return path.read_text().strip() or None
    return None


# Hub tokens (hf_ and the organisation tokens api_org_), in any text: a download error that
# echoes a request, a traceback, a log line.
TOKEN_PATTERN = re.compile(r"\b(?:hf_oauth|hf|api_org)_[A-Za-z0-9]{16,}\b")


def known_tokens() -> list[str]:
    """Every Hub token this process could use: HF_TOKEN (and its old name), the server's token
    file and each lab user's `hub_token.USER` beside it. Longest first, so that a token that
    contains another is blanked whole."""
    found = {os.environ.get(name, "").strip() for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    try:
        base = token_file()
        files = [base] + sorted(base.parent.glob(base.name + ".*")) if base.parent.is_dir() \
            else []
    except OSError:
        files = []
    for path in files:
        try:
            if path.is_file() and not path.name.endswith(".tmp"):
                found.add(path.read_text().strip())
        except OSError:
            continue
    return sorted((t for t in found if len(t) >= 8), key=len, reverse=True)


def redact(text, tokens: list[str] | None = None) -> str:
    """`text` with every Hub token blanked (`***`): the known tokens' values and anything
    shaped like a Hub token. The one formatter for log lines and stored errors."""
    text = "" if text is None else str(text)
    for token in known_tokens() if tokens is None else tokens:
        if token:
            text = text.replace(token, "***")
    return TOKEN_PATTERN.sub("***", text)


class RedactingFilter:
    """A logging filter that blanks Hub tokens in every record (logging.Filter protocol): in
    its message, in each argument (kept as they are when clean, so formatters that read the
    arguments, such as uvicorn's access log, still work) and in its traceback."""

    def __init__(self):
        self._tokens = known_tokens()

    def _clean(self, value):
        text = value if isinstance(value, str) else str(value)
        clean = redact(text, self._tokens)
        return value if clean == text else clean

    def filter(self, record) -> bool:
        try:
            if not isinstance(record.msg, str):  # log.error(exc): the message is the object
                record.msg, record.args = self._clean(record.getMessage()), None
            record.msg = redact(record.msg, self._tokens)
            if isinstance(record.args, tuple):
                record.args = tuple(self._clean(a) for a in record.args)
            elif isinstance(record.args, dict):
                record.args = {k: self._clean(v) for k, v in record.args.items()}
            if record.exc_info and record.exc_info[1] is not None:
                import traceback

                record.exc_text = redact("".join(
                    traceback.format_exception(*record.exc_info)).rstrip("\n"), self._tokens)
        except Exception:  # noqa: BLE001 - a record logging cannot format is logging's to report
            pass
        return True


class RedactingStream:
    """A text stream (stdout/stderr) with Hub tokens blanked in every write: a traceback or a
    library's message that echoes a request must not put a token in a log that lab members
    can read."""

    def __init__(self, stream):
        self._stream = stream
        self._tokens = known_tokens()

    def write(self, text: str) -> int:
        self._stream.write(redact(text, self._tokens))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):  # flush, fileno, isatty, encoding...
        if name.startswith("_"):  # copy.deepcopy and pickle must not loop through here
            raise AttributeError(name)
        return getattr(self._stream, name)


def install_log_redaction() -> None:
    """Blank Hub tokens in everything this process logs: a filter on every handler that
    exists now (filters on a logger do not see its children's records; handlers see all
    that reach them)."""
    import logging

    loggers = [logging.getLogger()] + [logger for logger in
                                       list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(logger, logging.Logger)]
    for logger in loggers:  # uvicorn's loggers have handlers of their own
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


def client(token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token or load_token())


# ----------------------------------------------------------------------------------- retry
def _transient(error: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        return status is None or status in (408, 429) or status >= 500
    try:
        from httpx2 import TransportError
    except ImportError:  # pragma: no cover - huggingface_hub before 2.x used httpx
        from httpx import TransportError
    return isinstance(error, (TransportError, ConnectionError, TimeoutError))


def retrying(call: Callable[[], Any], attempts: int = RETRY_ATTEMPTS) -> Any:
    """Run `call`, retrying network errors and 5xx/429 answers with exponential backoff."""
    wait = float(os.environ.get(RETRY_WAIT_ENV, "1.0"))
    for attempt in range(attempts):
        try:
            return call()
        except Exception as e:
            if attempt == attempts - 1 or not _transient(e):
                raise
            time.sleep(wait * 2 ** attempt)


def _message(error: Exception, token: str | None) -> str:
    """One line about an error, with the token blanked should a server echo it."""
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    text = " ".join(line.strip() for line in text if line.strip())[:1000]
    return redact(text, [token] + known_tokens() if token else None)


# --------------------------------------------------------------------------------- helpers
def looks_local(value: str) -> bool:
    return value.startswith(("/", "~", "./", "../", "file:")) or bool(
        re.match(r"^[A-Za-z]:[\\/]", value))


def scrub(value: Any, secret_values: tuple[str, ...] = ()) -> Any:
    """A copy of `value` without local paths (replaced by `local:NAME`) and secrets (keys that
    name a token or password are dropped; known secret strings are blanked)."""
    if isinstance(value, dict):
        return {k: scrub(v, secret_values) for k, v in value.items()
                if not SECRET_KEY.search(str(k))}
    if isinstance(value, list):
        return [scrub(v, secret_values) for v in value]
    if isinstance(value, str):
        if looks_local(value):
            return "local:" + Path(value.rstrip("/")).name
        # absolute paths inside text (a mergekit YAML); URLs and ORG/NAME ids do not match
        value = EMBEDDED_PATH.sub(lambda m: "local:" + Path(m.group(0)).name, value)
        for s in secret_values:
            if s:
                value = value.replace(s, "***")
    return value


def hub_id(row: dict | None) -> str | None:
    """The Hub id of a checkpoint that is on the Hub: published by us (hub_repo) or imported
    from a Hub id (source hf://ORG/NAME)."""
    if not row:
        return None
    if row.get("hub_repo"):
        return row["hub_repo"]
    source = row.get("source") or ""
    if source.startswith("hf://"):
        return source[len("hf://"):].split("@")[0]
    return None


def find_hub_row(reg: Registry, repo_id: str) -> dict | None:
    """The registry's row for a Hub model: one with files first, then the oldest."""
    return reg.checkpoint_for_hub_id(repo_id)


def check_repo_id(repo_id: str) -> str:
    repo_id = (repo_id or "").strip()
    if not is_hub_id(repo_id):
        raise HubError(f"repo {repo_id!r}: expected a Hub repo id of the form ORG/NAME")
    return repo_id


def _loads(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return text


# ------------------------------------------------------------------------------ model card
def _datasets(config: Any) -> list[str]:
    """Hub dataset ids a producing config names (local files are not datasets on the Hub)."""
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            if isinstance(value, (dict, list)):
                found += _datasets(value)
            elif isinstance(value, str) and ("data" in key or key == "dataset") \
                    and is_hub_id(value):
                found.append(value)
    elif isinstance(config, list):
        for value in config:
            found += _datasets(value)
    return list(dict.fromkeys(found))


def build_card(reg: Registry, row: dict, repo_id: str, base_models: list[str]):
    """The model card: Hub metadata (base_model, base_model_relation, library, tags,
    datasets, model-index scores) and a body with the lineage, config, versions and scores."""
    import yaml
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    relation = row["relation"]
    tags = list(dict.fromkeys(["weightsmith", relation]
                              + (["merge", "mergekit"] if relation == "merge" else [])
                              + (["gguf"] if row["kind"] == "gguf" else [])))
    config = scrub(_loads(row["config"]))
    scores = reg.latest_scores([row["id"]]).get(row["id"], {})
    results = []
    for key, value in sorted(scores.items()):
        task, _, metric = key.rpartition("/")
        results.append(EvalResult(task_type="text-generation", dataset_type=task,
                                  dataset_name=task, metric_type=metric, metric_value=value))
    data = ModelCardData(
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        base_model_relation=relations.hub_relation(relation) if base_models else None,
        # a GGUF file (an export) is llama.cpp's, which the Hub recognizes by the file
        library_name={"adapter": "peft", "gguf": None}.get(row["kind"], "transformers"),
        tags=tags, datasets=_datasets(config) or None,
        model_name=repo_id.split("/")[-1] if results else None,
        eval_results=results or None)

    graph = reg.lineage(row["id"])  # ancestors only: descendants may come later
    keep = {row["id"]} | {a["id"] for a in reg.ancestors(row["id"])}
    graph["nodes"] = [n for n in graph["nodes"] if n["id"] in keep]
    graph["edges"] = [e for e in graph["edges"] if e["child"] in keep and e["parent"] in keep]
    lines = [f"# {_card_text(repo_id.split('/')[-1])}", "",
             f"{_card_text(row['name'])} ({_card_text(row['id'])}), relation "
             f"**{_card_text(relation)}**, made with Weightsmith"
             + (f" by the {_card_text(row['plugin'])} plugin" if row["plugin"] else "") + ".",
             "", "## Lineage", "", "```mermaid", mermaid(graph), "```", ""]
    deltas = reg.score_deltas(row["id"])
    if scores:
        lines += ["## Scores", "", "| task / metric | value | parent | parent value | delta |",
                  "|---|---|---|---|---|"]
        for key, value in sorted(scores.items()):
            mine = [d for d in deltas if d["metric"] == key] or [None]
            for d in mine:
                lines.append(f"| {_card_text(key)} | {value:.6g} | " + (
                    f"{_card_text(d['parent_name'])} | {d['parent_value']:.6g} | "
                    f"{d['delta']:+.4g} |"
                    if d else "| | |"))
        lines.append("")
    if config:
        text = yaml.safe_dump(config, sort_keys=True).strip()
        fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
        lines += ["## Producing config", "", fence + "yaml", text, fence, ""]
    versions = _loads(row["versions"])
    if isinstance(versions, dict) and versions:
        lines += ["## Library versions", "", "| library | version |", "|---|---|"]
        lines += [f"| {k} | {v or '-'} |" for k, v in sorted(versions.items())]
        lines.append("")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _card_text(text) -> str:
    """A registry value as literal text in the card's Markdown (names and task labels are lab
    members' text): HTML escaped, Markdown punctuation and table pipes backslash-escaped.
    (plugins.kit.markup does this for the app; the registry may not import plugins.)"""
    import html

    text = " ".join(html.escape(str(text), quote=True).splitlines())
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", text)


def read_card_lineage(card_text: str) -> tuple[list[str], str]:
    """(base_model ids, our relation) from a model card's metadata."""
    from huggingface_hub import ModelCard

    from ops import safe_yaml

    front = re.match(r"^---\s*\n(.*?)\n---\s*\n", card_text, re.S)
    if front:  # a card from the Hub is anyone's text: its YAML goes through the bounded loader
        try:
            safe_yaml.load(front.group(1), what="the model card's metadata")
        except safe_yaml.YamlError as e:
            raise HubError(str(e)) from None
    data = ModelCard(card_text).data
    base = data.base_model or []
    base = [base] if isinstance(base, str) else list(base)
    tags = data.tags or []
    relation = relations.from_hub(getattr(data, "base_model_relation", None))
    if "weightsmith" in tags:  # our own cards name our relation in the tag after ours
        ours = [t for t in tags if t not in ("weightsmith", "merge", "mergekit")]
        try:  # anyone may tag a card: a tag that is no relation name leaves the Hub's word
            relation = relations.check_relation(ours[0]) if ours else relation
        except relations.RelationError:
            pass
    return [b for b in base if isinstance(b, str) and is_hub_id(b)], relation


# ---------------------------------------------------------------------------------- publish
def _files(folder: Path) -> list[tuple[str, Path]]:
    return sorted((str(p.relative_to(folder)), p) for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".")
                                             for part in p.relative_to(folder).parts)
                  and p.name != "README.md")


def push_checkpoint(reg: Registry, ref: str, repo_id: str, *, private: bool = False,
                    omit_local_parents: bool = False, token: str | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """Publish a checkpoint: create the repo if needed, then one commit with its files and
    model card. An unchanged checkpoint makes no commit. Records repo, commit and time on the
    row, or `sync_failed` with the error."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    repo_id = check_repo_id(repo_id)
    row = reg.checkpoint(ref)
    folder = Path(row["path"]) if row["path"] else None
    if folder is None or not folder.is_dir():
        raise HubError(f"{row['name']} ({row['id']}) has no files here (a remote-only row); "
                       f"download it with `weightsmith import` first")
    base_models, warnings = [], []
    for p in reg.parents(row["id"]):
        parent = reg.get_checkpoint(p["parent_id"])
        parent_hub = hub_id(parent)
        if parent_hub is None:
            problem = f"parent {parent['name']} ({parent['id']}) is not on the Hub"
            if not omit_local_parents:
                raise LocalParentError(
                    f"{problem}, so the card cannot name it as base_model: publish it first "
                    f"(weightsmith hub push {parent['id']} --repo ORG/NAME), or pass "
                    f"--omit-local-parents to leave it out")
            warnings.append(f"warning: {problem}; it is left out of base_model")
            log(warnings[-1])
            continue
        base_models.append(parent_hub)
    card = str(build_card(reg, row, repo_id, base_models)).encode()
    files = _files(folder)
    parent_paths = {reg.get_checkpoint(p["parent_id"])["path"]: p["parent_id"]
                    for p in reg.parents(row["id"])}

    def content(rel: str, path: Path) -> bytes | str:
        if rel != "mergekit_config.yml":
            return str(path)
        text = path.read_text()  # references resolved to local folders: name the Hub ids
        for local, parent_id in parent_paths.items():
            if local:
                text = text.replace(local, hub_id(reg.get_checkpoint(parent_id)) or parent_id)
        return text.encode()

    api = client(token)
    reg.update_checkpoint(row["id"], sync_status="pushing", sync_error=None)
    try:
        retrying(lambda: api.create_repo(repo_id, private=private, exist_ok=True))
        before = retrying(lambda: api.repo_info(repo_id)).sha
        remote = retrying(lambda: api.list_repo_files(repo_id))
        local = {rel for rel, _ in files} | {"README.md"}

        def commit():  # operations are single-use: build them for each attempt
            ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content(rel, path))
                   for rel, path in files]
            ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
            ops += [CommitOperationDelete(path_in_repo=f) for f in remote
                    if f not in local and WEIGHT_FILE.search(f)]
            return api.create_commit(
                repo_id, ops, commit_message=f"Weightsmith: {row['name']} ({row['id']})",
                commit_description=f"relation {row['relation']}, content hash "
                                   f"{row['content_hash'] or '-'}")

        info = retrying(commit)
    except Exception as e:
        error = _message(e, api.token if isinstance(api.token, str) else None)
        reg.update_checkpoint(row["id"], sync_status="sync_failed", sync_error=error)
        raise HubError(f"pushing {row['name']} ({row['id']}) to {repo_id} failed: {error}") \
            from None
    new_commit = info.oid != before
    pushed_at = now() if new_commit or not row["hub_pushed_at"] else row["hub_pushed_at"]
    reg.update_checkpoint(row["id"], hub_repo=repo_id, hub_commit=info.oid,
                          hub_pushed_at=pushed_at, sync_status="synced", sync_error=None)
    return {"checkpoint": row["id"], "repo": repo_id, "commit": info.oid,
            "new_commit": new_commit, "url": f"{endpoint()}/{repo_id}",
            "base_model": base_models, "warnings": warnings}


# ------------------------------------------------------------------------------ registry sync
def _digest(row: dict) -> str:
    return hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()


def export_rows(reg: Registry, secret_values: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """The lab's lineage as synced: no local paths, no secrets, finished jobs only."""
    out: dict[str, list[dict]] = {}
    for table in SYNC_TABLES:
        rows = []
        for r in reg.sync.rows(table):
            row = {k: r.get(k) for k in SYNC_FIELDS[table]}
            for key in JSON_FIELDS:
                if key in row and row[key] is not None:
                    row[key] = scrub(_loads(row[key]), secret_values)
            if table == "checkpoints" and row["source"] and not row["source"].startswith(
                    "hf://"):
                row["source"] = None  # a local folder
            rows.append(row)
        out[table] = rows
    return out


def _key(table: str, row: dict) -> str:
    if table == "edges":
        return f"{row['child_id']}>{row['parent_id']}"
    return row["uid"] if table == "evaluations" else row["id"]


def _safe_key(table: str, row: Any) -> str | None:
    """A pulled row's key, or None for a row without one (merge_rows refused it already):
    one malformed row in a repo must not stop every later sync."""
    try:
        key = _key(table, row)
    except (KeyError, TypeError):
        return None
    return key if isinstance(key, str) else None


def merge_rows(reg: Registry, rows: dict[str, list[dict]],
               refused: list[str] | None = None) -> dict[str, int]:
    """Merge synced rows into the registry, idempotently: rows are immutable and keyed by
    globally unique ids, so a known row is skipped (a checkpoint only gains Hub fields it
    lacked). Pulled checkpoints have no files here (path NULL). Every row goes through the
    registry's checks (a relation that is no relation name, an edge or evaluation whose
    checkpoints are missing): a row they refuse is left out, and why is appended to
    `refused`. Returns rows added."""
    added = {t: 0 for t in SYNC_TABLES}
    refused = [] if refused is None else refused
    adders = {"checkpoints": reg.sync.add_checkpoint, "jobs": reg.sync.add_job,
              "evaluations": reg.sync.add_evaluation,
              "edges": lambda r: reg.add_edge(
                  r["child_id"], r["parent_id"], r["relation"], weight=r["weight"],
                  density=r["density"], role=r["role"], position=r["position"] or 0,
                  skip_existing=True)}
    with reg.write():
        for table in ("checkpoints", "jobs", "edges", "evaluations"):  # ends before edges
            for row in rows.get(table, []):
                if not isinstance(row, dict):
                    refused.append(f"{table}: not a row: {str(row)[:100]!r}")
                    continue
                fields = {k: row.get(k) for k in SYNC_FIELDS[table]}
                try:
                    added[table] += bool(adders[table](fields))
                except (RegistryError, KeyError, TypeError, sqlite3.Error) as e:
                    refused.append(f"{table} {_key(table, fields)}: {e}")
                    continue
                existing = reg.get_checkpoint(fields["id"]) if table == "checkpoints" else None
                if existing and not existing["hub_repo"] and fields["hub_repo"]:
                    reg.update_checkpoint(fields["id"], hub_repo=fields["hub_repo"],
                                          hub_commit=fields["hub_commit"],
                                          hub_pushed_at=fields["hub_pushed_at"])
    return added


def sync_registry(reg: Registry, repo_id: str, *, private: bool = False,
                  token: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Pull the batches of a Hub dataset repo this lab has not merged, then push this lab's
    rows the repo lacks as one new batch (one JSONL file per table and a manifest, in one
    commit). Two labs syncing through one repo both end with the union."""
    from huggingface_hub import CommitOperationAdd

    repo_id = check_repo_id(repo_id)
    api = client(token)
    token_value = api.token if isinstance(api.token, str) else None
    try:
        retrying(lambda: api.create_repo(repo_id, repo_type="dataset", private=private,
                                         exist_ok=True))
        head = retrying(lambda: api.repo_info(repo_id, repo_type="dataset")).sha
        files = retrying(lambda: api.list_repo_files(repo_id, repo_type="dataset",
                                                     revision=head))
        batches = sorted({f.split("/")[1] for f in files
                          if f.startswith("batches/") and f.endswith("/manifest.json")})
        known = reg.sync.batches(repo_id)
        new = [b for b in batches if b not in known]
        pulled = {t: [] for t in SYNC_TABLES}
        with tempfile.TemporaryDirectory() as tmp:
            def read(name: str) -> str:
                path = retrying(lambda: api.hf_hub_download(
                    repo_id, name, repo_type="dataset", revision=head, local_dir=tmp))
                return Path(path).read_text()

            for batch in new:
                manifest = json.loads(read(f"batches/{batch}/manifest.json"))
                for table in manifest["tables"]:
                    if table in SYNC_TABLES:
                        pulled[table] += [json.loads(line) for line in
                                          read(f"batches/{batch}/{table}.jsonl").splitlines()
                                          if line.strip()]
        refused: list[str] = []
        added = merge_rows(reg, pulled, refused)
        with reg.write():
            for batch in new:
                reg.sync.record_batch(repo_id, batch, "pull")
            # the repo has these: never push them back
            reg.sync.record_repo_rows(repo_id, [(table, _safe_key(table, row), _digest(row))
                                                for table, rows in pulled.items()
                                                for row in rows
                                                if _safe_key(table, row) is not None])
        if new:
            log(f"pulled {len(new)} batch(es) from {repo_id}: "
                + ", ".join(f"{n} {t}" for t, n in added.items()))
        for why in refused:
            log(f"warning: left out a pulled row: {why}")

        exported = export_rows(reg, tuple(filter(None, [token_value])))
        # a pulled row reads back slightly different here (a taken name got a suffix): that
        # version is the repo's too, so it is not pushed back
        pulled_keys = {(t, _safe_key(t, r)) for t, rows in pulled.items() for r in rows}
        reg.sync.record_repo_rows(repo_id, [(t, _key(t, r), _digest(r))
                                            for t, rows in exported.items() for r in rows
                                            if (t, _key(t, r)) in pulled_keys])
        have = reg.sync.repo_rows(repo_id)
        todo = {t: [r for r in rows if (t, _key(t, r), _digest(r)) not in have]
                for t, rows in exported.items()}
        batch = None
        if any(todo.values()):
            batch = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(6)
            tables = {t: rows for t, rows in todo.items() if rows}
            manifest = {"batch": batch, "created_at": now(), "format": 1,
                        "tables": {t: len(rows) for t, rows in tables.items()}}

            def commit():
                ops = [CommitOperationAdd(
                    path_in_repo=f"batches/{batch}/{t}.jsonl",
                    path_or_fileobj="".join(json.dumps(r, sort_keys=True) + "\n"
                                            for r in rows).encode())
                    for t, rows in tables.items()]
                ops.append(CommitOperationAdd(
                    path_in_repo=f"batches/{batch}/manifest.json",
                    path_or_fileobj=json.dumps(manifest, indent=2).encode()))
                return api.create_commit(repo_id, ops, repo_type="dataset",
                                         commit_message=f"Weightsmith registry batch {batch}")

            retrying(commit)
            with reg.write():
                reg.sync.record_batch(repo_id, batch, "push")
                reg.sync.record_repo_rows(repo_id, [(t, _key(t, r), _digest(r))
                                                    for t, rows in tables.items()
                                                    for r in rows])
            log(f"pushed batch {batch} to {repo_id}: "
                + ", ".join(f"{len(rows)} {t}" for t, rows in tables.items()))
    except HubError:
        raise
    except Exception as e:
        raise HubError(f"syncing the registry with {repo_id} failed: "
                       f"{_message(e, token_value)}") from None
    return {"repo": repo_id, "pulled_batches": new, "added": added, "pushed_batch": batch,
            "pushed": {t: len(rows) for t, rows in todo.items()}}


# ----------------------------------------------------------------------------------- import
def card_parents(reg: Registry, readme: Path, own_id: str) -> list[dict]:
    """Parents (for Registry.add_checkpoint) named by a downloaded card's base_model: rows
    already in the registry (published or imported from that id), else new remote-only
    stubs (no files: `weightsmith import ORG/NAME` downloads one later)."""
    if not readme.is_file():
        return []
    base_models, relation = read_card_lineage(readme.read_text())
    parents = []
    for base in base_models:
        if base == own_id:
            continue
        row = find_hub_row(reg, base) or reg.add_checkpoint(
            name=base.split("/")[-1], relation="import", path=None, source=f"hf://{base}",
            metadata={"remote_only": True})
        parents.append({"id": row["id"], "relation": relation})
    return parents


def fill_stub(reg: Registry, ck_id: str, path: str, fields: dict,
              parents: list[dict]) -> dict:
    """Give a remote-only row its downloaded files (and the lineage its card names)."""
    with reg.write():
        reg.update_checkpoint(ck_id, path=path, **fields)
        for position, p in enumerate(parents):
            reg.add_edge(ck_id, p["id"], p["relation"], position=position, skip_existing=True)
    return reg.get_checkpoint(ck_id)
