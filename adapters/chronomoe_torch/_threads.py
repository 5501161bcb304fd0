"""CPU threads that stay fast on a shared machine: the OpenMP wait policy and the thread count.

Why: torch's CPU kernels run their parallel regions on OpenMP (libgomp). By default a worker
thread that finishes early spin-waits for the others. When another process holds one of the
cores, every parallel region waits for a worker that is not scheduled while its partner burns
its time slice spinning: a 30-step ``chronomoe-train`` run on 2 cores took 1.9 s idle and 6 to
60 s with one other CPU-bound process (``benchmarks/bench_busy.py``).

Policy (``choose_threads``; ``chronomoe-train`` and ``ChronoMoETrainer.train`` apply it and say
what they chose in their first log line):
  * wait policy: ``OMP_WAIT_POLICY=PASSIVE`` (a waiting worker sleeps) unless the environment
    sets one. libgomp reads it once, when ``import torch`` loads it, so ``chronomoe_torch``
    sets it in its ``__init__`` *before* importing torch (``configure_openmp_env``). When torch
    was imported first, the environment's policy stays (the default spins) and that is reported.
  * thread count ("auto"): ``OMP_NUM_THREADS`` when the environment sets it, or the count set
    with ``torch.set_num_threads`` since ``chronomoe_torch`` was imported (the user's choice);
    else half the usable CPUs (at least 1; under torchrun, shared by the node's
    ``LOCAL_WORLD_SIZE`` ranks) with the PASSIVE policy, and 1 thread when workers may spin
    (more could collapse as above). Half, because the loader, the OS and other jobs
    need room, and because the small models trained on CPU here gain nothing from more
    (measured on 2 cores, 30 steps of the default model: 1 thread 2.3 s idle / 3.0 s busy;
    2 PASSIVE threads 3.6 / 3.1; 2 spinning threads 1.9 / 6-60).
  * an explicit count (``--threads``, ``TrainingConfig.num_threads``) overrides.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

__all__ = ["configure_openmp_env", "wait_policy", "choose_threads", "ThreadChoice"]

# What the environment held when chronomoe_torch was imported, and whether torch was loaded
# before (then the OpenMP runtime had already read its environment).
_AT_IMPORT: dict = {}


def configure_openmp_env() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` if nothing set it and torch has not loaded OpenMP yet.
    Called by ``chronomoe_torch/__init__`` before it imports torch; idempotent."""
    if _AT_IMPORT:
        return
    torch_first = "torch" in sys.modules
    given = os.environ.get("OMP_WAIT_POLICY")
    if given is None and not torch_first:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _AT_IMPORT.update(torch_first=torch_first, given=given)


def record_torch_threads(n: int) -> None:
    """torch's intra-op thread count right after ``chronomoe_torch`` imported it."""
    _AT_IMPORT.setdefault("threads", n)


def wait_policy() -> tuple[str, str]:
    """(the OpenMP wait policy in effect, where it came from)."""
    given = _AT_IMPORT.get("given", os.environ.get("OMP_WAIT_POLICY"))
    if given is not None:
        return given.upper(), "from the environment"
    if _AT_IMPORT.get("torch_first", True):
        return "default (spin, then sleep)", "torch was imported before chronomoe_torch"
    return "PASSIVE", "set by chronomoe_torch before torch loaded OpenMP"


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    """Intra-op CPU threads for torch."""
    reason: str
    """Why this count (for the log line)."""
    policy: str
    """The OpenMP wait policy in effect."""
    policy_source: str
    """Where the policy came from."""

    def describe(self) -> str:
        return (f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} ({self.reason}), "
                f"OpenMP wait policy {self.policy} ({self.policy_source})")


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """The thread count of the policy above (``requested``: an explicit count, which wins)."""
    import torch
    policy, source = wait_policy()
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads={requested!r}: expected an integer >= 1")
        n, why = requested, "given"
    elif "OMP_NUM_THREADS" in os.environ:
        n, why = torch.get_num_threads(), "from OMP_NUM_THREADS"
    elif torch.get_num_threads() != _AT_IMPORT.get("threads", torch.get_num_threads()):
        n, why = torch.get_num_threads(), "set with torch.set_num_threads"
    elif policy == "PASSIVE":
        cpus, local = usable_cpus(), max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        n = max(1, cpus // (2 * local))
        why = f"auto: half of {cpus} usable CPUs" + (f" over {local} local ranks"
                                                      if local > 1 else "")
    else:
        n, why = 1, "auto: workers may spin-wait, so one thread"
    return ThreadChoice(n, why, policy, source)


def apply_threads(requested: int | None = None) -> ThreadChoice:
    """``choose_threads`` and ``torch.set_num_threads`` with the result."""
    import torch
    choice = choose_threads(requested)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    _AT_IMPORT["threads"] = choice.threads  # ours now, not the user's
    return choice
