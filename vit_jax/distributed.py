"""Many processes, one run: jax.distributed's start-up, the processes' agreement, and failing in one line.

    python -m vit_jax.train --coordinator_address HOST:PORT --num_processes N --process_id I [flags]

(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; or, with none of them, what SLURM
or Open MPI tells jax). Every process runs the same command; process 0 hosts the coordinator. Each
one then sees every device of every process in one mesh (`devices.py`), feeds its own rows of each
global batch, and takes part in every checkpoint; process 0 alone writes the workdir's other files.

A process that dies takes the others down within --heartbeat_timeout seconds: jax's runtime ends
them (SIGABRT, after a C++ stack trace), or a collective fails at once. So that a person reads one
line instead, each process runs its training as a child (`supervise`) and translates such an end.
"""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax

from vit_jax.config import ModelConfig, TrainConfig, to_dict
from vit_jax.errors import UserError

CHILD = "VIT_JAX_DISTRIBUTED_CHILD"  # set in the supervised child
INIT_TIMEOUT = 120  # seconds to wait for every process to join
EXIT_PEER_LOST = 3  # the status of a process stopped because another one died
# Cluster managers that start one process per task and tell jax (through these) who is who.
CLUSTER_MARKERS = {"SLURM_NTASKS": "SLURM", "OMPI_COMM_WORLD_SIZE": "Open MPI"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """Who this process is among how many, and where they meet (None: jax asks the cluster)."""

    address: str | None
    num_processes: int | None
    process_id: int | None

    @property
    def explicit(self) -> bool:
        return self.address is not None and self.num_processes is not None and self.process_id is not None


def topology(cfg: TrainConfig) -> Topology | None:
    """The processes this run asks for (flags first, then JAX_* variables, then a cluster); None: one process."""
    env = os.environ

    def number(name):  # a JAX_* variable set to what is not a count is a mistake, not "unset"
        value = env.get(name, "").strip()
        if value and not value.isdigit():
            raise UserError(f"{name}={env[name]!r} is not a number: set it to a count, or unset it")
        return int(value) if value else None

    t = Topology(cfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None,
                 cfg.num_processes if cfg.num_processes is not None else number("JAX_NUM_PROCESSES"),
                 cfg.process_id if cfg.process_id is not None else number("JAX_PROCESS_ID"))
    in_cluster = any(env.get(m, "").strip().isdigit() and int(env[m]) > 1 for m in CLUSTER_MARKERS)
    if t.num_processes == 1 or (t.num_processes is None and not in_cluster):
        return None
    if t.num_processes is not None and (t.address is None or t.process_id is None):
        missing = [name for name, v in (("--coordinator_address", t.address), ("--process_id", t.process_id)) if v is None]
        raise UserError(f"--num_processes {t.num_processes} also needs {' and '.join(missing)} (or the JAX_* "
                        f"variables): every process must know where process 0 is and which one it is")
    return t


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


def same_everywhere(cfg: TrainConfig) -> TrainConfig:
    """Process 0's cfg in every process (for what each one measured for itself, like --time_budget's plan)."""
    if jax.process_count() == 1:
        return cfg
    import numpy as np
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(dataclasses.asdict(cfg)).encode().ljust(4096), np.uint8)
    chosen = bytes(np.asarray(multihost_utils.broadcast_one_to_all(encoded))).decode().strip()
    return TrainConfig(**json.loads(chosen))


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


# --------------------------------------------------------------------------------------------------
# Supervision: one line for the end that jax's runtime gives a process whose peer died

RUNTIME_LOG = re.compile(r"^[EWIF]\d{4} \d\d:\d\d:\d\d")  # a C++ log line of jax's runtime (glog/absl)
NOISE = re.compile(r"\[Gloo\]|peer ranks")  # gloo reporting its connections as it starts (lines can interleave)
OURS = ("error:", "warning:", "note:", "Stopping", "Second signal", "Saved", "Process")


def supervise(argv: list[str], process_id) -> int:
    """Runs `python -m vit_jax.train argv` as a child and relays its output; returns its exit status.

    The child gets SIGINT and SIGTERM from here (a Ctrl+C reaches only this process, which passes
    it on once), and dies with this process. The runtime's C++ log lines are held back: when it ends
    the child because another process died or stopped answering, one line says so instead."""
    import ctypes

    def die_with_parent():
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    child = subprocess.Popen([sys.executable, "-u", "-m", "vit_jax.train", *argv], env={**os.environ, CHILD: "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=die_with_parent)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: child.send_signal(signum))
    held = []  # the runtime's log: its lines and the lines that continue them

    def relay(stream, out):
        holding = False
        for line in stream:
            if NOISE.search(line):
                continue
            holding = bool(RUNTIME_LOG.match(line)) or (holding and not line.startswith(OURS))
            if holding:
                held.append(line.rstrip())
            else:
                out.write(line)
                out.flush()

    threads = [threading.Thread(target=relay, args=(child.stdout, sys.stdout)),
               threading.Thread(target=relay, args=(child.stderr, sys.stderr))]
    for t in threads:
        t.start()
    status = child.wait()
    for t in threads:
        t.join()
    if any(line.startswith("F") for line in held if RUNTIME_LOG.match(line)):  # a fatal one: the runtime ended it
        print(f"error: process {'?' if process_id is None else process_id}: stopped by jax's distributed runtime: "
              f"{_what_happened(held)}; rerun every process with the same command to resume", file=sys.stderr,
              flush=True)
        return EXIT_PEER_LOST
    return status if status >= 0 else 128 - status


def _what_happened(log: list[str]) -> str:
    """The runtime's reason, in a few words, from its log lines."""
    text = " ".join(log)
    unhealthy = re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*([\d\s,]+)", text)
    if unhealthy:
        ids = ", ".join(unhealthy.group(1).replace(",", " ").split())
        return f"process {ids} stopped sending heartbeats (it died, or hung)"
    status = re.search(r"(UNAVAILABLE|DEADLINE_EXCEEDED|INTERNAL|ABORTED|CANCELLED): ([^.]*)", text)
    return (f"{status.group(1)}: {status.group(2)[:200]}" if status else "another process most likely died or "
            "stopped answering")


def fail_fast(error: BaseException, process_id) -> None:
    """One line, then out at once: with other processes waiting in collectives or barriers, an orderly
    exit (jax's own shutdown is a barrier too) would hang until their timeout."""
    if jax.process_count() > 1:
        print(f"error: process {process_id}: {type(error).__name__}: {str(error).strip().splitlines()[0][:300]}",
              file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)
