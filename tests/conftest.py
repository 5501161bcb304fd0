"""Shared factories for the whole test suite (kept small; add fixtures as parts need them).

Helpers are handed out as session-scoped fixtures (not imported from this file), so they work
under any pytest import mode and inside Hypothesis tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from chronomoe_dyn import ControllerConfig, ControllerState, RoutingObservation, init_state


def _make_obs(counts, weight_sum=None, loss_sum=None) -> RoutingObservation:
    c = np.asarray(counts, dtype=np.float64)
    w = 0.5 * c if weight_sum is None else np.asarray(weight_sum, dtype=np.float64)
    loss = None if loss_sum is None else np.asarray(loss_sum, dtype=np.float64)
    return RoutingObservation(counts=c, weight_sum=w, loss_sum=loss)


def _uniform_obs(num_layers: int, num_experts: int, tokens_per_expert: float = 32.0,
                 loss_per_token: float | None = None) -> RoutingObservation:
    c = np.full((num_layers, num_experts), float(tokens_per_expert))
    return _make_obs(c, loss_sum=None if loss_per_token is None else c * loss_per_token)


@pytest.fixture(scope="session")
def make_obs():
    """make_obs(counts, weight_sum=None, loss_sum=None) -> RoutingObservation from nested lists;
    weight_sum defaults to half the counts."""
    return _make_obs


@pytest.fixture(scope="session")
def uniform_obs():
    """uniform_obs(L, E, tokens_per_expert=32, loss_per_token=None): every expert of every
    layer gets the same tokens (and the same loss per token)."""
    return _uniform_obs


@pytest.fixture(scope="session")
def cfg() -> ControllerConfig:
    """The default controller configuration (DESIGN.md §3); frozen, so safe to share."""
    return ControllerConfig()


@pytest.fixture
def state_2x4(cfg) -> ControllerState:
    """A fresh 2-layer, 4-expert state, seed 0."""
    return init_state(cfg, 2, 4, seed=0)


# ------------------------------------------------------------------------------------------
# Import graphs of the packages (the architecture tests of tests/dyn and tests/torch)
def _import_graph(pkg) -> dict[str, set[str]]:
    """module -> the modules of package directory ``pkg`` it imports anywhere in the file
    (inside functions and ``if TYPE_CHECKING:`` too: a lazy import only hides a cycle)."""
    import ast
    from pathlib import Path
    pkg = Path(pkg).resolve()

    def name_of(path: Path) -> str:
        parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts)

    modules = {name_of(p): p for p in sorted(pkg.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    root = ".".join(base + ([node.module] if node.module else []))
                else:
                    root = node.module or ""
                targets = [root] + [f"{root}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def _import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles of ``graph``, ignoring edges into a package's own __init__ from inside the
    package (``from . import rng`` loads the package first in any case)."""
    found, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if m.startswith(n + "."):
                continue
            if state.get(n) == 1:
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


@pytest.fixture(scope="session")
def import_graph():
    """import_graph(package_dir) -> {module: modules of the package it imports}."""
    return _import_graph


@pytest.fixture(scope="session")
def import_cycles():
    """import_cycles(graph) -> the import cycles of a graph, each as [m0, m1, ..., m0]."""
    return _import_cycles
