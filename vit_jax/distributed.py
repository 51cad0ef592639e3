"""Many processes, one run: jax.distributed's start-up, the processes' agreement, and failing in one line.

    python -m vit_jax.train --coordinator_address HOST:PORT --num_processes N --process_id I [flags]

(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; or, with none of them, what SLURM
or Open MPI tells jax). Every process runs the same command; process 0 hosts the coordinator. Each
one then sees every device of every process in one mesh (`devices.py`), feeds its own rows of each
global batch, and takes part in every checkpoint; process 0 alone writes the workdir's other files.
Which processes a run has, and the supervisor each one trains under, are `processes.py`'s.
"""

import dataclasses
import json
import os
import re
import socket
import sys
import time

import jax

from vit_jax.config import ModelConfig, TrainConfig, to_dict
from vit_jax.errors import UserError
from vit_jax.processes import EXIT_PEER_LOST, RERUN, Topology

INIT_TIMEOUT = 120  # seconds to wait for every process to join


def start(cfg: TrainConfig, t: Topology) -> TrainConfig:
    """jax.distributed.initialize, within bounded waits; returns cfg with the job's process count and index."""
    if t.explicit:
        host, _, port = t.address.rpartition(":")
        if not (port.isdigit() and 0 < int(port) < 65536):
            raise UserError(f"--coordinator_address {t.address!r} is not HOST:PORT (a port is 1 to 65535)")
        if t.process_id == 0:
            _check_port_free(int(port))
        else:
            _wait_for_coordinator(host, int(port), cfg.heartbeat_timeout)
        print(f"Process {t.process_id} of {t.num_processes}: joining {t.address}", flush=True)
    try:
        jax.distributed.initialize(
            t.address, t.num_processes, t.process_id, initialization_timeout=INIT_TIMEOUT,
            cluster_detection_method="deactivate" if t.explicit else None,
            heartbeat_timeout_seconds=cfg.heartbeat_timeout, shutdown_timeout_seconds=cfg.heartbeat_timeout)
    except Exception as e:  # a cluster jax does not recognize, or a coordinator that refuses
        raise UserError(f"jax.distributed.initialize failed ({type(e).__name__}: {e}): pass --coordinator_address, "
                        f"--num_processes and --process_id") from None
    if t.num_processes is not None and jax.process_count() != t.num_processes:
        raise UserError(f"{jax.process_count()} processes joined, but --num_processes says {t.num_processes}")
    return dataclasses.replace(cfg, num_processes=jax.process_count(), process_id=jax.process_index())


def _check_port_free(port: int):
    """Process 0 serves the coordinator on `port`; a port in use would crash it in C++, so say so first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise UserError(f"process 0 cannot serve the coordinator on port {port} ({e.strerror}): choose another "
                            f"port in --coordinator_address, the same for every process") from None


def _wait_for_coordinator(host: str, port: int, timeout: float):
    """Waits until process 0's coordinator accepts connections, at most `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=5).close()
            return
        except OSError as e:
            if time.time() > deadline:
                raise UserError(f"the coordinator {host}:{port} cannot be reached after {timeout:g} s ({e.strerror or e}): "
                                f"is process 0 running, with the same --coordinator_address, and can this host "
                                f"reach that one?") from None
            time.sleep(1)


def agree(cfg: TrainConfig, model_cfg: ModelConfig):
    """Refuses, on every process alike, settings that differ between the processes (naming the fields).

    Fields that may differ per process are left out: which one it is, where its data lies."""
    if jax.process_count() == 1:
        return
    from jax._src.distributed import global_state  # the key-value store jax's processes share

    client, me = global_state.client, jax.process_index()
    per_process = {"process_id", "coordinator_address", "data_dir", "archive", "log_every", "tensorboard"}
    mine = {k: v for section in to_dict(cfg, model_cfg).values() for k, v in section.items() if k not in per_process}
    client.key_value_set(f"vit_jax/settings/{me}", json.dumps(mine, sort_keys=True))
    client.wait_at_barrier("vit_jax/settings/published", INIT_TIMEOUT * 1000)
    everyone = {int(k.rsplit("/", 1)[1]): json.loads(v) for k, v in client.key_value_dir_get("vit_jax/settings/")}
    client.wait_at_barrier("vit_jax/settings/read", INIT_TIMEOUT * 1000)  # all have read before any may exit
    diff = [f"{k}: {everyone[0][k]!r} in process 0, {s[k]!r} in process {p}"
            for p, s in sorted(everyone.items()) for k in sorted(s) if s[k] != everyone[0].get(k)]
    if diff:
        raise UserError(f"the processes were started with different settings ({'; '.join(diff[:6])}"
                        f"{'; ...' if len(diff) > 6 else ''}): start every process with the same flags")


def same_everywhere(value):
    """Process 0's `value` (a small JSON value) in every process: for what each one measured for itself,
    like the length a --time_budget revision chose."""
    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(value).encode().ljust(4096), np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(encoded))).decode().strip())


def is_primary() -> bool:
    """Whether this process writes the workdir's files (the config, metrics, seals, summary): process 0."""
    return jax.process_index() == 0


def barrier(name: str):
    """Every process waits here until all have come (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether `flag` is set in any process: each one learns of a stop signal that reached another."""
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag]))).any())


def same_in_every_process(value) -> bool:
    """Whether every process holds the same small array `value` (one collective)."""
    if jax.process_count() == 1:
        return True
    import numpy as np
    from jax.experimental import multihost_utils

    everyone = np.asarray(multihost_utils.process_allgather(np.asarray(value)))  # (processes, ...)
    return bool((everyone == everyone[0]).all())


# A collective whose peer went away: Gloo's words on the CPU ("Gloo all-reduce failed: ... Connection
# closed by peer [127.0.0.1]:23972") when a process dies while the others are in a step with it.
PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe")


def failure(error: BaseException) -> str:
    """What a step's error means to a person, in a line: a lost peer says so and what to do, as the
    supervisor's line for a lost heartbeat does (`processes.py`); anything else is its first line."""
    text = str(error).strip()
    if PEER_GONE.search(text):
        return f"another process closed its connection during a collective (it died, or was stopped); {RERUN}"
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def fail_fast(error: BaseException, process_id) -> None:
    """One line, then out at once: with other processes waiting in collectives or barriers, an orderly
    exit (jax's own shutdown is a barrier too) would hang until their timeout."""
    if jax.process_count() > 1:
        print(f"error: process {process_id}: {failure(error)}", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)
