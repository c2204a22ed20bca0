"""Atomic, verified checkpoints of model variables with JSON metadata (orbax).

A checkpoint is a directory::

    <path>/
      metadata.json   format marker, leaf manifest (path, dtype, shape, sha256),
                      file manifest of state/ (size, sha256), and the caller's
                      metadata (+ created, library_version)
      state/          the variables, written by orbax (StandardCheckpointHandler)

:func:`save` writes the whole directory under a temporary name next to
``path`` and renames it into place, so ``path`` is at any moment either absent,
the previous complete checkpoint, or the new complete checkpoint. :func:`load`
checks every file of ``state/`` (size and SHA-256: a truncated or altered
file is reported before orbax reads it), restores NumPy arrays with their
saved dtypes and checks them bit for bit against the leaf manifest.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from otfusion_jax import io_utils

__all__ = [
    "CheckpointError",
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "STATE_DIR",
    "save",
    "load",
    "load_metadata",
    "exists",
]

FORMAT = "otfusion_jax.checkpoint"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
STATE_DIR = "state"
_RESERVED = ("created", "library_version")


class CheckpointError(ValueError):
    """A checkpoint is missing, not a checkpoint, corrupt, or cannot be written.

    The message names the checkpoint path.
    """


def _library_version() -> str:
    """The installed otfusion_jax version (``"unknown"`` if unavailable)."""
    try:
        import otfusion_jax  # pylint: disable=import-outside-toplevel

        return str(getattr(otfusion_jax, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - a version string must never break saving.
        return "unknown"


def _flatten(tree: Mapping[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """Flattens nested string-keyed mappings into ``{"a/b/c": leaf}``.

    Args:
      tree: Nested mappings with array leaves.
      where: Checkpoint path, for error messages.
      prefix: Path of ``tree`` itself.

    Returns:
      Leaf path -> leaf, in insertion order.
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise CheckpointError(
                f"cannot save checkpoint {where!r}: keys must be non-empty strings without '/', "
                f"got {key!r} under {prefix or '<root>'!r}"
            )
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(_flatten(value, where, name))
        else:
            out[name] = value
    return out


