"""The CIFAR-10 pipeline: offline preparation of tfds 'cifar10', loading, batching, and the command line."""

import os
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vit_jax import data
from vit_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tfds_order(data_dir, split):
    """The file-order index of each example, in the order tfds yields them (it reorders by key hash)."""
    ds = tfds.load("cifar10", split=split, data_dir=data_dir)
    return np.array([int(ex["id"].decode().split("_")[1]) for ex in tfds.as_numpy(ds)])


def _assert_same_data(data_dir, written):
    for split in ("train", "test"):
        images, labels = data.load_split(split, data_dir=data_dir)
        want_images, want_labels = written[split]
        assert images.dtype == np.uint8 and images.shape == want_images.shape
        assert labels.dtype == np.int32 and labels.shape == want_labels.shape
        order = _tfds_order(data_dir, split)
        assert sorted(order) == list(range(len(want_labels)))  # every written example, once
        np.testing.assert_array_equal(images, want_images[order])
        np.testing.assert_array_equal(labels, want_labels[order])


@pytest.fixture(scope="module")
def prepared(small_cifar, tmp_path_factory):
    """tfds data_dir prepared from the small archive."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    assert data.prepare(small_cifar["archive"], data_dir, allow_checksum_mismatch=True) == data_dir
    return data_dir


def test_checksum_is_tfds_registered_official_one():
    url, info = data._official()
    assert url == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    assert info.checksum == "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
    assert int(info.size) == 170052171 and info.filename == "cifar-10-binary.tar.gz"


def test_prepare_refuses_an_unofficial_archive_without_the_flag(small_cifar, tmp_path):
    with pytest.raises(UserError, match="--allow_checksum_mismatch") as e:
        data.prepare(small_cifar["archive"], str(tmp_path))
    assert "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd" in str(e.value)
    assert not (tmp_path / "cifar10").exists()


def test_prepare_from_archive_gives_the_written_data(small_cifar, prepared, capsys):
    _assert_same_data(prepared, small_cifar)
    builder = tfds.builder("cifar10", data_dir=prepared)  # the stock dataset, as plain tfds sees it
    assert builder.info.features["label"].names == list(data.CLASS_NAMES)
    assert builder.info.splits["train"].num_examples == 60
    assert os.listdir(prepared) == ["cifar10"]  # the scratch folder is gone
    # Again: nothing to do, and the archive is not even read.
    assert data.prepare(small_cifar["archive"], prepared) == prepared
    assert "already prepared" in capsys.readouterr().out


def test_prepare_from_folder(small_cifar, tmp_path):
    with pytest.raises(UserError, match="10000 records in each batch file.*--allow_checksum_mismatch"):
        data.prepare(small_cifar["folder"], str(tmp_path / "refused"))
    # The folder itself, or the folder that holds it.
    for source in (small_cifar["folder"], os.path.dirname(small_cifar["folder"])):
        data_dir = str(tmp_path / f"tfds_{len(source)}")
        data.prepare(source, data_dir, allow_checksum_mismatch=True)
        _assert_same_data(data_dir, small_cifar)


def test_folder_with_official_sizes_needs_no_flag(tmp_path, monkeypatch, capsys):
    from conftest import write_cifar_archive
    written = write_cifar_archive(str(tmp_path / "src"), 8, 8, seed=1)
    monkeypatch.setattr(data, "OFFICIAL_RECORDS", 8)  # stands in for the real 10000 per file
    data.prepare(written["folder"], str(tmp_path / "tfds"))
    assert "no checksum" in capsys.readouterr().out
    images, labels = data.load_split("test", str(tmp_path / "tfds"))
    assert sorted(map(bytes, images)) == sorted(map(bytes, written["test"][0]))


def test_wrong_layout(small_cifar, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="lacks data_batch_1.bin.*cifar-10-batches-bin"):
        data.prepare(str(empty), str(tmp_path / "tfds"))

    not_tar = tmp_path / "cifar-10-binary.tar.gz"
    not_tar.write_bytes(b"not an archive")
    with pytest.raises(UserError, match="not a readable .tar.gz.*expected cifar-10-binary.tar.gz"):
        data.prepare(str(not_tar), str(tmp_path / "tfds"), allow_checksum_mismatch=True)

    torn = tmp_path / "torn"
    shutil.copytree(small_cifar["folder"], torn)
    with open(torn / "test_batch.bin", "ab") as f:
        f.write(b"\0" * 100)
    with pytest.raises(UserError, match="test_batch.bin has .* bytes, not a whole number of 3073-byte records"):
        data.prepare(str(torn), str(tmp_path / "tfds"), allow_checksum_mismatch=True)

    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(os.path.join(small_cifar["folder"], "data_batch_1.bin"), "cifar-10-batches-bin/data_batch_1.bin")
    with pytest.raises(UserError, match="lacks cifar-10-batches-bin/data_batch_2.bin"):
        data.prepare(str(partial), str(tmp_path / "tfds"), allow_checksum_mismatch=True)

    with pytest.raises(UserError, match="does not exist"):
        data.prepare(str(tmp_path / "nowhere.tar.gz"), str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds" / "cifar10").exists()


def test_load_split_offline_says_how_to_prepare(tmp_path, monkeypatch):
    # An https proxy that refuses connections: no network, whatever this machine has.
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.raises(UserError, match="python -m vit_jax.data prepare --archive") as e:
        data.load_split("train", data_dir=str(tmp_path))
    assert time.perf_counter() - started < 10
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_load_split_checks_its_arguments(prepared):
    with pytest.raises(UserError, match="'validation'"):
        data.load_split("validation", prepared)
    with pytest.raises(UserError, match="larger than the train split \\(60 examples\\)"):
        data.load_split("train", prepared, limit=61)
    images, labels = data.load_split("train", prepared, limit=7)
    full_images, full_labels = data.load_split("train", prepared)
    np.testing.assert_array_equal(images, full_images[:7])
    np.testing.assert_array_equal(labels, full_labels[:7])


def test_load_split_under_mock_data():
    with tfds.testing.mock_data(num_examples=9):
        images, labels = data.load_split("train")
        assert images.shape == (9, 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (9,) and labels.dtype == np.int32
        assert data.load_split("test", limit=4)[0].shape == (4, 32, 32, 3)


def test_num_batches():
    assert data.num_batches(50000, 64) == 782
    assert data.num_batches(128, 64) == 2
    assert data.num_batches(1, 64) == 1


def _epoch(n=10, batch_size=4, **kwargs):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    labels = np.arange(n, dtype=np.int32) % 10
    return list(data.epoch_batches(images, labels, batch_size, **kwargs))


def _ids(batches):
    """The example each real (mask 1) slot holds, in order."""
    return [int(x[0, 0, 0]) for b in batches for x, m in zip(b[0], b[2]) if m]


def test_epoch_batches_shapes_and_padding():
    batches = _epoch(seed=0)
    assert len(batches) == 3
    for x, y, m in batches:
        assert x.shape == (4, 32, 32, 3) and x.dtype == np.uint8
        assert y.shape == (4,) and y.dtype == np.int32 and m.shape == (4,) and m.dtype == np.float32
    x, y, m = batches[-1]
    np.testing.assert_array_equal(m, [1, 1, 0, 0])
    assert not x[2:].any() and not y[2:].any()
    assert sorted(_ids(batches)) == list(range(10))  # each example exactly once
    for x, y, m in batches:  # labels stay with their images
        np.testing.assert_array_equal(y[m > 0], x[m > 0, 0, 0, 0] % 10)


def test_epoch_batches_order():
    assert _ids(_epoch()) == list(range(10))  # no seed: file order
    first = _ids(_epoch(seed=3, epoch=1))
    assert first == _ids(_epoch(seed=3, epoch=1))  # a pure function of (seed, epoch)
    assert first != list(range(10))
    assert first != _ids(_epoch(seed=3, epoch=2))
    assert first != _ids(_epoch(seed=4, epoch=1))


def test_epoch_batches_resume():
    full = _epoch(n=23, batch_size=5, seed=7, epoch=4)
    resumed = _epoch(n=23, batch_size=5, seed=7, epoch=4, start=2)
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    assert _epoch(n=23, batch_size=5, start=5) == []


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vit_jax.data", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_bad_archive_is_one_line(tmp_path):
    run = _cli("prepare", "--archive", str(tmp_path / "missing.tar.gz"), "--data_dir", str(tmp_path))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in run.stderr, run.stderr


def test_cli_prepares(small_cifar, tmp_path):
    run = _cli("prepare", "--archive", small_cifar["archive"], "--data_dir", str(tmp_path),
               "--allow_checksum_mismatch")
    assert run.returncode == 0, run.stderr
    assert "60 train and 17 test examples" in run.stdout
    assert "warning: " in run.stderr and "Traceback" not in run.stderr


def test_damaged_prepared_data_says_to_prepare_again(tmp_path):
    version_dir = tmp_path / "cifar10" / "3.0.2"
    version_dir.mkdir(parents=True)
    (version_dir / "dataset_info.json").write_text("not json")
    with pytest.raises(UserError, match="cannot be read .*delete that folder and prepare it again"):
        data.load_split("test", str(tmp_path))
