"""CIFAR-10 input: tfds 'cifar10' as numpy arrays, one epoch's batches, and offline preparation.

This is the only module that imports TensorFlow and tensorflow-datasets (tfds); TensorFlow is kept
off the GPU, which belongs to JAX. `load_split` reads the stock tfds 'cifar10' dataset (tfds downloads
and prepares it where there is internet). Without internet, `prepare` builds the same stock dataset
from a local copy of the official archive:

    python -m vit_jax.data prepare --archive PATH/cifar-10-binary.tar.gz [--data_dir DIR]
"""

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import os
import socket
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zlib
from pathlib import Path
from unittest import mock

import numpy as np

from vit_jax.errors import UserError, cli


@contextlib.contextmanager
def _stderr_silenced():
    """Points file descriptor 2 at /dev/null for a moment.

    TensorFlow's import prints C++ notices (oneDNN) that TF_CPP_MIN_LOG_LEVEL does not reach; they
    would bury the one-line errors of the command line.
    """
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
with _stderr_silenced():
    import tensorflow as tf
    import tensorflow_datasets as tfds

try:
    # TensorFlow only reads files here; leave every accelerator to JAX.
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:
    pass  # TensorFlow already initialized its devices elsewhere; too late to hide them

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

FOLDER = "cifar-10-batches-bin"  # the archive's one folder
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"  # the class names, one a line
BATCH_FILES = TRAIN_FILES + (TEST_FILE,)
FILES = BATCH_FILES + (META_FILE,)
RECORD_BYTES = 1 + 32 * 32 * 3  # a label byte, then the red, green and blue planes
OFFICIAL_RECORDS = 10_000  # per batch file in the official release

EXPECTED = (f"expected cifar-10-binary.tar.gz (the official binary CIFAR-10 archive) or its extracted "
            f"folder {FOLDER}/ holding {', '.join(BATCH_FILES)} and {META_FILE}")

# The real download_and_prepare, to tell it from the no-op that tfds.testing.mock_data puts in its
# place (getattr_static: plain attribute access returns a new wrapper object every time).
_TFDS_DOWNLOAD_AND_PREPARE = inspect.getattr_static(tfds.core.DatasetBuilder, "download_and_prepare")


def _official():
    """(url, UrlInfo) that tfds registers for cifar10: the archive's url, sha256, size and file name."""
    ((url, info),) = tfds.builder_cls("cifar10").url_infos.items()
    return url, info


# ---------------------------------------------------------------------------------------------------
# Reading


