"""CIFAR-10 through tensorflow-datasets (tfds): the one module that imports TensorFlow.

`load_split` reads the stock tfds 'cifar10' dataset; where it is not prepared yet, tfds downloads
and prepares it if the internet can be reached, and otherwise the error says how to prepare it from
a local copy of the archive (`python -m vit_jax.data prepare`, in `prepare.py`). TensorFlow only
reads files here and is kept off the GPU, which belongs to JAX.
"""

import contextlib
import os
import socket
import sys
import threading
import urllib.parse
import urllib.request

import numpy as np

from vit_jax.errors import UserError, reason


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
    tf.config.set_visible_devices([], "GPU")  # leave every accelerator to JAX
except RuntimeError:
    pass  # TensorFlow already initialized its devices elsewhere; too late to hide them


def builder(data_dir: str | None):
    return tfds.builder("cifar10", data_dir=data_dir)


def official_url_info():
    """(url, UrlInfo) that tfds registers for cifar10: the archive's url, sha256, size and file name."""
    ((url, info),) = tfds.builder_cls("cifar10").url_infos.items()
    return url, info


def is_prepared(b) -> bool:
    # is_prepared() logs a warning for a folder that does not exist yet; ask it only when there is one.
    return b.data_path.exists() and b.is_prepared()


def load_split(split: str, data_dir: str | None = None, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """tfds 'cifar10' split 'train' or 'test': images uint8 (N, 32, 32, 3), labels int32 (N,).

    In the archive's file order (tfds stores the examples shuffled; each keeps its index in its id,
    'train_00042'), so both sources give the same arrays. limit: only the first `limit` examples.
    data_dir None: tfds's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    """
    with _unreadable_data_is_a_user_error(data_dir):
        b = builder(data_dir)
    if not is_prepared(b):
        _download(b)
    with _unreadable_data_is_a_user_error(data_dir):
        ids, images, labels = [], [], []
        for batch in tfds.as_numpy(b.as_dataset(split=split).batch(10_000)):
            ids += [int(i.rsplit(b"_", 1)[1]) for i in batch["id"]]
            images.append(batch["image"])
            labels.append(batch["label"].astype(np.int32))
    order = np.argsort(ids)
    images, labels = np.concatenate(images)[order], np.concatenate(labels)[order]
    if limit is not None:
        if limit > len(labels):
            raise UserError(f"limit {limit} is larger than the {split} split ({len(labels)} examples)")
        images, labels = images[:limit], labels[:limit]
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
        raise UserError(f"the prepared CIFAR-10 in {where} cannot be read ({reason(e, last=True)}): delete that "
                        f"folder and prepare it again (python -m vit_jax.data prepare --archive PATH --data_dir "
                        f"DIR)") from None


def _download(b) -> None:
    """Lets tfds download and prepare cifar10; when it can't, says how to prepare it offline."""
    root = b.data_dir_root
    try:
        check_reachable(official_url_info()[0])
        b.download_and_prepare()
    except Exception as e:  # any failure here means the same to the user: no data, and no way to fetch it
        raise UserError(
            f"CIFAR-10 is not prepared in {root} and could not be downloaded ({reason(e)}). Without internet, "
            f"prepare it from a copy of the official archive: python -m vit_jax.data prepare "
            f"--archive PATH/cifar-10-binary.tar.gz --data_dir {root}, or train from the archive itself "
            f"with --archive PATH") from None


def check_reachable(url: str, timeout: float = 5.0) -> None:
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
