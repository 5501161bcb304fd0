"""CPU threads that stay fast on a shared machine (issue 11): ``chronomoe_torch`` sets the OpenMP
wait policy before torch loads its OpenMP runtime, and chooses a thread count it reports.

The runtime itself is asked what it read: ``OMP_DISPLAY_ENV=VERBOSE`` makes libgomp print its
settings when torch loads it. ``GOMP_SPINCOUNT`` is how long an idle worker spins: 300000 by
default (the collapse on a busy machine, see benchmarks/bench_busy.py), 0 with PASSIVE.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def _omp_settings(code: str, **env_over) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", **env_over)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    found = dict(re.findall(r"^\s+(\w+) = '([^']*)'", p.stderr, flags=re.M))
    if "GOMP_SPINCOUNT" not in found:
        pytest.skip("torch's OpenMP runtime is not libgomp (no OMP_DISPLAY_ENV report)")
    return {**found, "stdout": p.stdout.strip()}


def test_importing_chronomoe_torch_first_makes_workers_sleep():
    """Mutation caught (and today's code): the policy set after torch is imported, or not at
    all (GOMP_SPINCOUNT stays 300000: idle workers spin)."""
    got = _omp_settings("import chronomoe_torch, torch\n"
                        "from chronomoe_torch._threads import choose_threads\n"
                        "print(choose_threads().describe())")
    assert got["OMP_WAIT_POLICY"] == "PASSIVE" and got["GOMP_SPINCOUNT"] == "0"
    cpus = len(os.sched_getaffinity(0))
    assert got["stdout"] == (f"{max(1, cpus // 2)} CPU thread{'s' if cpus // 2 > 1 else ''} "
                             f"(auto: half of {cpus} usable CPUs), OpenMP wait policy PASSIVE "
                             f"(set by chronomoe_torch before torch loaded OpenMP)")


def test_torch_first_keeps_the_spinning_default_and_one_thread():
    """The control: imported after torch, nothing can change the policy; the auto choice is
    then one thread, and it says why."""
    got = _omp_settings("import torch, chronomoe_torch\n"
                        "from chronomoe_torch._threads import choose_threads\n"
                        "print(choose_threads().describe())")
    assert got["GOMP_SPINCOUNT"] == "300000"
    assert got["stdout"] == ("1 CPU thread (auto: workers may spin-wait, so one thread), OpenMP "
                             "wait policy default (spin, then sleep) (torch was imported before "
                             "chronomoe_torch)")


def test_the_environment_wins():
    got = _omp_settings("import chronomoe_torch, torch\n"
                        "from chronomoe_torch._threads import choose_threads\n"
                        "print(choose_threads().describe())",
                        OMP_WAIT_POLICY="active", OMP_NUM_THREADS="1")
    assert got["OMP_WAIT_POLICY"] == "ACTIVE"
    assert got["stdout"] == ("1 CPU thread (from OMP_NUM_THREADS), OpenMP wait policy ACTIVE "
                             "(from the environment)")


def test_explicit_and_user_set_counts(monkeypatch):
    import torch
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)   # else it outranks the user's call
    from chronomoe_torch import _threads
    before = torch.get_num_threads()
    try:
        assert _threads.choose_threads(3).describe().startswith("3 CPU threads (given)")
        with pytest.raises(ValueError, match="threads=0"):
            _threads.choose_threads(0)
        _threads.apply_threads(1)
        torch.set_num_threads(2)                      # the user's own call afterwards
        choice = _threads.choose_threads()
        assert (choice.threads, choice.reason) == (2, "set with torch.set_num_threads")
    finally:
        torch.set_num_threads(before)


def test_auto_count_with_passive_workers_and_local_ranks(monkeypatch):
    """Half the usable CPUs, shared by the node's ranks under torchrun."""
    from chronomoe_torch import _threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_threads, "wait_policy", lambda: ("PASSIVE", "test"))
    monkeypatch.setattr(_threads, "usable_cpus", lambda: 16)
    monkeypatch.setitem(_threads._AT_IMPORT, "threads", __import__("torch").get_num_threads())
    assert _threads.choose_threads().threads == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    c = _threads.choose_threads()
    assert (c.threads, c.reason) == (2, "auto: half of 16 usable CPUs over 4 local ranks")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert _threads.choose_threads().threads == 1
