"""Tests of otfusion_jax.checkpoints and otfusion_jax.io_utils: round trips, atomicity, corruption."""

from __future__ import annotations

import gc
import glob
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from otfusion_jax import checkpoints, io_utils, models
from otfusion_jax.checkpoints import CheckpointError


def _variables(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "conv1": {"kernel": rng.normal(size=(3, 3, 1, 4)).astype(np.float32)},
            "fc": {
                "kernel": jnp.asarray(rng.normal(size=(16, 10)), jnp.float32),
                "bias": rng.normal(size=(10,)).astype(ml_dtypes.bfloat16),
            },
        },
        "batch_stats": {
            "bn1": {"mean": rng.normal(size=(4,)).astype(np.float64), "var": rng.random(4).astype(np.float16)},
            "count": np.array(7, np.int32),
        },
    }


def _assert_bit_exact(loaded, original):
    flat_l = jax.tree_util.tree_flatten_with_path(loaded)
    flat_o = jax.tree_util.tree_flatten_with_path(original)
    assert flat_l[1] == flat_o[1]
    for (path, a), (_, b) in zip(flat_l[0], flat_o[0]):
        b = np.asarray(b)
        assert isinstance(a, np.ndarray), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), path


def _siblings(path) -> list[str]:
    """Everything in the parent folder of ``path`` except ``path`` itself."""
    parent, base = os.path.split(os.fspath(path))
    return sorted(n for n in os.listdir(parent) if n != base)


METADATA = {
    "model": {"name": "mlpnet", "options": {"bias": False, "widths": (4, 2)}},
    "dataset": "digits",
    "seed": np.int64(3),
    "test_accuracy": np.float32(0.5),
    "history": [{"epoch": 1, "test_accuracy": 0.25}],
}


def test_round_trip_is_bit_exact_and_keeps_metadata(tmp_path):
    variables = _variables()
    path = tmp_path / "ckpt"
    returned = checkpoints.save(path, variables, METADATA)
    assert returned == str(path) and checkpoints.exists(path)
    loaded, meta = checkpoints.load(path)
    _assert_bit_exact(loaded, variables)
    assert isinstance(loaded, dict) and isinstance(loaded["params"], dict)
    assert meta["model"] == {"name": "mlpnet", "options": {"bias": False, "widths": [4, 2]}}
    assert meta["seed"] == 3 and meta["test_accuracy"] == 0.5 and meta["dataset"] == "digits"
    assert meta["history"] == [{"epoch": 1, "test_accuracy": 0.25}]
    assert meta["library_version"] and meta["created"]
    assert checkpoints.load_metadata(path) == meta
    assert json.load(open(path / "metadata.json"))["metadata"] == meta
    assert _siblings(path) == []


def test_round_trip_of_model_variables(tmp_path):
    module, _ = models.build("mlpnet", input_shape=(8, 8, 1), widths=(16, 8), bias=True)
    variables = models.init(module, jax.random.key(1), (8, 8, 1))
    checkpoints.save(tmp_path / "mlp", variables, {"model": "mlpnet"})
    loaded, _ = checkpoints.load(tmp_path / "mlp")
    _assert_bit_exact(loaded, variables)
    x = jnp.linspace(-1, 1, 2 * 64).reshape(2, 8, 8, 1)
    out_a = module.apply(variables, x, train=False)
    out_b = module.apply(loaded, x, train=False)
    np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))


def test_overwrite_replaces_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "ckpt"
    checkpoints.save(path, _variables(0), {"v": 1})
    checkpoints.save(path, _variables(1), {"v": 2})
    loaded, meta = checkpoints.load(path)
    _assert_bit_exact(loaded, _variables(1))
    assert meta["v"] == 2
    assert _siblings(path) == []


def test_a_save_removes_leftovers_of_killed_saves_once_they_are_an_hour_old(tmp_path):
    """Hidden .tmp-/.old- siblings of a killed save go with the next save; a fresh one (a save in progress) stays."""
    path = tmp_path / "ckpt"
    checkpoints.save(path, {"params": {"w": np.ones(3, np.float32)}})
    stale_dir, stale_old = tmp_path / ".ckpt.tmp-00aa11bb", tmp_path / ".ckpt.old-22cc33dd"
    fresh_dir, other = tmp_path / ".ckpt.tmp-44ee55ff", tmp_path / ".ckpt2.tmp-66aa77bb"
    for d in (stale_dir, stale_old, fresh_dir, other):
        d.mkdir()
        (d / "partial").write_text("x")
    hour_ago = time.time() - 2 * 3600
    for d in (stale_dir, stale_old, other):
        os.utime(d, (hour_ago, hour_ago))
    checkpoints.save(path, {"params": {"w": np.zeros(3, np.float32)}})
    assert not stale_dir.exists() and not stale_old.exists()
    assert fresh_dir.exists() and other.exists()  # too young / another path's
    np.testing.assert_array_equal(checkpoints.load(path)[0]["params"]["w"], np.zeros(3, np.float32))
    # the same for the atomic text writer's temp files
    results = tmp_path / "results.json"
    stale_file, fresh_file = tmp_path / ".results.json.tmp-0badf00d", tmp_path / ".results.json.tmp-1badf00d"
    stale_file.write_text("{")
    fresh_file.write_text("{")
    os.utime(stale_file, (hour_ago, hour_ago))
    io_utils.atomic_write_json(results, {"ok": 1})
    assert not stale_file.exists() and fresh_file.exists()
    assert json.loads(results.read_text()) == {"ok": 1}