def load_split(split: str, data_dir: str | None = None, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """tfds 'cifar10' split 'train' or 'test': images uint8 (N, 32, 32, 3), labels int32 (N,).

    limit: only the first `limit` examples. data_dir None: tfds's default ($TFDS_DATA_DIR or
    ~/tensorflow_datasets). The order is the one tfds stores, the same on every call.
    """
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; CIFAR-10 has 'train' and 'test'")
    if limit is not None and limit <= 0:
        raise UserError(f"limit must be positive, got {limit}")
    with _unreadable_data_is_a_user_error(data_dir):
        builder = tfds.builder("cifar10", data_dir=data_dir)
    if not _is_prepared(builder):
        _download(builder)
    with _unreadable_data_is_a_user_error(data_dir):
        # tfds answers a slice past the end with a bare ValueError; say it plainly. (Under
        # tfds.testing.mock_data the splits are unknown and the check after loading speaks instead.)
        splits = builder.info.splits
        if limit is not None and split in splits and limit > splits[split].num_examples:
            raise UserError(f"limit {limit} is larger than the {split} split ({splits[split].num_examples} examples)")
        ds = builder.as_dataset(split=split if limit is None else f"{split}[:{limit}]", as_supervised=True)
        if limit is not None:
            ds = ds.take(limit)  # tfds.testing.mock_data ignores the slice
        images, labels = [], []
        for x, y in tfds.as_numpy(ds.batch(10_000)):
            images.append(x)
            labels.append(y.astype(np.int32))
        images, labels = np.concatenate(images), np.concatenate(labels)
    if limit is not None and len(labels) < limit:
        raise UserError(f"limit {limit} is larger than the {split} split ({len(labels)} examples)")
    return images, labels


@contextlib.contextmanager
def _unreadable_data_is_a_user_error(data_dir):
    """Damaged prepared files (truncated, edited, half deleted) become one message that says what to do."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # protobuf, tf.errors, OSError...: to the user they all mean the same
        where = os.path.join(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"), "cifar10")
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise UserError(f"the prepared CIFAR-10 in {where} cannot be read ({reason}): delete that folder and "
                        f"prepare it again (python -m vit_jax.data prepare --archive PATH --data_dir DIR)") from None


def _is_prepared(builder) -> bool:
    # is_prepared() logs a warning for a folder that does not exist yet; ask it only when there is one.
    return builder.data_path.exists() and builder.is_prepared()


def _download(builder) -> None:
    """Lets tfds download and prepare cifar10; when it can't, says how to prepare it offline."""
    root = builder.data_dir_root
    try:
        if inspect.getattr_static(type(builder), "download_and_prepare") is _TFDS_DOWNLOAD_AND_PREPARE:
            _check_reachable(_official()[0])
        builder.download_and_prepare()
    except Exception as e:  # any failure here means the same to the user: no data, and no way to fetch it
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise UserError(
            f"CIFAR-10 is not prepared in {root} and could not be downloaded ({reason}). Without internet, "
            f"prepare it from a copy of the official archive: python -m vit_jax.data prepare "
            f"--archive PATH/cifar-10-binary.tar.gz --data_dir {root}") from None


def _check_reachable(url: str, timeout: float = 5.0) -> None:
    """Raises OSError unless the url's host (or the https proxy) accepts a connection within `timeout`.

    Offline, tfds would retry the download ten times with growing pauses: over three minutes of silence.
    """
    proxy = urllib.request.getproxies().get("https")
    target = urllib.parse.urlsplit(proxy or url)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    outcome = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    # A thread, because the name lookup inside create_connection has no timeout of its own.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise OSError(f"no answer from {host} within {timeout:g} s")
    if outcome[0] is not None:
        raise OSError(f"cannot reach {host}: {outcome[0]}")


# ---------------------------------------------------------------------------------------------------
# Batching


def num_batches(num_examples: int, batch_size: int) -> int:
    """Batches in one epoch; the last, partial one counts (782 for 50000 examples in batches of 64)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return -(-num_examples // batch_size)


def epoch_batches(images, labels, batch_size, *, seed=None, epoch=0, start=0):
    """Yields one epoch as (images, labels int32, mask float32) numpy batches of exactly batch_size.

    Shuffled when seed is given, in an order that depends on (seed, epoch) alone, so a resumed run
    sees the same batches. The last batch is padded with zeros and mask 0, so every batch has one
    shape (one compilation) and no example is dropped. start: skip the first `start` batches.
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    if start < 0:
        raise ValueError(f"start must be non-negative, got {start}")
    order = np.arange(n) if seed is None else np.random.default_rng([seed, epoch]).permutation(n)
    for b in range(start, num_batches(n, batch_size)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        x, y = images[idx], np.asarray(labels[idx], np.int32)
        mask = np.ones(batch_size, np.float32)
        if len(idx) < batch_size:
            pad = batch_size - len(idx)
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(pad, np.int32)])
            mask[len(idx):] = 0.0
        yield x, y, mask


# ---------------------------------------------------------------------------------------------------
# Offline preparation


def prepare(archive: str, data_dir: str | None = None, allow_checksum_mismatch: bool = False) -> str:
    """Builds the stock tfds 'cifar10' in data_dir from a local copy of the official archive.

    archive: cifar-10-binary.tar.gz, or its extracted folder (cifar-10-batches-bin or a folder holding
    it). The archive must have the official sha256; a folder, which has no checksum, the official
    layout and sizes. A copy that differs is refused unless allow_checksum_mismatch. Returns the
    data_dir used, from which tfds.load('cifar10', data_dir=...) then reads with no network.
    """
    path = Path(archive).expanduser()
    if not path.exists():
        raise UserError(f"{archive} does not exist; {EXPECTED}")
    builder = tfds.builder("cifar10", data_dir=data_dir)
    root = builder.data_dir_root
    if _is_prepared(builder):
        print(f"CIFAR-10 is already prepared in {root}; delete {builder.data_dir} to prepare it again")
        return str(root)

    url, official = _official()
    if path.is_dir():
        folder = path / FOLDER if (path / FOLDER).is_dir() else path
        _verify_folder(folder, allow_checksum_mismatch)
        trusted = False  # what tfds gets is a .tar.gz packed here, whose checksum is nobody's
    else:
        trusted = _verify_archive(path, official, allow_checksum_mismatch)

    # tfds takes the archive the way it takes a file downloaded by hand: from its manual_dir, under
    # the registered file name. Its downloads and extraction go to scratch, on the same disk.
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tmp-vit_jax-prepare-", dir=root) as scratch:
        manual = Path(scratch, "manual")
        manual.mkdir()
        staged = manual / official.filename
        if path.is_dir():
            _pack(folder, staged)
        else:
            staged.symlink_to(path.resolve())
        config = tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)
        with contextlib.nullcontext() if trusted else _accept_checksum(builder, url, official, staged):
            builder.download_and_prepare(download_dir=scratch, download_config=config)
    return str(root)


def _verify_archive(path: Path, official, allowed: bool) -> bool:
    """Whether path is the official archive; if not, checks its layout and refuses it unless allowed."""
    size, sha256 = _sha256(path)
    if (size, sha256) == (official.size, official.checksum):
        return True
    _check_archive(path)  # a wrong layout says more than a wrong checksum
    _mismatch(path, f"expected sha256 {official.checksum} and {int(official.size)} bytes, found sha256 "
                    f"{sha256} and {size} bytes", allowed)
    return False


