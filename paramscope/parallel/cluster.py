"""Running as N cooperating processes on JAX's own multi-process runtime (``jax.distributed``).

Process 0 reads the checkpoint's metadata and hands it to the others (:func:`open_checkpoint`);
every process makes the same read plan from it, and each then reads and reduces
only its share of it (:func:`owns`), and the partial results are combined with a JAX collective
(``process_allgather``) of exact float64 bit patterns, so all processes end with the same
numbers. Process 0 alone writes the report.

A process that dies or never joins must not leave the others hanging: a watchdog gives every
phase ``timeout`` seconds and then ends the process with exit 3 and one line saying what it was
waiting for; a peer that dies mid-run is noticed at once, when the collective loses its
connection. JAX's own failure handling would abort the process with a stack trace instead, so
the runtime is started in its recoverable mode and left with ``os._exit`` on failure.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from paramscope.errors import EXIT_CHECKPOINT, EXIT_INTERNAL, ParamscopeError, UsageError, error_line

ENV_COORDINATOR = "PARAMSCOPE_COORDINATOR"
ENV_NUM_PROCESSES = "PARAMSCOPE_NUM_PROCESSES"
ENV_PROCESS_ID = "PARAMSCOPE_PROCESS_ID"
DEFAULT_TIMEOUT = 300
MESSAGE_BYTES = 512


class PeerFailure(ParamscopeError):
    """Another process died, never joined, or stopped answering."""


@dataclass
class Cluster:
    """This process's place among the cooperating processes."""

    process_id: int = 0
    num_processes: int = 1
    timeout: float = DEFAULT_TIMEOUT
    hosts: list[str] = field(default_factory=list)  # address of every process, by id
    watchdog: _Watchdog | None = None

    @property
    def active(self) -> bool:
        return self.num_processes > 1

    @property
    def primary(self) -> bool:
        return self.process_id == 0


LOCAL = Cluster()
CURRENT: Cluster | None = None  # the cluster this process joined, if any


def share(cluster: Cluster, sizes: list[int]) -> list[bool]:
    """Which pieces of a plan (given by their sizes, the same list in every process) this process
    reads: largest first, each to the process with the fewest bytes so far, so that every
    process reads about 1/N of the bytes.

    >>> share(Cluster(process_id=1, num_processes=2), [4, 4, 2, 1, 1])
    [False, True, False, True, True]
    """
    loads = [0] * cluster.num_processes
    mine = [False] * len(sizes)
    for piece in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        process = min(range(cluster.num_processes), key=lambda p: (loads[p], p))
        loads[process] += sizes[piece]
        mine[piece] = process == cluster.process_id
    return mine


def settings_from(coordinator: str | None, num_processes: int | None, process_id: int | None, auto: bool):
    """The launch settings from the options, falling back to the PARAMSCOPE_* variables."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    try:
        if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
            num_processes = int(os.environ[ENV_NUM_PROCESSES])
        if process_id is None and os.environ.get(ENV_PROCESS_ID):
            process_id = int(os.environ[ENV_PROCESS_ID])
    except ValueError:
        raise UsageError(
            f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be integers",
            hint="e.g. PARAMSCOPE_NUM_PROCESSES=2 PARAMSCOPE_PROCESS_ID=0",
        ) from None
    manual = coordinator is not None or num_processes is not None or process_id is not None
    if not manual and not auto:
        return None
    if manual:
        if coordinator is None or num_processes is None or process_id is None:
            raise UsageError(
                "--coordinator, --num-processes and --process-id go together",
                hint="give all three (or the PARAMSCOPE_* variables), or --distributed under a launcher",
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UsageError(
                f"--process-id {process_id} is not in 0..{num_processes - 1}",
                hint="number the processes 0 to N-1",
            )
        if ":" not in coordinator:
            raise UsageError(
                f"malformed --coordinator {coordinator!r}", hint="write HOST:PORT, e.g. 10.0.0.1:1234"
            )
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


class _Watchdog:
    """Ends the process (exit 3, one line) when a phase outlasts its time."""

    def __init__(self, cluster: Cluster, stderr):
        self.cluster, self.stderr = cluster, stderr
        self.deadline: float | None = None
        self.phase = ""
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name="paramscope-watchdog").start()

    def arm(self, phase: str, seconds: float | None = None) -> None:
        with self.lock:
            self.phase = phase
            self.deadline = time.monotonic() + (seconds or self.cluster.timeout)

    def disarm(self) -> None:
        with self.lock:
            self.deadline = None

    def _run(self) -> None:
        while True:
            time.sleep(0.2)
            with self.lock:
                expired = self.deadline is not None and time.monotonic() > self.deadline
                phase = self.phase
            if expired:
                abort(self.cluster, f"timed out after {self.cluster.timeout:g} s {phase}", self.stderr)


def abort(cluster: Cluster, message: str, stderr=None, code: int = EXIT_CHECKPOINT) -> None:
    """One line, then out, skipping JAX's shutdown (which would wait on the missing process)."""
    stream = stderr or sys.stderr
    hint = "every process must be started, with the same options, and reach the coordinator"
    stream.write(error_line(f"process {cluster.process_id}: {message}", hint) + "\n")
    stream.flush()
    os._exit(code)


