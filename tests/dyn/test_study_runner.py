"""Studies on the execution layer: cluster = in-process bitwise, kill and resume, every bad input
refused before any cell runs, --quick and --set behaviour, the first-compile note."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from chronomoe_dyn import cli
from chronomoe_dyn.cluster import ClusterSpec, available_cores
from chronomoe_dyn.gridstore import GridStore
from chronomoe_dyn.studies import get_study, runner
from chronomoe_dyn.studies.common import out_dir_for, resolve_config
from chronomoe_dyn.studies.runner import Execution

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "kappa=[0.0, 0.5]", "--set", "coupling=[0.0, 1.0]", "--set", "ticks=100",
        "--set", "record_every=10"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters")]))


def _same_summary(a: dict, b: dict) -> None:
    drop = ("seconds", "out_dir", "figures", "execution")
    assert {k: v for k, v in a.items() if k not in drop} == \
        {k: v for k, v in b.items() if k not in drop}


def _same_store(p: Path, q: Path, group: str | None = None) -> None:
    a = xr.open_zarr(p, group=group, consolidated=False, chunks=None)
    b = xr.open_zarr(q, group=group, consolidated=False, chunks=None)
    assert set(a.variables) == set(b.variables)
    for v in a.variables:
        x, y = a[v].values, b[v].values
        assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), v


def test_sweep_on_a_local_cluster_equals_in_process_bitwise(tmp_path):
    """Same seeds (common random numbers), cells split differently (all systems of a (K, κ) in
    one cell in-process, one system per cell on 2 workers): the same bits."""
    sweep = get_study("sweep")
    a = sweep.main(out_dir=tmp_path / "a", quick=True, progress=False)
    b = sweep.main(out_dir=tmp_path / "b", quick=True, progress=False,
                   overrides={"systems_per_cell": 1},
                   execution=Execution(ClusterSpec(workers=min(2, available_cores()))))
    assert b["execution"]["where"].startswith("LocalCluster")
    assert b["execution"]["computed"] == 2 * a["execution"]["computed"] == 12
    _same_store(tmp_path / "a" / "sweep.zarr", tmp_path / "b" / "sweep.zarr")
    _same_summary(a, b)


def _done_count(store: Path) -> int:
    """Systems marked done in the store (= cells when a cell holds one system)."""
    import zarr
    try:
        return int(np.sum(zarr.open_array(store / "cell_done", mode="r")[...]))
    except Exception:  # noqa: BLE001  (not created yet)
        return 0


def test_killed_sweep_resumes_to_the_same_result(tmp_path):
    """SIGKILL a sweep mid-way, rerun it: only the missing cells run and the result is the
    uninterrupted one, bit for bit."""
    sets = {"ticks": 6000, "record_every": 100, "systems_per_cell": 1, "num_systems": 3}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "chronomoe_dyn.cli", "study", "sweep",
                             "--quick", "--in-process", "--no-progress", "--out", str(out), *args],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    total = 2 * 3 * 3
    deadline = time.monotonic() + 120
    while _done_count(out / "sweep.zarr") < 4 and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _done_count(out / "sweep.zarr")
    assert 0 < done < total, (done, proc.stderr.read().decode()[-2000:])
    sweep = get_study("sweep")
    resumed = sweep.main(out_dir=out, quick=True, progress=False, overrides=sets)
    assert resumed["execution"]["reused"] == done
    assert resumed["execution"]["computed"] == total - done
    ref = sweep.main(out_dir=tmp_path / "ref", quick=True, progress=False, overrides=sets)
    _same_store(out / "sweep.zarr", tmp_path / "ref" / "sweep.zarr")
    _same_summary(resumed, ref)


@pytest.fixture
def no_cells(monkeypatch):
    """Fail the test if any cell is submitted."""
    def refuse(*a, **kw):
        raise AssertionError("a cell ran")
    monkeypatch.setattr(runner, "run_tasks", refuse)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chronomoe-dyn: error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])


@pytest.mark.parametrize("extra, needles", [
    (["--set", "no_such_key=3"], ["unknown config key 'no_such_key'", "allowed:", "ticks"]),
    (["--set", "env.topk=1"], ["'env.topk'", "top_k"]),
    (["--set", "num_systems=abc"], ["'num_systems'", "an integer", "'abc'"]),
    (["--set", "ticks=100.5"], ["'ticks'", "an integer"]),
    (["--set", "env.top_k=9"], ["top_k"]),
    (["--set", "controller.coupling=0.1"], ["controller.coupling", "--set coupling="]),
    (["--scheduler", "tcp://127.0.0.1:9"], ["scheduler tcp://127.0.0.1:9: does not answer"]),
    (["--scheduler", "127.0.0.1:9"], ["tcp://HOST:PORT"]),
    (["--workers", "64"], ["exceeds the"]),
])
def test_bad_input_is_refused_before_any_cell(tmp_path, capsys, no_cells, extra, needles):
    rc = cli.main(["study", "sweep", "--quick", "--no-progress", "--out", str(tmp_path / "o"),
                   *TINY, *extra])
    assert rc == 2
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "o" / "sweep.zarr").exists()


def test_store_of_another_study_or_config_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    base = ["study", "sweep", "--quick", "--no-progress", "--in-process", "--out", str(out)]
    assert cli.main(base + TINY) == 0
    store = out / "sweep.zarr"
    before = {f: f.stat().st_mtime_ns for f in store.rglob("*") if f.is_file()}
    capsys.readouterr()
    assert cli.main(base + TINY + ["--set", "ticks=200"]) == 2
    _one_line_error(capsys, "another config", "ticks", "--overwrite")
    assert {f: f.stat().st_mtime_ns for f in store.rglob("*") if f.is_file()} == before
    # the same config again reuses every cell
    assert cli.main(base + TINY) == 0
    assert json.loads((out / "summary.json").read_text())["execution"]["computed"] == 0
    # a store that belongs to another study
    GridStore.open(tmp_path / "x" / "sweep.zarr", "phases", {}, [])
    capsys.readouterr()
    assert cli.main(["study", "sweep", "--quick", "--no-progress", "--in-process", "--out",
                     str(tmp_path / "x"), *TINY]) == 2
    _one_line_error(capsys, "holds study 'phases'")
    # --overwrite replaces it
    assert cli.main(base + TINY + ["--set", "ticks=200", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["ticks"] == 200


def test_cell_failure_exits_1_and_keeps_the_rest(tmp_path, capsys, monkeypatch):
    from chronomoe_dyn.studies import sweep
    real = sweep.run_cell

    def flaky(arg):
        if arg["simulate"]["config"].coupling == 1.0:
            raise RuntimeError("worker lost")
        return real(arg)

    monkeypatch.setattr(sweep, "run_cell", flaky)
    out = tmp_path / "o"
    rc = cli.main(["study", "sweep", "--quick", "--no-progress", "--in-process", "--out",
                   str(out), *TINY])
    assert rc == 1
    _one_line_error(capsys, "2 of 4 cells failed", "worker lost", "rerun")
    assert _done_count(out / "sweep.zarr") == 2 * 2   # the other coupling's 2 cells × 2 systems


def test_quick_writes_to_its_own_folder(tmp_path, monkeypatch):
    """README: ``--quick`` overwrote studies/out/<name>/ (the full results)."""
    monkeypatch.chdir(tmp_path)
    assert out_dir_for("sweep", None, quick=True) == Path("studies/out/sweep-quick")
    assert cli.main(["study", "sweep", "--quick", "--no-progress", "--in-process", *TINY]) == 0
    assert (tmp_path / "studies/out/sweep-quick/summary.json").is_file()
    assert not (tmp_path / "studies/out/sweep").exists()


def _plan(name: str, overrides: dict):
    mod = get_study(name)
    cfg = resolve_config(mod.CONFIG, mod.QUICK, True, overrides, mod.SECTIONS)
    cfg["seed"], cfg["quick"] = 0, True
    return [arg["simulate"] for _, arg in mod.plan(cfg).tasks.values()]


def test_dotted_set_keys_reach_every_nested_config():
    """README: ``--set env.top_k=1`` (and controller.*, schedule.*) failed in every study with
    "unknown config key ... (allowed: )"."""
    for name in ("phases", "sweep", "valley-repair"):
        extra = {} if name == "sweep" else {"controller.coupling": 0.1}
        for kw in _plan(name, {"env.top_k": 1, "controller.lens_rate": 0.02, **extra}):
            assert kw["env"].top_k == 1 and kw["config"].lens_rate == 0.02
            if extra:
                assert kw["config"].coupling == 0.1
    runs = _plan("phases", {"schedule.kind": "linear", "schedule.rule.rate": 0.02})
    sched = runs[0]["schedule"]
    assert sched.kind == "linear" and sched.rule.rate == 0.02
    assert sched.total_steps == 800          # the rest of the default schedule for the run
    with pytest.raises(ValueError, match=r"'schedule.rule.nope'.*allowed:.*rate"):
        _plan("phases", {"schedule.rule.nope": 1})
    with pytest.raises(ValueError, match=r"'env.top_k': expected an integer"):
        _plan("sweep", {"env.top_k": "two"})


def test_compile_note_when_the_cache_is_cold(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "kernels_cached", lambda names: False)
    get_study("sweep").main(out_dir=tmp_path / "a", quick=True, progress=False,
                            overrides={"kappa": [0.0], "coupling": [0.0], "ticks": 50})
    assert "compiling kernels (first run only)" in capsys.readouterr().err
    monkeypatch.setattr(runner, "kernels_cached", lambda names: True)
    get_study("sweep").main(out_dir=tmp_path / "b", quick=True, progress=False,
                            overrides={"kappa": [0.0], "coupling": [0.0], "ticks": 50})
    assert "compiling" not in capsys.readouterr().err


def test_cold_cache_is_detected(tmp_path):
    """Mutation caught: ``kernels_cached`` that always says True (or looks up names the
    kernel module does not have)."""
    names = get_study("sweep").KERNELS
    code = ("from chronomoe_dyn.studies.runner import kernels_cached\n"
            f"print(kernels_cached({names!r}))")
    cold = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(_env(), NUMBA_CACHE_DIR=str(tmp_path)), timeout=120)
    assert cold.stdout.strip() == "False", cold.stderr
    from chronomoe_dyn import simulate
    simulate(num_systems=2, ticks=10)              # compiles or loads: the cache is warm now
    assert runner.kernels_cached(names) is True


@pytest.mark.slow
def test_first_run_prints_the_compile_note_once(tmp_path):
    """A real cold cache (an empty NUMBA_CACHE_DIR): the note, then none on the second run."""
    env = dict(_env(), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "chronomoe_dyn.cli", "study", "sweep", "--quick",
           "--in-process", "--no-progress", *TINY, "--set", "kappa=[0.0]", "--set",
           "coupling=[0.0]"]
    first = subprocess.run(cmd + ["--out", str(tmp_path / "a")], capture_output=True, text=True,
                           env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "compiling kernels (first run only)" in first.stderr
    second = subprocess.run(cmd + ["--out", str(tmp_path / "b")], capture_output=True,
                            text=True, env=env, timeout=600)
    assert second.returncode == 0 and "compiling" not in second.stderr


def test_float32_store(tmp_path):
    """``store_dtype=float32`` halves the store; the numbers stay close to float64's.
    (Mutation caught: the cast in ``simulate_cell`` failing for every cell, as it first did.)"""
    sweep = get_study("sweep")
    over = {"kappa": [0.0], "coupling": [0.0, 1.0], "ticks": 100, "record_every": 10}
    a = sweep.main(out_dir=tmp_path / "a", quick=True, progress=False, overrides=over)
    b = sweep.main(out_dir=tmp_path / "b", quick=True, progress=False,
                   overrides={**over, "store_dtype": "float32"})
    ds = xr.open_zarr(tmp_path / "b" / "sweep.zarr", consolidated=False, chunks=None)
    assert ds["R"].dtype == np.float32 and ds["Tbar_local"].dtype == np.float32
    assert ds["valley_local"].dtype == bool and ds["final_theta"].dtype == np.float64
    np.testing.assert_allclose(np.array(b["grids"]["R"]), np.array(a["grids"]["R"]),
                               rtol=1e-6)


def test_store_identity_covers_every_kernel_source(tmp_path, monkeypatch):
    """A store's identity hashes the simulator's code, the _kernels package included (it was
    hashed as a missing _kernels.py, so a kernel change kept old cells). Works on a copy of the
    package (editing the installed kernels would invalidate Numba's cache). Mutation caught:
    hashing only ``<name>.py`` files."""
    import shutil
    from pathlib import Path

    import chronomoe_dyn
    from chronomoe_dyn.studies import runner
    copy = tmp_path / "chronomoe_dyn"
    shutil.copytree(Path(chronomoe_dyn.__file__).parent, copy,
                    ignore=shutil.ignore_patterns("__pycache__", "studies"))
    before = runner.code_fingerprint(copy)
    assert before == runner.code_fingerprint()
    kernel = copy / "_kernels" / "driver.py"
    kernel.write_bytes(kernel.read_bytes() + b"\n# changed\n")
    assert runner.code_fingerprint(copy) != before
    monkeypatch.setattr(runner, "_CELL_CODE", runner._CELL_CODE + ("no_such_module",))
    with pytest.raises(FileNotFoundError, match="no_such_module"):
        runner.code_fingerprint()