def _to_numpy_tree(tree: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Copies nested mappings into plain dicts of host NumPy arrays (exact dtypes)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = _to_numpy_tree(value, where)
        elif isinstance(value, (np.ndarray, np.generic, jax.Array)):
            out[key] = np.array(jax.device_get(value), copy=True)
        else:
            raise CheckpointError(
                f"cannot save checkpoint {where!r}: leaf {key!r} is a {type(value).__name__}, "
                "not an array"
            )
    return out


def _digest(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _manifest(flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Leaf path -> {dtype, shape, sha256}."""
    return {
        name: {"dtype": arr.dtype.name, "shape": list(arr.shape), "sha256": _digest(arr)}
        for name, arr in flat.items()
    }


def _file_digest(path: str) -> str:
    """SHA-256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_manifest(state_dir: str) -> dict[str, dict[str, Any]]:
    """Relative path -> {size, sha256} of every file orbax wrote under ``state_dir``."""
    out = {}
    for folder, _, files in sorted(os.walk(state_dir)):
        for name in sorted(files):
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, state_dir).replace(os.sep, "/")
            out[rel] = {"size": os.path.getsize(full), "sha256": _file_digest(full)}
    return out


def _check_files(path: str, state_dir: str, files: Mapping[str, Any]) -> None:
    """Checks that every file of the manifest is present, complete and unchanged.

    Raises:
      CheckpointError: Naming the checkpoint and the first bad file.
    """
    for rel, want in files.items():
        full = os.path.join(state_dir, *rel.split("/"))
        if not os.path.isfile(full):
            raise CheckpointError(f"corrupt checkpoint {path!r}: file {STATE_DIR}/{rel} is missing")
        size = os.path.getsize(full)
        if size != want.get("size"):
            what = "truncated" if size < want.get("size", 0) else "resized"
            raise CheckpointError(
                f"corrupt checkpoint {path!r}: file {STATE_DIR}/{rel} is {what} "
                f"({size} bytes, expected {want.get('size')})"
            )
        if _file_digest(full) != want.get("sha256"):
            raise CheckpointError(f"corrupt checkpoint {path!r}: file {STATE_DIR}/{rel} fails its SHA-256 check")


def _is_checkpoint_dir(path: str) -> bool:
    """Whether ``path`` holds our metadata file with the format marker."""
    try:
        with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete checkpoint directory (cheap; reads no arrays).

    Args:
      path: Checkpoint directory.

    Returns:
      True if the directory has a metadata file of this format and a state folder.
    """
    path = os.fspath(path)
    return os.path.isdir(os.path.join(path, STATE_DIR)) and _is_checkpoint_dir(path)


def _write_orbax(state_dir: str, tree: dict[str, Any]) -> None:
    """Writes ``tree`` with orbax's standard handler, synchronously."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    # The synchronous Checkpointer: returns once the data is written (no background thread).
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(state_dir, args=ocp.args.StandardSave(tree))


def _read_orbax(state_dir: str) -> Any:
    """Restores the tree saved by :func:`_write_orbax` (NumPy leaves)."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            return ckptr.restore(state_dir, args=ocp.args.StandardRestore())


def _fsync_tree(root: str) -> None:
    """fsyncs every file and directory under ``root`` (so the rename publishes durable data)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        io_utils.fsync_dir(folder)


def save(
    path: str | os.PathLike, variables: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
) -> str:
    """Saves model variables and JSON metadata atomically to the directory ``path``.

    Everything is written to a temporary directory next to ``path`` and
    renamed into place. An existing checkpoint at ``path`` is first renamed
    aside, then deleted once the new one is in place; if anything fails the
    temporary directory is removed and the previous checkpoint restored.
    Hidden leftovers of earlier saves of ``path`` that were killed midway
    (``.<name>.tmp-*``, ``.<name>.old-*``, untouched for an hour) are removed
    after a successful save.

    Args:
      path: Target directory (its parent is created if missing). If it exists
        it must be a checkpoint written by this module; anything else is
        refused rather than deleted.
      variables: Nested string-keyed mappings of arrays (NumPy or JAX), e.g.
        ``{"params": ..., "batch_stats": ...}``; dtypes are kept exactly.
      metadata: JSON-serialisable dict (NumPy scalars, tuples and ConfigDicts
        are converted). ``created`` (UTC ISO time) and ``library_version`` are
        added unless given.

    Returns:
      The absolute checkpoint path.

    Raises:
      CheckpointError: If ``variables`` or ``metadata`` cannot be saved, or
        ``path`` exists and is not a checkpoint.
      OSError: If the file system fails (the previous checkpoint is kept).
    """
    path = os.path.abspath(os.fspath(path))
    if not isinstance(variables, Mapping):
        raise CheckpointError(f"cannot save checkpoint {path!r}: variables must be a mapping")
    tree = _to_numpy_tree(variables, path)
    flat = _flatten(tree, path)
    if not flat:
        raise CheckpointError(f"cannot save checkpoint {path!r}: variables hold no arrays")
    user = dict(metadata or {})
    user.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    user.setdefault("library_version", _library_version())
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "leaves": _manifest(flat),
        "metadata": user,
    }
    try:
        document = io_utils.to_jsonable(document)
    except TypeError as e:
        raise CheckpointError(f"cannot save checkpoint {path!r}: metadata is not JSON serialisable: {e}") from e
    if os.path.lexists(path) and not (os.path.isdir(path) and _is_checkpoint_dir(path)):
        raise CheckpointError(
            f"cannot save checkpoint {path!r}: the path exists and is not a checkpoint; refusing to replace it"
        )

    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = io_utils.temp_name(path, "tmp")
    os.mkdir(tmp)  # mode 0o777 minus the umask, like any new directory
    old = None
    try:
        _write_orbax(os.path.join(tmp, STATE_DIR), tree)
        document["files"] = _file_manifest(os.path.join(tmp, STATE_DIR))
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as f:
            f.write(json.dumps(document, indent=2, allow_nan=True) + "\n")
        _fsync_tree(tmp)
        if os.path.lexists(path):
            old = io_utils.temp_name(path, "old")
            os.rename(path, old)
        os.rename(tmp, path)
        tmp = None
        io_utils.fsync_dir(parent)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and os.path.isdir(old) and not os.path.lexists(path):
            try:
                os.rename(old, path)  # put the previous checkpoint back
                old = None
            except OSError:
                pass  # load() names the leftover in its "not found" message
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    # Leftovers of earlier saves killed midway (a partial new version, the previous version renamed aside):
    # superseded by the checkpoint just written.
    io_utils.remove_stale_temps(path, ("tmp", "old"))
    return path


def _read_document(path: str) -> dict[str, Any]:
    """Reads and checks ``metadata.json`` of the checkpoint at ``path``."""
    if not os.path.lexists(path):
        hint = ""
        parent, base = os.path.split(path)
        leftovers = sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.old-*")))
        if leftovers:
            hint = f" (an interrupted save left the previous version at {leftovers[-1]!r})"
        raise CheckpointError(f"checkpoint not found: {path!r}{hint}")
    if not os.path.isdir(path):
        raise CheckpointError(f"not a checkpoint: {path!r} is not a directory")
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"not a checkpoint: {path!r} has no {METADATA_FILE}")
    try:
        with open(meta_path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint {path!r}: cannot read {METADATA_FILE}: {e}") from e
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"not a checkpoint: {path!r}: {METADATA_FILE} lacks the {FORMAT!r} marker")
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {document.get('format_version')!r}; "
            f"this library reads version {FORMAT_VERSION}"
        )
    for key in ("leaves", "files", "metadata"):
        if not isinstance(document.get(key), dict):
            raise CheckpointError(f"corrupt checkpoint {path!r}: {METADATA_FILE} lacks its {key!r} section")
    return document


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Reads only the metadata of a checkpoint (no arrays).

    Args:
      path: Checkpoint directory.

    Returns:
      The metadata dict given to :func:`save` plus ``created`` and
      ``library_version``.

    Raises:
      CheckpointError: If ``path`` is missing or not a readable checkpoint.
    """
    return _read_document(os.path.abspath(os.fspath(path)))["metadata"]


def load(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads a checkpoint written by :func:`save` and verifies it bit for bit.

    Args:
      path: Checkpoint directory.

    Returns:
      ``(variables, metadata)``: variables as plain nested dicts of NumPy
      arrays with the saved dtypes and shapes; metadata as in
      :func:`load_metadata`.

    Raises:
      CheckpointError: If ``path`` is missing, is not a checkpoint, lacks its
        metadata or state, or its arrays are unreadable, truncated or differ
        from the manifest (dtype, shape or SHA-256). The message names ``path``.
    """
    path = os.path.abspath(os.fspath(path))
    document = _read_document(path)
    state_dir = os.path.join(path, STATE_DIR)
    if not os.path.isdir(state_dir):
        raise CheckpointError(f"corrupt checkpoint {path!r}: the {STATE_DIR}/ folder is missing")
    _check_files(path, state_dir, document["files"])
    try:
        restored = _read_orbax(state_dir)
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types.
        message = " ".join(str(e).split())[:500]
        raise CheckpointError(
            f"corrupt or truncated checkpoint {path!r}: cannot restore arrays: {type(e).__name__}: {message}"
        ) from e
    variables = _plain_dict(restored, path)
    flat = _flatten(variables, path)
    expected = document["leaves"]
    if set(flat) != set(expected):
        missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
        raise CheckpointError(
            f"corrupt checkpoint {path!r}: leaves differ from the manifest (missing {missing}, extra {extra})"
        )
    for name, arr in flat.items():
        want = expected[name]
        got = {"dtype": arr.dtype.name, "shape": list(arr.shape)}
        if got["dtype"] != want.get("dtype") or got["shape"] != want.get("shape"):
            raise CheckpointError(
                f"corrupt checkpoint {path!r}: leaf {name!r} is {got['dtype']}{tuple(got['shape'])}, "
                f"manifest says {want.get('dtype')}{tuple(want.get('shape') or ())}"
            )
        if _digest(arr) != want.get("sha256"):
            raise CheckpointError(f"corrupt checkpoint {path!r}: leaf {name!r} fails its SHA-256 check")
    return variables, document["metadata"]


def _plain_dict(tree: Any, path: str) -> Any:
    """Converts a restored tree into plain dicts of NumPy arrays."""
    if isinstance(tree, Mapping):
        return {k: _plain_dict(v, path) for k, v in tree.items()}
    if isinstance(tree, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(jax.device_get(tree))
    raise CheckpointError(f"corrupt checkpoint {path!r}: unexpected {type(tree).__name__} in the state")
