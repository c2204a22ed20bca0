"""Crash-safe file writing: temp file in the same folder, fsync, ``os.replace``.

A reader of ``path`` sees either the previous complete file or the new complete
file, never a partial one, even if the process dies mid-write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["atomic_write_text", "atomic_write_json", "fsync_dir", "remove_stale_temps", "temp_name", "to_jsonable"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a directory entry to disk (makes a rename inside it durable).

    Args:
      path: A directory. Platforms that cannot open directories are ignored.
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def to_jsonable(obj: Any) -> Any:
    """Converts ``obj`` into plain JSON types (dict, list, str, int, float, bool, None).

    NumPy and JAX scalars become Python numbers, arrays become nested lists,
    tuples become lists, dataclasses and ``ConfigDict``-like objects (anything
    with ``to_dict()``) become dicts, paths become strings. Non-finite floats
    are kept (Python's ``json`` writes them as ``NaN``/``Infinity``).

    Args:
      obj: The object to convert.

    Returns:
      An equivalent structure of JSON types.

    Raises:
      TypeError: If some value has no JSON representation.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"JSON object keys must be strings, got {type(key).__name__} {key!r}")
            out[str(key) if not isinstance(key, str) else key] = to_jsonable(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__array__") and hasattr(obj, "shape"):
        arr = np.asarray(obj)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    raise TypeError(f"value of type {type(obj).__name__} is not JSON serializable: {obj!r:.80}")


def temp_name(path: str | os.PathLike, tag: str = "tmp") -> str:
    """A fresh hidden sibling name for ``path``: ``<dir>/.<name>.<tag>-<random>``.

    Args:
      path: The final path.
      tag: What the temporary is for (``"tmp"``, ``"old"``).

    Returns:
      An absolute path that did not exist when checked.
    """
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    while True:
        candidate = os.path.join(folder, f".{base}.{tag}-{secrets.token_hex(4)}")
        if not os.path.lexists(candidate):
            return candidate


STALE_SECONDS = 3600.0


def remove_stale_temps(
    path: str | os.PathLike, tags: tuple[str, ...] = ("tmp",), older_than: float = STALE_SECONDS
) -> list[str]:
    """Removes the hidden siblings ``.<name>.<tag>-<hex>`` of ``path`` that a killed writer left behind.

    Called after a successful write of ``path``, whose data then supersede
    them. Only siblings untouched for ``older_than`` seconds go, so a write of
    the same path in progress in another process keeps its temporary.

    Args:
      path: The final path.
      tags: Which kinds of temporaries (see :func:`temp_name`).
      older_than: Minimum age in seconds (modification time).

    Returns:
      The paths removed.
    """
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    removed = []
    now = time.time()
    for tag in tags:
        for candidate in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(base)}.{tag}-*")):
            try:
                if now - os.lstat(candidate).st_mtime < older_than:
                    continue
                if os.path.isdir(candidate) and not os.path.islink(candidate):
                    shutil.rmtree(candidate)
                else:
                    os.unlink(candidate)
                removed.append(candidate)
            except OSError:
                continue  # gone already, or not ours to remove: leave it
    return removed


def _create_temp_file(path: str) -> tuple[str, int]:
    """Creates a new temp file next to ``path`` (mode 0o666 minus the umask); returns (name, fd)."""
    while True:
        tmp = temp_name(path)
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> str:
    """Writes ``text`` to ``path`` atomically.

    The text goes into a temporary file in the same folder, which is flushed,
    fsynced and then renamed over ``path`` with ``os.replace``; the folder is
    fsynced afterwards. Missing parent folders are created. On any failure the
    temporary file is removed and ``path`` keeps its previous content.

    Args:
      path: Destination file.
      text: Content.
      encoding: Text encoding.

    Returns:
      The absolute destination path.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp, fd = _create_temp_file(path)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
    remove_stale_temps(path)
    return path


def atomic_write_json(
    path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False
) -> str:
    """Writes ``obj`` as JSON to ``path`` atomically (see :func:`atomic_write_text`).

    The object is converted with :func:`to_jsonable` first, so NumPy scalars,
    arrays, tuples and dataclasses are accepted. Serialisation happens before
    anything is written: an unserialisable object leaves ``path`` untouched.

    Args:
      path: Destination file.
      obj: The object to write.
      indent: JSON indentation (``None``: compact).
      sort_keys: Sort object keys.

    Returns:
      The absolute destination path.

    Raises:
      TypeError: If ``obj`` has no JSON representation.
    """
    text = json.dumps(to_jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=True)
    return atomic_write_text(path, text + "\n")

