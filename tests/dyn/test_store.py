"""Trajectory <-> xarray <-> zarr (chronomoe_dyn.store): layout, exact round trip, safe writes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from chronomoe_dyn import EnvConfig, Event, Trajectory, simulate
from chronomoe_dyn.store import DIMS, atomic_dir, split_suffix, to_dataset

# L != E so that a swapped layer/expert axis cannot go unnoticed
ENV = EnvConfig(num_layers=3, num_experts=5, tokens_per_tick=64)


@pytest.fixture(scope="module")
def traj():
    return simulate(env=ENV, num_systems=3, ticks=120, seed=7, record_every=10,
                    events=[Event("collapse", 60, expert=2)])


def _assert_same(a: Trajectory, b: Trajectory) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or x is None:
            assert (x is None) == (y is None), f.name
            if x is not None:
                assert x.dtype == y.dtype and x.shape == y.shape, f.name
                assert np.array_equal(x, y), f.name
        elif f.name == "final_states":
            assert len(x) == len(y)
            for s, t in zip(x, y):
                for g in dataclasses.fields(s):
                    u, v = getattr(s, g.name), getattr(t, g.name)
                    assert type(u) is type(v) and np.array_equal(u, v), g.name
        else:
            assert x == y, f.name


def test_zarr_round_trip_is_exact(traj, tmp_path):
    """Mutations caught: a float cast in ``to_dataset`` (``np.asarray(a, np.float32)``), the
    final states or an attribute left out, a dims mapping that swaps layer and expert."""
    path = traj.to_zarr(tmp_path / "run" / "trajectory.zarr")     # folder created
    back = Trajectory.from_zarr(path)
    _assert_same(traj, back)
    assert back.events == traj.events and back.events[0].expert == 2


def test_round_trip_without_layer_fields(tmp_path):
    t = simulate(env=ENV, num_systems=2, ticks=40, record_layers=False)
    back = Trajectory.from_zarr(t.to_zarr(tmp_path / "t.zarr"))
    assert back.Tbar_local_BTLE is None and back.valley_local_BTLE is None
    _assert_same(t, back)


def test_xarray_layout(traj):
    ds = traj.to_xarray()
    assert ds["Tbar_local"].dims == ("system", "tick", "layer", "expert")
    assert ds["Tbar_local"].shape == (3, 12, 3, 5)
    assert ds["R"].dims == ("system", "tick") and ds["variance_local"].dims[-1] == "layer"
    assert ds["tick"].values.tolist() == traj.tick_T.tolist()
    assert ds["seed"].dims == ("system",) and ds["seed"].values.tolist() == [7, 8, 9]
    assert ds["final_theta"].dims == ("system", "layer", "expert")
    assert json.loads(ds.attrs["config"]) == traj.config.to_dict()
    assert json.loads(ds.attrs["env"])["num_layers"] == 3
    # labelled selection works as xarray users expect
    np.testing.assert_array_equal(ds["R"].sel(tick=60).values, traj.R_BT[:, 5])


def test_layout_follows_the_dataclass_fields(traj):
    """A new array field (a later law version adds some) is stored without touching store.py."""
    @dataclasses.dataclass(frozen=True)
    class TrajectoryNext(Trajectory):
        future_rate_BT: np.ndarray | None = None
        future_scale_BTL: np.ndarray | None = None

    B, T = traj.R_BT.shape
    nxt = TrajectoryNext(**{f.name: getattr(traj, f.name) for f in dataclasses.fields(traj)},
                         future_rate_BT=np.full((B, T), 0.1),
                         future_scale_BTL=np.ones((B, T, 3)))
    ds = to_dataset(nxt)
    assert ds["future_rate"].dims == ("system", "tick")
    assert ds["future_scale"].dims == ("system", "tick", "layer")
    assert ds["logit_scale"].dims == ("system", "tick", "layer")       # v2's own fields too
    assert ds["exploration"].dims == ("system", "tick")
    assert split_suffix("Tbar_global_BT") == ("Tbar_global", ("system", "tick"))
    assert split_suffix("final_states") == ("final_states", ())
    assert set(DIMS.values()) == {"system", "tick", "layer", "expert"}


def test_existing_store_is_never_overwritten_silently(traj, tmp_path):
    p = traj.to_zarr(tmp_path / "t.zarr")
    before = sorted(x.name for x in p.rglob("*"))
    with pytest.raises(FileExistsError, match="overwrite"):
        traj.to_zarr(p)
    assert sorted(x.name for x in p.rglob("*")) == before
    other = simulate(env=ENV, num_systems=1, ticks=30, seed=99)
    other.to_zarr(p, overwrite=True)
    assert Trajectory.from_zarr(p).seeds_B.tolist() == [99]
    # a folder that is not a zarr store is never replaced, even with overwrite
    plain = tmp_path / "notes"
    plain.mkdir()
    (plain / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        traj.to_zarr(plain, overwrite=True)
    assert (plain / "keep.txt").read_text() == "mine"


def test_failed_write_leaves_nothing(tmp_path):
    """The store is built in a hidden sibling, so a crash (even SIGKILL) never leaves a
    half-written store at the path. Mutations caught: building in place (``tmp = path``), no
    clean-up of the sibling after an error."""
    target = tmp_path / "t.zarr"

    def build(tmp):
        assert tmp != target and tmp.parent == target.parent and tmp.name.startswith(".")
        assert not target.exists()
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_dir(target, build)
    assert list(tmp_path.iterdir()) == []


def test_to_npz_creates_its_folder(traj, tmp_path):
    """README: ``traj.to_npz("run/trajectory.npz")`` failed when run/ did not exist."""
    p = traj.to_npz(tmp_path / "run" / "deeper" / "trajectory.npz")
    assert p.is_file()
    np.testing.assert_array_equal(Trajectory.from_npz(p).R_BT, traj.R_BT)


def test_read_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        Trajectory.from_zarr(tmp_path / "nothere.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a zarr store"):
        Trajectory.from_zarr(tmp_path / "plain")