def test_failure_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    checkpoints.save(path, _variables(0), {"v": 1})

    def broken_write(state_dir, tree):
        os.makedirs(state_dir)
        with open(os.path.join(state_dir, "half_written"), "wb") as f:
            f.write(b"\0" * 10)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(checkpoints, "_write_orbax", broken_write)
    with pytest.raises(OSError, match="injected"):
        checkpoints.save(path, _variables(1), {"v": 2})
    loaded, meta = checkpoints.load(path)
    _assert_bit_exact(loaded, _variables(0))
    assert meta["v"] == 1
    assert _siblings(path) == []


def test_failure_while_renaming_restores_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    checkpoints.save(path, _variables(0), {"v": 1})
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if os.fspath(dst) == str(path) and ".tmp-" in os.fspath(src):  # the new one into place
            raise OSError("crash during rename (injected)")
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoints.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="injected"):
        checkpoints.save(path, _variables(1), {"v": 2})
    monkeypatch.undo()
    assert any(".ckpt.old-" in os.fspath(dst) for _, dst in calls)  # the old one was moved aside
    loaded, meta = checkpoints.load(path)
    _assert_bit_exact(loaded, _variables(0))
    assert meta["v"] == 1
    assert _siblings(path) == []


def test_failure_on_first_save_leaves_no_target(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    monkeypatch.setattr(checkpoints, "_write_orbax", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        checkpoints.save(path, _variables(), {})
    assert not path.exists() and os.listdir(tmp_path) == []


def test_bad_inputs_are_refused_before_writing(tmp_path):
    path = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match="JSON"):
        checkpoints.save(path, _variables(), {"fn": object()})
    with pytest.raises(CheckpointError, match="not an array"):
        checkpoints.save(path, {"params": {"w": [1.0, 2.0]}}, {})
    with pytest.raises(CheckpointError, match="no arrays"):
        checkpoints.save(path, {"params": {}}, {})
    assert os.listdir(tmp_path) == []
    other = tmp_path / "not_a_checkpoint"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing"):
        checkpoints.save(other, _variables(), {})
    assert (other / "precious.txt").read_text() == "keep me"


def test_missing_and_non_checkpoint_paths(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=str(missing)):
        checkpoints.load(missing)
    assert not checkpoints.exists(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"not a checkpoint.*{empty}"):
        checkpoints.load(empty)
    afile = tmp_path / "file.bin"
    afile.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=str(afile)):
        checkpoints.load(afile)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt"
    checkpoints.save(path, _variables(), METADATA)
    return path


def test_truncated_array_files_raise(saved):
    files = [f for f in glob.glob(str(saved / "state" / "**" / "d" / "*"), recursive=True) if os.path.isfile(f)]
    assert files
    for f in files:
        size = os.path.getsize(f)
        with open(f, "r+b") as fh:
            fh.truncate(size // 2)
    with pytest.raises(CheckpointError, match=f"corrupt.*{saved}.*truncated"):
        checkpoints.load(saved)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_arrays_raise_even_with_a_matching_file_manifest(saved):
    # Simulate damage the file manifest cannot see (manifest rewritten to match): orbax's
    # own failure must still come out as a CheckpointError naming the path.
    document = json.loads((saved / "metadata.json").read_text())
    for rel in document["files"]:
        full = saved / "state" / rel
        if "/d/" in "/" + rel:
            full.write_bytes(full.read_bytes()[:5])
            document["files"][rel] = {"size": 5, "sha256": checkpoints._file_digest(str(full))}
    (saved / "metadata.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=f"{saved}"):
        checkpoints.load(saved)
    time.sleep(0.3)  # orbax leaves asyncio callbacks behind on failure; let them fire here
    gc.collect()


def test_garbage_metadata_raises(saved):
    (saved / "metadata.json").write_text('{"format": "otfusion_jax.checkp')
    with pytest.raises(CheckpointError, match=f"corrupt.*{saved}"):
        checkpoints.load(saved)
    assert not checkpoints.exists(saved)


def test_missing_metadata_or_state_raises(saved):
    os.rename(saved / "metadata.json", saved / "moved.json")
    with pytest.raises(CheckpointError, match=f"{saved}.*metadata.json"):
        checkpoints.load(saved)
    os.rename(saved / "moved.json", saved / "metadata.json")
    os.rename(saved / "state", saved / "moved_state")
    with pytest.raises(CheckpointError, match=f"{saved}.*state"):
        checkpoints.load(saved)


def test_manifest_mismatch_raises(saved):
    document = json.loads((saved / "metadata.json").read_text())
    document["leaves"]["params/fc/kernel"]["sha256"] = "0" * 64
    (saved / "metadata.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="SHA-256"):
        checkpoints.load(saved)
    document["leaves"]["params/fc/kernel"]["dtype"] = "float16"
    (saved / "metadata.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="params/fc/kernel"):
        checkpoints.load(saved)


# --- io_utils ------------------------------------------------------------------------------


def test_atomic_write_json_round_trip(tmp_path):
    path = tmp_path / "sub" / "results.json"
    obj = {"acc": np.float32(0.25), "n": np.int64(3), "arr": np.arange(3), "t": (1, 2), "p": tmp_path}
    io_utils.atomic_write_json(path, obj)
    want = {"acc": 0.25, "n": 3, "arr": [0, 1, 2], "t": [1, 2], "p": str(tmp_path)}
    assert json.loads(path.read_text()) == want
    assert os.listdir(path.parent) == ["results.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0o600


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    io_utils.atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        io_utils.atomic_write_json(path, {"v": object()})

    def broken_replace(src, dst):
        raise OSError("injected")

    monkeypatch.setattr(io_utils.os, "replace", broken_replace)
    with pytest.raises(OSError, match="injected"):
        io_utils.atomic_write_text(path, "new")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["results.json"]
