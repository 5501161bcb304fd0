"""chronomoe_dyn.plot: the run-metrics JSONL schema, its reader and the run figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chronomoe_dyn.plot import (MetricsFormatError, load_run, plot_run, read_metrics_jsonl,
                                series_from_trajectory, validate_metrics_record,
                                write_metrics_record)

L, E = 3, 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(path: Path, steps: int = 30) -> None:
    rng = np.random.default_rng(0)
    for s in range(steps):
        tb = 1.0 + 0.05 * (s / steps) * np.sin(np.arange(E)[None, :] + np.arange(L)[:, None])
        write_metrics_record(path, {
            "step": s * 10, "loss": 5.0 - 0.05 * s, "loss_lm": 5.0 - 0.05 * s,
            "loss_balance": 1.02, "loss_coherence": 0.1, "loss_valley": 0.0,
            "R": 0.2 + 0.02 * s, "dR": 0.02, "kappa": 0.5 - 0.025 * s, "gate": 0.6,
            "tbar_variance": 1e-4 * s, "valleys": [0], "ridges": [2, 3], "phase": "cosine_anneal",
            "load_LE": rng.dirichlet(np.ones(E), size=L), "tbar_local_LE": tb,
            "tbar_global_E": tb.mean(axis=0)})
    write_metrics_record(path, {"step": 100, "split": "eval", "loss": 4.0})


def _assert_pngs(paths, names):
    got = {p.name for p in paths}
    assert set(names) <= got, got
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 5_000, (p, len(data))  # an empty canvas is ~2 kB


def test_jsonl_run_renders_every_figure(tmp_path):
    run = tmp_path / "run"
    _write_run(run / "metrics.jsonl")
    paths = plot_run(run)
    assert all(p.parent == run / "plots" for p in paths)
    _assert_pngs(paths, ["curves.png", "landscape.png", "tbar_snapshots.png", "tbar_time.png",
                         "load.png", "loss.png"])


def test_reader_values_and_derived_maxvio(tmp_path):
    f = tmp_path / "m.jsonl"
    _write_run(f, steps=5)
    s = read_metrics_jsonl(f)
    assert s.step_T.tolist() == [0, 10, 20, 30, 40]
    np.testing.assert_allclose(s.scalars["R"], [0.2, 0.22, 0.24, 0.26, 0.28])
    assert s.scalars["valleys"].tolist() == [1] * 5 and s.scalars["ridges"].tolist() == [2] * 5
    assert s.load_TLE.shape == (5, L, E) and s.tbar_local_TLE.shape == (5, L, E)
    np.testing.assert_allclose(s.load_TLE.sum(-1), 1.0)
    mv = (s.load_TLE.max(-1) - 1 / E) * E
    np.testing.assert_allclose(s.scalars["maxvio"], mv.mean(-1))
    np.testing.assert_allclose(s.maxvio_TL, mv)
    assert s.eval_step.tolist() == [100] and s.eval_loss.tolist() == [4.0]


def test_explicit_maxvio_L_and_raw_counts(tmp_path):
    f = tmp_path / "metrics.jsonl"
    write_metrics_record(f, {"step": 1, "load_LE": [[3, 1], [2, 2]], "maxvio_L": [0.5, None]})
    s = read_metrics_jsonl(f)
    np.testing.assert_allclose(s.load_TLE[0], [[0.75, 0.25], [0.5, 0.5]])  # counts → shares
    assert s.maxvio_TL[0, 0] == 0.5 and np.isnan(s.maxvio_TL[0, 1])       # as written
    assert s.scalars["maxvio"][0] == pytest.approx(0.25)                  # derived: (0.5 + 0)/2


def test_repeated_step_later_line_wins_and_sorted(tmp_path):
    f = tmp_path / "metrics.jsonl"
    lines = [{"step": 5, "R": 0.1}, {"step": 1, "R": 0.2}, {"step": 5, "R": 0.9}]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    s = read_metrics_jsonl(f)
    assert s.step_T.tolist() == [1, 5]
    assert s.scalars["R"].tolist() == [0.2, 0.9]


def test_null_and_nonfinite_are_missing(tmp_path):
    f = tmp_path / "metrics.jsonl"
    write_metrics_record(f, {"step": 0, "R": float("nan"), "kappa": 0.5})
    write_metrics_record(f, {"step": 1, "R": 0.5, "kappa": None})
    assert "NaN" not in f.read_text()  # strict JSON on disk
    s = read_metrics_jsonl(f)
    assert np.isnan(s.scalars["R"][0]) and s.scalars["R"][1] == 0.5
    assert np.isnan(s.scalars["kappa"][1])


@pytest.mark.parametrize("line, field", [
    ('{"step": 1, "R": 0.4', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"R": 0.4}', "'step'"),
    ('{"step": -3}', "'step'"),
    ('{"step": 2, "R": "high"}', "'R'"),
    ('{"step": 2, "load_LE": [[1, 2], [3]]}', "'load_LE'"),
    ('{"step": 2, "valleys": [1.5]}', "'valleys'"),
    ('{"step": 2, "split": "test"}', "'split'"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, field):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 0, "R": 0.3}\n\n' + line + "\n")
    with pytest.raises(MetricsFormatError) as ei:
        read_metrics_jsonl(f)
    msg = str(ei.value)
    assert str(f) in msg and "line 3" in msg and field in msg


def test_shape_change_within_file_is_an_error(tmp_path):
    f = tmp_path / "metrics.jsonl"
    write_metrics_record(f, {"step": 0, "tbar_global_E": [1.0, 1.0]})
    write_metrics_record(f, {"step": 1, "tbar_global_E": [1.0, 1.0, 1.0]})
    with pytest.raises(MetricsFormatError, match=r"line 2: field 'tbar_global_E' has shape \[3\]"):
        read_metrics_jsonl(f)


def test_writer_rejects_bad_record(tmp_path):
    with pytest.raises(MetricsFormatError, match="'gate'"):
        write_metrics_record(tmp_path / "m.jsonl", {"step": 0, "gate": "open"})
    assert not (tmp_path / "m.jsonl").exists()
    with pytest.raises(MetricsFormatError, match="'step'"):
        validate_metrics_record({"R": 0.5})


def test_empty_and_missing_runs(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n")
    with pytest.raises(MetricsFormatError, match="no training records"):
        plot_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="run not found"):
        plot_run(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_run(empty)
    (empty / "a.jsonl").write_text('{"step": 0, "R": 0.1}\n')
    (empty / "b.jsonl").write_text('{"step": 0, "R": 0.1}\n')
    with pytest.raises(ValueError, match="several"):
        plot_run(empty)


def _tiny_trajectory(B: int = 2, T: int = 12) -> dict:
    """The arrays of a simulator Trajectory v2 (CONTRACTS.md), synthetic."""
    rng = np.random.default_rng(1)
    usage = rng.dirichlet(np.ones(E), size=(B, T, L))
    tl = 1.0 + 0.1 * rng.standard_normal((B, T, L, E))
    mean, std = tl.mean(-1, keepdims=True), tl.std(-1, keepdims=True)
    return {
        "tick_T": np.arange(T) * 10, "R_BT": rng.uniform(0, 1, (B, T)),
        "dR_BT": rng.normal(0, 0.01, (B, T)),
        "kappa_BT": np.tile(np.linspace(0.5, -0.3, T), (B, 1)),
        "gate_BT": rng.uniform(0.5, 1, (B, T)), "Tbar_global_BT": tl.mean(axis=(2, 3)),
        "Tbar_local_BTLE": tl, "usage_BTLE": usage, "variance_local_BTL": tl.var(-1),
        "valley_local_BTLE": tl < mean - 0.5 * std, "ridge_local_BTLE": tl > mean + 0.5 * std,
        "exploration_BT": rng.uniform(0, 0.3, (B, T)), "maxvio_BTL": rng.uniform(0, 1, (B, T, L)),
        "logit_scale_BTL": rng.uniform(0.5, 2, (B, T, L)), "loss_BT": rng.uniform(1, 2, (B, T)),
    }


def test_trajectory_npz_and_object(tmp_path):
    traj = _tiny_trajectory()
    s = series_from_trajectory(traj, system=1)
    np.testing.assert_array_equal(s.scalars["R"], traj["R_BT"][1])
    assert "R" in s.bands  # a batch gets a spread band
    # whole-model counts aggregate over layers (version 2): mean per layer
    np.testing.assert_array_equal(s.scalars["valleys"],
                                  traj["valley_local_BTLE"][1].sum(-1).mean(-1))
    np.testing.assert_array_equal(s.scalars["maxvio"], traj["maxvio_BTL"][1].mean(-1))
    np.testing.assert_array_equal(s.maxvio_TL, traj["maxvio_BTL"][1])
    np.testing.assert_array_equal(s.scalars["exploration_rate"], traj["exploration_BT"][1])
    paths = plot_run(traj, out_dir=tmp_path / "obj")
    _assert_pngs(paths, ["curves.png", "landscape.png", "tbar_snapshots.png", "load.png"])
    run = tmp_path / "simrun"
    run.mkdir()
    np.savez(run / "trajectory.npz", **traj)
    paths = plot_run(run, out_dir=tmp_path / "npz")
    _assert_pngs(paths, ["curves.png", "tbar_time.png", "loss.png"])
    with pytest.raises(ValueError, match="system=5"):
        load_run(run, system=5)
    with pytest.raises(ValueError, match="out_dir is required"):
        plot_run(traj)


def test_a_version_1_trajectory_file_is_refused(tmp_path):
    """A version-1 trajectory.npz (meta format .../1) gives a clear error, not a wrong plot."""
    import json
    traj = _tiny_trajectory()
    traj["meta_json"] = np.array(json.dumps({"format": "chronomoe_dyn.Trajectory/1"}))
    np.savez(tmp_path / "trajectory.npz", **traj)
    with pytest.raises(ValueError, match="version-1 trajectory"):
        plot_run(tmp_path)


def test_real_simulator_trajectory_plots(tmp_path):
    pytest.importorskip("numba")
    from chronomoe_dyn.simulate import simulate
    traj = simulate(num_systems=2, ticks=200, record_every=10, seed=3)
    traj.to_npz(tmp_path / "trajectory.npz")
    paths = plot_run(tmp_path)
    _assert_pngs(paths, ["curves.png", "landscape.png", "tbar_snapshots.png", "load.png"])


def test_zarr_trajectory_plots(tmp_path, capsys):
    """``chronomoe-dyn plot`` reads a Trajectory.to_zarr store: a run folder holding
    trajectory.zarr, or the store itself."""
    from chronomoe_dyn import cli
    from chronomoe_dyn.simulate import simulate
    traj = simulate(num_systems=2, ticks=200, record_every=10, seed=3)
    traj.to_zarr(tmp_path / "run" / "trajectory.zarr")
    paths = plot_run(tmp_path / "run")
    assert all(p.parent == tmp_path / "run" / "plots" for p in paths)
    _assert_pngs(paths, ["curves.png", "tbar_snapshots.png", "load.png"])
    assert cli.main(["plot", str(tmp_path / "run" / "trajectory.zarr"), "--out",
                     str(tmp_path / "figs"), "--system", "1"]) == 0
    assert (tmp_path / "figs" / "curves.png").is_file()
    np.testing.assert_array_equal(load_run(tmp_path / "run", system=1).scalars["R"],
                                  traj.R_BT[1])


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chronomoe-dyn: error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])


def test_unreadable_inputs_are_one_line_errors(tmp_path, capsys):
    """README: ``plot`` on a truncated file printed a 20–30-line traceback."""
    from chronomoe_dyn import cli
    from chronomoe_dyn.simulate import simulate
    traj = simulate(num_systems=1, ticks=100, record_every=10)
    npz = traj.to_npz(tmp_path / "a" / "trajectory.npz")
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])          # truncated
    assert cli.main(["plot", str(npz)]) == 2
    _one_line_error(capsys, str(npz), "truncated")
    store = traj.to_zarr(tmp_path / "b" / "trajectory.zarr")
    (store / "zarr.json").write_text("{not json")                         # corrupt
    assert cli.main(["plot", str(store)]) == 2
    _one_line_error(capsys, str(store))
    bad = tmp_path / "c" / "metrics.jsonl"
    bad.parent.mkdir()
    bad.write_bytes(b'{"step": 0}\n\xff\xfe\x00garbage\n')                  # binary
    assert cli.main(["plot", str(bad)]) == 2
    _one_line_error(capsys, str(bad), "line 2", "UTF-8")
    # a study's store is not one trajectory
    from chronomoe_dyn.gridstore import GridStore
    GridStore.open(tmp_path / "d" / "sweep.zarr", "sweep", {}, [])
    assert cli.main(["plot", str(tmp_path / "d" / "sweep.zarr")]) == 2
    _one_line_error(capsys, "store of study 'sweep'")
    # --debug shows the traceback instead
    with pytest.raises(ValueError, match="truncated"):
        cli.main(["plot", str(npz), "--debug"])


def test_tbar_snapshots_colour_relative_to_the_layer_mean(tmp_path, monkeypatch):
    """The legend says blue = valley, red = ridge: a cell's colour must be its T̄ minus its
    layer's mean, on a scale centred at 0. (It coloured absolute T̄ on one shared scale, so
    a whole cool layer was "valleys".)"""
    import chronomoe_dyn.plot as plot
    figs = {}
    monkeypatch.setattr(plot, "save_figure", lambda fig, path, dpi=110: figs.setdefault(
        Path(path).name, fig) and Path(path))
    traj = _tiny_trajectory(B=1, T=6)
    traj["Tbar_local_BTLE"] = traj["Tbar_local_BTLE"] + np.arange(L)[None, None, :, None]
    plot.plot_series(series_from_trajectory(traj), tmp_path)
    fig = figs["tbar_snapshots.png"]
    images = [im for ax in fig.axes for im in ax.images]
    assert images
    for im in images:
        a = np.asarray(im.get_array())
        np.testing.assert_allclose(a.mean(axis=-1), 0.0, atol=1e-12)     # each layer centred
        assert im.norm.vmin == pytest.approx(-im.norm.vmax) and im.norm.vmax > 0
    t0 = images[0].get_array()
    tl = traj["Tbar_local_BTLE"][0, 0]
    np.testing.assert_allclose(t0, tl - tl.mean(axis=-1, keepdims=True))


def test_sweep_heatmaps_have_meaningful_colour_ranges(tmp_path, monkeypatch):
    """A loss spread of 2.88–2.95 filled the whole colour bar; now the bars are fixed: R and the
    explored share in [0, 1], loss over the environment's range, T̄ variance on 1e-4–1, counts on
    0–E, MaxVio on 0–2."""
    from chronomoe_dyn.env import EnvConfig
    from chronomoe_dyn.studies import sweep
    figs = {}
    monkeypatch.setattr(sweep, "save_figure", lambda fig, path: figs.setdefault(
        Path(path).name, fig) and Path(path))
    kappas, Ks = [-0.5, 0.5], [0.0, 1.0]
    arrays = {"R": np.array([[0.40, 0.41], [0.42, 0.43]]),
              "var_local": np.array([[0.012, 0.013], [0.014, 0.015]]),
              "exploration": np.array([[0.02, 0.03], [0.04, 0.05]]),
              "valleys_local": np.array([[2.88, 2.9], [2.92, 2.95]]),
              "maxvio": np.array([[0.30, 0.31], [0.28, 0.29]]),
              "loss": np.array([[2.88, 2.90], [2.93, 2.95]])}
    env = EnvConfig()
    sweep._fig_heatmaps(tmp_path, arrays, kappas, Ks, 8, 4000, 0.25, env)
    fig = figs["sweep_heatmaps.png"]
    norms = {ax.get_title(): ax.images[0].norm for ax in fig.axes if ax.images}
    assert (norms["late R"].vmin, norms["late R"].vmax) == (0.0, 1.0)
    assert (norms["mean token loss"].vmin, norms["mean token loss"].vmax) == \
        (env.loss_floor, env.loss_floor + env.loss_range)
    assert (norms["valleys per layer"].vmin, norms["valleys per layer"].vmax) == \
        (0.0, env.num_experts)
    assert (norms["var T̄_local (layer mean)"].vmin, norms["var T̄_local (layer mean)"].vmax) \
        == (1e-4, 1.0)
    assert (norms["explored share of slots"].vmin, norms["explored share of slots"].vmax) == \
        (0.0, 1.0)
    assert (norms["MaxVio (layer mean)"].vmin, norms["MaxVio (layer mean)"].vmax) == (0.0, 2.0)
    labels = [ax.get_ylabel() for ax in fig.axes if not ax.images]
    assert "data 2.880–2.950" in labels            # the data's own span is named
