"""The official CIFAR-10 archive (`cifar-10-binary.tar.gz`), read with numpy alone.

    cifar-10-batches-bin/data_batch_1.bin ... data_batch_5.bin   the 50,000 training images
    cifar-10-batches-bin/test_batch.bin                           the 10,000 test images
    cifar-10-batches-bin/batches.meta.txt                         the class names, one a line

Each .bin file is a run of 3073-byte records: a label byte, then the red, green and blue planes of
a 32x32 image, rows in order. This module checks that layout (for `prepare` and for reading) and
reads the splits, in file order, with no TensorFlow: the data source of `--archive PATH`.
"""

import os
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np

from vit_jax.errors import UserError

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FOLDER = "cifar-10-batches-bin"  # the archive's one folder
SPLIT_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
BATCH_FILES = SPLIT_FILES["train"] + SPLIT_FILES["test"]
META_FILE = "batches.meta.txt"
FILES = BATCH_FILES + (META_FILE,)
SIDE = 32
RECORD_BYTES = 1 + SIDE * SIDE * 3
OFFICIAL_RECORDS = 10_000  # per batch file in the official release
# The official release, as tensorflow-datasets registers it (url_infos of its cifar10 builder).
OFFICIAL_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
OFFICIAL_SIZE = 170_052_171

EXPECTED = (f"expected cifar-10-binary.tar.gz (the official binary CIFAR-10 archive) or its extracted "
            f"folder {FOLDER}/ holding {', '.join(BATCH_FILES)} and {META_FILE}")


def check_file(name: str, data: bytes, where) -> int:
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


def folder_of(path: Path) -> Path | None:
    """The cifar-10-batches-bin folder that `path` is or holds; None for a file (an archive)."""
    if not path.is_dir():
        return None
    return path / FOLDER if (path / FOLDER).is_dir() else path


def read_files(path: str | Path) -> dict[str, bytes]:
    """{file name: contents} of the layout's files, from a .tar.gz or a folder, each checked."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist; {EXPECTED}")
    folder = folder_of(path)
    if folder is not None:
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise UserError(f"{folder} lacks {', '.join(missing)}; {EXPECTED}")
        contents, where = {name: (folder / name).read_bytes() for name in FILES}, folder
    else:
        contents, where = {}, f"{path}:{FOLDER}"
        try:
            with tarfile.open(path, "r:gz") as tar:
                for member in tar:
                    parent, _, name = os.path.normpath(member.name).rpartition("/")
                    if parent == FOLDER and name in FILES and member.isfile():
                        contents[name] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise UserError(f"{path} is not a readable .tar.gz archive ({e}); {EXPECTED}") from None
        missing = [f"{FOLDER}/{name}" for name in FILES if name not in contents]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}; {EXPECTED}")
    for name, data in contents.items():
        check_file(name, data, where)
    return contents


def decode(records: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Records -> images uint8 (N, 32, 32, 3), labels int32 (N,)."""
    flat = np.frombuffer(records, np.uint8).reshape(-1, RECORD_BYTES)
    images = flat[:, 1:].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)  # planes -> NHWC
    return np.ascontiguousarray(images), flat[:, 0].astype(np.int32)


def load_split(path: str, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split 'train' or 'test' of the archive (or its folder), in file order; limit: the first N."""
    contents = read_files(path)
    images, labels = decode(b"".join(contents[name] for name in SPLIT_FILES[split]))
    if limit is not None:
        if limit > len(labels):
            raise UserError(f"limit {limit} is larger than the {split} split ({len(labels)} examples)")
        images, labels = images[:limit], labels[:limit]
    return images, labels


def mismatch(what, detail: str, allowed: bool) -> None:
    """Refuses a copy that is not the official release, or with `allowed` warns and goes on."""
    if not allowed:
        raise UserError(f"{what} is not the official CIFAR-10 release: {detail}. If you trust this copy, "
                        f"run again with --allow_checksum_mismatch to use it anyway")
    print(f"warning: {what} is not the official CIFAR-10 release ({detail}); using it because of "
          f"--allow_checksum_mismatch", file=sys.stderr)
