"""The CIFAR-10 pipeline: both sources (tfds, the archive with numpy), offline preparation of tfds
'cifar10', batching, and the command line."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vit_jax import archive, data, prepare, tfds_data
from vit_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_same_data(written, **source):
    """Both splits, read from `source` (data_dir= or archive=), are the written arrays in file order."""
    for split in ("train", "test"):
        images, labels = data.load_split(split, **source)
        want_images, want_labels = written[split]
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(labels, want_labels)


@pytest.fixture(scope="module")
def prepared(small_cifar, tmp_path_factory):
    """tfds data_dir prepared from the small archive."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    assert prepare.prepare(small_cifar["archive"], data_dir, allow_checksum_mismatch=True) == data_dir
    return data_dir


def test_checksum_is_tfds_registered_official_one():
    url, info = tfds_data.official_url_info()
    assert url == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    assert info.checksum == archive.OFFICIAL_SHA256
    assert int(info.size) == archive.OFFICIAL_SIZE and info.filename == "cifar-10-binary.tar.gz"


def test_both_sources_give_the_same_images_and_labels(small_cifar, prepared):
    _assert_same_data(small_cifar, data_dir=prepared)
    _assert_same_data(small_cifar, archive=small_cifar["archive"])
    _assert_same_data(small_cifar, archive=small_cifar["folder"])
    for split in ("train", "test"):  # as sets too, whatever the order
        a = data.load_split(split, data_dir=prepared)
        b = data.load_split(split, archive=small_cifar["archive"])
        assert sorted(zip(map(bytes, a[0]), a[1])) == sorted(zip(map(bytes, b[0]), b[1]))
    x, y = data.load_split("train", archive=small_cifar["archive"], limit=7)
    np.testing.assert_array_equal(x, small_cifar["train"][0][:7])


def test_training_reads_either_source_to_the_same_metrics(small_cifar, prepared, tmp_path):
    """`vit_jax.train --data_dir` (tfds) and `--archive` (numpy): one epoch each, the same numbers."""
    from vit_jax import train

    rows = {}
    for flag, source in (("--data_dir", prepared), ("--archive", small_cifar["archive"])):
        workdir = tmp_path / flag.strip("-")
        train.main(["--recipe", "test", "--epochs", "1", "--batch_size", "12", flag, source, "--workdir", str(workdir)])
        rows[flag] = [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_sec")}
                      for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows["--archive"]) == 1 and rows["--data_dir"] == rows["--archive"]


def test_prepare_refuses_an_unofficial_archive_without_the_flag(small_cifar, tmp_path):
    with pytest.raises(UserError, match="--allow_checksum_mismatch") as e:
        prepare.prepare(small_cifar["archive"], str(tmp_path))
    assert "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd" in str(e.value)
    assert not (tmp_path / "cifar10").exists()


def test_prepare_from_archive_gives_the_written_data(small_cifar, prepared, capsys):
    _assert_same_data(small_cifar, data_dir=prepared)
    builder = tfds.builder("cifar10", data_dir=prepared)  # the stock dataset, as plain tfds sees it
    assert builder.info.features["label"].names == list(data.CLASS_NAMES)
    assert builder.info.splits["train"].num_examples == 60
    assert os.listdir(prepared) == ["cifar10"]  # the scratch folder and the lock are gone
    assert os.listdir(os.path.join(prepared, "cifar10")) == [str(builder.version)]
    # Again: nothing to do, and the archive is not even read.
    assert prepare.prepare(small_cifar["archive"], prepared) == prepared
    assert "already prepared" in capsys.readouterr().out


def test_prepare_from_folder(small_cifar, tmp_path):
    with pytest.raises(UserError, match="10000 records in each batch file.*--allow_checksum_mismatch"):
        prepare.prepare(small_cifar["folder"], str(tmp_path / "refused"))
    # The folder itself, or the folder that holds it.
    for source in (small_cifar["folder"], os.path.dirname(small_cifar["folder"])):
        data_dir = str(tmp_path / f"tfds_{len(source)}")
        prepare.prepare(source, data_dir, allow_checksum_mismatch=True)
        _assert_same_data(small_cifar, data_dir=data_dir)


