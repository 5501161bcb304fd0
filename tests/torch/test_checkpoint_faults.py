"""Faults and hostile input for checkpoint IO: SIGKILL while saving, malicious pickles,
corrupted / truncated / edited files, other format versions.

The SIGKILL test forks saving processes from a "zygote" subprocess (torch imported once, so
each trial costs no interpreter start-up) and kills them with SIGKILL, two ways:
  * sweep: the writer kills itself right before (and inside) its n-th filesystem operation
    (mkdir, each file write, half of a file write, each fsync, rename, pointer replace, rmtree
    of a pruned checkpoint), for every n: every step boundary of a save, a pointer move and a
    prune is hit;
  * random: the writer saves in a loop (step_<k>, move `final` to it, prune to 2) and the test
    kills it after a random delay.
After each kill: every visible checkpoint must load and equal the state it was written from,
and every visible pointer must name one; a hidden leftover that loads must equal its state too
(nothing half-written loads); the newest checkpoint the writer reported committed must still be
there, and `latest` and `final` must name one at least that new (checkpoints lost: goal 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chronomoe_torch import checkpoint as ck
from chronomoe_torch.checkpoint import (
    FORMAT_VERSION,
    CheckpointCorruptError, CheckpointError, CheckpointVersionError, load_state, save_state,
    trees_equal,
)



# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
_UNPICKLE_EVENTS: list = []
_WATCH = [False]


def _audit(event, args):  # records any unpickling of globals while a test watches
    if _WATCH[0] and event == "pickle.find_class":
        _UNPICKLE_EVENTS.append(args)


sys.addaudithook(_audit)


def _rewrite(ckpt: Path, name: str, data: bytes, fix_manifest: bool) -> None:
    """Replace one file of a checkpoint; optionally make the manifest agree (a deliberate,
    consistent tampering rather than corruption)."""
    (ckpt / name).write_bytes(data)
    if fix_manifest:
        m = json.loads((ckpt / "manifest.json").read_text())
        m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (ckpt / "manifest.json").write_text(json.dumps(m))


def _small(tmp_path: Path) -> Path:
    """A new small checkpoint (``ck``, ``ck.1``, ...: checkpoints are never overwritten)."""
    return save_state(tmp_path / ck.unique_name(tmp_path, "ck"),
                      {"w": torch.arange(4.0), "step": 3, "opt": {0: {"m": torch.ones(2)}}})


# --------------------------------------------------------------------------------------
# corruption and tampering
# --------------------------------------------------------------------------------------
def test_truncated_tensors_file(tmp_path):
    p = _small(tmp_path)
    data = (p / "tensors.safetensors").read_bytes()
    (p / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointCorruptError, match=r"tensors\.safetensors has \d+ bytes, the manifest says"):
        load_state(p)
    _rewrite(p, "tensors.safetensors", data[: len(data) // 2], fix_manifest=True)
    with pytest.raises(CheckpointCorruptError, match=r"tensors\.safetensors is not a valid safetensors"):
        load_state(p)


def test_flipped_byte_in_tensors_file(tmp_path):
    p = _small(tmp_path)
    data = bytearray((p / "tensors.safetensors").read_bytes())
    data[-3] ^= 0x10  # inside the tensor data, so safetensors alone would accept it
    (p / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=str(p / "tensors.safetensors") + " fails its checksum"):
        load_state(p)
    with pytest.raises(CheckpointCorruptError, match="fails its checksum"):
        ck.verify_checkpoint(p)


def test_edited_meta_json(tmp_path):
    p = _small(tmp_path)
    good = (p / "meta.json").read_bytes()
    edited = good.replace(b'["step",3]', b'["step",4]')  # same size, one digit changed
    assert edited != good and len(edited) == len(good)
    (p / "meta.json").write_bytes(edited)
    with pytest.raises(CheckpointCorruptError, match=r"meta\.json fails its checksum"):
        load_state(p)


@pytest.mark.parametrize("node, msg", [
    ({"t": "pickle", "v": "gASV"}, "unknown node type 'pickle'"),
    ({"t": "object", "module": "os", "name": "system"}, "unknown node type 'object'"),
    ({"t": "int", "v": "9" * 5000}, "malformed 'int' node"),
    ({"t": "float", "v": "1e5"}, "malformed 'float' node"),
    ({"t": "tensor", "key": "nope", "dtype": "float32", "shape": [4]}, "references tensor 'nope'"),
    ({"t": "dtype", "v": "nn"}, "unknown torch dtype"),
    ([1, 2], "unexpected JSON value of type list"),
])
def test_consistently_tampered_meta_json(tmp_path, node, msg):
    """Even with a manifest that agrees, meta.json can only describe data."""
    p = _small(tmp_path)
    meta = json.loads((p / "meta.json").read_text())
    meta["tree"]["items"].append(["evil", node])
    _rewrite(p, "meta.json", json.dumps(meta).encode(), fix_manifest=True)
    with pytest.raises(CheckpointCorruptError, match=str(p / "meta.json") + ".*" + msg):
        load_state(p)


def test_meta_and_tensors_disagree(tmp_path):
    p = _small(tmp_path)
    meta = json.loads((p / "meta.json").read_text())
    meta["tree"]["items"][0][1]["shape"] = [5]
    _rewrite(p, "meta.json", json.dumps(meta).encode(), fix_manifest=True)
    with pytest.raises(CheckpointCorruptError, match=r"is float32 \[4\] in tensors\.safetensors but float32 \[5\] in meta\.json"):
        load_state(p)
    p2 = save_state(tmp_path / "ck2", {"w": torch.ones(3), "v": torch.zeros(2)})
    meta = json.loads((p2 / "meta.json").read_text())
    meta["tree"]["items"] = meta["tree"]["items"][:1]
    _rewrite(p2, "meta.json", json.dumps(meta).encode(), fix_manifest=True)
    with pytest.raises(CheckpointCorruptError, match="holds tensors that meta.json does not reference"):
        load_state(p2)


def test_missing_and_broken_manifest(tmp_path):
    p = _small(tmp_path)
    good = (p / "manifest.json").read_bytes()
    (p / "manifest.json").unlink()
    with pytest.raises(CheckpointCorruptError, match=str(p / "manifest.json") + " is missing"):
        load_state(p)
    (p / "manifest.json").write_bytes(good[:20])
    with pytest.raises(CheckpointCorruptError, match=r"manifest\.json is not valid JSON"):
        load_state(p)
    m = json.loads(good)
    m["files"]["../../escape"] = {"size": 1, "sha256": "00"}
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointCorruptError, match="'files' must list exactly"):
        load_state(p)
    (p / "manifest.json").write_bytes(good)
    (p / "meta.json").unlink()
    with pytest.raises(CheckpointCorruptError, match=str(p / "meta.json") + " is missing"):
        load_state(p)


def test_other_format_version(tmp_path):
    """A checkpoint of a later format is refused naming both versions (relative to
    FORMAT_VERSION, so a version bump keeps the test meaningful)."""
    newer = FORMAT_VERSION + 1
    p = save_state(tmp_path / "newer", {"a": 1}, format_version=newer)
    with pytest.raises(CheckpointVersionError,
                       match=rf"has format version {newer} .*reads format version "
                             rf"{FORMAT_VERSION}"):
        load_state(p)
    m = json.loads((p / "manifest.json").read_text())
    m["format"] = "someone-else"
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointVersionError, match="format 'someone-else', expected 'chronomoe-checkpoint'"):
        load_state(p)
    # meta.json must agree with the manifest on the version
    p1 = _small(tmp_path)
    meta = json.loads((p1 / "meta.json").read_text())
    meta["format_version"] = newer
    _rewrite(p1, "meta.json", json.dumps(meta).encode(), fix_manifest=True)
    with pytest.raises(CheckpointCorruptError,
                       match=f"format_version={newer} but manifest.json says {FORMAT_VERSION}"):
        load_state(p1)


# --------------------------------------------------------------------------------------
# malicious pickle
# --------------------------------------------------------------------------------------
class _Evil:
    """Unpickling this opens (creates) the file at ``target``: arbitrary code at load time."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_creates_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(marker)))
    torch_payload = tmp_path / "evil_torch.pt"
    torch.save({"w": torch.ones(1), "x": _Evil(str(marker))}, torch_payload)
    # positive control: the payloads really do create the file when unpickled
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=payload, check=True)
    assert marker.exists()
    marker.unlink()
    subprocess.run([sys.executable, "-c",
                    f"import torch; torch.load({str(torch_payload)!r}, weights_only=False)"], check=True)
    assert marker.exists()
    marker.unlink()

    evil_pt = tmp_path / "step_1.pt"
    evil_pt.write_bytes(payload)
    attempts = []
    _WATCH[0] = True
    try:
        # 1. a pickle where a checkpoint is expected
        for target in (evil_pt, torch_payload):
            with pytest.raises(CheckpointError, match="is not a checkpoint directory"):
                load_state(target)
            attempts.append(target.name)
        # 2. a pickle in place of each file of a checkpoint, with a manifest that agrees
        for name, msg in (("tensors.safetensors", "not a valid safetensors"),
                          ("meta.json", "not valid JSON"), ("manifest.json", "not valid JSON")):
            for data in (payload, torch_payload.read_bytes()):
                p = _small(tmp_path)
                _rewrite(p, name, data, fix_manifest=name != "manifest.json")
                with pytest.raises(CheckpointCorruptError, match=str(p / name) + ".*" + msg):
                    load_state(p)
                attempts.append(name)
        # 3. a pickle as the `latest` pointer
        newest = ck.latest_checkpoint(tmp_path)
        (tmp_path / "latest").write_bytes(payload)
        with pytest.raises(CheckpointError, match="not a checkpoint name"):
            load_state(tmp_path / "latest")
        attempts.append("latest")
        assert ck.latest_checkpoint(tmp_path) == newest      # the newest checkpoint instead
    finally:
        _WATCH[0] = False
    assert len(attempts) == 9
    assert not marker.exists()
    assert _UNPICKLE_EVENTS == []  # nothing was even looked up by an unpickler


