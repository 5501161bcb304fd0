"""The ``chronomoe-dyn`` command line: run dynamics studies and plot runs.

  chronomoe-dyn study NAME [--out DIR] [--quick] [--seed N] [--set KEY=VALUE ...]
                           [--in-process | --scheduler tcp://HOST:PORT] [--workers N]
                           [--threads N] [--overwrite] [--no-progress] [--debug]
  chronomoe-dyn study --list
  chronomoe-dyn plot RUN [--out DIR] [--system N] [--debug]

A study splits into cells (one ``simulate`` call each) that run on a dask LocalCluster
(``--workers`` processes × ``--threads`` threads ≤ the cores; default: one single-threaded
worker per core), on a running dask scheduler (``--scheduler``), or one after the other in this
process (``--in-process``). Each finished cell lands in ``<out>/<name>.zarr``; a rerun computes
only the cells the store lacks; a store of another study or config is refused unless
``--overwrite``. Outputs go to ``studies/out/<name>/`` (``studies/out/<name>-quick/`` with
``--quick``) unless ``--out`` is given.

``RUN`` is a run directory (with ``metrics.jsonl`` from training, or ``trajectory.npz`` /
``trajectory.zarr`` from the simulator), or one such file or store. ``--set`` overrides an entry
of the study's config: dotted keys reach nested entries and every field of the controller, env
and schedule configs (``--set env.top_k=1 --set controller.coupling=0.1``); values are JSON.

Exit status: 0 on success; 2 on a usage error or a bad input (unknown study or key, a value of
the wrong type, a missing or unreadable run, a store that holds something else, a scheduler
that does not answer), with a one-line ``error:`` message; 1 when cells of a study fail, or on
an internal error. ``--debug`` (or ``CHRONOMOE_DYN_DEBUG=1``) shows the traceback instead.
Studies, dask and Numba load only when a study runs; nothing here imports torch.
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
USER_ERRORS = (ValueError, KeyError, OSError)
"""Exceptions that report a bad input (exit 2); OSError covers missing and unreadable files."""


def _version() -> str:
    from . import __version__
    return __version__


def build_parser() -> argparse.ArgumentParser:
    from .studies import STUDIES
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of a one-line message")
    p = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        description="ChronoMoE-Dyn: dynamics studies and plots of the P×T routing controller "
                    "(NumPy + Numba).")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    names = ", ".join(STUDIES)
    st = sub.add_parser("study", parents=[common],
                        help="run a dynamics study (zarr store + plots + summary.json)",
                        description=f"Run a dynamics study. Studies: {names}. Outputs go to "
                                    f"studies/out/<name>/ (<name>-quick/ with --quick) unless "
                                    f"--out is given.")
    st.add_argument("name", nargs="?", metavar="NAME", help=f"study to run ({names})")
    st.add_argument("--list", action="store_true", help="list the studies and their questions")
    st.add_argument("--out", metavar="DIR", help="output directory (default studies/out/<name>)")
    st.add_argument("--quick", action="store_true",
                    help="small, fast version (seconds), in studies/out/<name>-quick/")
    st.add_argument("--seed", type=int, default=0, metavar="N", help="base random seed (0)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override a config entry (repeatable; VALUE parsed as JSON)")
    where = st.add_mutually_exclusive_group()
    where.add_argument("--in-process", action="store_true",
                       help="run the cells one after the other in this process")
    where.add_argument("--scheduler", metavar="ADDR",
                       help="address of a running dask scheduler (tcp://HOST:PORT)")
    st.add_argument("--workers", type=int, metavar="N",
                    help="LocalCluster worker processes (default: cores // threads)")
    st.add_argument("--threads", type=int, metavar="N",
                    help="threads per cell for Numba (default 1 on a cluster; all cores "
                         "in-process)")
    st.add_argument("--overwrite", action="store_true",
                    help="replace a store that holds another study or config")
    st.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    st.set_defaults(subparser=st)

    pl = sub.add_parser("plot", parents=[common],
                        help="render PNGs of a training run or a simulator trajectory",
                        description="Render PNGs of a run: a directory with metrics.jsonl "
                                    "(training), trajectory.npz or trajectory.zarr (simulator), "
                                    "or one such file.")
    pl.add_argument("run", metavar="RUN_DIR", help="run directory, metrics .jsonl, .npz or .zarr")
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


def _execution(args: argparse.Namespace):
    from .cluster import ClusterSpec, limit_threads
    from .studies.runner import Execution
    if args.in_process:
        if args.workers is not None:
            raise ValueError("--workers: only for a cluster (leave it out with --in-process)")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads={args.threads}: expected an integer >= 1")
            limit_threads(args.threads)
        return Execution(None, args.overwrite)
    spec = ClusterSpec(scheduler=args.scheduler, workers=args.workers, threads=args.threads)
    return Execution(spec, args.overwrite)


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
    execution = _execution(args)
    t0 = time.perf_counter()
    summary = module.main(out_dir=args.out, quick=args.quick, seed=args.seed,
                          progress=not args.no_progress, overrides=overrides or None,
                          execution=execution)
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


def _error(msg: Any) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = args.debug or bool(os.environ.get("CHRONOMOE_DYN_DEBUG"))
    from .studies.runner import StudyError
    try:
        if args.command == "study":
            return _cmd_study(args, args.subparser)
        return _cmd_plot(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except StudyError as e:
        if debug:
            raise
        _error(e)
        return 1
    except USER_ERRORS as e:
        if debug:
            raise
        _error(e.args[0] if isinstance(e, KeyError) and e.args else e)
        return 2
    except Exception as e:  # noqa: BLE001  (one line, unless --debug)
        if debug:
            raise
        _error(f"internal error ({type(e).__name__}: {e}); run with --debug for the traceback")
        return 1


if __name__ == "__main__":  # python -m chronomoe_dyn.cli
    sys.exit(main())
