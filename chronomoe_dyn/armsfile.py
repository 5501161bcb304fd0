"""The arms-file format, read once for both halves of a comparison (no torch here).

An arms file is TOML with one ``[arms."name"]`` table per arm, each with the optional keys
``base`` (a built-in arm to start from), ``description`` and three tables of field = value:
``training`` (``TrainingConfig``), ``model`` (``MixtralConfig``) and ``controller``
(``ControllerConfig``). ``chronomoe-train compare --arms-file`` reads it through
``chronomoe_torch.arms``; the simulator's ``calibrate`` study reads the same file (only the
``controller`` table matters there). This module checks the structure and the names; the fields
themselves are checked by the configs that receive them.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ArmSpec", "read_arms_file", "ARM_KEYS", "NAME_OK"]

ARM_KEYS = ("base", "description", "training", "model", "controller")
NAME_OK = re.compile(r"^[A-Za-z0-9_.=+-]+$")
"""Arm names: letters, digits and _ . = + - (they become folder names)."""


@dataclass(frozen=True)
class ArmSpec:
    """One ``[arms."name"]`` table as written (base not yet applied)."""
    name: str
    base: str | None
    description: str | None
    training: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    controller: dict[str, Any] = field(default_factory=dict)


def read_arms_file(path: str | Path) -> dict[str, ArmSpec]:
    """name -> ArmSpec, in file order. ValueError names the file, the arm and the key of any
    problem (missing or unreadable file, bad TOML, unknown keys, a section that is no table)."""
    p = Path(path)
    src = f"arms file {str(p)!r}"
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{src} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{src} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{src} is not valid TOML: {e}") from None
    extra = sorted(set(doc) - {"arms"})
    if extra or not isinstance(doc.get("arms"), dict) or not doc["arms"]:
        raise ValueError(f"{src}: expected one or more [arms.\"name\"] tables and nothing else"
                         + (f" (found {extra})" if extra else ""))
    out: dict[str, ArmSpec] = {}
    for name, body in doc["arms"].items():
        where = f"{src}, arm {name!r}"
        if not NAME_OK.match(name):
            raise ValueError(f"{where}: names may use letters, digits and _ . = + - only")
        if not isinstance(body, dict):
            raise ValueError(f"{where}: expected a table")
        bad = sorted(set(body) - set(ARM_KEYS))
        if bad:
            hint = (f"; a name with dots must be quoted in TOML, e.g. [arms.\"{name}.{bad[0]}\"]"
                    if any(isinstance(body[k], dict) for k in bad) else "")
            raise ValueError(f"{where}: unknown key(s) {bad} (allowed: {', '.join(ARM_KEYS)})"
                             f"{hint}")
        sections = {}
        for key in ("training", "model", "controller"):
            v = body.get(key, {})
            if not isinstance(v, dict):
                raise ValueError(f"{where}: '{key}' must be a table of field = value, got "
                                 f"{type(v).__name__}")
            sections[key] = dict(v)
        out[name] = ArmSpec(name=name, base=None if "base" not in body else str(body["base"]),
                            description=None if "description" not in body
                            else str(body["description"]), **sections)
    return out