# --------------------------------------------------------------------------------------
# SIGKILL while saving
# --------------------------------------------------------------------------------------
TREE_SRC = '''
import torch

def base_tensors(H=128):
    """Shapes of MixtralConfig(vocab 256, hidden H=128, 4 layers, 8 experts) + AdamW moments."""
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (256, H)}
    for i in range(4):
        for n, s in (("q", (H, H)), ("k", (H // 4, H)), ("v", (H // 4, H)), ("o", (H, H)),
                     ("router", (8, H)), ("w1", (8, 2 * H, H)), ("w3", (8, 2 * H, H)),
                     ("w2", (8, H, 2 * H)), ("norm1", (H,)), ("norm2", (H,))):
            shapes[f"layers.{i}.{n}"] = s
    model = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    m = [torch.randn(s, generator=g) * 1e-3 for s in shapes.values()]
    v = [torch.rand(s, generator=g) * 1e-6 for s in shapes.values()]
    return model, m, v

def make_tree(base, step):
    model, m, v = base
    model = dict(model)
    model["embed.weight"] = model["embed.weight"] + step
    opt = {i: {"step": torch.tensor(float(step)), "exp_avg": m[i], "exp_avg_sq": v[i]}
           for i in range(len(m))}
    return {"model": model, "optimizer": {"state": opt, "param_groups": [{"lr": 1e-3, "params": list(opt)}]},
            "counters": {"global_step": step}, "rng": torch.full((816,), step % 256, dtype=torch.uint8)}
'''

