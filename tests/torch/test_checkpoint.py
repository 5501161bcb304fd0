"""Checkpoint IO (chronomoe_torch.checkpoint): round trips, write-once directories, pointer files
(latest/best/final), listing, unique names, pruning, leftovers, and ChronovisorCheckpoint."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import OrderedDict
from collections import namedtuple

import numpy as np
import pytest
import torch

from chronomoe_torch import _atomic  # the filesystem protocol: where its knobs are patched
from chronomoe_torch import _ckpt_io  # save_state's module: where its verification is patched
from chronomoe_torch import checkpoint as ck
from chronomoe_torch.checkpoint import (
    CheckpointError, CheckpointMismatchError, CheckpointNotFoundError, load_state, save_state,
    trees_equal,
)




def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _rich_tree() -> dict:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 8, generator=g)
    shared = torch.arange(20, dtype=torch.float64)
    tensors = {str(dt).removeprefix("torch."): (torch.randn(3, 2, generator=g) * 50).to(dt)
               for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                          torch.complex64, torch.complex128, torch.uint16, torch.uint32)}
    tensors["bool"] = torch.tensor([[True, False], [False, True]])
    tensors["fp8"] = torch.randn(4, generator=g).to(torch.float8_e4m3fn)
    return {
        "tensors": tensors,
        "noncontig": base.t(),                  # transposed view
        "strided": base[::2, 1::3],             # strided slice
        "expanded": torch.ones(3, 1).expand(3, 4),
        "views": [shared[:10], shared[5:15], shared[5:15]],   # overlapping views of one storage
        "scalar0d": torch.tensor(3.25),
        "empty": torch.empty(0, 5, dtype=torch.int64),
        "nan_inf": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]),
        "np": {"f8": np.linspace(0, 1, 7), "u4": np.arange(6, dtype=np.uint32).reshape(2, 3),
               "b": np.array([True, False]), "c16": np.array([1 + 2j]), "0d": np.array(7, np.int16),
               "be": np.arange(3, dtype=">i4"), "S": np.array([b"ab", b"c"]),
               "U": np.array(["xy", "z"]), "noncontig": np.arange(12.0).reshape(3, 4)[:, ::2]},
        "np_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.uint8(200)],
        "ints": [0, -1, 2**31, 2**53, 2**64 + 1, -(2**100), 123456789012345678901234567890],
        "floats": [0.1, -0.0, float("inf"), -float("inf"), float("nan"), 1e-320, 1.7976931348623157e308],
        "misc": [True, False, None, "", "ünïcödé / ~ \"quoted\"", b"\x00\xffbytes"],
        "tuple": (1, (2, [3, (4,)]), ()),
        "list": [[], {}, [()]],
        "int_keys": {0: "a", 1: "b", "1": "string one", -5: [1]},
        "slash/key": {"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}},
        "odict": OrderedDict([("z", 1), ("a", 2)]),
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
    }


def test_round_trip_rich_tree(tmp_path):
    tree = _rich_tree()
    p = save_state(tmp_path / "ck", tree)
    assert p == tmp_path / "ck"
    assert sorted(os.listdir(p)) == ["manifest.json", "meta.json", "tensors.safetensors"]
    back = load_state(p)
    assert trees_equal(back, tree)
    # spot checks that trees_equal is not vacuous
    assert back["tensors"]["bfloat16"].dtype == torch.bfloat16
    assert back["tensors"]["complex128"].dtype == torch.complex128
    assert back["tensors"]["bool"].dtype == torch.bool
    assert torch.equal(back["noncontig"], tree["noncontig"])
    assert type(back["tuple"]) is tuple and type(back["tuple"][1][1]) is list
    assert list(back["int_keys"]) == [0, 1, "1", -5]
    assert back["int_keys"][1] == "b" and back["int_keys"]["1"] == "string one"
    assert back["ints"][4] == 2**64 + 1 and back["ints"][5] == -(2**100)
    assert str(back["floats"][1]) == "-0.0" and back["floats"][4] != back["floats"][4]
    assert isinstance(back["odict"], OrderedDict) and list(back["odict"]) == ["z", "a"]
    assert back["np"]["be"].dtype == np.dtype(">i4")
    assert type(back["np_scalars"][0]) is np.float32 and back["np_scalars"][3] == 200
    assert back["size"] == torch.Size([2, 3]) and isinstance(back["size"], torch.Size)
    assert back["misc"][5] == b"\x00\xffbytes"
    assert back["slash/key"]["a/b"].item() == 0 and back["slash/key"]["a"]["b"].item() == 1
    # overlapping views come back as independent tensors with the same values
    back["views"][1][0] = -1
    assert back["views"][0][5] == 5


def test_trees_equal_detects_differences():
    tree = _rich_tree()
    for mutate in (
        lambda t: t["tensors"]["float32"].__setitem__((0, 0), 1e9),
        lambda t: t["int_keys"].pop(0),
        lambda t: t.__setitem__("tuple", [1, (2, [3, (4,)]), ()]),
        lambda t: t["floats"].__setitem__(1, 0.0),  # -0.0 vs 0.0
        lambda t: t["np"].__setitem__("f8", t["np"]["f8"].astype(np.float32)),
        lambda t: t["tensors"].__setitem__("bool", t["tensors"]["bool"].to(torch.uint8)),
        lambda t: t.__setitem__("odict", dict(t["odict"])),
    ):
        other = _rich_tree()
        mutate(other)
        assert not trees_equal(other, tree)
    assert trees_equal(_rich_tree(), _rich_tree())


def test_aliases_written_once_and_restored_as_one_tensor(tmp_path):
    w = torch.randn(64, 32)
    tree = {"embed": w, "lm_head": w, "detached": w.detach(), "copy": w.clone()}
    save_state(tmp_path / "ck", tree)
    back = load_state(tmp_path / "ck")
    assert back["embed"] is back["lm_head"] is back["detached"]
    assert back["copy"] is not back["embed"] and torch.equal(back["copy"], w)
    size = (tmp_path / "ck" / "tensors.safetensors").stat().st_size
    assert size < 2.5 * w.numel() * 4  # two copies of w (alias + clone), not four


def test_model_and_optimizer_state_dicts_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    x = torch.randn(16, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()
    tree = {"model": model.state_dict(), "optimizer": opt.state_dict(), "sched": sched.state_dict()}
    save_state(tmp_path / "ck", tree)
    back = load_state(tmp_path / "ck")
    assert trees_equal(back, tree)
    assert back["model"]._metadata["1"]["version"] == 2  # BatchNorm's state_dict version
    assert list(back["optimizer"]["state"]) == [0, 1, 2, 3, 4, 5]  # int keys survive
    # a fresh model+optimizer loaded from the checkpoint continues bit-identically
    torch.manual_seed(1)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    model2.load_state_dict(back["model"])
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["sched"])
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        for _ in range(2):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
            s.step()
    assert trees_equal(model.state_dict(), model2.state_dict())
    assert trees_equal(opt.state_dict(), opt2.state_dict())


def test_rng_state_round_trip(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in the legacy state
    save_state(tmp_path / "ck", {"rng": ck.capture_rng_state()})
    want = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ck.restore_rng_state(load_state(tmp_path / "ck")["rng"])
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert got == want


@pytest.mark.parametrize("bad, what", [
    ({"x": object()}, "tree['x'] is a builtins.object"),
    ({"x": {1.5: 2}}, "key 1.5 of type float"),
    ({"x": {(1, 2): 2}}, "key (1, 2) of type tuple"),
    ({"x": {True: 2}}, "key True of type bool"),
    ({"x": [1, {2, 3}]}, "tree['x'][1] is a builtins.set"),
    ({"x": namedtuple("P", "a b")(1, 2)}, "namedtuples"),
    ({"x": np.array([object()])}, "object arrays would need pickle"),
    ({"x": torch.eye(3).to_sparse()}, "sparse_coo tensor"),
])
def test_unsupported_values_are_refused_before_touching_disk(tmp_path, bad, what):
    with pytest.raises(TypeError, match=__import__("re").escape(what)):
        save_state(tmp_path / "ck", bad)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["latest", ".hidden", "-x", "a b", "x/..", "ü"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="not allowed"):
        save_state(tmp_path / name, {"a": 1})
    assert not any(tmp_path.iterdir())


def test_bad_kind_and_version_arguments(tmp_path):
    with pytest.raises(ValueError, match="kind="):
        save_state(tmp_path / "ck", {}, kind="../x")
    with pytest.raises(ValueError, match="format_version=0"):
        save_state(tmp_path / "ck", {}, format_version=0)


def test_kind_is_checked(tmp_path):
    save_state(tmp_path / "ck", {"a": 1}, kind="chronovisor")
    assert load_state(tmp_path / "ck", kind="chronovisor") == {"a": 1}
    with pytest.raises(CheckpointMismatchError, match="kind 'chronovisor', expected kind 'trainer'"):
        load_state(tmp_path / "ck", kind="trainer")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=str(tmp_path / "nope")):
        load_state(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for callers that expect one
        load_state(tmp_path / "nope")


def test_an_existing_checkpoint_is_never_overwritten(tmp_path):
    """Mutation caught: dropping the existence checks of ``save_state``/``write_dir`` (the
    final ``rename`` then silently replaces an existing empty directory)."""
    save_state(tmp_path / "final", {"v": torch.zeros(3)})
    with pytest.raises(ck.CheckpointExistsError, match="never overwritten"):
        save_state(tmp_path / "final", {"v": torch.ones(3)})
    assert torch.equal(load_state(tmp_path / "final")["v"], torch.zeros(3))
    (tmp_path / "file").write_text("precious")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("precious")
    (tmp_path / "empty").mkdir()
    for name in ("file", "dir", "empty"):
        with pytest.raises(FileExistsError):   # CheckpointExistsError is one
            save_state(tmp_path / name, {"ok": True})
    assert (tmp_path / "file").read_text() == "precious"
    assert (tmp_path / "dir" / "notes.txt").read_text() == "precious"
    assert list((tmp_path / "empty").iterdir()) == []
    assert sorted(os.listdir(tmp_path)) == ["dir", "empty", "file", "final", "latest"]


def test_verify_failure_commits_nothing(tmp_path, monkeypatch):
    save_state(tmp_path / "ck", {"v": 1})
    monkeypatch.setattr(_ckpt_io, "trees_equal", lambda a, b: False)   # what save_state uses
    with pytest.raises(CheckpointError, match="do not read back"):
        save_state(tmp_path / "ck2", {"v": 2})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck", "latest"]
    assert load_state(tmp_path / "latest") == {"v": 1}
    real_write = _atomic._write_file

    def flaky_write(path, data):  # the disk returns other bytes than were written
        real_write(path, data[:-1] + bytes([data[-1] ^ 1]) if path.name.endswith("safetensors") else data)

    monkeypatch.setattr(_atomic, "_write_file", flaky_write)
    with pytest.raises(CheckpointError, match="tensors.safetensors reads back other bytes"):
        save_state(tmp_path / "ck3", {"v": torch.ones(4)})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck", "latest"]


def test_pointers_name_checkpoints_and_move_atomically(tmp_path):
    """``final`` is a one-line file naming a checkpoint; moving it leaves every checkpoint as
    it was. Mutation caught: ``write_pointer`` writing the pointer in place (the test sees the
    hidden temporary it must leave nothing of, and the replaced content)."""
    d = tmp_path
    for i in (1, 2):
        save_state(d / f"step_{i}", {"step": i})
    ck.write_pointer(d, "final", "step_1")
    assert (d / "final").read_text() == "step_1\n"
    assert load_state(d / "final") == {"step": 1}
    ck.write_pointer(d, "final", "step_2")
    assert load_state(d / "final") == {"step": 2} and load_state(d / "step_1") == {"step": 1}
    assert ck.pointers(d) == {"final": "step_2", "latest": "step_2"}
    assert sorted(os.listdir(d)) == ["final", "latest", "step_1", "step_2"]   # no leftovers
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at .*step_9"):
        ck.write_pointer(d, "final", "step_9")
    with pytest.raises(ck.CheckpointExistsError, match="is a checkpoint directory"):
        ck.write_pointer(d, "step_1", "step_2")
    with pytest.raises(ValueError, match="names are letters"):
        ck.write_pointer(d, "final", "../step_1")
    assert load_state(d / "final") == {"step": 2}


def test_latest_pointer_and_listing(tmp_path):
    d = tmp_path / "ckpts"
    assert ck.list_checkpoints(d) == [] and ck.latest_checkpoint(d) is None
    for i in (1, 2, 3):
        save_state(d / f"step_{i}", {"step": i})
    ck.write_pointer(d, "best", "step_2")
    assert [p.name for p in ck.list_checkpoints(d)] == ["step_1", "step_2", "step_3"]
    assert (d / "latest").read_text() == "step_3\n"
    assert ck.latest_checkpoint(d) == d / "step_3"
    assert load_state(d / "best") == {"step": 2}
    save_state(d / "step_5", {"step": 5}, update_latest=False)
    assert ck.latest_checkpoint(d) == d / "step_3"
    # a pointer at something missing: listing falls back to the newest, loading names both
    (d / "latest").write_text("step_99\n")
    assert ck.latest_checkpoint(d) == d / "step_5" and "latest" not in ck.pointers(d)
    with pytest.raises(CheckpointNotFoundError, match="latest names 'step_99'"):
        load_state(d / "latest")
    (d / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="not a checkpoint name"):
        load_state(d / "latest")
    # hidden and incomplete directories are never listed
    (d / f".step_6.tmp-{ck._host_tag()}-{os.getpid()}-ab").mkdir()
    (d / "step_7").mkdir()
    (d / "step_7" / "tensors.safetensors").write_bytes(b"half")
    assert [p.name for p in ck.list_checkpoints(d)][-1] == "step_5"


def test_unique_name(tmp_path):
    assert ck.unique_name(tmp_path, "step_4") == "step_4"
    save_state(tmp_path / "step_4", {"a": 1})
    assert ck.unique_name(tmp_path, "step_4") == "step_4.1"
    save_state(tmp_path / "step_4.1", {"a": 2})
    (tmp_path / "step_4.2").write_text("a file takes the name too")
    assert ck.unique_name(tmp_path, "step_4") == "step_4.3"


def test_prune_keeps_the_newest_and_whatever_a_pointer_names(tmp_path):
    """Mutations caught: pruning a checkpoint that ``best``/``final``/``latest`` name; keeping
    other than the ``keep`` newest; ignoring ``match``."""
    d = tmp_path
    for i in range(1, 7):
        save_state(d / f"step_{i}", {"s": i})
    save_state(d / "manual", {"s": 0}, update_latest=False)
    ck.write_pointer(d, "best", "step_2")
    ck.write_pointer(d, "final", "step_6")
    removed = ck.prune_checkpoints(d, keep=2, match=r"^step_\d+(\.\d+)?$")
    assert [p.name for p in removed] == ["step_1", "step_3", "step_4"]
    assert sorted(p.name for p in ck.list_checkpoints(d)) == \
        ["manual", "step_2", "step_5", "step_6"]
    assert not [n for n in os.listdir(d) if n.startswith(".")]  # trash removed
    # without `match` every checkpoint counts (`manual` is the newest); `latest` is kept too
    ck.write_pointer(d, "latest", "step_5")
    ck.write_pointer(d, "final", "step_2")
    assert [p.name for p in ck.prune_checkpoints(d, keep=1)] == ["step_6"]
    assert sorted(p.name for p in ck.list_checkpoints(d)) == ["manual", "step_2", "step_5"]
    with pytest.raises(ValueError, match="keep=-1"):
        ck.prune_checkpoints(d, keep=-1)


def test_leftovers_of_dead_writers_are_removed(tmp_path):
    dead, host = _dead_pid(), ck._host_tag()
    (tmp_path / f".step_1.tmp-{host}-{dead}-00ff").mkdir()
    (tmp_path / f".step_1.tmp-{host}-{dead}-00ff" / "tensors.safetensors").write_bytes(b"x" * 100)
    (tmp_path / f".step_0.trash-{host}-{dead}-00ff").mkdir()
    (tmp_path / f".latest.tmp-{host}-{dead}-00ff").write_text("step_1")
    live = tmp_path / f".step_2.tmp-{host}-{os.getpid()}-00ff"
    live.mkdir()
    save_state(tmp_path / "step_3", {"a": 1})
    assert sorted(os.listdir(tmp_path)) == sorted(["step_3", "latest", live.name])


def test_leftovers_of_other_hosts_are_kept_until_old(tmp_path):
    fresh = tmp_path / ".step_1.tmp-0000abcd-1-00ff"   # another host's writer, maybe at work
    stale = tmp_path / ".step_2.tmp-0000abcd-1-00ff"
    fresh.mkdir()
    stale.mkdir()
    two_hours_ago = __import__("time").time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assert ck._host_tag() != "0000abcd"
    assert ck.remove_leftovers(tmp_path) == [stale]
    assert fresh.exists() and not stale.exists()


def test_map_location(tmp_path):
    save_state(tmp_path / "ck", {"w": torch.ones(2)})
    assert load_state(tmp_path / "ck", map_location=None)["w"].device.type == "cpu"
    assert load_state(tmp_path / "ck", map_location="meta")["w"].device.type == "meta"


def test_meta_json_is_plain_data(tmp_path):
    save_state(tmp_path / "ck", {"w": torch.ones(2), "k": {0: (1.5, None)}})
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    assert meta["format"] == "chronomoe-checkpoint" and meta["format_version"] == ck.FORMAT_VERSION
    assert meta["kind"] == "trainer"
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"meta.json", "tensors.safetensors"}


# ----------------------------------------------------------------------------------------
# ChronovisorCheckpoint
# ----------------------------------------------------------------------------------------
from chronomoe_dyn import ControllerConfig  # noqa: E402
from chronomoe_torch.checkpoint import ChronovisorCheckpoint  # noqa: E402
from chronomoe_torch.controller import PxTController  # noqa: E402

_GEO_CFG = ControllerConfig(phase_noise=0.05, kappa_smoothing=0.3)


def _drive(ctrl, ticks: int, seed: int = 0) -> None:
    """Skewed routing with per-expert losses: a landscape forms, R moves, κ anneals."""
    g = torch.Generator().manual_seed(seed)
    L, E = ctrl.num_layers, ctrl.num_experts
    skew = torch.linspace(1.0, 3.0, E)
    for i in range(ticks):
        counts = torch.poisson(skew.expand(L, E) * 20, generator=g)
        ctrl.observe_all(counts, counts * 0.6, counts * (1.0 + 0.1 * torch.arange(E)),
                         logit_scale_L=1.0 + torch.rand(L, generator=g))
        ctrl.set_knob(0.5 - i / max(ticks, 1))
        ctrl.tick()


def _sd(ctrl) -> dict:
    return dict(ctrl.state_dict())


def test_geo_round_trip_restores_bit_exact_and_continues_identically(tmp_path):
    a = PxTController(3, 5, config=_GEO_CFG, seed=11, history_length=64)
    _drive(a, 137)
    geo = ChronovisorCheckpoint.from_controller(a)
    # the seed's names, with the shapes of the controller
    assert geo.structural_T_global.shape == () and len(geo.lens_states) == 3     # v2: scalar
    assert geo.logit_scale_L.shape == (3,) and bool((geo.logit_scale_L > 1.0).all())
    ls = geo.lens_states[1]
    for f in ("lens_E", "pressure_E", "T_fast_E", "Tbar_local_E", "Tbar_hier_E", "T_eff_E"):
        assert getattr(ls, f).shape == (5,)
    assert torch.equal(ls.Tbar_hier_E, geo.structural_T_global * ls.Tbar_local_E)
    assert torch.equal(geo.coherence_history, a.get_coherence_history())
    assert torch.equal(geo.meta_knob_history, a.get_meta_knob_history())
    assert geo.clocks == {"tick": 137, "micro_ticks": 27, "macro_ticks": 6}
    assert geo.phases_LE.dtype == torch.float64 and geo.kappa_target.shape == ()
    geo.save(tmp_path / "geo")
    back = ChronovisorCheckpoint.load(tmp_path / "geo")
    b = PxTController(3, 5, config=_GEO_CFG, seed=99, history_length=64)
    assert not trees_equal(_sd(a), _sd(b))
    back.restore_to_controller(b)
    assert trees_equal(_sd(a), _sd(b))
    assert b.num_ticks == 137  # host tick mirror re-synced
    assert torch.equal(a.routing_fields()[0], b.routing_fields()[0])
    assert torch.equal(a.routing_fields()[1], b.routing_fields()[1])
    _drive(a, 45, seed=3)  # crosses micro and macro ticks; phase noise keyed on (seed, tick)
    _drive(b, 45, seed=3)
    assert trees_equal(_sd(a), _sd(b))


def test_geo_preserves_the_landscape(tmp_path):
    """The seed's point: without it a resumed run starts from a flat landscape."""
    a = PxTController(2, 6, seed=1)
    _drive(a, 600)
    before = a.get_structural_temperature_diagnostics()
    assert before["local_variance_mean"] > 0
    ChronovisorCheckpoint.from_controller(a).save(tmp_path / "geo")
    fresh = PxTController(2, 6, seed=1)
    assert fresh.get_structural_temperature_diagnostics()["local_variance_mean"] == 0
    ChronovisorCheckpoint.load(tmp_path / "geo").restore_to_controller(fresh)
    assert fresh.get_structural_temperature_diagnostics() == before


