"""Small helpers every layer uses: byte/str conversion of record features, CSV writing, closing
iterators. Imports nothing heavy (no jax, no TFDS)."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import pathlib
import shutil
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np


def as_bytes(value: Any) -> bytes:
    """A record's bytes feature (bytes, np.bytes_, str, a 0-d array of them, or any value's str)
    as bytes."""
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("utf-8")


def to_str(values: Iterable[Any]) -> np.ndarray:
    """bytes/str [N] -> object array of str (invalid UTF-8 replaced)."""
    return np.array(
        [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values],
        dtype=object,
    )


def write_csv(
    path: str | os.PathLike,
    header: Sequence[str] | None,
    rows: Iterable[Sequence[Any]],
    *,
    lineterminator: str = "\r\n",
) -> None:
    """Writes a UTF-8 CSV (no header row when `header` is None), creating the parent folder;
    atomically (a sibling temporary file renamed into place): a crash leaves no half file.
    `lineterminator`: csv's default "\r\n", or "\n" as most ISIC releases end their lines."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator=lineterminator)
            if header is not None:
                writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def close_iterator(iterator: Any) -> None:
    """Closes an iterator that has a `close` (Grain's, with worker processes); others are left."""
    close = getattr(iterator, "close", None)
    if callable(close):
        close()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a sibling temporary folder to fill; on success it replaces `path` (an existing
    folder or file there is removed first), on an exception it is deleted: `path` is never left
    half-written."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the folder gets the umask's permissions, not 0700.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        tmp.replace(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def to_json_compatible(obj: Any) -> Any:
    """Nested dicts/lists/tuples of numpy or Python values -> JSON values (NaN/inf -> None)."""
    if isinstance(obj, dict):
        return {str(k): to_json_compatible(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json_compatible(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json_compatible(obj.tolist())
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, bytes | np.bytes_):
        return obj.decode("utf8", errors="replace")
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot make {type(obj).__name__} JSON-compatible")
