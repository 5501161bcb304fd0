"""The chronomoe-dyn command line: subcommands, exit codes, error messages, torch-freedom."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chronomoe_dyn import cli
from chronomoe_dyn.studies import STUDIES, get_study


def test_list_names_every_study(capsys):
    assert cli.main(["study", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("phases", "valley-repair", "kuramoto", "sweep", "calibrate"):
        assert name in out


def test_unknown_study_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["study", "no-such-study"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "unknown study 'no-such-study'" in err and "phases" in err


def test_study_without_name(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["study"])
    assert ei.value.code == 2
    assert "--list" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "study" in capsys.readouterr().err


def test_plot_missing_run_dir(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "missing")]) == 2   # a user mistake: exit 2
    err = capsys.readouterr().err
    assert "run not found" in err and "missing" in err


def test_plot_malformed_file_names_line(tmp_path, capsys):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 0, "R": 0.5}\n{"step": 1, "R": 0.5\n')
    assert cli.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{f} line 2" in err and "not valid JSON" in err


def test_plot_writes_pngs(tmp_path, capsys):
    f = tmp_path / "run" / "metrics.jsonl"
    f.parent.mkdir()
    f.write_text("".join(json.dumps({"step": s, "R": 0.1 * s, "kappa": 0.5, "gate": 0.7,
                                     "loss": 3.0 - 0.1 * s}) + "\n" for s in range(8)))
    out = tmp_path / "figs"
    assert cli.main(["plot", str(f.parent), "--out", str(out)]) == 0
    assert (out / "curves.png").stat().st_size > 5_000
    assert (out / "loss.png").is_file()
    assert str(out / "curves.png") in capsys.readouterr().out


def test_bad_set_override_is_an_error(tmp_path, capsys):
    rc = cli.main(["study", "kuramoto", "--quick", "--no-progress", "--out", str(tmp_path),
                   "--set", "no_such_key=3"])
    assert rc == 2
    assert "unknown config key 'no_such_key'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cli._parse_overrides(["novalue"])
    assert cli._parse_overrides(["a=3", "b.c=[1, 2]", "d=cosine"]) == \
        {"a": 3, "b.c": [1, 2], "d": "cosine"}


def test_registry_resolves_both_spellings():
    for name in STUDIES:
        mod = get_study(name)
        assert callable(mod.main) and mod.NAME == name
    assert get_study("valley_repair") is get_study("valley-repair")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_and_studies_do_not_import_torch():
    code = ("import sys, chronomoe_dyn.cli, chronomoe_dyn.plot, chronomoe_dyn.studies.common\n"
            "from chronomoe_dyn.studies import STUDIES, get_study\n"
            "[get_study(n) for n in STUDIES]\n"
            "import chronomoe_dyn.cli as c; c.main(['study', '--list'])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print('ok')")
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "chronomoe_dyn.cli", "study", "--list"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kuramoto" in r.stdout
    r = subprocess.run([sys.executable, "-m", "chronomoe_dyn.cli", "plot", "/nonexistent/run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "run not found" in r.stderr


def test_thin_scripts_run_the_cli():
    root = Path(__file__).resolve().parents[2] / "studies"
    for name in ("phases", "valley_repair", "kuramoto", "sweep", "calibrate"):
        r = subprocess.run([sys.executable, str(root / f"{name}.py"), "--help"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "--quick" in r.stdout and "--seed" in r.stdout


def test_study_runs_from_the_cli_with_overrides(tmp_path, capsys):
    out = tmp_path / "k"
    rc = cli.main(["study", "kuramoto", "--quick", "--no-progress", "--seed", "3",
                   "--out", str(out),
                   "--set", "lorentzian.N=[300]", "--set", "lorentzian.K=[0.5, 2.0]",
                   "--set", "gaussian.K=[0.25]"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "kuramoto: done" in text and "Lorentzian N=300" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 3 and cfg["lorentzian"]["N"] == [300]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lorentzian"]["300"]["K"] == [0.5, 2.0]
    assert (out / "R_vs_K.png").stat().st_size > 10_000