def test_geo_history_bound_and_other_ring_lengths():
    a = PxTController(2, 3, history_length=16)
    _drive(a, 40)
    full = a.get_coherence_history()
    assert full.shape == (16,)
    geo5 = ChronovisorCheckpoint.from_controller(a, history_length=5)
    assert torch.equal(geo5.coherence_history, full[-5:])
    assert torch.equal(geo5.meta_knob_history, a.get_meta_knob_history()[-5:])
    geo = ChronovisorCheckpoint.from_controller(a)
    for H in (4, 16, 100):
        b = PxTController(2, 3, history_length=H)
        geo.restore_to_controller(b)
        got = b.get_coherence_history()
        m = min(H, 16)
        assert torch.equal(got[-m:], full[-m:]), H
    with pytest.raises(ValueError, match="history_length=-1"):
        ChronovisorCheckpoint.from_controller(a, history_length=-1)


def test_geo_restore_into_other_shapes_or_dtype_is_refused():
    a = PxTController(3, 4)
    _drive(a, 10)
    geo = ChronovisorCheckpoint.from_controller(a)
    for L, E in ((2, 4), (3, 8)):
        with pytest.raises(CheckpointMismatchError,
                           match=fr"\(layers, experts\) = \(3, 4\); the controller has "
                                 fr"\(layers, experts\) = \({L}, {E}\)"):
            geo.restore_to_controller(PxTController(L, E))
    with pytest.raises(CheckpointMismatchError, match="float32 in the checkpoint, float64 in the controller"):
        geo.restore_to_controller(PxTController(3, 4, dtype=torch.float64))


