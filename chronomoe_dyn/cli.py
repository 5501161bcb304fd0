"""The ``chronomoe-dyn`` command line: run dynamics studies and plot runs.

  chronomoe-dyn study NAME [--out DIR] [--quick] [--seed N] [--set KEY=VALUE ...] [--no-progress]
  chronomoe-dyn study --list
  chronomoe-dyn plot RUN [--out DIR] [--system N]

``RUN`` is a run directory (with ``metrics.jsonl`` from training or ``trajectory.npz`` from the
simulator), or one such file. ``--set`` overrides an entry of the study's config (dotted keys
reach nested entries, values are parsed as JSON: ``--set ticks=20000 --set env.top_k=2``).

Exit status: 0 on success, 1 when the study or plot fails on its input (missing run directory,
malformed file, bad config value), 2 on a usage error (unknown study, bad option). Set
``CHRONOMOE_DYN_DEBUG=1`` to get the traceback instead of the one-line message. Studies and
Numba load only when a study runs; nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

PROG = "chronomoe-dyn"


def _version() -> str:
    from . import __version__
    return __version__


def build_parser() -> argparse.ArgumentParser:
    from .studies import STUDIES
    p = argparse.ArgumentParser(
        prog=PROG, description="ChronoMoE-Dyn: dynamics studies and plots of the P×T routing "
                               "controller (NumPy + Numba).")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    names = ", ".join(STUDIES)
    st = sub.add_parser("study", help="run a dynamics study (plots + summary.json + config.json)",
                        description=f"Run a dynamics study. Studies: {names}. Outputs go to "
                                    f"studies/out/<name>/ unless --out is given.")
    st.add_argument("name", nargs="?", metavar="NAME", help=f"study to run ({names})")
    st.add_argument("--list", action="store_true", help="list the studies and their questions")
    st.add_argument("--out", metavar="DIR", help="output directory (default studies/out/<name>)")
    st.add_argument("--quick", action="store_true",
                    help="small, fast version (seconds): for smoke tests and trying options")
    st.add_argument("--seed", type=int, default=0, metavar="N", help="base random seed (0)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override a config entry (repeatable; VALUE parsed as JSON)")
    st.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    st.set_defaults(subparser=st)

    pl = sub.add_parser("plot", help="render PNGs of a training run or a simulator trajectory",
                        description="Render PNGs of a run: a directory with metrics.jsonl "
                                    "(training) or trajectory.npz (simulator), or one such file.")
    pl.add_argument("run", metavar="RUN_DIR", help="run directory, metrics .jsonl or .npz file")
    pl.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/plots)")
    pl.add_argument("--system", type=int, default=0, metavar="B",
                    help="which system of a batched trajectory to draw (0)")
    return p


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare string such as cosine
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cmd_study(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .studies import STUDIES, get_study
    if args.list:
        width = max(len(n) for n in STUDIES)
        for name, (_mod, question) in STUDIES.items():
            print(f"{name:<{width}}  {question}")
        return 0
    if not args.name:
        parser.error("study: give a study NAME or --list (studies: " + ", ".join(STUDIES) + ")")
    try:
        module = get_study(args.name)
    except KeyError as e:
        parser.error(str(e.args[0]))
    overrides = _parse_overrides(args.overrides)
    t0 = time.perf_counter()
    summary = module.main(out_dir=args.out, quick=args.quick, seed=args.seed,
                          progress=not args.no_progress, overrides=overrides or None)
    dt = time.perf_counter() - t0
    print(f"{module.NAME}: done in {dt:.1f} s -> {summary.get('out_dir')}")
    for line in summary.get("headline", []):
        print(f"  {line}")
    for fig in summary.get("figures", []):
        print(f"  figure: {fig}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run
    paths = plot_run(args.run, out_dir=args.out, system=args.system)
    print(f"wrote {len(paths)} figure(s):")
    for p in paths:
        print(f"  {p}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "study":
            return _cmd_study(args, args.subparser)
        return _cmd_plot(args)
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        if os.environ.get("CHRONOMOE_DYN_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m chronomoe_dyn.cli
    sys.exit(main())
