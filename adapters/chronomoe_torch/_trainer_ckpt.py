"""The checkpoint, run-directory and resume side of ``ChronoMoETrainer`` (mixed into it; the
trainer module keeps the step, the loop and logging).

Checkpoints (``save_checkpoint``): write-once directories ``step_<n>`` and the pointer files
``latest``, ``best``, ``final``, ``last_good`` that name them (``checkpoint``); the same state
saved under several names is written once. Pruning (``keep_last_n_checkpoints``) logs its rule
when a run starts and each deletion. The run directory belongs to one run (``_run``); a resumed
run keeps the κ/LR schedule length of its checkpoint (``config.TrainingConfig``); the first log
line of a run is its CPU threads (``_threads``).

Uses the trainer's ``config``, ``device``, ``is_main``, ``global_step``, ``eval_history``,
``schedule_steps``, ``knob_scheduler``, ``state_dict``/``load_state_dict`` and ``_log_output``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import torch

from . import _run
from . import checkpoint as ckpt
from . import distributed as cdist
from ._run import RunDirError
from ._threads import apply_threads

logger = logging.getLogger("chronomoe_torch")

_STEP_NAME = re.compile(r"^step_\d+$")             # a periodic checkpoint's name
_STEP_DIR = re.compile(r"^step_\d+(\.\d+)?$")      # its directory (``.k``: the name was taken)


class CheckpointingMixin:
    def _checkpoint_path(self, name: str | Path) -> Path:
        p = Path(name)
        if p.is_absolute() or len(p.parts) > 1:
            return p
        return Path(self.config.checkpoint_dir) / p

    def save_checkpoint(self, name: str | Path) -> Path:
        """Save the trainer's state (rank 0; every rank waits for it) and return the path that
        ``load_checkpoint`` takes.

        ``step_<n>``: a new checkpoint directory of that name (``step_<n>.<k>`` when the name is
        taken: checkpoints are never overwritten). Any other name (``final``, ``best``,
        ``last_good``, yours): a pointer file naming the checkpoint of the current state, which
        is written as ``step_<global_step>`` unless this state was saved already. A path with
        directories: a checkpoint directory of its own. Every save moves ``latest``."""
        path = self._checkpoint_path(name)
        self.prepare_run_dirs()
        if self.is_main:
            path = self._save_main(path)
        cdist.barrier()
        return path

    def _save_main(self, path: Path) -> Path:
        d, name = path.parent, path.name
        if path != Path(self.config.checkpoint_dir) / name:          # an explicit path
            ckpt.save_state(path, self.state_dict(), kind="trainer")
            logger.info(f"Step {self.global_step} | saved checkpoint {path}")
            return path
        key = (self.global_step, len(self.eval_history))
        target = self._last_save[1] if self._last_save and self._last_save[0] == key else None
        if target is None or not (target / ckpt.MANIFEST_FILE).is_file():
            base = name if _STEP_NAME.match(name) else f"step_{self.global_step}"
            target = d / ckpt.unique_name(d, base)
            ckpt.save_state(target, self.state_dict(), kind="trainer")
            self._last_save = (key, target)
            logger.info(f"Step {self.global_step} | saved checkpoint {target}")
        if _STEP_NAME.match(name):
            return target
        ckpt.write_pointer(d, name, target.name)
        logger.info(f"Step {self.global_step} | {path} -> {target.name}")
        return path

    def load_checkpoint(self, name: str | Path) -> None:
        """Load ``<checkpoint_dir>/<name>`` (a checkpoint or a pointer such as ``final``), or a
        path, saved by ``save_checkpoint``; ``train()`` then continues from its step."""
        path = self._checkpoint_path(name)
        self.load_state_dict(ckpt.load_state(path, kind="trainer", map_location=self.device))
        logger.info(f"Step {self.global_step} | loaded checkpoint {path}")

    def _prune(self) -> None:
        """Delete old ``step_<n>`` checkpoints (``keep_last_n_checkpoints``), and say so."""
        keep = self.config.keep_last_n_checkpoints
        d = Path(self.config.checkpoint_dir)
        if keep is None or not self.is_main or not d.is_dir():
            return
        removed = ckpt.prune_checkpoints(d, keep, match=_STEP_DIR)
        if removed:
            logger.info(f"Step {self.global_step} | deleted checkpoint(s) "
                        f"{', '.join(p.name for p in removed)} ({self._prune_rule()})")

    def _prune_rule(self) -> str:
        k = self.config.keep_last_n_checkpoints
        return (f"keep_last_n_checkpoints={k}: the {k} newest step_<n> checkpoints are kept, "
                f"and any that latest/best/final/last_good name; older ones are deleted")

    # ------------------------------------------------------------------ the checkpoint tree
    def _configs(self) -> dict[str, Any]:
        mcfg = getattr(self.model, "config", None)
        return {"training": self.config.to_dict(),
                "model": mcfg.to_dict() if hasattr(mcfg, "to_dict") else None,
                "controller": (self.controller.config.to_dict()
                               if self.controller is not None else None),
                "total_steps": self.total_steps, "schedule_steps": self.schedule_steps,
                "run_id": self.run_id}

    def _controller_prefix(self) -> str | None:
        for name, m in self.model.named_modules():
            if m is self.controller and self.controller is not None:
                return name + "."
        return None

    def state_dict(self) -> dict[str, Any]:
        """The trainer's checkpoint tree (docs/CONTRACTS.md, "trainer")."""
        model_sd = self.model.state_dict()
        prefix = self._controller_prefix()
        if prefix is not None and not self.config.save_chronovisor_state:
            model_sd = type(model_sd)((k, v) for k, v in model_sd.items()
                                      if not k.startswith(prefix))
        return {
            "model": model_sd,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "knob_scheduler": self.knob_scheduler.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "rng": ckpt.capture_rng_state(),
            "data": self.stream.state_dict(),
            "counters": {"global_step": self.global_step, "micro_step": self.micro_step,
                         "tokens_seen": self.tokens_seen,
                         "skipped_steps": self._skips_total.clone(),
                         "consecutive_skips": self._skips_run.clone(),
                         "consecutive_skips_max": self._skips_run_max.clone(),
                         "skips_logged": self._skips_logged, "num_logs": self._num_logs,
                         "best_eval_loss": self.best_eval_loss},
            "history": {k: list(v) for k, v in self.history.items()},
            "eval_history": [dict(e) for e in self.eval_history],
            "configs": self._configs(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a tree from ``state_dict()``; the data iterator resumes on the next step.
        The κ and LR schedules keep the checkpoint's length (see ``TrainingConfig``)."""
        self._check_compatible(state.get("configs") or {})
        self._continue_schedules(state.get("configs") or {}, int(state["counters"]["global_step"]))
        prefix = self._controller_prefix()
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        allowed = [k for k in missing if prefix is not None and k.startswith(prefix)]
        if unexpected or len(allowed) != len(missing):
            raise ckpt.CheckpointMismatchError(
                f"checkpoint model state does not fit this model: missing "
                f"{sorted(set(missing) - set(allowed))[:8]}, unexpected {sorted(unexpected)[:8]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.knob_scheduler.load_state_dict(state["knob_scheduler"])
        self.loss_fn.load_state_dict(state["loss"])
        ckpt.restore_rng_state(state["rng"])
        self.stream.load_state_dict(state["data"])
        c = state["counters"]
        self.global_step, self.micro_step = int(c["global_step"]), int(c["micro_step"])
        self.tokens_seen = int(c["tokens_seen"])
        for buf, key in ((self._skips_total, "skipped_steps"),
                         (self._skips_run, "consecutive_skips"),
                         (self._skips_run_max, "consecutive_skips_max")):
            buf.copy_(c[key].to(buf.device))
        self._skips_logged, self._num_logs = int(c["skips_logged"]), int(c["num_logs"])
        self.best_eval_loss = c["best_eval_loss"]
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.eval_history = [dict(e) for e in state["eval_history"]]
        self._resumed(state.get("configs") or {})

    def _check_compatible(self, configs: dict[str, Any]) -> None:
        saved, mine = configs.get("model"), self._configs()["model"]
        if not saved or not mine:
            return
        keys = ("vocab_size", "hidden_dim", "num_layers", "num_experts", "top_k")
        a = {k: saved.get(k) for k in keys}
        b = {k: mine.get(k) for k in keys}
        if a != b:
            raise ckpt.CheckpointMismatchError(f"checkpoint is from a model with {a}, this model "
                                               f"has {b}")

    # ------------------------------------------------------------------ run directory, resume
    def _init_run_state(self) -> None:
        self.run_id = cdist.broadcast_str(uuid.uuid4().hex[:12])   # rank 0's on every rank
        """Identifies the run (config.json, checkpoints); a resumed run keeps its own."""
        self._resumed_step: int | None = None   # set by load_state_dict: this is a resume
        self._claimed = False                   # run directories checked (and cleared)
        self._last_save: tuple | None = None    # (state key, directory) of the last save

    def prepare_run_dirs(self) -> None:
        """Make sure ``run_dir``/``checkpoint_dir`` are this run's before anything is written
        (``train()`` and the first save call it; ``chronomoe-train`` calls it early). A
        directory of an earlier run raises ``RunDirError`` saying how to proceed, unless
        ``overwrite`` (its outputs are deleted first); a resumed run continues its own
        directory. Rank 0 checks; every rank raises when it refuses."""
        if self._claimed:
            return
        error, lines = None, []
        if self.is_main:
            try:
                lines = _run.claim(self.config.run_dir, self.config.checkpoint_dir,
                                   run_id=self.run_id, resumed_step=self._resumed_step,
                                   overwrite=self.config.overwrite)
            except RunDirError as e:
                error = e
        with self._log_output():
            for line in lines:
                logger.info(line)
        refused = not bool(cdist.all_true(torch.tensor(error is None, device=self.device)))
        if error is not None:
            raise error
        if refused:
            raise RunDirError("rank 0 refused the run directory (see its error)")
        self._claimed = True

    def _resumed(self, configs: dict[str, Any]) -> None:
        self._last_save = None                  # a load makes another state
        self._resumed_step = self.global_step
        self.run_id = configs.get("run_id") or self.run_id
        self._claimed = False    # checked again: the directory must be this run's

    def _continue_schedules(self, configs: dict[str, Any], step: int) -> None:
        """Keep the checkpoint's κ/LR schedule length whatever this run's max_steps says, so κ
        and the learning rate are continuous at the resume point (TrainingConfig docstring)."""
        saved = configs.get("schedule_steps")
        if not isinstance(saved, int) or isinstance(saved, bool) or saved == self.schedule_steps:
            return
        logger.info(f"resume at step {step}: the κ and LR schedules keep the checkpoint's length "
                    f"of {saved} steps (this config's would be {self.schedule_steps}); steps past "
                    f"{saved} run at their final values")
        self.schedule_steps = saved
        ks = self.knob_scheduler
        ks.schedule = dataclasses.replace(ks.schedule, total_steps=saved)

    def _begin_run(self) -> None:
        """Start of ``train()``: threads (the first log line), the run directory, the rule by
        which checkpoints are deleted."""
        logger.info(f"CPU threads: {apply_threads(self.config.num_threads).describe()}")
        self.prepare_run_dirs()
        cfg = self.config
        if cfg.save_every_n_steps and cfg.keep_last_n_checkpoints is not None:
            logger.info(f"checkpoints: step_<n> every {cfg.save_every_n_steps} steps in "
                        f"{cfg.checkpoint_dir}; {self._prune_rule()}")
