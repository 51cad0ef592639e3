"""The devices a run computes on: one 'data' mesh over all of them, and how batches reach it.

The batch is sharded over the mesh's 'data' axis and the parameters are replicated; XLA inserts the
gradient all-reduce. One device is just a mesh of one.
"""

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """All local devices on one 'data' axis, with the shardings the steps use."""

    batch: NamedSharding  # leading axis split over the devices
    replicated: NamedSharding  # a whole copy on every device

    @classmethod
    def create(cls, batch_size: int) -> "DataParallel":
        n = jax.local_device_count()
        if batch_size % n:
            raise UserError(f"batch_size {batch_size} cannot be split over {n} devices: "
                            f"use a multiple of {n}")
        # Auto axes: XLA propagates the batch sharding and inserts the collectives itself.
        mesh = jax.make_mesh((n,), ("data",), devices=jax.local_devices(),
                             axis_types=(jax.sharding.AxisType.Auto,))
        return cls(NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))

    def put_batch(self, *arrays):
        return tuple(jax.device_put(np.asarray(a), self.batch) for a in arrays)

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)


def describe_devices() -> str:
    """The devices in words, for logs and summaries: '2 x cpu (2 cores, no accelerator)', '1 x NVIDIA H200 (...)'."""
    devices = jax.local_devices()
    d = devices[0]
    if d.platform == "cpu":
        return f"{len(devices)} x cpu ({os.cpu_count()} cores, no accelerator)"
    memory = (d.memory_stats() or {}).get("bytes_limit", 0) / 2**30
    return f"{len(devices)} x {d.device_kind}" + (f" ({memory:.1f} GiB)" if memory else "")