def test_geo_restore_with_other_config_warns_naming_fields():
    a = PxTController(2, 3)
    _drive(a, 10)
    b = PxTController(2, 3, config=ControllerConfig(coupling=0.5))
    with pytest.warns(UserWarning, match=r"'coupling': \(0.25, 0.5\)"):
        ChronovisorCheckpoint.from_controller(a).restore_to_controller(b)
    assert trees_equal(_sd(a), _sd(b))


def test_geo_refuses_stale_snapshots(tmp_path):
    a = PxTController(2, 3)
    _drive(a, 10)
    geo = ChronovisorCheckpoint.from_controller(a)
    _drive(a, 1)
    with pytest.raises(CheckpointError, match="stale snapshot: captured at tick 10, the controller is now at tick 11"):
        geo.save(tmp_path / "geo")
    assert not (tmp_path / "geo").exists()
    geo.save(tmp_path / "geo", allow_stale=True)
    assert ChronovisorCheckpoint.load(tmp_path / "geo").tick == 10


def test_geo_refuses_zeroed_or_inconsistent_controllers():
    a = PxTController(2, 3)
    _drive(a, 10)
    with torch.no_grad():
        a.usage_LE.zero_()
    with pytest.raises(CheckpointError, match="usage_LE: rows must sum to 1"):
        ChronovisorCheckpoint.from_controller(a)
    b = PxTController(2, 3)
    with torch.no_grad():
        for buf in b.buffers():
            buf.zero_()
    with pytest.raises(CheckpointError, match="zeroed, uninitialised or corrupted"):
        ChronovisorCheckpoint.from_controller(b)
    c = PxTController(2, 3)
    _drive(c, 5)
    c._tick_host = 7  # a host mirror out of step with the buffer
    with pytest.raises(CheckpointError, match=r"host tick mirror \(7\) disagrees with its tick_counter buffer \(5\)"):
        ChronovisorCheckpoint.from_controller(c)


