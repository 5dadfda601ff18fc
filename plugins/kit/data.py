"""Training data for jobs: local JSONL/CSV/Parquet/text files or folders, or Hub dataset ids,
through `datasets`; and a tokenization cache in the lab folder, keyed by the data's content
hash, the tokenizer and the encoding options, so a second run does not re-tokenize."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
            ".txt": "text", ".text": "text"}
BATCH_ROWS = 1000  # rows per tokenizer call in cached_tokenize (datasets' default batch)


def _files(path: Path, field: str) -> tuple[str, list[Path]]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
        if not files:
            raise ValueError(f"{field}: the folder {path} has no {', '.join(sorted(BUILDERS))} "
                             f"files")
    kinds = {BUILDERS.get(p.suffix) for p in files}
    if None in kinds:
        raise ValueError(f"{field}: {path} is not one of {', '.join(sorted(BUILDERS))}")
    if len(kinds) > 1:
        raise ValueError(f"{field}: {path} mixes file types ({', '.join(sorted(kinds))}); use "
                         f"one kind per dataset")
    return kinds.pop(), files


def content_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_rows(source: str, field: str, cache_dir: Path, split: str = "train"):
    """(datasets.Dataset, fingerprint) for a local file or folder, or a Hub dataset id."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    if path.exists():
        builder, files = _files(path, field)
        # only small files can be blank; the big ones are read once, by datasets
        if all(f.stat().st_size < 4096 and not f.read_bytes().strip() for f in files):
            raise ValueError(f"{field}: {source} has no rows (empty)")
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files],
                                       split="train", cache_dir=str(cache_dir))
        except Exception as exc:  # datasets raises many types for unreadable files
            raise ValueError(f"{field}: could not read {path} as {builder}: "
                             f"{_last_line(exc)}") from None
        fingerprint = content_hash(files)
    else:
        if source.startswith((".", "/", "~")) or source.count("/") > 1:
            raise ValueError(f"{field}: {source} does not exist")
        try:
            ds = datasets.load_dataset(source, split=split, cache_dir=str(cache_dir))
        except Exception as exc:
            raise ValueError(f"{field}: {source!r} is neither a local path nor a loadable Hub "
                             f"dataset ({_last_line(exc)})") from None
        fingerprint = ds._fingerprint
    if len(ds) == 0:
        raise ValueError(f"{field}: {source} has no rows")
    return ds, fingerprint


def _last_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(tokenizer.get_vocab())
    text += str(getattr(tokenizer, "chat_template", "") or "")
    return hashlib.sha256(text.encode()).hexdigest()


def cached_tokenize(ds, fingerprint: str, tokenizer, options: dict,
                    encode: Callable[[dict], dict], cache_root: Path,
                    log: Callable[[str], None] = print):
    """`ds.map(encode, batched=True)` once per (data, tokenizer, options); later runs load it
    from disk. `encode` takes a batch (a dict of columns, each a list of BATCH_ROWS values) and
    returns a dict of equally long lists, which must equal encoding the rows one by one: the
    cache key does not say how the rows were encoded. Written to a temporary folder and
    renamed, so an interrupted run leaves no partial cache."""
    import datasets

    key = hashlib.sha256(json.dumps([fingerprint, tokenizer_hash(tokenizer), options],
                                    sort_keys=True).encode()).hexdigest()[:24]
    final = cache_root / key
    if (final / "dataset_info.json").exists():
        log(f"tokenized data: cache hit {final}")
        return datasets.load_from_disk(str(final)), key, True
    encoded = ds.map(encode, batched=True, batch_size=BATCH_ROWS,
                     remove_columns=ds.column_names, desc=None, load_from_cache_file=False)
    tmp = cache_root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    encoded.save_to_disk(str(tmp))
    try:
        os.rename(tmp, final)
    except OSError:  # another job wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"tokenized data: {len(encoded)} rows cached in {final}")
    return datasets.load_from_disk(str(final)), key, False
