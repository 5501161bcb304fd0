"""The execution layer (chronomoe_dyn.cluster): specs, the task loop here and on a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from chronomoe_dyn.cluster import (ClusterSpec, available_cores, close_client, open_client,
                                   run_tasks)


def square(x):
    if x == 3:
        raise RuntimeError("three is bad")
    return x * x


def thread_settings(_):
    import numba
    return {"numba": numba.get_num_threads(), "wait": os.environ.get("OMP_WAIT_POLICY"),
            "omp": os.environ.get("OMP_NUM_THREADS"), "pid": os.getpid()}


@pytest.fixture(scope="module")
def client():
    c = open_client(ClusterSpec(workers=min(2, available_cores()), threads=1))
    yield c
    close_client(c)


def test_spec_validation():
    cores = available_cores()
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        ClusterSpec(scheduler="localhost:8786")
    with pytest.raises(ValueError, match="exceeds the"):
        ClusterSpec(workers=cores, threads=2)
    with pytest.raises(ValueError, match="workers=0"):
        ClusterSpec(workers=0)
    with pytest.raises(ValueError, match="threads='2'"):
        ClusterSpec(threads="2")
    with pytest.raises(ValueError, match="only for a LocalCluster"):
        ClusterSpec(scheduler="tcp://10.0.0.1:8786", workers=2)
    spec = ClusterSpec()
    assert spec.threads_per_task == 1 and spec.workers_per_cluster == cores
    assert ClusterSpec(scheduler="tcp://10.0.0.1:8786").scheduler == "tcp://10.0.0.1:8786"


def test_unreachable_scheduler_is_a_clear_error():
    with pytest.raises(ValueError, match=r"scheduler tcp://127\.0\.0\.1:9: does not answer"):
        open_client(ClusterSpec(scheduler="tcp://127.0.0.1:9", connect_timeout=1.0))


@pytest.mark.parametrize("where", ["in-process", "cluster"])
def test_loop_skips_done_tasks_and_survives_a_failure(where, request):
    client = None if where == "in-process" else request.getfixturevalue("client")
    tasks = {"a": 0, "b": 1, "c": 2, "d": 4, "e": 3}
    got, errors = {}, {}
    report = run_tasks(client, tasks, square, is_done=lambda n: n == "c",
                       on_done=got.__setitem__, on_error=errors.__setitem__, progress=False)
    assert sorted(report.done) == ["a", "b", "d"] and report.skipped == ["c"]
    assert list(report.failed) == ["e"] and "three is bad" in report.failed["e"]
    assert got == {"a": 0, "b": 1, "d": 16} and list(errors) == ["e"]


def test_workers_start_with_thread_limits(client):
    """Mutation caught: a LocalCluster without the thread environment (each worker's Numba
    would start one thread per core: workers × cores threads on a shared machine)."""
    env = client.run(lambda: {k: os.environ.get(k) for k in
                              ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")})
    assert len(env) == min(2, available_cores())
    for v in env.values():
        assert v == {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    got = {}
    run_tasks(client, {f"t{i}": i for i in range(4)}, thread_settings, on_done=got.__setitem__,
              progress=False, threads=1)
    assert all(v["numba"] == 1 for v in got.values())
    assert os.getpid() not in {v["pid"] for v in got.values()}


def test_limit_threads_in_a_running_process():
    """Workers of an external scheduler get the limits per task. Mutation caught:
    ``limit_threads`` not calling ``numba.set_num_threads``."""
    code = ("import os; os.environ.pop('NUMBA_NUM_THREADS', None)\n"
            "import numba\n"
            "from chronomoe_dyn.cluster import limit_threads\n"
            "limit_threads(1)\n"
            "print(numba.get_num_threads(), os.environ['OMP_WAIT_POLICY'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "PASSIVE"]


def test_on_done_failure_stops_the_rest(client):
    """A failure of this process (storing a result) cancels what is queued and propagates."""
    def boom(name, result):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_tasks(client, {f"t{i}": i for i in range(6)}, square, on_done=boom, progress=False)


def test_importing_the_layer_stays_light():
    code = ("import sys, chronomoe_dyn, chronomoe_dyn.cluster, chronomoe_dyn.store, "
            "chronomoe_dyn.gridstore, chronomoe_dyn.runlog, chronomoe_dyn.cli, "
            "chronomoe_dyn.studies.runner\n"
            "import json; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       check=True)
    loaded = set(json.loads(r.stdout.strip().splitlines()[-1]))
    assert "chronomoe_dyn" in loaded and "numpy" in loaded
    heavy = {"dask", "distributed", "xarray", "zarr", "numba", "torch", "matplotlib"} & loaded
    assert not heavy, heavy
