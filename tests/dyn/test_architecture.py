"""Architectural rules of chronomoe_dyn, as tests (STYLE.md §9; issue 10):

* no file under chronomoe_dyn/ imports torch (an AST scan of every .py file, not just the
  modules ``import chronomoe_dyn`` happens to load);
* no import cycle between chronomoe_dyn's modules (imports inside functions included: a lazy
  import only hides a cycle);
* every ControllerConfig field reaches the Numba kernels: the kernels' parameter record is
  derived from ``dataclasses.fields``, and every field is read by a kernel unless it is listed
  as host-only with the reason (and then no kernel reads it);
* one registry of counter-RNG streams (``rng.STREAMS``): no module defines its own STREAM_ id;
* every module stays under ~400 lines unless its docstring says why it is longer.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import chronomoe_dyn
from chronomoe_dyn import ControllerConfig
from chronomoe_dyn.config import CHOICES

PKG = Path(chronomoe_dyn.__file__).resolve().parent
FILES = sorted(PKG.rglob("*.py"))


def _torch_imports(path: Path) -> list[str]:
    """'file:line import' for every import of torch (or a torch submodule) in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        out += [f"{path.relative_to(PKG.parent)}:{node.lineno} {n}" for n in names
                if n == "torch" or n.startswith("torch.")]
    return out


def test_no_file_in_chronomoe_dyn_imports_torch():
    """Mutation caught (checked): ``import torch`` at the top of chronomoe_dyn/studies/common.py
    (a module ``import chronomoe_dyn`` does not load, so the import-time test missed it), or a
    ``from torch.nn import functional`` inside a function anywhere in the package."""
    assert len(FILES) > 20 and any(p.parent.name == "studies" for p in FILES)
    bad = [hit for p in FILES for hit in _torch_imports(p)]
    assert bad == []


def test_the_torch_scan_sees_every_import_form(tmp_path):
    """The scanner itself: all spellings are found, look-alikes are not."""
    f = tmp_path / "m.py"
    f.write_text("import os, torch.nn as nn\nfrom torch import tensor\n"
                 "def g():\n    import torch\n    from torch.utils import data\n"
                 "import torchvision\nfrom .torch import x\nfrom torchaudio import y\n")
    global PKG
    old, PKG = PKG, tmp_path.parent
    try:
        hits = _torch_imports(f)
    finally:
        PKG = old
    assert [h.split()[-1] for h in hits] == ["torch.nn", "torch", "torch", "torch.utils"]


def test_there_is_no_import_cycle(import_graph, import_cycles):
    """Mutation caught (checked): state.py importing order_parameter from law (version 1's
    hidden state↔law cycle, as a lazy import in init_state)."""
    graph = import_graph(PKG)
    assert "chronomoe_dyn.law" in graph["chronomoe_dyn.routing"]     # the graph sees imports
    assert "chronomoe_dyn._kernels.libm" in graph["chronomoe_dyn._kernels.kuramoto"]
    assert import_cycles(graph) == []
    assert import_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]


def _kernel_attribute_reads(name: str = "cp") -> set[str]:
    reads = set()
    for p in sorted((PKG / "_kernels").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == name:
                reads.add(node.attr)
    return reads


def test_every_config_field_reaches_the_kernels():
    """The parameter record has every field under its own name with the config's value (ints
    and floats cast by the declared type, string choices as their index), and every field but
    the host-only ones is read by a kernel (``cp.<field>``). Mutations caught (checked):
    a new ControllerConfig field that no kernel reads (version 1's hand-written list silently
    dropped such a field); a kernel reading a field under a stale name (``cp.pressure_scale``);
    a host-only field that a kernel does read after all."""
    from chronomoe_dyn._kernels import HOST_ONLY_FIELDS, ctrl_params
    cfg = ControllerConfig(micro_period=3, coupling=1, lens_clock="micro", pressure_gain=2)
    cp = ctrl_params(cfg)
    names = [f.name for f in dataclasses.fields(ControllerConfig)]
    assert list(cp._fields) == names
    for f in dataclasses.fields(ControllerConfig):
        v, got = getattr(cfg, f.name), getattr(cp, f.name)
        if f.name in CHOICES:
            assert got == CHOICES[f.name].index(v) and isinstance(got, int)
        else:
            assert got == v and type(got).__name__ == f.type, f.name
    reads = _kernel_attribute_reads("cp")
    assert reads <= set(names), f"kernels read unknown fields {sorted(reads - set(names))}"
    assert set(names) - set(HOST_ONLY_FIELDS) - reads == set()
    assert set(HOST_ONLY_FIELDS) & reads == set()


def test_one_registry_of_rng_streams():
    """Every STREAM_* id is defined in rng.py (other modules import it). Mutation caught: a
    module defining ``STREAM_X = 19`` of its own (v1 had them in env.py and kuramoto.py)."""
    defined = {}
    for p in FILES:
        for node in ast.parse(p.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id.startswith("STREAM_"):
                        defined.setdefault(t.id, []).append(p.name)
    assert defined and all(where == ["rng.py"] for where in defined.values()), defined
    from chronomoe_dyn import rng
    assert set(rng.STREAMS.values()) == {getattr(rng, n) for n in defined}


@pytest.mark.parametrize("mod", ["chronomoe_dyn._kernels.driver"])
def test_batch_and_serial_drivers_are_one_body(mod):
    """simulate_batch and simulate_serial compile the same Python function (issue 10: one
    driver body), with and without parallel=True."""
    import importlib
    d = importlib.import_module(mod)
    assert d.simulate_batch.py_func is d.simulate_serial.py_func
    assert d.simulate_batch.targetoptions.get("parallel") is True
    assert not d.simulate_serial.targetoptions.get("parallel")


def test_kernel_caches_are_keyed_on_every_kernel_source():
    """Numba keys a cache on the function's own file only; the kernels span several files and
    bake in rng/law/config/schedule/state. Every cached kernel must use the keyed cache, whose
    key covers all of those files. Mutation caught: ``kernel`` falling back to plain
    ``njit(cache=True)`` (editing libm.py would then leave a stale driver in the cache)."""
    from chronomoe_dyn import _kernels
    from chronomoe_dyn._kernels import jit
    want = set((PKG / "_kernels").glob("*.py")) | {PKG / n for n in ("rng.py", "law.py",
                                                                       "config.py", "schedule.py",
                                                                       "state.py")}
    assert set(jit.SOURCES) == {p.resolve() for p in want}
    cached = [getattr(_kernels, n) for n in _kernels.__all__
              if hasattr(getattr(_kernels, n), "py_func")]
    assert len(cached) >= 10
    for d in cached:
        assert isinstance(d._cache, jit._KeyedCache), d
        key = d._cache._index_key((), type("C", (), {"magic_tuple": lambda self: ()})())
        assert key[-1][0] == jit.SOURCE_KEY


MAX_LINES = 420
""""About 400 lines": a module longer than this must say why in its docstring."""


def test_long_modules_say_why():
    """A module over ~400 lines names the reason in its docstring ("... 400 lines: ...").
    Mutation caught (checked): a 421-line module without the reason (runload.py padded)."""
    long = {}
    for p in FILES:
        n = len(p.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or ""
        if n > MAX_LINES and "400 lines" not in doc:
            long[p.relative_to(PKG).as_posix()] = n
    assert long == {}