def _quiet_descriptors(debug: bool):
    """Sends what C++ libraries print (gloo writes to stdout) to /dev/null; Python keeps its streams."""
    sys.stdout.flush()
    sys.stderr.flush()
    stdout = os.fdopen(os.dup(1), "w", buffering=1)
    # where Python's stderr writes: descriptor 2 itself, or the terminal behind the pipe that
    # holds back the C++ libraries' log lines (a line written to that pipe could be lost at exit)
    try:
        own = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        own = 2
    stderr = os.fdopen(os.dup(own), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    if not debug:
        os.dup2(devnull, 2)
    os.close(devnull)
    sys.stdout, sys.stderr = stdout, stderr
    return stdout, stderr


def join(settings: dict | None, timeout: float, debug: bool = False) -> Cluster:
    """Starts ``jax.distributed`` (auto-detected under a launcher when ``settings`` is empty)."""
    import jax

    _, stderr = _quiet_descriptors(debug)
    cluster = Cluster(process_id=(settings or {}).get("process_id") or 0, timeout=timeout)
    cluster.watchdog = _Watchdog(cluster, stderr)
    expected = (settings or {}).get("num_processes")
    cluster.watchdog.arm(f"waiting for all {expected or ''} processes to join".replace("  ", " "))
    jax.config.update("jax_enable_recoverability", True)
    try:
        jax.distributed.initialize(
            **(settings or {}),
            initialization_timeout=int(timeout) + 60,
            heartbeat_timeout_seconds=int(timeout) + 60,
        )
        jax.devices()  # every process's devices: completes the join
    except Exception as err:  # noqa: BLE001 - whatever the runtime raises, it is a failed join
        abort(cluster, f"could not join the other processes: {str(err).splitlines()[0][:200]}", stderr)
    cluster.process_id = jax.process_index()
    cluster.num_processes = jax.process_count()
    if not cluster.primary:
        sys.stdout = open(os.devnull, "w")
    cluster.hosts = [h.decode() for h in _gather_bytes(cluster, _own_address().encode(), "joining")]
    cluster.watchdog.disarm()
    global CURRENT
    CURRENT = cluster
    return cluster


def finish(cluster: Cluster, code: int) -> None:
    """Leaves together: once every process is done, all exit with the highest exit code.

    No process goes through JAX's shutdown, which fails when the coordinator (process 0) is gone
    before the others have said goodbye.
    """
    codes = _gather(cluster, np.array([code], np.uint32), "finishing")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(np.max(codes)))


def _own_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()


def _gather(cluster: Cluster, array: np.ndarray, phase: str) -> np.ndarray:
    """``process_allgather`` of a uint32 array, with a deadline and a peer's death named."""
    from jax.experimental import multihost_utils

    cluster.watchdog.arm(phase)
    try:
        gathered = np.asarray(multihost_utils.process_allgather(array))
    except Exception as err:  # noqa: BLE001 - a failed collective means a peer is gone
        abort(cluster, f"{_missing(cluster, str(err))} while {phase}")
    cluster.watchdog.disarm()
    return gathered


def _missing(cluster: Cluster, error: str) -> str:
    others = [i for i in range(cluster.num_processes) if i != cluster.process_id]
    suspects = [i for i in others if cluster.hosts and f"[{cluster.hosts[i]}]" in error] or others
    names = ", ".join(str(i) for i in suspects)
    return (
        f"process {names} stopped (its connection closed)"
        if len(suspects) == 1
        else (f"one of processes {names} stopped (a connection closed)")
    )


