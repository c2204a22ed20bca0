"""Tests for otfusion_jax.data: loaders, IDX parser, TFDS path and batching."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otfusion_jax import data

IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Serialises ``arr`` as an IDX file (big-endian), written with struct."""
    arr = np.asarray(arr)
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[arr.dtype], arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr: np.ndarray, compress: bool = False) -> str:
    """Writes ``arr`` to ``path`` as IDX (gzip-compressed if ``compress``)."""
    payload = idx_bytes(arr)
    if compress:
        payload = gzip.compress(payload)
    with open(path, "wb") as f:
        f.write(payload)
    return os.fspath(path)


def make_idx_folder(
    folder,
    n_train: int = 20,
    n_test: int = 6,
    size: int = 28,
    compress: bool = False,
    seed: int = 0,
    train_labels: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Writes a small MNIST-like IDX folder; returns the raw arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": (
            rng.integers(0, 10, n_train, dtype=np.uint8) if train_labels is None else train_labels
        ),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    os.makedirs(folder, exist_ok=True)
    for stem, arr in arrays.items():
        write_idx(os.path.join(folder, stem + (".gz" if compress else "")), arr, compress)
    return arrays


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_normalisation():
    ds = data.load("digits")
    assert ds.name == "digits" and ds.source == "sklearn" and ds.num_classes == 10
    assert ds.x_train.shape == (1497, 8, 8, 1) and ds.x_test.shape == (300, 8, 8, 1)
    assert ds.y_train.shape == (1497,) and ds.y_test.shape == (300,)
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    assert ds.input_shape == (8, 8, 1)
    assert abs(float(ds.x_train.mean())) < 1e-3
    assert abs(float(ds.x_train.std()) - 1.0) < 1e-3
    assert set(np.unique(ds.y_train)) == set(range(10))
    # Raw pixel 0 maps to -mean/std, raw 16 to (1-mean)/std.
    mean, std = data.NORMALIZATION["digits"]
    np.testing.assert_allclose(ds.x_train.min(), -mean[0] / std[0], rtol=1e-6)
    np.testing.assert_allclose(ds.x_train.max(), (1 - mean[0]) / std[0], rtol=1e-6)


