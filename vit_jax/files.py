"""Plain files, safely: written whole or not at all, used by one process at a time, fingerprinted;
and a file given where a folder is wanted, refused.

The run folder (`workdir.py`), the data preparation (`prepare.py`) and the commands that write a
report all write through `atomic_open`; `lock` keeps a second process out of a folder in use; and
`sha256` is the fingerprint that checkpoint seals and the archive's checksum are made of.
"""

import contextlib
import fcntl
import hashlib
import os

from vit_jax.errors import UserError


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **open_args):
    """A file object whose contents appear at `path` only once it is complete and on disk."""
    tmp = f"{path}.tmp"
    with open(tmp, mode, **open_args) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path: str, text: str):
    with atomic_open(path) as f:
        f.write(text)


@contextlib.contextmanager
def lock(path: str, busy: str):
    """Holds an exclusive lock on the file `path` (it records who holds it) or refuses with `busy`, a
    message in which {owner} names the holder. The kernel drops the lock when its process dies, however
    it dies, so a lock left by a dead process does not block."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise UserError(busy.format(owner=f.read().strip() or "another process")) from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {os.uname().nodename}")
        f.flush()
        try:
            yield
        finally:
            os.remove(path)  # the folder is left as it was found (before the lock is let go: no one else holds it)


def check_data_dir(data_dir: str | None):
    """Refuses a --data_dir that is a file (before TensorFlow is imported): tfds would take it for a
    folder without the dataset, and its message would be about preparing or downloading it."""
    if data_dir is not None and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir} is a file, not a folder: give the folder that holds the prepared "
                        f"dataset (or is to hold it; it is created if missing), and an archive as --archive")


def sha256(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 in hex) of a file, read a megabyte at a time."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()
