"""Every code block of README.md runs as written (issue 11).

How blocks are run:
* ```python blocks: saved as a script and run with ``python`` in a fresh temporary folder.
* ```bash blocks: run with ``bash -euo pipefail`` in a fresh temporary folder, line by line as a
  user would paste them. The two set-up blocks (the first block of the "Set-up" section: install
  and the main job; the next one: the test command) are what ``.ci/run`` executes on a fresh
  clone; ``test_ci_runs_the_readme_setup`` checks that the two agree instead of installing the
  package a second time or running the suite inside itself.
* A block whose first line is ``# torchrun <args> FILE.py`` is saved as FILE.py and run with that
  torchrun command (the data-parallel example).
* Any other fence (text, output examples) is not code and is not run.
Long examples read their size from an environment variable with the README's value as the default
(``${STEPS:-500}`` in bash, ``os.environ.get("STEPS", ...)`` in Python); the tests set ``SMALL``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SMALL = {"STEPS": "8", "SEEDS": "0", "SYSTEMS": "4", "TICKS": "400"}
"""Sizes the tests run the long examples at (each example names its variable)."""
TIMEOUT_S = 900

_FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks(text: str) -> list[dict]:
    """[{lang, code, line, section}] of the fenced blocks of a Markdown text."""
    blocks, section, cur = [], "", None
    for i, line in enumerate(text.splitlines(), start=1):
        if cur is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            m = _FENCE.match(line)
            if m:
                cur = {"lang": m.group(1), "code": [], "line": i, "section": section}
        elif line.strip() == "```":
            cur["code"] = "\n".join(cur["code"]) + "\n"
            blocks.append(cur)
            cur = None
        else:
            cur["code"].append(line)
    if cur is not None:
        raise ValueError(f"README.md: the fence opened at line {cur['line']} is never closed")
    return blocks


def _blocks() -> list[dict]:
    return readme_blocks(README.read_text(encoding="utf-8"))


def _setup_block(blocks: list[dict]) -> dict:
    return next(b for b in blocks if b["section"].lower().startswith("set-up")
                and b["lang"] == "bash")


def _runnable() -> list[dict]:
    """Every python/bash block except the two set-up commands (install + main job, and the test
    command: the suite cannot run itself; ``.ci/run`` runs both, checked below)."""
    blocks = _blocks()
    setup = _setup_block(blocks)
    tests = blocks[blocks.index(setup) + 1]
    return [b for b in blocks if b["lang"] in ("python", "bash") and b is not setup
            and b is not tests]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", **SMALL)
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("block", _runnable(), ids=lambda b: f"line{b['line']}-{b['lang']}")
def test_readme_block_runs_as_written(block, tmp_path):
    code, first = block["code"], block["code"].splitlines()[0]
    if first.startswith("# torchrun "):
        cmd = shlex.split(first[2:])
        script = next(a for a in cmd if a.endswith(".py"))
        (tmp_path / script).write_text(code, encoding="utf-8")
        cmd[0] = str(Path(sys.executable).with_name("torchrun"))
    elif block["lang"] == "python":
        (tmp_path / "block.py").write_text(code, encoding="utf-8")
        cmd = [sys.executable, "block.py"]
    else:
        (tmp_path / "block.sh").write_text(code, encoding="utf-8")
        cmd = ["bash", "-euo", "pipefail", "block.sh"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    assert r.returncode == 0, (f"README.md line {block['line']} ({block['section']}) failed:\n"
                               f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def test_ci_runs_the_readme_setup():
    """.ci/run installs and runs exactly the README's set-up commands (block 1: install and the
    main job; block 2: the test command), so the two cannot drift apart."""
    blocks = _blocks()
    setup = _setup_block(blocks)
    tests = blocks[blocks.index(setup) + 1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_cmds = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.startswith("#")]

    def commands(code: str) -> list[str]:
        out = []
        for ln in code.splitlines():
            ln = ln.split("#", 1)[0].strip()
            out += [c.strip() for c in ln.split("&&") if c.strip()]
        return out

    want = commands(setup["code"]) + commands(tests["code"])
    norm = lambda c: c.replace("python3 -m pip", "pip").replace("python -m pip", "pip")  # noqa
    got = [norm(c) for c in ci_cmds]
    for c in want:
        assert norm(c) in got, f".ci/run does not run the README's `{c}`"


def test_the_harness_finds_every_fence():
    """The parser sees every fenced block (an unclosed fence is an error), and the README has
    the blocks the issue names: set-up, dynamics, training, attach, compare."""
    blocks = _blocks()
    fences = sum(1 for ln in README.read_text(encoding="utf-8").splitlines() if _FENCE.match(ln))
    assert fences == 2 * len(blocks)                   # every opening fence and its closing one
    text = "\n".join(b["code"] for b in blocks)
    for needle in ("chronomoe-dyn study phases", "simulate(", "ChronoMoETrainer(", "attach(",
                   "chronomoe-train compare"):
        assert needle in text, needle
    with pytest.raises(ValueError, match="never closed"):
        readme_blocks("```python\nx = 1\n")


def _map_entries(part: str) -> list[str]:
    """The entries of one package's part of the map: a line indented by two spaces starts an
    entry, deeper-indented lines continue it."""
    entries: list[str] = []
    for ln in part.splitlines()[1:]:
        if ln.startswith("  ") and not ln.startswith("   "):
            entries.append(ln)
        elif ln.strip() and entries:
            entries[-1] += " " + ln.strip()
    return entries


def _mapped_modules(part: str) -> set[str]:
    """Module paths (relative, without .py) one package's part of the map names: ``x.py`` and
    the ``(+ a, b)`` lists for top-level modules; every word of a ``sub/`` entry for the
    modules of that subpackage."""
    out: set[str] = set()
    for entry in _map_entries(part):
        head = entry.split()[0]
        if head.endswith("/"):
            out |= {f"{head}{w}" for w in re.findall(r"\b[a-z_][a-z0-9_]*\b", entry)}
        else:
            out |= set(re.findall(r"\b(_?[a-z][a-z0-9_]*)\.py\b", entry))
            for lst in re.findall(r"\(\+ ([^)]*)\)", entry):
                out |= {w.strip() for w in lst.split(",")}
    return out


def test_the_package_map_matches_the_tree():
    """Issue 10: the README's package map names every module of each package in that package's
    part (top-level modules as ``x.py`` or in a ``(+ ...)`` list, subpackage modules on the
    subpackage's entry), and every ``x.py`` it names exists. Catches (all tried): the map's
    ``_rng.py`` line deleted; ``law.py`` removed from its line (``law`` still appears as a word
    elsewhere in the map); a ``ghost.py`` added to a line."""
    blocks = _blocks()
    i = next(k for k, b in enumerate(blocks) if b["section"].lower() == "package map")
    text = blocks[i]["code"]
    dyn_part, rest = text.split("\nadapters/chronomoe_torch/", 1)
    torch_part = "adapters/chronomoe_torch/" + rest.split("\ntests/", 1)[0]
    for part, root in ((dyn_part, ROOT / "chronomoe_dyn"),
                       (torch_part, ROOT / "adapters" / "chronomoe_torch")):
        modules = {f.relative_to(root).with_suffix("").as_posix() for f in root.rglob("*.py")
                   if f.name != "__init__.py" and "__pycache__" not in f.parts}
        named = _mapped_modules(part)
        missing = sorted(modules - named)
        assert not missing, f"README package map ({root.name}) does not name: {missing}"
        ghosts = sorted(m for m in named if "/" not in m and m not in modules)
        assert not ghosts, f"README package map ({root.name}) names missing modules: {ghosts}"