def test_folder_with_official_sizes_needs_no_flag(tmp_path, monkeypatch, capsys):
    from conftest import write_cifar_archive
    written = write_cifar_archive(str(tmp_path / "src"), 8, 8, seed=1)
    monkeypatch.setattr(archive, "OFFICIAL_RECORDS", 8)  # stands in for the real 10000 per file
    prepare.prepare(written["folder"], str(tmp_path / "tfds"))
    assert "no checksum" in capsys.readouterr().out
    images, labels = data.load_split("test", str(tmp_path / "tfds"))
    assert sorted(map(bytes, images)) == sorted(map(bytes, written["test"][0]))


def test_wrong_layout(small_cifar, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="lacks data_batch_1.bin.*cifar-10-batches-bin"):
        prepare.prepare(str(empty), str(tmp_path / "tfds"))

    not_tar = tmp_path / "cifar-10-binary.tar.gz"
    not_tar.write_bytes(b"not an archive")
    with pytest.raises(UserError, match="not a readable .tar.gz.*expected cifar-10-binary.tar.gz"):
        prepare.prepare(str(not_tar), str(tmp_path / "tfds"), allow_checksum_mismatch=True)

    torn = tmp_path / "torn"
    shutil.copytree(small_cifar["folder"], torn)
    with open(torn / "test_batch.bin", "ab") as f:
        f.write(b"\0" * 100)
    with pytest.raises(UserError, match="test_batch.bin has .* bytes, not a whole number of 3073-byte records"):
        prepare.prepare(str(torn), str(tmp_path / "tfds"), allow_checksum_mismatch=True)

    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(os.path.join(small_cifar["folder"], "data_batch_1.bin"), "cifar-10-batches-bin/data_batch_1.bin")
    with pytest.raises(UserError, match="lacks cifar-10-batches-bin/data_batch_2.bin"):
        prepare.prepare(str(partial), str(tmp_path / "tfds"), allow_checksum_mismatch=True)

    with pytest.raises(UserError, match="does not exist"):
        prepare.prepare(str(tmp_path / "nowhere.tar.gz"), str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds" / "cifar10").exists()


def test_prepare_onto_a_read_only_disk_is_one_line(small_cifar, tmp_path, monkeypatch, capsys):
    """As root, a folder with its write bits off can still be written: the disk's refusal is simulated."""
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(prepare.Path, "mkdir", read_only)
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(SystemExit) as e:
        prepare.main(["prepare", "--archive", small_cifar["archive"], "--data_dir", data_dir,
                      "--allow_checksum_mismatch"])
    err = capsys.readouterr().err  # after the warning that the small archive is not the official one
    assert e.value.code == 2 and err.splitlines()[1:] == [
        f"error: cannot write to {data_dir} (Read-only file system): choose another --data_dir"], err


@pytest.mark.parametrize("where", ["extracting", "writing the dataset"])
def test_prepare_onto_a_disk_that_fills_up_is_one_line(where, small_cifar, tmp_path, monkeypatch, capsys):
    """tfds wraps the disk's error in its ExtractError while it extracts; TensorFlow's file errors keep
    only its words. Either way: one line with the room needed, and nothing left behind."""
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "extracting":
        def copy(data, path):
            raise full
        monkeypatch.setattr(tfds.core.download.extractor, "_copy", copy)
    else:
        def write(*args, **kwargs):
            raise RuntimeError(f"tfrecord writer: {full}")
        monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", write)
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(SystemExit) as e:
        prepare.main(["prepare", "--archive", small_cifar["archive"], "--data_dir", data_dir,
                      "--allow_checksum_mismatch"])
    err = capsys.readouterr().err  # tfds's progress bars, then the error
    assert "Traceback" not in err and err.endswith("\n") and err.count("error:") == 1, err
    assert e.value.code == 2 and err.splitlines()[-1:] == [
        f"error: the disk of {data_dir} is full: preparing CIFAR-10 needs about 303 MB free there while it runs "
        f"(142 MB stay). What it wrote is removed; free some space, or choose another --data_dir, and run the "
        f"same command again"], err
    left = [os.path.relpath(os.path.join(d, n), data_dir) for d, dirs, files in os.walk(data_dir) for n in dirs + files]
    assert not [p for p in left if p.startswith(prepare.SCRATCH_PREFIX) or "incomplete" in p], left


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


def test_a_download_that_fails_says_how_to_prepare(tmp_path, monkeypatch):
    """With the network reachable (the probe replaced), tfds's own failure becomes the same message."""
    monkeypatch.setattr(tfds_data, "check_reachable", lambda url: None)

    def fail(self, *args, **kwargs):
        raise ConnectionError("Failed to fetch https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    with pytest.raises(UserError, match="could not be downloaded \\(Failed to fetch .*train from the archive"):
        data.load_split("test", data_dir=str(tmp_path))


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


# `python -m vit_jax.data ARGS` in a process where TensorFlow cannot be imported: a mistake in the
# arguments is reported before TensorFlow is needed (in a second, not after its start-up).
WITHOUT_TENSORFLOW = """
import runpy, sys
sys.modules.update(tensorflow=None, tensorflow_datasets=None)  # import raises ImportError
runpy.run_module("vit_jax.data", run_name="__main__", alter_sys=True)
"""


def _cli(*args, without_tensorflow=False):
    how = ["-c", WITHOUT_TENSORFLOW] if without_tensorflow else ["-m", "vit_jax.data"]
    return subprocess.run([sys.executable, *how, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_bad_archive_is_one_line(tmp_path):
    run = _cli("prepare", "--archive", str(tmp_path / "missing.tar.gz"), "--data_dir", str(tmp_path),
               without_tensorflow=True)
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


def test_prepare_into_a_file_says_to_give_a_folder(small_cifar):
    """The hint that `--data_dir ARCHIVE` prints leads here; the archive itself must come to no harm."""
    before = os.path.getsize(small_cifar["archive"])
    run = _cli("prepare", "--archive", small_cifar["archive"], "--data_dir", small_cifar["archive"],
               "--allow_checksum_mismatch", without_tensorflow=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "is a file, not a folder" in run.stderr and os.path.getsize(small_cifar["archive"]) == before


def test_training_from_a_file_as_data_dir_says_it_is_a_file(small_cifar, tmp_path, capsys):
    """Not that CIFAR-10 is not prepared there (nor a download attempted): prepare's words, from one check."""
    from vit_jax import train

    with pytest.raises(SystemExit) as e:
        train.main(["--recipe", "test", "--epochs", "1", "--data_dir", small_cifar["archive"],
                    "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (
        f"error: --data_dir {small_cifar['archive']} is a file, not a folder: give the folder that holds the "
        f"prepared dataset (or is to hold it; it is created if missing), and an archive as --archive\n"), err


def test_a_killed_prepare_leaves_nothing_that_the_next_one_does_not_remove(tmp_path):
    from conftest import write_cifar_archive
    source = write_cifar_archive(str(tmp_path / "src"), 400, 400, seed=2)  # big enough to kill midway
    data_dir = tmp_path / "tfds"
    proc = subprocess.Popen([sys.executable, "-m", "vit_jax.data", "prepare", "--archive", source["archive"],
                             "--data_dir", str(data_dir), "--allow_checksum_mismatch"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((data_dir / "cifar10").glob("incomplete.*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # kill once tfds is writing the dataset: scratch and incomplete folders both exist
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(os.listdir(data_dir))
    assert any(n.startswith(prepare.SCRATCH_PREFIX) for n in left), left
    assert list((data_dir / "cifar10").glob("incomplete.*"))

    prepare.prepare(source["archive"], str(data_dir), allow_checksum_mismatch=True)
    assert os.listdir(data_dir) == ["cifar10"]
    assert [p.name for p in (data_dir / "cifar10").iterdir()] == [str(tfds.builder("cifar10").version)]
    _assert_same_data(source, data_dir=str(data_dir))
