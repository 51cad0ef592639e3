"""The devices a run computes on: one 'data' mesh over all of them, and how batches reach it.

The mesh spans every device of every process (`distributed.py` starts them). The batch is sharded
over its 'data' axis and the parameters are replicated; XLA inserts the gradient all-reduce. Every
process holds the same global batch on the host and puts only its own rows on its own devices, so
a run gives the results of one process with the same devices. One device is just a mesh of one.
"""

import dataclasses
import hashlib
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import distributed
from vit_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """All devices of all processes on one 'data' axis, with the shardings the steps use."""

    batch: NamedSharding  # leading axis split over the devices
    replicated: NamedSharding  # a whole copy on every device

    @classmethod
    def create(cls, batch_size: int) -> "DataParallel":
        n = jax.device_count()
        if batch_size % n:
            where = f"{n} devices" + (f" of {jax.process_count()} processes" if jax.process_count() > 1 else "")
            raise UserError(f"batch_size {batch_size} cannot be split over {where}: use a multiple of {n}")
        # Auto axes: XLA propagates the batch sharding and inserts the collectives itself.
        mesh = jax.make_mesh((n,), ("data",), devices=jax.devices(), axis_types=(jax.sharding.AxisType.Auto,))
        return cls(NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))

    def local_rows(self, batch_size: int) -> slice:
        """The rows of a global batch that this process's devices hold (all of them with one process)."""
        spans = [index[0].indices(batch_size)[:2] for index in
                 self.batch.addressable_devices_indices_map((batch_size,)).values()]
        return slice(min(s for s, _ in spans), max(e for _, e in spans))

    def put_batch(self, *arrays):
        """Global host arrays (the same in every process) -> arrays sharded over the mesh."""
        if jax.process_count() == 1:
            return tuple(jax.device_put(np.asarray(a), self.batch) for a in arrays)
        rows = self.local_rows(len(arrays[0]))
        return tuple(jax.make_array_from_process_local_data(self.batch, np.asarray(a)[rows], np.shape(a))
                     for a in arrays)

    def replicate(self, tree):
        """A copy of `tree` (the same in every process) on every device."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)
        # Each process fills its own devices from its host copy. jax.device_put would first check
        # every leaf against the other processes, a collective per leaf (seconds for a model's
        # state); one fingerprint of the whole tree checks the same in one.
        tree = jax.device_get(tree)
        if not distributed.same_in_every_process(_fingerprint(tree)):
            raise UserError("the processes hold different parameters or state (different --init_from files, or "
                            "different checkpoints in the workdir?): every process must see the same files")
        return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), self.replicated,
                                                                   lambda index: np.asarray(x)[index]), tree)


CPU_DEVICES_HELP = ("on a CPU, the XLA devices the batch is split over, as in training (default 0: one per core "
                    "that divides the batch; 1: one device)")


def split_cpu(cpu_devices: int, batch_size: int):
    """Before JAX starts: sets the XLA devices a CPU splits into (`--cpu_devices`; 0: one per core, as
    many as divide the batch), unless the environment already says (JAX_NUM_CPU_DEVICES, or
    XLA_FLAGS's --xla_force_host_platform_device_count). XLA:CPU runs each matmul fusion on one thread:
    with a device per core, each core takes a share of every batch, as GPUs do (docs/benchmarks.md).
    Accelerators are not affected."""
    if cpu_devices < 0:
        raise UserError(f"--cpu_devices must be 0 (one per core) or positive, got {cpu_devices}")
    if not cpu_devices and ("JAX_NUM_CPU_DEVICES" in os.environ
                            or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = cpu_devices or max(d for d in range(1, cores + 1) if batch_size % d == 0)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX has started (a call from Python that ran JAX before): its devices stay
        if cpu_devices and jax.default_backend() == "cpu" and jax.local_device_count() != cpu_devices:
            raise UserError(f"--cpu_devices {cpu_devices} must be set before JAX starts: pass it to a fresh process")


def _fingerprint(tree) -> np.ndarray:
    """32 bytes that differ, in practice, between any two trees of host arrays that differ."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        leaf = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return np.frombuffer(digest.digest(), np.uint8)


def describe_devices() -> str:
    """The devices in words, for logs and summaries: '2 x cpu (2 cores, no accelerator)', '1 x NVIDIA H200 (...)'."""
    devices = jax.local_devices()
    d = devices[0]
    processes = f"{jax.process_count()} processes x " if jax.process_count() > 1 else ""
    if d.platform == "cpu":
        return f"{processes}{len(devices)} x cpu ({os.cpu_count()} cores, no accelerator)"
    memory = (d.memory_stats() or {}).get("bytes_limit", 0) / 2**30
    return f"{processes}{len(devices)} x {d.device_kind}" + (f" ({memory:.1f} GiB)" if memory else "")