def gather_bytes(cluster: Cluster, data: bytes, phase: str) -> list[bytes]:
    """Every process's bytes, of any length, in process order (two collectives: sizes, then data)."""
    sizes = _gather(cluster, np.array([len(data)], np.uint32), phase).reshape(-1)
    padded = -(-int(sizes.max()) // 4) * 4
    buffer = np.zeros(padded, np.uint8)
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    rows = _gather(cluster, buffer.view(np.uint32), phase).reshape(cluster.num_processes, -1)
    return [row.astype(np.uint32).view(np.uint8).tobytes()[: int(size)] for row, size in zip(rows, sizes)]


def _gather_bytes(cluster: Cluster, data: bytes, phase: str) -> list[bytes]:
    buffer = np.zeros(MESSAGE_BYTES + 4, np.uint8)
    data = data[:MESSAGE_BYTES]
    buffer[:4] = np.frombuffer(len(data).to_bytes(4, "little"), np.uint8)
    buffer[4 : 4 + len(data)] = np.frombuffer(data, np.uint8)
    rows = _gather(cluster, buffer.view(np.uint32), phase).reshape(cluster.num_processes, -1)
    out = []
    for row in rows:
        raw = row.astype(np.uint32).view(np.uint8).tobytes()
        out.append(raw[4 : 4 + int.from_bytes(raw[:4], "little")])
    return out


def gather_float64(cluster: Cluster, values: np.ndarray, phase: str) -> np.ndarray:
    """Every process's float64 vector (same length everywhere), exactly, shape (processes, n)."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    gathered = _gather(cluster, values.view(np.uint32), phase)
    return gathered.reshape(cluster.num_processes, -1).astype(np.uint32).view(np.float64)


def agree_on_failure(cluster: Cluster, error: ParamscopeError | None, phase: str) -> None:
    """All processes learn whether any failed; each then raises the first failure (same exit,
    same line: its message and hint travel whole)."""
    message = b"" if error is None else json.dumps([error.exit_code, error.message, error.hint]).encode()
    reports = gather_bytes(cluster, message, phase)
    for process, report in enumerate(reports):
        if report:
            code, text, hint = json.loads(report)
            failure = ParamscopeError(f"process {process}: {text}", hint=hint)
            failure.exit_code = int(code)
            raise failure


def from_primary(cluster: Cluster, produce: Callable[[], bytes], phase: str) -> bytes:
    """What ``produce()`` returns on process 0, in every process; only process 0 runs it.

    Its failure is every process's: all raise the same error, with its exit code.
    """
    data, failure = b"", None
    if cluster.primary:
        try:
            data = produce()
        except ParamscopeError as err:
            failure = err
        except Exception as err:  # noqa: BLE001 - a bug on process 0 must not leave the others waiting
            failure = ParamscopeError(
                f"unexpected {type(err).__name__}: {err}",
                hint="set PARAMSCOPE_DEBUG=1 for a traceback and report it",
            )
            failure.exit_code = EXIT_INTERNAL
    agree_on_failure(cluster, failure, phase)
    return gather_bytes(cluster, data, phase)[0]


def open_checkpoint(
    cluster: Cluster, path: str, step: int | None = None, item: str | None = None, subtree: str | None = None
):
    """:func:`paramscope.open_checkpoint` for a cluster: process 0 alone reads the metadata (the
    listing, ``_METADATA``, ``_sharding``, the array metadata) and hands the others the
    :class:`~paramscope.io.inventory.Inventory` as JSON, so N processes make the metadata requests
    of one, on a bucket as on a shared filesystem.
    """
    from paramscope.io import inventory, storage

    if not cluster.active:
        return inventory.open_checkpoint(path, step=step, item=item, subtree=subtree)

    def read() -> bytes:
        found = inventory.open_checkpoint(path, step=step, item=item, subtree=subtree)
        return zlib.compress(inventory.inventory_to_json(found).encode(), 1)

    inv = inventory.inventory_from_json(zlib.decompress(from_primary(cluster, read, "reading the metadata")))
    storage.Tree(inv.checkpoint)  # no request: sets up this process's access (e.g. the GCS emulator)
    return inv
