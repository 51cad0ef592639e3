"""Shared test helpers: a small CIFAR-10 archive in the official binary layout, written on the spot."""

import atexit
import os
import shutil
import tarfile
import tempfile

# One compilation cache for the whole session, this process and every subprocess it starts (they
# inherit the environment): most tests run the same tiny model in a new process, and compiling it
# is a large part of such a process's time. Set before anything imports jax, removed at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vit_jax_test_jit_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

# One CPU device, unless a test asks for more (--cpu_devices, XLA_FLAGS): the commands' default of one
# per core would give the in-process runs as many devices as the first of them set up, whichever test
# that was. The default itself is tested in test_train.py, in processes of their own.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")

import importlib.abc
import importlib.machinery
import sys
import types

import numpy as np
import pytest

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _records(images, labels):
    # The official record: a label byte, then the red, green and blue planes, rows in order.
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels[:, None], planes], axis=1).tobytes()


def write_cifar_archive(out_dir, n_train_per_batch, n_test, seed):
    """Writes random CIFAR-10-like data as out_dir/cifar-10-binary.tar.gz and out_dir/cifar-10-batches-bin/.

    Returns {'archive', 'folder', 'train': (images, labels), 'test': (images, labels)} with images
    uint8 (N, 32, 32, 3) and labels uint8 (N,), in file order.
    """
    rng = np.random.default_rng(seed)

    def split(n):
        return rng.integers(0, 256, (n, 32, 32, 3), np.uint8), rng.integers(0, 10, n).astype(np.uint8)

    train = [split(n_train_per_batch) for _ in range(5)]
    test = split(n_test)
    folder = os.path.join(out_dir, "cifar-10-batches-bin")
    os.makedirs(folder, exist_ok=True)
    for i, (x, y) in enumerate(train):
        with open(os.path.join(folder, f"data_batch_{i + 1}.bin"), "wb") as f:
            f.write(_records(x, y))
    with open(os.path.join(folder, "test_batch.bin"), "wb") as f:
        f.write(_records(*test))
    with open(os.path.join(folder, "batches.meta.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n\n")
    archive = os.path.join(out_dir, "cifar-10-binary.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-bin")
    return {
        "archive": archive,
        "folder": folder,
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": test,
    }


# The files that take longest (CPU time on 2 cores, measured), longest first: the workers take
# files in this order (scripts/test.sh turns off xdist's own order, by number of tests), so that
# no long file starts last while the other workers have nothing left to do.
LONGEST_FIRST = ("test_distributed.py", "test_robustness.py", "test_train.py", "test_real_data.py",
                 "test_recipe.py", "test_parity.py", "test_inspect.py", "test_gpu_check.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests as written


@pytest.fixture(scope="session")
def small_cifar(tmp_path_factory):
    """A small archive: 5 x 12 train and 17 test examples."""
    return write_cifar_archive(str(tmp_path_factory.mktemp("cifar_archive")), 12, 17, seed=0)


@pytest.fixture(scope="session")
def cifar_archive(tmp_path_factory):
    """A small archive in the official format, 100 train and 32 test examples: for training runs
    that read it with --archive (numpy, no TensorFlow: the tfds path is tested in test_data)."""
    tmp = tmp_path_factory.mktemp("archive")
    write_cifar_archive(str(tmp), 20, 32, seed=1)
    return str(tmp / "cifar-10-binary.tar.gz")


# timm ------------------------------------------------------------------------------------------------


class _StandInMeta(type):
    def __getattr__(cls, name):  # class attributes read at import time: InterpolationMode.BICUBIC
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in(name)


def _stand_in(name: str):
    return _StandInMeta(name, (), {"__module__": "torchvision (test stand-in)"})


def _module_getattr(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _stand_in(name)


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `torchvision` and every `torchvision.X` as an empty package whose names are stand-in classes."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """timm, the independent reference of the fine-tuning tests. Test-only.

    timm 1.0.31 imports torchvision when it is imported (FrozenBatchNorm2d in timm/layers/create_norm.py,
    norm_act.py and utils/model.py; datasets and transforms in timm/data, which timm.models imports), and
    the only torchvision wheels on offer here are CUDA builds that fail to load beside the CPU torch
    (RuntimeError: operator torchvision::nms does not exist). The ViT uses none of it. So when the real
    torchvision cannot be imported, `torchvision` and its submodules (torchvision.ops.misc with its
    FrozenBatchNorm2d, torchvision.transforms, ...) become stand-ins, put in front of sys.meta_path before
    timm is imported. The product never imports timm except for `parity.convert --timm NAME`.
    """
    if "timm" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception:  # ImportError, or the RuntimeError of a build for another torch
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]  # what the failed import left half-made
            sys.meta_path.insert(0, _TorchvisionStandIn())
    import timm
    return timm


@pytest.fixture(scope="session")
def timm():
    """timm, imported as `import_timm` does."""
    return import_timm()
