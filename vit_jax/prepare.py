"""Offline preparation: the stock tfds 'cifar10' dataset built from a local copy of the archive.

    python -m vit_jax.data prepare --archive PATH/cifar-10-binary.tar.gz [--data_dir DIR]

tfds takes the archive the way it takes a file downloaded by hand, from its manual_dir; its
downloads and extraction go to a scratch folder beside the dataset. One prepare runs at a time per
data_dir (a lock), and each one first removes what a killed one left behind (its scratch folder,
tfds's incomplete.* folders), so a successful prepare leaves nothing but the dataset.
"""

import contextlib
import dataclasses
import errno
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from vit_jax import archive, files
from vit_jax.errors import CommandParser, UserError, cli

# tfds_data (TensorFlow, seconds to import) is imported where it is used, after the arguments are
# checked: a wrong path is one line at once, not after TensorFlow's start-up.

SCRATCH_PREFIX = "tmp-vit_jax-prepare-"
LOCK = ".vit_jax-prepare.lock"


def prepare(source: str, data_dir: str | None = None, allow_checksum_mismatch: bool = False) -> str:
    """Builds the stock tfds 'cifar10' in data_dir from a local copy of the official archive.

    source: cifar-10-binary.tar.gz, or its extracted folder (cifar-10-batches-bin or a folder holding
    it). The archive must have the official sha256; a folder, which has no checksum, the official
    layout and sizes. A copy that differs is refused unless allow_checksum_mismatch. Returns the
    data_dir used, from which tfds.load('cifar10', data_dir=...) then reads with no network.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source} does not exist; {archive.EXPECTED}")
    files.check_data_dir(data_dir)
    from vit_jax import tfds_data

    builder = tfds_data.builder(data_dir)
    root = Path(builder.data_dir_root)
    if tfds_data.is_prepared(builder):
        print(f"CIFAR-10 is already prepared in {root}; delete {builder.data_dir} to prepare it again")
        return str(root)

    url, official = tfds_data.official_url_info()
    folder = archive.folder_of(path)
    if folder is not None:
        _verify_folder(folder, allow_checksum_mismatch)
    else:
        accepted = _verify_archive(path, allow_checksum_mismatch)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _exclusive(root), tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=root) as scratch:
            manual = Path(scratch, "manual")
            manual.mkdir()
            staged = manual / official.filename
            if folder is not None:
                _pack(folder, staged)
                accepted = files.sha256(staged)  # packed here: nobody's checksum
            else:
                staged.symlink_to(path.resolve())
            if accepted is not None:  # tfds must be told the copy's checksum
                size, sha256 = accepted
                builder = _accepting(dataclasses.replace(official, size=size, checksum=sha256), url, data_dir)
            config = tfds_data.tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)
            builder.download_and_prepare(download_dir=scratch, download_config=config)
    except Exception as e:  # the scratch folder, the lock and tfds's incomplete folder are gone by now
        problem = _disk_problem(e, root, from_folder=folder is not None)
        if problem is None:
            raise
        raise problem from None
    return str(root)


# Disk use of a prepare of the official CIFAR-10 from its archive, measured (tfds 4.9): at the peak, the
# archive extracted in the scratch folder (184 MB) and the dataset tfds writes (142 MB, which stays).
# A folder is first packed into an archive in the scratch folder: 184 MB more.
PEAK_BYTES, KEPT_BYTES, PACKED_BYTES = 303_000_000, 142_000_000, 184_400_000

# What the disk said, as errno and as the words that a wrapped error (tfds's ExtractError, a
# TensorFlow file error) keeps of it when it does not keep the OSError itself.
UNWRITABLE = {errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied",
              errno.EPERM: "Operation not permitted"}
FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}


def _disk_error(error: BaseException, errnos: dict[int, str]) -> int | None:
    """The errno among `errnos` behind `error`, however many exceptions wrap it; None if none is."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in errnos:
            return error.errno
        found = [n for n, words in errnos.items() if words in str(error)]
        if found:
            return found[0]
        error = error.__cause__ or error.__context__
    return None


