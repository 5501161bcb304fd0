"""Arms of a routing comparison: named sets of config changes on top of one benchmark recipe.

An ``Arm`` is a name, a description and three dicts of overrides: ``training``
(``TrainingConfig`` fields), ``model`` (``MixtralConfig`` fields) and ``controller``
(``ControllerConfig`` fields, inside the model's ``controller_config``). ``resolve_arm(arm,
spec, seed)`` applies them on top of the benchmark recipe (``BenchmarkSpec``) and returns the
validated configs of one run; every field name and value is checked there, so a comparison can
refuse a bad arm before any run starts.

Built-in arms (what users pick today, and the controller against its ablations):

  plain            no controller, no balancing: LM loss only
  switch           no controller, Switch load-balancing loss (λ_balance 0.01)
  aux_free         no controller, DeepSeek-V3 auxiliary-loss-free bias (rate 1e-3)
  zloss            switch + router z-loss (λ_z 1e-3, ST-MoE's value)
  pxt              the P×T controller at its defaults (the seed's recipe: combined loss, cosine κ
                   0.5 → −0.3, coherence gating)
  pxt-fields-off   pxt with controller_fields=False: the controller observes and ticks, routing
                   is the plain top-k (the ablation every claim about the fields is held against)
  pxt-nogate       pxt without coherence gating
  kappa=<v>        pxt with κ held constant at v ∈ [−1, 1]

Arms file (TOML), for comparing your own settings::

    [arms.pxt-slow-lens]
    base = "pxt"                       # optional: start from a built-in arm
    description = "pxt with half the lens rate"
    training = { lambda_balance = 0.02 }
    model = { aux_free_bias_rate = 0.0 }
    controller = { lens_rate = 0.025 }
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from chronomoe_dyn import ControllerConfig
from chronomoe_dyn.armsfile import read_arms_file

from .config import TrainingConfig
from .model import MixtralConfig

__all__ = ["Arm", "BenchmarkSpec", "BUILTIN_ARMS", "builtin_arm", "parse_arms", "load_arms_file",
           "resolve_arm", "ArmError"]

_KAPPA_ARM = re.compile(r"^kappa=(.*)$")


class ArmError(ValueError):
    """An arm name, arms file or override that cannot be used (the message names it)."""


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    training: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    controller: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "training": dict(self.training), "model": dict(self.model),
                "controller": dict(self.controller)}


_NO_CONTROLLER = {"enable_chronovisor": False}
BUILTIN_ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("plain", "no controller, no balancing (LM loss only)",
        {"balance_mode": "switch", "lambda_balance": 0.0}, _NO_CONTROLLER),
    Arm("switch", "no controller, Switch load-balancing loss (lambda_balance 0.01)",
        {"balance_mode": "switch", "lambda_balance": 0.01}, _NO_CONTROLLER),
    Arm("aux_free", "no controller, DeepSeek-V3 aux-loss-free bias (rate 1e-3)",
        {"balance_mode": "aux_free"}, _NO_CONTROLLER),
    Arm("zloss", "switch + router z-loss (lambda_z 1e-3)",
        {"balance_mode": "switch", "lambda_balance": 0.01, "lambda_z": 1e-3}, _NO_CONTROLLER),
    Arm("pxt", "P x T controller at its defaults (cosine kappa 0.5 -> -0.3, gating)"),
    Arm("pxt-fields-off", "pxt with controller_fields=False (plain top-k routing; the ablation)",
        model={"controller_fields": False}),
    Arm("pxt-nogate", "pxt without coherence gating", {"use_coherence_gating": False}),
)}


def builtin_arm(name: str) -> Arm:
    """A built-in arm by name, including ``kappa=<v>``; ArmError names an unknown one."""
    m = _KAPPA_ARM.match(name)
    if m:
        text = m.group(1)
        try:
            k = float(text)
        except ValueError:
            raise ArmError(f"arm {name!r}: kappa {text!r} is not a number (expected "
                           f"kappa=<v> with v in [-1, 1], e.g. kappa=0.5)") from None
        if not math.isfinite(k) or not -1.0 <= k <= 1.0:
            raise ArmError(f"arm {name!r}: kappa={k!r} is outside [-1, 1]")
        return Arm(name, f"pxt with kappa held at {k:+g}",
                   {"kappa_schedule": "constant", "initial_kappa": k, "final_kappa": k})
    try:
        return BUILTIN_ARMS[name]
    except KeyError:
        raise ArmError(f"unknown arm {name!r}: built-in arms are {', '.join(BUILTIN_ARMS)}, "
                       f"kappa=<v>, or arms defined in --arms-file") from None


def load_arms_file(path: str | Path) -> dict[str, Arm]:
    """Arms defined in a TOML file (see the module docstring). The structure is read by
    ``chronomoe_dyn.armsfile`` (shared with the simulator's calibrate study); the fields are
    checked by ``resolve_arm``."""
    try:
        specs = read_arms_file(path)
    except ValueError as e:
        raise ArmError(str(e)) from None
    out: dict[str, Arm] = {}
    for name, a in specs.items():
        base = builtin_arm(a.base) if a.base is not None else Arm(name, "")
        out[name] = Arm(name, a.description if a.description is not None
                        else (base.description or name),
                        {**base.training, **a.training}, {**base.model, **a.model},
                        {**base.controller, **a.controller})
    return out


def parse_arms(names: Sequence[str], arms_file: str | Path | None = None) -> list[Arm]:
    """The arms named (built-ins, ``kappa=<v>``, or from the arms file; a file's arm wins
    over a built-in of the same name). Duplicates and unknown names raise ArmError."""
    defined = load_arms_file(arms_file) if arms_file is not None else {}
    if not names:
        raise ArmError("no arms given")
    seen, out = set(), []
    for n in names:
        n = n.strip()
        if not n:
            raise ArmError("an empty arm name in the arm list")
        if n in seen:
            raise ArmError(f"arm {n!r} is listed twice")
        seen.add(n)
        out.append(defined[n] if n in defined else builtin_arm(n))
    return out


@dataclass(frozen=True)
class BenchmarkSpec:
    """The benchmark recipe every arm starts from (issue 8: h128, 4 layers, 8 experts, top-2,
    seq 128, batch 8, 500 steps, lr 3e-3, on the standard library's byte corpus)."""
    steps: int = 500
    hidden_dim: int = 128
    num_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 128
    batch_size: int = 8
    learning_rate: float = 3e-3
    eval_batches: int = 50
    """Batches of the eval split per evaluation (MaxVio_global and the eval loss use them)."""
    evals: int = 4
    """Evaluations per run (every steps/evals steps; the last one is at the end)."""
    log_every: int = 5
    data: tuple[str, ...] | None = None
    """Text files (None: the Python standard library's sources)."""
    eval_fraction: float = 0.1
    device: str = "cpu"
    shift_at_step: int | None = None
    """A routing disruption: from this optimizer step on, every byte b of the train and eval
    text becomes perm[b] for a fixed random permutation (a sudden domain shift). None: off."""

    def __post_init__(self) -> None:
        for name in ("steps", "hidden_dim", "num_layers", "num_experts", "top_k", "num_heads",
                     "num_kv_heads", "seq_len", "batch_size", "eval_batches", "evals",
                     "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ArmError(f"benchmark {name}={v!r}: expected an integer >= 1")
        if self.shift_at_step is not None and (
                isinstance(self.shift_at_step, bool) or not isinstance(self.shift_at_step, int)
                or not 1 <= self.shift_at_step < self.steps):
            raise ArmError(f"benchmark shift_at_step={self.shift_at_step!r}: expected an "
                           f"integer in [1, steps={self.steps})")
        if self.data is not None:
            object.__setattr__(self, "data", tuple(str(Path(p)) for p in self.data))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(getattr(self, f.name)) if f.name == "data" and self.data
                         else getattr(self, f.name)) for f in fields(self)}

    def base_model(self) -> dict[str, Any]:
        return dict(vocab_size=256, hidden_dim=self.hidden_dim, num_layers=self.num_layers,
                    num_experts=self.num_experts, top_k=self.top_k, num_heads=self.num_heads,
                    num_kv_heads=self.num_kv_heads, max_seq_length=self.seq_len + 1)

    def base_training(self) -> dict[str, Any]:
        s = self.steps
        return dict(learning_rate=self.learning_rate, max_steps=s, batch_size=self.batch_size,
                    kappa_warmup_steps=s // 10, lr_schedule="cosine", lr_warmup_steps=s // 20,
                    log_every_n_steps=min(self.log_every, s),
                    eval_every_n_steps=max(1, s // self.evals), eval_max_batches=self.eval_batches,
                    save_every_n_steps=0, save_best=False, save_final=False,
                    progress_bar=False, device=self.device)


def _check_names(kind: str, arm: Arm, given: dict[str, Any], cls: type) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ArmError(f"arm {arm.name!r}: {cls.__name__} has no field(s) {unknown} "
                       f"(in its '{kind}' overrides)")


def resolve_arm(arm: Arm, spec: BenchmarkSpec, seed: int, run_dir: str | Path = "run"
                ) -> tuple[MixtralConfig, TrainingConfig]:
    """The validated (model, training) configs of one run of ``arm`` with ``seed``.

    The seed sets the model's initialisation, the controller's phases, the data order and the
    routing noise; arms never override it (a comparison varies the arm, not the seed)."""
    for kind, given, cls in (("training", arm.training, TrainingConfig),
                             ("model", arm.model, MixtralConfig),
                             ("controller", arm.controller, ControllerConfig)):
        _check_names(kind, arm, given, cls)
    fixed = {"seed", "init_seed", "controller_seed", "run_dir", "checkpoint_dir"} \
        & (set(arm.training) | set(arm.model))
    if fixed:
        raise ArmError(f"arm {arm.name!r}: {sorted(fixed)} are set by the comparison "
                       f"(seed and folders), not by an arm")
    try:
        base_ctrl = ControllerConfig()
        ctrl = base_ctrl.replace(**arm.controller) if arm.controller else base_ctrl
        model_kw = {**spec.base_model(), **copy.deepcopy(arm.model),
                    "init_seed": seed, "controller_seed": seed, "controller_config": ctrl}
        model = MixtralConfig(**model_kw)
        run_dir = Path(run_dir)
        train_kw = {**spec.base_training(), **copy.deepcopy(arm.training), "seed": seed,
                    "run_dir": str(run_dir), "checkpoint_dir": str(run_dir / "checkpoints")}
        training = TrainingConfig(**train_kw)
    except (TypeError, ValueError) as e:
        raise ArmError(f"arm {arm.name!r}: {e}") from None
    return model, training
