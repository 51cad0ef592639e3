"""Which processes a run has, and the supervisor that each one's training runs under. No JAX here:
with many processes, the process a person (or SLURM) starts only supervises, and never imports it.

A process that dies takes the others down within --heartbeat_timeout seconds: jax's runtime ends
them (SIGABRT, after a C++ stack trace), or a collective fails at once. So that a person reads one
line instead, each process runs its training as a child (`supervise`) and translates such an end.
"""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading

from vit_jax.config import TrainConfig, parse_args
from vit_jax.errors import UserError, cli

CHILD = "VIT_JAX_DISTRIBUTED_CHILD"  # set in the supervised child
EXIT_PEER_LOST = 3  # the status of a process stopped because another one died
RERUN = "rerun every process with the same command to resume"  # what to do then, in every such line
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


@cli
def supervise_unless_child(argv: list[str]):
    """`python -m vit_jax.train argv`, before its imports: checks the flags (a mistake is one line at
    once), and with many processes, in the process that was started, runs the training as a child and
    exits with its status. Returns in that child, and when the run has one process."""
    cfg, _ = parse_args(argv)
    t = topology(cfg)
    if t is not None and not os.environ.get(CHILD):
        sys.exit(supervise(argv, t.process_id))


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
              f"{_what_happened(held)}; {RERUN}", file=sys.stderr, flush=True)
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