def _verify_folder(folder: Path, allowed: bool) -> None:
    """Checks the layout; a folder has no checksum, so other sizes than the official ones count as a mismatch."""
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}; {EXPECTED}")
    counts = {name: _check_file(name, (folder / name).read_bytes(), folder) for name in FILES}
    if all(counts[name] == OFFICIAL_RECORDS for name in BATCH_FILES):
        print(f"note: {folder} is a folder, which has no checksum to verify; its layout and sizes match "
              f"the official release")
    else:
        found = ", ".join(f"{counts[name]} in {name}" for name in BATCH_FILES)
        _mismatch(folder, f"expected {OFFICIAL_RECORDS} records in each batch file, found {found}", allowed)


def _accept_checksum(builder, url, official, archive: Path):
    """Makes tfds take an archive whose checksum is not the registered one, for a `with` block.

    tfds checks every download against the checksum its builder class registers, and has no public
    switch to accept another (register_checksums would rewrite a file inside the installed package).
    So the class's `url_infos` is replaced by the archive's own, for the duration only.
    """
    size, sha256 = _sha256(archive)
    info = dataclasses.replace(official, size=size, checksum=sha256)
    return mock.patch.object(type(builder), "url_infos", {url: info})


def _mismatch(what, detail: str, allowed: bool) -> None:
    if not allowed:
        raise UserError(f"{what} is not the official CIFAR-10 release: {detail}. If you trust this copy, "
                        f"run again with --allow_checksum_mismatch to use it anyway")
    print(f"warning: {what} is not the official CIFAR-10 release ({detail}); using it because of "
          f"--allow_checksum_mismatch", file=sys.stderr)


def _check_file(name: str, data: bytes, where) -> int:
    """Checks one file of the layout; returns its number of records (0 for the class names)."""
    if name == META_FILE:
        # Parsed as tfds parses it: lines, the empty ones skipped.
        names = tuple(line for line in data.decode("utf-8", "replace").split("\n") if line)
        if names != CLASS_NAMES:
            raise UserError(f"{where}/{name} lists {', '.join(names[:12]) or 'nothing'}; expected the CIFAR-10 "
                            f"classes {', '.join(CLASS_NAMES)}")
        return 0
    if not data or len(data) % RECORD_BYTES:
        raise UserError(f"{where}/{name} has {len(data)} bytes, not a whole number of {RECORD_BYTES}-byte "
                        f"records (a label byte and 32x32x3 pixels); {EXPECTED}")
    top = int(np.frombuffer(data, np.uint8)[::RECORD_BYTES].max())
    if top >= len(CLASS_NAMES):
        raise UserError(f"{where}/{name} holds label {top}; CIFAR-10 labels are 0 to 9; {EXPECTED}")
    return len(data) // RECORD_BYTES


def _check_archive(path: Path) -> None:
    """Checks the layout inside a .tar.gz."""
    counts = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                folder, _, name = os.path.normpath(member.name).rpartition("/")
                if folder == FOLDER and name in FILES and member.isfile():
                    counts[name] = _check_file(name, tar.extractfile(member).read(), f"{path}:{FOLDER}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(f"{path} is not a readable .tar.gz archive ({e}); {EXPECTED}") from None
    missing = [f"{FOLDER}/{name}" for name in FILES if name not in counts]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; {EXPECTED}")


def _pack(folder: Path, out: Path) -> None:
    """Writes the layout of folder as a .tar.gz, the only form tfds takes; stored, not compressed."""
    with tarfile.open(out, "w:gz", compresslevel=0) as tar:
        for name in FILES:
            tar.add(folder / name, arcname=f"{FOLDER}/{name}")


def _sha256(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Command line


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vit_jax.data", description="CIFAR-10 for tfds, offline.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="prepare tfds 'cifar10' from a local copy of the official archive")
    p.add_argument("--archive", required=True,
                   help="cifar-10-binary.tar.gz, or its extracted folder cifar-10-batches-bin")
    p.add_argument("--data_dir", default=None,
                   help="tfds data directory to write (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--allow_checksum_mismatch", action="store_true",
                   help="go on, with a warning, when the copy is not byte for byte the official release")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    root = prepare(args.archive, args.data_dir, args.allow_checksum_mismatch)
    builder = tfds.builder("cifar10", data_dir=root)
    splits = builder.info.splits
    print(f"CIFAR-10 (tfds cifar10 {builder.version}) is in {root}: {splits['train'].num_examples} train and "
          f"{splits['test'].num_examples} test examples ({time.perf_counter() - started:.0f} s). "
          f"Train with --data_dir {root}")


if __name__ == "__main__":
    main()
