"""Checkpoint IO (chronomoe_torch.checkpoint): round trips, atomic replace, latest/list/prune,
recovery of orphaned checkpoints, and ChronovisorCheckpoint."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import OrderedDict
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("exchange", [True, False], ids=["rename_exchange", "rename_aside"])
def test_replace_existing_checkpoint(tmp_path, monkeypatch, exchange):
    monkeypatch.setattr(ck, "_USE_RENAME_EXCHANGE", exchange)
    save_state(tmp_path / "final", {"v": torch.zeros(3)})
    save_state(tmp_path / "final", {"v": torch.ones(3), "new": 1})
    back = load_state(tmp_path / "final")
    assert torch.equal(back["v"], torch.ones(3)) and back["new"] == 1
    assert sorted(os.listdir(tmp_path)) == ["final", "latest"]  # no leftovers


def test_refuses_to_replace_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "file").write_text("precious")
    with pytest.raises(CheckpointError, match="is not a checkpoint directory"):
        save_state(tmp_path / "file", {})
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="non-empty directory that is not a checkpoint"):
        save_state(tmp_path / "dir", {})
    assert (tmp_path / "file").read_text() == "precious"
    assert (tmp_path / "dir" / "notes.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    save_state(tmp_path / "empty", {"ok": True})  # an empty directory is fine
    assert load_state(tmp_path / "empty") == {"ok": True}


def test_verify_failure_commits_nothing(tmp_path, monkeypatch):
    save_state(tmp_path / "ck", {"v": 1})
    monkeypatch.setattr(ck, "trees_equal", lambda a, b: False)
    with pytest.raises(CheckpointError, match="do not read back"):
        save_state(tmp_path / "ck", {"v": 2})
    monkeypatch.undo()
    assert load_state(tmp_path / "ck") == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["ck", "latest"]
    real_write = ck._write_file

    def flaky_write(path, data):  # the disk returns other bytes than were written
        real_write(path, data[:-1] + bytes([data[-1] ^ 1]) if path.name.endswith("safetensors") else data)

    monkeypatch.setattr(ck, "_write_file", flaky_write)
    with pytest.raises(CheckpointError, match="tensors.safetensors fails its checksum"):
        save_state(tmp_path / "ck", {"v": torch.ones(4)})
    monkeypatch.undo()
    assert load_state(tmp_path / "ck") == {"v": 1}


def test_latest_pointer_and_listing(tmp_path):
    d = tmp_path / "ckpts"
    assert ck.list_checkpoints(d) == [] and ck.latest_checkpoint(d) is None
    for i in (1, 2, 3):
        save_state(d / f"step_{i}", {"step": i})
    save_state(d / "best", {"step": 2})
    assert [p.name for p in ck.list_checkpoints(d)] == ["step_1", "step_2", "step_3", "best"]
    assert (d / "latest").read_text() == "best\n"
    assert ck.latest_checkpoint(d) == d / "best"
    assert load_state(d / "latest") == {"step": 2}
    save_state(d / "step_4", {"step": 4})
    assert load_state(d / "latest") == {"step": 4}
    save_state(d / "step_5", {"step": 5}, update_latest=False)
    assert ck.latest_checkpoint(d) == d / "step_4"
    # a pointer at something missing falls back to the newest complete checkpoint
    (d / "latest").write_text("step_99\n")
    assert ck.latest_checkpoint(d) == d / "step_5"
    with pytest.raises(CheckpointNotFoundError, match="step_99"):
        load_state(d / "latest")
    (d / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="not a checkpoint name"):
        load_state(d / "latest")
    # hidden and incomplete directories are never listed
    (d / ".step_6.tmp-1-ab").mkdir()
    (d / "step_7").mkdir()
    (d / "step_7" / "tensors.safetensors").write_bytes(b"half")
    assert [p.name for p in ck.list_checkpoints(d)][-1] == "step_5"


def test_prune_keeps_last_n_and_protected(tmp_path):
    d = tmp_path
    save_state(d / "final", {"s": 0})
    for i in range(1, 6):
        save_state(d / f"step_{i}", {"s": i})
        if i == 2:
            save_state(d / "best", {"s": 2})
    removed = ck.prune_checkpoints(d, keep=2)
    assert sorted(p.name for p in removed) == ["step_1", "step_2", "step_3"]
    assert sorted(p.name for p in ck.list_checkpoints(d)) == ["best", "final", "step_4", "step_5"]
    assert not [n for n in os.listdir(d) if n.startswith(".")]  # trash removed
    # the checkpoint that `latest` names is never pruned, even when older ones are newer by name
    (d / "latest").write_text("step_4\n")
    save_state(d / "step_6", {"s": 6}, update_latest=False)
    ck.prune_checkpoints(d, keep=1)
    assert sorted(p.name for p in ck.list_checkpoints(d)) == ["best", "final", "step_4"]
    assert ck.prune_checkpoints(d, keep=0) == []
    with pytest.raises(ValueError, match="keep=-1"):
        ck.prune_checkpoints(d, keep=-1)


def test_orphaned_old_checkpoint_is_recovered(tmp_path):
    """The rename-aside protocol crashed between its two renames: only `.final.old-*` exists."""
    save_state(tmp_path / "final", {"v": 7})
    orphan = tmp_path / f".final.old-{_dead_pid()}-0abc"
    os.rename(tmp_path / "final", orphan)
    assert load_state(tmp_path / "final") == {"v": 7}
    assert (tmp_path / "final").is_dir() and not orphan.exists()
    # an orphan of a writer that is still alive (this process) is left alone
    os.rename(tmp_path / "final", tmp_path / f".final.old-{os.getpid()}-0abc")
    with pytest.raises(CheckpointNotFoundError):
        load_state(tmp_path / "final")


def test_stale_leftovers_of_dead_writers_are_cleaned(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".step_1.tmp-{dead}-00ff").mkdir()
    (tmp_path / f".step_1.tmp-{dead}-00ff" / "tensors.safetensors").write_bytes(b"x" * 100)
    (tmp_path / f".latest.tmp-{dead}-00ff").write_text("step_1")
    live = tmp_path / f".step_2.tmp-{os.getpid()}-00ff"
    live.mkdir()
    save_state(tmp_path / "step_3", {"a": 1})
    assert sorted(os.listdir(tmp_path)) == sorted(["step_3", "latest", live.name])


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