def test_geo_refuses_controllers_with_unknown_state():
    class Extended(PxTController):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.register_buffer("new_state_LE", torch.zeros(2, 3))

    with pytest.raises(CheckpointError, match=r"does not know \['new_state_LE'\]"):
        ChronovisorCheckpoint.from_controller(Extended(2, 3))
    geo = ChronovisorCheckpoint.from_controller(PxTController(2, 3))
    with pytest.raises(CheckpointMismatchError, match=r"does not hold: \['new_state_LE'\]"):
        geo.restore_to_controller(Extended(2, 3))


def test_geo_tampered_file_is_refused(tmp_path):
    a = PxTController(2, 3)
    _drive(a, 25)
    ChronovisorCheckpoint.from_controller(a).save(tmp_path / "geo")
    tree = load_state(tmp_path / "geo", kind="chronovisor")
    tree["structural_T_global"] = tree["structural_T_global"] * 1.01  # a plausible edit
    save_state(tmp_path / "edited", tree, kind="chronovisor")  # consistent files, wrong state
    with pytest.raises(CheckpointError, match="does not match its state_checksum"):
        ChronovisorCheckpoint.load(tmp_path / "edited")
    del tree["lens_states"]
    save_state(tmp_path / "partial", tree, kind="chronovisor")
    with pytest.raises(CheckpointError, match="malformed.*lens_states"):
        ChronovisorCheckpoint.load(tmp_path / "partial")
    save_state(tmp_path / "other", {"a": 1}, kind="something")
    with pytest.raises(CheckpointMismatchError, match="of kind 'something'"):
        ChronovisorCheckpoint.load(tmp_path / "other")