def test_digits_split_is_deterministic_per_seed_and_a_partition():
    from sklearn.datasets import load_digits

    a, b, c = data.load("digits", seed=3), data.load("digits", seed=3), data.load("digits", seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_test, c.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    # Train + test is exactly the whole data set (as a multiset of rows).
    mean, std = data.NORMALIZATION["digits"]
    raw = np.concatenate([c.x_train, c.x_test]) * std[0] + mean[0]
    raw = np.rint(raw * 16).reshape(1797, 64)
    full = load_digits().data
    rows = lambda m: sorted(map(tuple, m.astype(int).tolist()))  # noqa: E731
    assert rows(raw) == rows(full)
    # Other seeds still normalise close to zero mean / unit std.
    assert abs(float(c.x_train.mean())) < 0.01 and abs(float(c.x_train.std()) - 1) < 0.01


def test_digits_max_train_max_test_take_prefix_after_split():
    full = data.load("digits", seed=1)
    small = data.load("digits", seed=1, max_train=50, max_test=7)
    np.testing.assert_array_equal(small.x_train, full.x_train[:50])
    np.testing.assert_array_equal(small.y_test, full.y_test[:7])
    with pytest.raises(ValueError, match="max_train"):
        data.load("digits", max_train=0)


def test_heldout_split_is_the_training_tail_no_parent_saw():
    full = data.load("digits", seed=1)
    held = data.load("digits", seed=1, max_train=1000, eval_split="heldout")
    assert held.eval_split == "heldout" and full.eval_split == "test"
    np.testing.assert_array_equal(held.x_train, full.x_train[:1000])
    np.testing.assert_array_equal(held.x_test, full.x_train[1000:])  # the rest of the training split, not the test set
    np.testing.assert_array_equal(held.y_test, full.y_train[1000:])
    short = data.load("digits", seed=1, max_train=1000, max_test=20, eval_split="heldout")
    np.testing.assert_array_equal(short.y_test, full.y_train[1000:1020])
    with pytest.raises(ValueError, match="set max_train"):
        data.load("digits", eval_split="heldout")
    with pytest.raises(ValueError, match="none after max_train=5000"):
        data.load("digits", max_train=5000, eval_split="heldout")
    with pytest.raises(ValueError, match="eval_split must be one of"):
        data.load("digits", eval_split="validation")


def test_digits_pad_to():
    ds = data.load("digits", pad_to=12)
    plain = data.load("digits")
    assert ds.input_shape == (12, 12, 1)
    np.testing.assert_array_equal(ds.x_train[:, 2:10, 2:10], plain.x_train)
    mean, std = data.NORMALIZATION["digits"]
    border = np.concatenate([ds.x_train[:, :2].ravel(), ds.x_train[:, :, -2:].ravel()])
    np.testing.assert_allclose(border, -mean[0] / std[0], rtol=1e-6)


# --------------------------------------------------------------------------- batches


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    batch_size=st.integers(1, 12),
    seed=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    drop=st.booleans(),
)
def test_batches_cover_each_example_once(n, batch_size, seed, drop):
    x = np.arange(n, dtype=np.float32)[:, None] * 2
    y = np.arange(n, dtype=np.int32)
    out = list(data.batches(x, y, batch_size, seed=seed, drop_remainder=drop))
    assert len(out) == data.num_batches(n, batch_size, drop)
    for i, (xb, yb) in enumerate(out):
        np.testing.assert_array_equal(xb[:, 0], 2 * yb)  # pairs stay together
        if drop or i < len(out) - 1:
            assert len(yb) == batch_size
    seen = np.concatenate([yb for _, yb in out]) if out else np.zeros(0, np.int32)
    assert len(np.unique(seen)) == len(seen)  # no example twice
    if drop:
        assert len(seen) == (n // batch_size) * batch_size
    else:
        np.testing.assert_array_equal(np.sort(seen), y)  # every example once
    if seed is None:
        np.testing.assert_array_equal(seen, y[: len(seen)])
    else:
        expected = np.random.default_rng(seed).permutation(n)[: len(seen)]
        np.testing.assert_array_equal(seen, expected)


def test_batches_deterministic_per_seed_and_seed_changes_order():
    x, y = np.arange(100.0)[:, None], np.arange(100)
    run = lambda s: np.concatenate([yb for _, yb in data.batches(x, y, 16, seed=s)])  # noqa: E731
    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))
    assert not np.array_equal(run(7), y)
    np.testing.assert_array_equal(run(None), y)


def test_batches_drop_remainder_and_errors():
    x, y = np.zeros((10, 3)), np.arange(10)
    sizes = [len(yb) for _, yb in data.batches(x, y, 4, seed=0)]
    assert sizes == [4, 4, 2]
    sizes = [len(yb) for _, yb in data.batches(x, y, 4, seed=0, drop_remainder=True)]
    assert sizes == [4, 4]
    assert data.num_batches(10, 4) == 3 and data.num_batches(10, 4, True) == 2
    assert data.num_batches(8, 4) == 2 and data.num_batches(0, 4) == 0
    with pytest.raises(ValueError):
        data.batches(x, y[:9], 4, seed=None)  # raised eagerly, not on first next()
    with pytest.raises(ValueError):
        data.num_batches(10, 0)


# --------------------------------------------------------------------------- IDX parser


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4),
        np.array([0, 9, 3, 255], dtype=np.uint8),
        np.array([[-128, 127], [-1, 0]], dtype=np.int8),
        np.array([-30000, 2, 30000], dtype=np.int16),
        np.arange(-6, 6, dtype=np.int32).reshape(3, 2, 2) * 123456,
        np.array([1.5, -2.25, 3e30], dtype=np.float32),
        np.array([[np.pi, -np.e]], dtype=np.float64),
    ],
    ids=["u8-3d", "u8-1d", "i8", "i16", "i32", "f32", "f64"],
)
def test_read_idx_round_trips(tmp_path, arr, compress):
    path = write_idx(tmp_path / ("x.idx.gz" if compress else "x.idx"), arr, compress)
    out = data.read_idx(path)
    assert out.dtype == arr.dtype and out.dtype.isnative and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)
    out[...] = 0  # the result is a writable copy