ZYGOTE_SRC = TREE_SRC + '''
import os, signal, shutil, sys, time
torch.set_num_threads(1)
from chronomoe_torch import _atomic as fs  # every mutating filesystem operation goes through it
from chronomoe_torch import checkpoint as ck

BASE = {"sweep": base_tensors(32), "loop": base_tensors(128)}
REAL_OS, REAL_SHUTIL, REAL_WRITE = fs.os, fs.shutil, fs._write_file
STEP = r"^step_\\d+(\\.\\d+)?$"


class Killer:
    """Counts filesystem operations of checkpoint IO (_atomic); SIGKILLs itself at the n-th."""
    def __init__(self, n):
        self.n, self.count = n, 0
    def hit(self):
        self.count += 1
        if self.count == self.n:
            os.kill(os.getpid(), signal.SIGKILL)
    def wrap(self, fn):
        def inner(*a, **k):
            self.hit()
            return fn(*a, **k)
        return inner


def install(n):
    k = Killer(n)
    class OS:
        def __getattr__(self, name):
            f = getattr(REAL_OS, name)
            return k.wrap(f) if name in ("rename", "replace", "mkdir", "fsync") else f
    class SH:
        def __getattr__(self, name):
            f = getattr(REAL_SHUTIL, name)
            return k.wrap(f) if name == "rmtree" else f
    def write(path, data):
        k.hit()
        with open(path, "wb") as f:  # half of the file reaches the disk, then maybe the kill
            f.write(data[: len(data) // 2])
            f.flush()
            k.hit()
            f.write(data[len(data) // 2:])
        return REAL_WRITE(path, data)
    fs.os, fs.shutil, fs._write_file = OS(), SH(), write


def log(logf, line):
    logf.write(line + "\\n")
    logf.flush()


def save_step(d, logf, tree, step, keep):
    """What the trainer does: a new step_<n> directory, `final` moved to it, old ones pruned."""
    name = ck.unique_name(d, f"step_{step}")
    ck.save_state(d / name, tree)
    log(logf, f"commit {name} {step}")
    ck.write_pointer(d, "final", name)
    log(logf, f"commit final {step}")
    ck.prune_checkpoints(d, keep=keep, match=STEP)


def child(mode, directory, start, logpath, n):
    d = ck.Path(directory)
    with open(logpath, "a") as logf:
        if mode == "sweep":  # a 16x smaller state: this covers every operation, not size
            ck.prune_checkpoints(d, keep=1, match=STEP)
            install(n)
            save_step(d, logf, make_tree(BASE[mode], start), start, keep=1)
            os._exit(3)  # n was past the last operation: the sweep is complete
        for step in range(start, start + 10_000):
            save_step(d, logf, make_tree(BASE[mode], step), step, keep=2)
    os._exit(0)


print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "fork":
        pid = os.fork()
        if pid == 0:
            try:
                child(cmd[1], cmd[2], int(cmd[3]), cmd[4], int(cmd[5]))
            finally:
                os._exit(1)
        print("pid", pid, flush=True)
    elif cmd[0] == "reap":
        _, status = os.waitpid(int(cmd[1]), 0)
        print("reaped", os.waitstatus_to_exitcode(status), flush=True)
    elif cmd[0] == "quit":
        break
'''