def _disk_problem(error: BaseException, root: Path, from_folder: bool) -> UserError | None:
    """One line for a data_dir that cannot be written or that filled up, else None."""
    n = _disk_error(error, UNWRITABLE)
    if n is not None:
        return UserError(f"cannot write to {root} ({UNWRITABLE[n]}): choose another --data_dir")
    if _disk_error(error, FULL) is not None:
        need = (PEAK_BYTES + (PACKED_BYTES if from_folder else 0)) / 1e6
        return UserError(f"the disk of {root} is full: preparing CIFAR-10 needs about {need:,.0f} MB free there "
                         f"while it runs ({KEPT_BYTES / 1e6:,.0f} MB stay). What it wrote is removed; free some "
                         f"space, or choose another --data_dir, and run the same command again")
    return None


def _accepting(info, url: str, data_dir: str | None):
    """The stock cifar10 builder, but taking `info` (the copy's size and sha256) as its archive's.

    tfds checks every file against the checksum its builder class registers and has no switch to
    take another (register_checksums would rewrite a file inside the installed package). Subclassing
    a builder is its public way to change one: this one differs from the stock class in `url_infos`
    alone, keeps its name (so the data lands in, and is read from, DATA_DIR/cifar10) and is not
    registered. Written against tfds 4.9, where `url_infos` is a class property of the builder.
    """
    from vit_jax import tfds_data

    stock = tfds_data.tfds.builder_cls("cifar10")
    copy = type("Cifar10Copy", (stock,), {"name": stock.name, "url_infos": {url: info}, "__module__": stock.__module__},
                skip_registration=True)
    return copy(data_dir=data_dir)


@contextlib.contextmanager
def _exclusive(root: Path):
    """Holds the data_dir's prepare lock, and removes what a killed prepare left behind."""
    with files.lock(str(root / LOCK), f"another prepare ({{owner}}) is running in {root}: wait for it to finish"):
        leftovers = list(root.glob(SCRATCH_PREFIX + "*")) + list((root / "cifar10").glob("incomplete.*"))
        for path in leftovers:  # no prepare holds the lock: these are a dead one's
            shutil.rmtree(path, ignore_errors=True)
        if leftovers:
            print(f"removed {len(leftovers)} folder(s) an interrupted prepare left in {root}")
        yield


def _verify_archive(path: Path, allowed: bool) -> tuple[int, str] | None:
    """None for the official archive; for another, checks its layout, refuses it unless allowed, and
    returns its (size, sha256)."""
    size, sha256 = files.sha256(path)
    if (size, sha256) == (archive.OFFICIAL_SIZE, archive.OFFICIAL_SHA256):
        return None
    archive.read_files(path)  # a wrong layout says more than a wrong checksum
    archive.mismatch(path, f"expected sha256 {archive.OFFICIAL_SHA256} and {archive.OFFICIAL_SIZE} bytes, found "
                           f"sha256 {sha256} and {size} bytes", allowed)
    return size, sha256


def _verify_folder(folder: Path, allowed: bool) -> None:
    """Checks the layout; a folder has no checksum, so other sizes than the official ones count as a mismatch."""
    contents = archive.read_files(folder)
    counts = {name: len(contents[name]) // archive.RECORD_BYTES for name in archive.BATCH_FILES}
    if all(n == archive.OFFICIAL_RECORDS for n in counts.values()):
        print(f"note: {folder} is a folder, which has no checksum to verify; its layout and sizes match "
              f"the official release")
    else:
        found = ", ".join(f"{n} in {name}" for name, n in counts.items())
        archive.mismatch(folder, f"expected {archive.OFFICIAL_RECORDS} records in each batch file, found {found}",
                         allowed)


def _pack(folder: Path, out: Path) -> None:
    """Writes the layout of folder as a .tar.gz, the only form tfds takes; stored, not compressed."""
    with tarfile.open(out, "w:gz", compresslevel=0) as tar:
        for name in archive.FILES:
            tar.add(folder / name, arcname=f"{archive.FOLDER}/{name}")


@cli
def main(argv=None):
    parser = CommandParser(prog="python -m vit_jax.data", description="CIFAR-10 for tfds, offline.")
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
    from vit_jax import tfds_data

    builder = tfds_data.builder(root)
    splits = builder.info.splits
    print(f"CIFAR-10 (tfds cifar10 {builder.version}) is in {root}: {splits['train'].num_examples} train and "
          f"{splits['test'].num_examples} test examples ({time.perf_counter() - started:.0f} s). "
          f"Train with --data_dir {root}")