def test_geo_from_a_model(tmp_path):
    from chronomoe_torch.model import ChronovisorMixtralForCausalLM, MixtralConfig
    model = ChronovisorMixtralForCausalLM(MixtralConfig(
        vocab_size=32, hidden_dim=16, num_layers=2, num_experts=4, num_heads=2, num_kv_heads=1,
        max_seq_length=8))
    _drive(model.controller, 7)
    geo = ChronovisorCheckpoint.from_controller(model)
    assert geo.matches(model.controller) and geo.num_layers == 2
    with pytest.raises(TypeError, match="expected a PxTController"):
        ChronovisorCheckpoint.from_controller(torch.nn.Linear(2, 2))


def test_geo_from_trainer_checkpoint_without_controller_state(tmp_path):
    save_state(tmp_path / "t", {"model": {"w": torch.ones(2)}, "configs": {}}, kind="trainer")
    with pytest.raises(CheckpointMismatchError, match="holds 0 controllers' state"):
        ChronovisorCheckpoint.load(tmp_path / "t")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_and_rng_states(tmp_path):
    t = torch.randn(4, 4, device="cuda")
    save_state(tmp_path / "ck", {"t": t, "alias": t, "rng": ck.capture_rng_state()})
    want = torch.rand(3, device="cuda")
    back = load_state(tmp_path / "ck", map_location="cuda")
    assert back["t"].device.type == "cuda" and torch.equal(back["t"], t)
    assert back["alias"] is back["t"]
    assert len(back["rng"]["torch_cuda"]) == torch.cuda.device_count()
    ck.restore_rng_state(back["rng"])
    assert torch.equal(torch.rand(3, device="cuda"), want)
    assert load_state(tmp_path / "ck")["t"].device.type == "cpu"


