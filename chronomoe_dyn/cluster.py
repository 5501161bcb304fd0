"""The execution layer: run named tasks on a dask.distributed cluster or in this process.

Shared by ``chronomoe-dyn study`` (a task = one cell of a study) and ``chronomoe-train compare``
(a task = one training run). It knows nothing about what a task computes:

    spec = ClusterSpec(scheduler=None, workers=None, threads=None)   # validated
    client = open_client(spec)              # LocalCluster, or connect to spec.scheduler
    try:
        report = run_tasks(client, {"a": arg_a, "b": arg_b}, fn, is_done=..., on_done=...,
                           on_error=..., progress=True, threads=spec.threads_per_task)
    finally:
        close_client(client)

``run_tasks(None, ...)`` runs the same loop in this process, one task after the other (the
``--in-process`` path). ``fn`` must be picklable (a module-level function) and so must each
task's argument and result. Results come back to this process as they finish, in completion
order; ``on_done(name, result)`` is called here, one at a time (a single writer), and the result
is dropped from the cluster right after. A task that raises, or whose worker dies, is reported
through ``on_error`` and never stops the others; an exception raised by ``on_done`` (this
process failing to store a result) cancels the rest and propagates.

Threads: a LocalCluster has W workers (processes) of one task slot each, and every task runs
with T threads for Numba, torch and OpenMP, with W × T ≤ the cores this process may use
(``os.sched_getaffinity``). Workers get these limits in their environment when they start
(``OMP_WAIT_POLICY=PASSIVE``: a waiting OpenMP thread sleeps instead of spinning on a shared
machine), and every task sets them again before it runs (workers of an external scheduler).
dask is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["ClusterSpec", "TaskReport", "available_cores", "open_client", "close_client",
           "run_tasks", "describe", "limit_threads"]

_ADDRESS = re.compile(r"^(tcp|tls|ucx|ws|wss|inproc)://[^\s/]+(:\d+)?/?$")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "NUMBA_NUM_THREADS")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _positive_int(name: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}={v!r}: expected an integer >= 1 (or None for the default)")
    return v


@dataclass(frozen=True)
class ClusterSpec:
    """Where tasks run.

    scheduler: address of a running dask scheduler (``tcp://HOST:PORT``); None = start a
        LocalCluster on this machine. workers: LocalCluster worker processes (default: cores
        // threads). threads: threads per task for Numba/torch/OpenMP (default 1).
    connect_timeout: seconds to wait for ``scheduler`` before giving up."""
    scheduler: str | None = None
    workers: int | None = None
    threads: int | None = None
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.scheduler is not None and (not isinstance(self.scheduler, str)
                                           or not _ADDRESS.match(self.scheduler)):
            raise ValueError(f"scheduler={self.scheduler!r}: expected an address such as "
                             f"tcp://HOST:PORT")
        _positive_int("workers", self.workers)
        _positive_int("threads", self.threads)
        if self.scheduler is not None and self.workers is not None:
            raise ValueError("workers: only for a LocalCluster; an external scheduler has its own "
                             "workers (leave --workers out with --scheduler)")
        cores = available_cores()
        if self.scheduler is None and self.workers_per_cluster * self.threads_per_task > cores:
            raise ValueError(f"workers × threads = {self.workers_per_cluster} × "
                             f"{self.threads_per_task} exceeds the {cores} cores available")
        if not (isinstance(self.connect_timeout, (int, float)) and self.connect_timeout > 0):
            raise ValueError(f"connect_timeout={self.connect_timeout!r}: expected seconds > 0")

    @property
    def threads_per_task(self) -> int:
        return self.threads or 1

    @property
    def workers_per_cluster(self) -> int:
        return self.workers or max(1, available_cores() // self.threads_per_task)


def describe(spec: ClusterSpec | None) -> str:
    """One line saying where tasks run."""
    if spec is None:
        return "in this process"
    if spec.scheduler is not None:
        return f"scheduler {spec.scheduler} ({spec.threads_per_task} thread(s) per task)"
    w, t = spec.workers_per_cluster, spec.threads_per_task
    return f"LocalCluster ({w} worker{'s' * (w != 1)} × {t} thread{'s' * (t != 1)})"


def _thread_env(threads: int) -> dict[str, str]:
    return {**{v: str(threads) for v in _THREAD_VARS}, "OMP_WAIT_POLICY": "PASSIVE"}


def limit_threads(threads: int) -> None:
    """Set this process's thread limits for Numba, torch and OpenMP (libraries imported later
    read the environment; loaded ones are set directly)."""
    os.environ.update(_thread_env(threads))
    if "numba" in sys.modules:
        import numba
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def open_client(spec: ClusterSpec):
    """A ``distributed.Client``: connected to ``spec.scheduler`` (ValueError naming the address
    when it does not answer within ``spec.connect_timeout``), or to a new LocalCluster."""
    from distributed import Client, LocalCluster
    if spec.scheduler is not None:
        try:
            return Client(spec.scheduler, timeout=spec.connect_timeout)
        except (OSError, TimeoutError) as e:
            raise ValueError(f"scheduler {spec.scheduler}: does not answer within "
                             f"{spec.connect_timeout:g} s ({e})") from None
    # dashboard_address=":0": the scheduler's HTTP server (it always starts one) takes a free
    # port instead of 8787, so two clusters on one machine do not warn about the port.
    cluster = LocalCluster(n_workers=spec.workers_per_cluster, threads_per_worker=1,
                           processes=True, dashboard_address=":0",
                           # a failed task is reported by run_tasks; no worker log on stderr
                           silence_logs=logging.CRITICAL,
                           env=_thread_env(spec.threads_per_task))
    return Client(cluster)


def close_client(client: Any) -> None:
    """Close the client and the LocalCluster it started (an external cluster keeps running)."""
    if client is None:
        return
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


@dataclass
class TaskReport:
    """What ``run_tasks`` did: tasks computed, skipped (already done) and failed (name ->
    error message)."""
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _call(fn: Callable[[Any], Any], arg: Any, threads: int) -> Any:
    limit_threads(threads)
    return fn(arg)


def run_tasks(client: Any, tasks: Mapping[str, Any], fn: Callable[[Any], Any], *,
              is_done: Callable[[str], bool] | None = None,
              on_done: Callable[[str, Any], None] | None = None,
              on_error: Callable[[str, BaseException], None] | None = None,
              progress: bool = True, desc: str = "tasks", unit: str = "task",
              threads: int = 1) -> TaskReport:
    """Run ``fn(tasks[name])`` for every task not ``is_done(name)``; see the module docstring.

    client: a ``distributed.Client``, or None to run here, in order. threads: per-task thread
    limit on the workers (ignored in this process). desc, unit: the progress bar's label and
    what it counts. Returns a TaskReport."""
    from tqdm.auto import tqdm
    report = TaskReport()
    todo = []
    for name in tasks:
        (report.skipped if is_done is not None and is_done(name) else todo).append(name)

    def failed(name: str, exc: BaseException) -> None:
        report.failed[name] = f"{type(exc).__name__}: {exc}"
        if on_error is not None:
            on_error(name, exc)

    def finished(name: str, result: Any) -> None:
        if on_done is not None:
            on_done(name, result)
        report.done.append(name)

    bar = tqdm(total=len(tasks), initial=len(report.skipped), desc=desc, unit=unit,
               disable=not progress, dynamic_ncols=True, leave=False)
    try:
        if client is None:
            for name in todo:
                try:
                    result = fn(tasks[name])
                except Exception as e:  # noqa: BLE001  (reported; the others go on)
                    failed(name, e)
                else:
                    finished(name, result)
                    del result
                bar.update(1)
        else:
            _run_on_cluster(client, tasks, fn, todo, threads, finished, failed, bar)
    finally:
        bar.close()
    return report


def _run_on_cluster(client, tasks, fn, todo, threads, finished, failed, bar) -> None:
    from distributed import as_completed
    token = uuid.uuid4().hex[:8]
    futures = {client.submit(_call, fn, tasks[name], threads, key=f"{name}-{token}",
                             pure=False): name for name in todo}
    try:
        for fut in as_completed(list(futures)):
            name = futures.pop(fut)
            if fut.status == "finished":
                result = fut.result()
                fut.release()
                finished(name, result)
                del result
            else:
                exc = fut.exception() if fut.status == "error" else RuntimeError(fut.status)
                fut.release()
                failed(name, exc)
            bar.update(1)
    finally:
        if futures:  # an exception here (on_done, Ctrl-C): stop what is still queued
            client.cancel(list(futures))
