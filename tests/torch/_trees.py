"""Comparing checkpoint trees in tests: where two trees differ, as readable paths."""

from __future__ import annotations

from chronomoe_torch import checkpoint as ckpt


def tree_diff(a, b, path: str = "tree") -> list[str]:
    """Paths where two trees (dicts, lists, tuples, tensors, scalars) differ; [] if equal
    (``checkpoint.trees_equal`` at the leaves)."""
    if isinstance(a, dict) and isinstance(b, dict):
        extra = [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"] if set(a) != set(b) else []
        return extra + [d for k in a if k in b for d in tree_diff(a[k], b[k], f"{path}[{k!r}]")]
    if isinstance(a, (list, tuple)) and type(a) is type(b) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tree_diff(x, y, f"{path}[{i}]")]
    return [] if ckpt.trees_equal(a, b) else [path]
