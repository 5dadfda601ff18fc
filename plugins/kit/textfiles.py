"""Text files that jobs read (calibration, evaluation): clear errors, token windows, hashes."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path


def read_text_file(path: str | Path | None, field: str,
                   default: Path | None = None) -> tuple[Path, str]:
    """(path, text) of a UTF-8 file named by a config field; the error names the field.
    A .jsonl file contributes the "text" field of each line, documents joined by blank
    lines."""
    resolved = Path(path).expanduser() if path else default
    if resolved is None:
        raise ValueError(f"{field} is required")
    if not resolved.is_file():
        raise ValueError(f"{field}: {resolved} does not exist or is not a file")
    try:
        text = resolved.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{field}: {resolved} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None
    if resolved.suffix == ".jsonl":
        text = _jsonl_text(text, resolved, field)
    if not text.strip():
        raise ValueError(f"{field}: {resolved} is empty")
    return resolved, text


def _jsonl_text(raw: str, path: Path, field: str) -> str:
    docs = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{field}: {path} line {number} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{field}: {path} line {number} has no string field 'text' "
                             f"(a .jsonl text file needs one per line)")
        docs.append(row["text"])
    return "\n\n".join(docs)


def check_text_file(path: str | None, field: str) -> str | None:
    """For pydantic validators: refuse a missing, unreadable or empty file before queueing."""
    if path:
        read_text_file(path, field)
    return path


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sample_windows(ids: list[int], samples: int, length: int, seed: int, field: str):
    """`samples` windows of `length` tokens at seeded random offsets: (samples, length) long
    tensor, and the sha256 of its bytes (what the calibration really was)."""
    import torch

    if len(ids) < length:
        raise ValueError(f"{field} has {len(ids)} tokens, fewer than one window of {length}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - length + 1) for _ in range(samples)]
    windows = torch.tensor([ids[s:s + length] for s in starts], dtype=torch.long)
    return windows, hashlib.sha256(windows.numpy().tobytes()).hexdigest()