class _Zygote:
    def __init__(self, workdir: Path) -> None:
        src = workdir / "zygote.py"
        src.write_text(ZYGOTE_SRC)
        self.p = subprocess.Popen([sys.executable, str(src)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.p.stdout.readline().strip() == "ready"

    def fork(self, mode, directory, start, logpath, n=0) -> int:
        self.p.stdin.write(f"fork {mode} {directory} {start} {logpath} {n}\n")
        self.p.stdin.flush()
        word, pid = self.p.stdout.readline().split()
        assert word == "pid"
        return int(pid)

    def reap(self, pid) -> int:
        self.p.stdin.write(f"reap {pid}\n")
        self.p.stdin.flush()
        word, code = self.p.stdout.readline().split()
        assert word == "reaped"
        return int(code)

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
            self.p.wait(timeout=10)
        except Exception:
            self.p.kill()


def _committed(logpath: Path) -> dict[str, tuple[int, str]]:
    """"final" / "step" -> (newest step, checkpoint name) the writer reported committed (the
    call had returned)."""
    out: dict[str, tuple[int, str]] = {}
    if logpath.exists():
        for line in logpath.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "commit":  # a torn last line is ignored
                kind = "final" if parts[1] == "final" else "step"
                if int(parts[2]) >= out.get(kind, (-1, ""))[0]:
                    out[kind] = (int(parts[2]), parts[1])
    return out


class _Audit:
    def __init__(self, make_tree, base) -> None:
        self.make_tree, self.base = make_tree, base
        self.kills = self.lost = self.bad_visible = self.bad_hidden = 0
        self.leftovers: dict[str, int] = {}
        self.removed = 0

    def _step_of(self, path: Path) -> int | None:
        """The step of the checkpoint at ``path`` (directory or pointer) when it loads and
        equals the state of that step; None (and counted bad) otherwise."""
        try:
            tree = load_state(path)
        except CheckpointError:
            return None
        step = tree["counters"]["global_step"]
        return step if trees_equal(tree, self.make_tree(self.base, step)) else None

    def check(self, d: Path, logpath: Path) -> None:
        """After one kill: audit the directory."""
        self.kills += 1
        steps = {}
        for name in sorted(os.listdir(d)):
            m = ck._HIDDEN_RE.match(name)
            if m:
                self.leftovers[m["what"]] = self.leftovers.get(m["what"], 0) + 1
                if (d / name).is_dir() and (d / name / "manifest.json").is_file():
                    # a hidden leftover must never load as something wrong
                    try:
                        tree = load_state(d / name)
                    except CheckpointError:
                        continue
                    step = tree["counters"]["global_step"]
                    self.bad_hidden += not trees_equal(tree, self.make_tree(self.base, step))
                continue
            step = self._step_of(d / name)       # a checkpoint, or a pointer naming one
            self.bad_visible += step is None
            steps[name] = step
        self.removed += len(ck.remove_leftovers(d))
        done = _committed(logpath)
        if "step" in done:
            step, name = done["step"]
            # the newest committed checkpoint is there, and `latest` names one at least as new
            self.lost += steps.get(name) != step
            self.lost += (steps.get("latest") or -1) < step
        if "final" in done:
            self.lost += (steps.get("final") or -1) < done["final"][0]


@pytest.mark.slow
def test_sigkill_while_saving_loses_nothing(tmp_path):
    t0 = time.monotonic()
    ns: dict = {}
    exec(TREE_SRC, ns)
    audit = _Audit(ns["make_tree"], ns["base_tensors"](32))
    zyg = _Zygote(tmp_path)
    rng = random.Random(1234)
    try:
        start = 1
        # 1. sweep: kill at every filesystem operation of a save, a pointer move and a prune
        d = tmp_path / "sweep"
        d.mkdir()
        logpath = tmp_path / "log_sweep"
        for n in range(1, 200):
            pid = zyg.fork("sweep", d, start, logpath, n)
            code = zyg.reap(pid)
            start += 1
            if code == 3:  # nothing left to kill: every operation was covered
                swept = n - 1
                break
            assert code == -signal.SIGKILL, f"writer exited with {code} at operation {n}"
            audit.check(d, logpath)
        else:
            pytest.fail("the sweep never finished")
        t_sweep = time.monotonic() - t0
        # 2. random delays while saving in a loop
        d = tmp_path / "random"
        d.mkdir()
        audit.base = ns["base_tensors"](128)
        for trial in range(20):
            logpath = tmp_path / f"log_random_{trial}"
            pid = zyg.fork("loop", d, 1000 * (trial + 1), logpath)
            time.sleep(rng.uniform(0.02, 1.0))
            os.kill(pid, signal.SIGKILL)
            assert zyg.reap(pid) == -signal.SIGKILL
            audit.check(d, logpath)
    finally:
        zyg.close()
    elapsed = time.monotonic() - t0
    print(f"\nSIGKILL: {audit.kills} kill points ({swept} operations swept, 20 random), "
          f"checkpoints lost {audit.lost}, visible-but-bad {audit.bad_visible}, "
          f"hidden-that-loads-wrong {audit.bad_hidden}, leftovers seen {audit.leftovers}, "
          f"leftovers removed {audit.removed}; {elapsed:.1f} s (sweep {t_sweep:.1f} s)")
    assert audit.lost == 0
    assert audit.bad_visible == 0
    assert audit.bad_hidden == 0
    # the sweep really reached the dangerous states, and later saves cleaned them up
    assert audit.leftovers.get("tmp", 0) > 0 and audit.leftovers.get("trash", 0) > 0
    assert audit.removed > 0
    assert elapsed < 240, "far beyond the ~25 s this takes on an idle 2-core machine"


# --------------------------------------------------------------------------------------
# a reader while a writer moves the pointer and prunes what it named
# --------------------------------------------------------------------------------------
def test_concurrent_reader_never_sees_a_broken_checkpoint(tmp_path):
    """A reader loads ``final`` while a writer saves new checkpoints, moves ``final`` to each
    and prunes the old ones. Mutation caught: no retry in ``_read`` (a reader whose target was
    pruned under it reports a missing file)."""
    import threading
    states = [{"k": k, "w": torch.full((64, 256), float(k))} for k in range(2)]
    save_state(tmp_path / "step_0", states[0])
    ck.write_pointer(tmp_path, "final", "step_0")
    stop = threading.Event()
    errors: list = []

    def writer():
        try:
            for i in range(1, 41):
                save_state(tmp_path / f"step_{i}", states[i % 2], verify=False)
                ck.write_pointer(tmp_path, "final", f"step_{i}")
                ck.prune_checkpoints(tmp_path, keep=0)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            stop.set()

    t = threading.Thread(target=writer)
    t.start()
    loads = 0
    while not stop.is_set():
        tree = load_state(tmp_path / "final")
        assert trees_equal(tree, states[tree["k"]])  # one of the two, never a mix
        loads += 1
    t.join()
    assert not errors and loads > 0
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_40"]