def test_read_idx_detects_gzip_by_content(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = write_idx(tmp_path / "no-suffix", arr, compress=True)
    np.testing.assert_array_equal(data.read_idx(path), arr)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x01\x02" + GOOD[2:], "bad magic"),
        (GOOD[:2] + b"\x07" + GOOD[3:], "unknown data type"),
        (GOOD[:3] + b"\x00" + GOOD[4:], "zero dimensions"),
        (GOOD[:-1], "truncated"),
        (GOOD + b"\x00", "longer than"),
        (GOOD[:9], "truncated"),  # header declares 3 dims, file stops inside them
        (b"", "too short"),
        (gzip.compress(GOOD)[:-10], "cannot read"),  # truncated gzip stream
    ],
    ids=["magic", "dtype", "ndim0", "trunc-data", "trailing", "trunc-header", "empty", "bad-gz"],
)
def test_read_idx_rejects_corrupt_files_naming_them(tmp_path, payload, match):
    path = tmp_path / "corrupt-idx3-ubyte"
    path.write_bytes(payload)
    with pytest.raises(data.DataSourceError, match=match) as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(data.DataSourceError, match="nope"):
        data.read_idx(tmp_path / "nope")


# --------------------------------------------------------------------------- IDX loader


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_folder_exact_normalisation(tmp_path, compress):
    raw = make_idx_folder(tmp_path / "mnist", compress=compress)
    ds = data.load("mnist", data_dir=str(tmp_path / "mnist"))  # auto -> idx
    assert ds.source == "idx" and ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (20, 28, 28, 1) and ds.x_test.shape == (6, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    expected = (raw["train-images-idx3-ubyte"][..., None] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(ds.x_train, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ds.y_train, raw["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, raw["t10k-labels-idx1-ubyte"])


def test_load_idx_fashion_constants_and_pad_to(tmp_path):
    raw = make_idx_folder(tmp_path, n_train=5, n_test=3)
    ds = data.load("fashion_mnist", source="idx", data_dir=str(tmp_path), pad_to=32)
    assert ds.input_shape == (32, 32, 1)
    assert ds.x_train.shape == (5, 32, 32, 1) and ds.x_test.shape == (3, 32, 32, 1)
    border_value = (0.0 - 0.2860) / 0.3530
    mask = np.ones((32, 32), bool)
    mask[2:30, 2:30] = False
    np.testing.assert_allclose(ds.x_train[:, mask], border_value, rtol=1e-6)
    np.testing.assert_allclose(ds.x_test[:, mask], border_value, rtol=1e-6)
    expected = (raw["train-images-idx3-ubyte"][..., None] / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(ds.x_train[:, 2:30, 2:30], expected, rtol=1e-5, atol=1e-6)
    # An odd surplus goes to the bottom/right; smaller than the image is an error.
    assert data.load("fashion_mnist", data_dir=str(tmp_path), pad_to=31).input_shape == (31, 31, 1)
    with pytest.raises(ValueError, match="pad_to"):
        data.load("fashion_mnist", data_dir=str(tmp_path), pad_to=27)


def test_load_idx_max_train_max_test(tmp_path):
    make_idx_folder(tmp_path)
    full = data.load("mnist", data_dir=str(tmp_path))
    small = data.load("mnist", data_dir=str(tmp_path), max_train=4, max_test=100)
    np.testing.assert_array_equal(small.x_train, full.x_train[:4])
    np.testing.assert_array_equal(small.y_test, full.y_test)  # max larger than the split


def test_load_idx_mismatched_counts_names_files(tmp_path):
    make_idx_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(data.DataSourceError, match="20 images but 19 labels") as info:
        data.load("mnist", data_dir=str(tmp_path))
    assert "train-labels-idx1-ubyte" in str(info.value)
    assert "train-images-idx3-ubyte" in str(info.value)


def test_load_idx_labels_out_of_range(tmp_path):
    labels = np.arange(20, dtype=np.uint8) % 11  # contains 10
    make_idx_folder(tmp_path, train_labels=labels)
    with pytest.raises(data.DataSourceError, match=r"outside \[0, 10\)") as info:
        data.load("mnist", data_dir=str(tmp_path))
    assert "train-labels-idx1-ubyte" in str(info.value)


def test_load_idx_empty_split(tmp_path):
    make_idx_folder(tmp_path, n_test=0)
    with pytest.raises(data.DataSourceError, match="no examples") as info:
        data.load("mnist", data_dir=str(tmp_path))
    assert "t10k-images-idx3-ubyte" in str(info.value)


def test_load_idx_wrong_rank_names_file(tmp_path):
    make_idx_folder(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((6, 28 * 28), np.uint8))
    with pytest.raises(data.DataSourceError, match="t10k-images-idx3-ubyte"):
        data.load("mnist", data_dir=str(tmp_path))


def test_load_idx_corrupt_file_in_folder_names_it(tmp_path):
    make_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x06\x01")
    with pytest.raises(data.DataSourceError, match="t10k-labels-idx1-ubyte.*truncated"):
        data.load("mnist", data_dir=str(tmp_path))


def test_missing_folder_mentions_offline_alternatives(tmp_path):
    missing = str(tmp_path / "does-not-exist")
    with pytest.raises(data.DataSourceError) as info:
        data.load("fashion_mnist", source="idx", data_dir=missing)
    msg = str(info.value)
    assert missing in msg and "fashion_mnist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "digits" in msg and "source='idx'" in msg


def test_missing_file_in_folder_is_named(tmp_path):
    make_idx_folder(tmp_path)
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(data.DataSourceError, match=r"t10k-images-idx3-ubyte\[\.gz\] not found"):
        data.load("mnist", data_dir=str(tmp_path))


def test_mnist_idx_without_data_dir_is_an_error():
    with pytest.raises(data.DataSourceError, match="needs data_dir") as info:
        data.load("mnist", source="idx")
    assert "digits" in str(info.value)


def test_argument_errors():
    with pytest.raises(ValueError, match="unknown data set"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="not available from source"):
        data.load("cifar10", source="idx")
    with pytest.raises(ValueError, match="not available from source"):
        data.load("digits", source="tfds")
    assert issubclass(data.DataSourceError, ValueError)


def test_dataset_checks_shapes():
    x, y = np.zeros((3, 4, 4, 1), np.float32), np.zeros(3, np.int32)
    ds = data.Dataset("toy", "sklearn", x, y, x[:2], y[:2], 2)
    assert ds.input_shape == (4, 4, 1)
    with pytest.raises(ValueError):
        data.Dataset("toy", "sklearn", x, y[:2], x, y, 2)
    with pytest.raises(ValueError):
        data.Dataset("toy", "sklearn", x, y, np.zeros((3, 5, 5, 1), np.float32), y, 2)


# --------------------------------------------------------------------------- TFDS


@pytest.fixture(name="tfds")
def fixture_tfds():
    return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize(
    "name, shape",
    [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))],
)
def test_tfds_mock_data_shapes_and_normalisation(tfds, name, shape):
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load(name, source="tfds")
        raw = tfds.data_source(name, split="train")
        raw_x = np.stack([raw[i]["image"] for i in range(len(raw))])
        raw_y = np.array([raw[i]["label"] for i in range(len(raw))])
    assert ds.source == "tfds" and ds.num_classes == 10
    assert ds.x_train.shape == (6, *shape) and ds.x_test.shape == (6, *shape)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.input_shape == shape
    mean, std = data.NORMALIZATION[name]
    expected = (raw_x / 255.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(ds.x_train, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.y_train, raw_y)
    assert ds.y_train.min() >= 0 and ds.y_train.max() < 10


def test_tfds_auto_source_and_limits(tfds):
    with tfds.testing.mock_data(num_examples=9):
        ds = data.load("cifar10", max_train=4, max_test=2, pad_to=36)
    assert ds.source == "tfds"
    assert ds.x_train.shape == (4, 36, 36, 3) and ds.x_test.shape == (2, 36, 36, 3)
    border = ds.x_train[:, 0, 0, :]
    mean, std = data.NORMALIZATION["cifar10"]
    np.testing.assert_allclose(border, np.broadcast_to(-np.asarray(mean) / std, (4, 3)), rtol=1e-6)


def test_tfds_heldout_split(tfds):
    with tfds.testing.mock_data(num_examples=9):
        full = data.load("fashion_mnist", source="tfds")
        held = data.load("fashion_mnist", source="tfds", max_train=6, eval_split="heldout")
    np.testing.assert_array_equal(held.x_test, full.x_train[6:])
    assert held.x_train.shape[0] == 6 and held.eval_split == "heldout"


def test_tfds_empty_split(tfds):
    with tfds.testing.mock_data(num_examples=0):
        with pytest.raises(data.DataSourceError, match="tfds data source 'mnist'.*no examples"):
            data.load("mnist", source="tfds")


def test_tfds_failure_is_wrapped_with_alternatives(tfds, monkeypatch):
    def unavailable(name, **kwargs):
        raise RuntimeError(f"cannot download {name}: network unreachable")

    monkeypatch.setattr(tfds, "data_source", unavailable)
    with pytest.raises(data.DataSourceError) as info:
        data.load("fashion_mnist", source="tfds", data_dir="/tmp/x")
    msg = str(info.value)
    assert "fashion_mnist" in msg and "tensorflow_datasets could not provide" in msg
    assert "network unreachable" in msg and "/tmp/x" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "digits" in msg
    assert isinstance(info.value.__cause__, RuntimeError)


def test_tfds_invalid_labels_rejected(tfds, monkeypatch):
    records = [{"image": np.zeros((28, 28, 1), np.uint8), "label": np.int64(i)} for i in (0, 10)]
    monkeypatch.setattr(tfds, "data_source", lambda name, **kwargs: records)
    with pytest.raises(data.DataSourceError, match="tfds data source 'mnist' split 'train'"):
        data.load("mnist", source="tfds")


def test_tfds_unprepared_without_mock_is_wrapped(tfds, tmp_path, monkeypatch):
    # A real call on an empty data_dir, with downloads disabled so that no network is touched.
    real = tfds.data_source
    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: real(*a, download=False, **k))
    with pytest.raises(data.DataSourceError, match="mnist: tensorflow_datasets could not"):
        data.load("mnist", source="tfds", data_dir=str(tmp_path))


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module", name="fashion")
def fixture_fashion():
    if not os.path.isdir(data.FASHION_MNIST_SYSTEM_DIR):
        pytest.skip(
            f"{data.FASHION_MNIST_SYSTEM_DIR} absent: apt-get install dataset-fashion-mnist"
        )
    return data.load("fashion_mnist")


def test_real_fashion_mnist(fashion):
    assert fashion.source == "idx"  # auto picks the system folder
    assert fashion.x_train.shape == (60000, 28, 28, 1)
    assert fashion.x_test.shape == (10000, 28, 28, 1)
    assert fashion.y_train.shape == (60000,) and fashion.y_test.shape == (10000,)
    assert fashion.num_classes == 10
    assert set(np.unique(fashion.y_train)) == set(range(10)) == set(np.unique(fashion.y_test))
    np.testing.assert_array_equal(np.bincount(fashion.y_train), np.full(10, 6000))
    assert abs(float(fashion.x_train.mean())) < 0.01
    assert abs(float(fashion.x_train.std()) - 1.0) < 0.01


def test_heldout_evaluation_refuses_parents_that_saw_the_heldout_images():
    from otfusion_jax import parents  # noqa: PLC0415

    held = data.load("digits", max_train=1000, eval_split="heldout")
    cfg = {"max_train": 1000, "seed": 0}
    rec = {"name": "digits", "source": "sklearn", "seed": 0}
    ok = [{"path": "p0", "dataset": {**rec, "num_train": 1000}}, {"path": "p1", "dataset": {**rec, "num_train": 900}}]
    parents.check_heldout_unseen(ok, held, cfg)
    with pytest.raises(ValueError, match="p1: trained on 1497 images, more than data.max_train=1000"):
        parents.check_heldout_unseen([ok[0], {"path": "p1", "dataset": {**rec, "num_train": 1497}}], held, cfg)
    with pytest.raises(ValueError, match="p0: no record of how many training images it saw"):
        parents.check_heldout_unseen([{"path": "p0", "dataset": None}], held, cfg)
    with pytest.raises(ValueError, match="p0: trained on data with seed=1, evaluated with seed=0"):
        parents.check_heldout_unseen([{"path": "p0", "dataset": {**rec, "seed": 1, "num_train": 900}}], held, cfg)
    with pytest.raises(ValueError, match="p0: trained on data with name='mnist', evaluated with name='digits'"):
        parents.check_heldout_unseen([{"path": "p0", "dataset": {**rec, "name": "mnist", "num_train": 9}}], held, cfg)
    parents.check_heldout_unseen([{"path": "p0", "dataset": None}], data.load("digits"), cfg)  # test set: no check