def test_a_law_v1_checkpoint_is_refused_with_one_clear_line(tmp_path):
    """Format 2 is controller law v2: a format-1 (law v1) checkpoint, of any kind, is refused
    by one line naming the versions found and expected and what to do; nothing is loaded.
    Catches: reading format 1 as if it were 2 (``FORMAT_VERSION`` left at 1) or a message
    without the remedy."""
    assert ck.FORMAT_VERSION == 2
    ctrl = PxTController(2, 4)
    p = ck.save_state(tmp_path / "v1", {"controller": dict(ctrl.state_dict())}, kind="attach",
                      format_version=1)
    for load in (lambda: ck.load_state(p), lambda: ChronovisorCheckpoint.load(p)):
        with pytest.raises(ck.CheckpointVersionError) as ei:
            load()
        msg = str(ei.value)
        assert "\n" not in msg
        assert "format version 1 (controller law v1)" in msg
        assert "reads format version 2 (controller law v2)" in msg
        assert "start a new run" in msg


def test_hf_callback_state_follows_a_rewritten_trainer_checkpoint(tmp_path):
    """transformers' Trainer may write ``checkpoint-<n>`` again (a new run into the same
    output_dir); the callback's ``chronomoe/`` inside it is then replaced, not refused (the only
    caller that replaces a checkpoint; it removes the old one first). Mutation caught: no
    ``remove_dir`` in ``ChronoMoECallback.save`` (CheckpointExistsError)."""
    pytest.importorskip("transformers")
    import _attach_models as M
    from chronomoe_torch.hf_callback import STATE_DIRNAME, ChronoMoECallback
    cb = ChronoMoECallback()
    cb.setup(M.make_hf("mixtral"))
    cb.save(tmp_path / "checkpoint-2")
    cb.handle.controller.set_knob(0.25)
    cb.save(tmp_path / "checkpoint-2")
    back = load_state(tmp_path / "checkpoint-2" / STATE_DIRNAME)
    assert float(back["attach"]["controller"]["kappa_target"]) == 0.25
    assert sorted(os.listdir(tmp_path / "checkpoint-2")) == [STATE_DIRNAME, "latest"]
