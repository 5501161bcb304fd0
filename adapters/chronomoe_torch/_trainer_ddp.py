"""The data-parallel side of ``ChronoMoETrainer`` (mixed into it): the user's single-process
script under ``torchrun --nproc-per-node W``.

The trainer initialises the process group from the launcher's environment if nobody has, wraps
the model in DDP (gradients averaged; buffers not broadcast: every rank updates them from the
same all-reduced numbers), and gives each rank its shard of the train batches (global batch i to
rank i mod W; ``_batches``). Per optimizer step the controller's observation and the aux-free
loads are summed over the ranks where they are used: in the controller's own tick
(``PxTController.tick``, the one observe → all-reduce → tick path of native and attached models)
and in the aux-free bias update; a step is skipped on every rank when it is bad on one
(``distributed.all_true`` in ``train_step``); evaluation is sharded and its sums all-reduced;
the logged losses and load are all-reduced on log steps. So every rank holds the same model and
controller, and the run equals one process with W·G micro-batches per step (up to
floating-point summation order). Rank 0 alone writes metrics, logs and checkpoints; every rank
loads the same checkpoint.

Uses the trainer's ``device``, ``model``, ``controller``, ``eval_dataloader``, ``config`` and
``_aux_free``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import torch

from . import distributed as cdist
from ._batches import shard_batches

logger = logging.getLogger("chronomoe_torch")


class DataParallelMixin:
    def _init_data_parallel(self) -> None:
        """Under ``torchrun``: the process group (if nobody made it) and this rank's device;
        ranks other than 0 log warnings only."""
        self.device, made = cdist.init_from_env(self.device)
        self.rank, self.world_size = cdist.rank(), cdist.world_size()
        self.is_main = self.rank == 0
        if made:
            import atexit
            atexit.register(torch.distributed.destroy_process_group)
        if not self.is_main:
            logger.addFilter(lambda record: record.levelno >= logging.WARNING)
        self._ddp = None

    def _wrap_data_parallel(self) -> None:
        if self.world_size == 1:
            return
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Buffers are not broadcast (a collective per forward saved): the controller's and the
        # aux-free ones are updated on every rank from all-reduced numbers, and the observation
        # accumulators are per rank (a broadcast would overwrite a rank's with rank 0's).
        # torch 2.13 marks broadcast_buffers deprecated in favour of forward_sync_buffers, which
        # still syncs buffers once at init; until init_sync_buffers exists (its own advice for
        # rank-local buffers) broadcast_buffers=False is the right switch: silence the notice.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated",
                                    category=FutureWarning)
            self._ddp = DDP(self.model, device_ids=[self.device] if self.device.type == "cuda"
                            else None, broadcast_buffers=False)

    def _forward_model(self, *args: Any, **kwargs: Any) -> Any:
        return (self._ddp or self.model)(*args, **kwargs)

    def _grad_sync(self, last: bool):
        """DDP all-reduces gradients in the last micro-batch's backward only."""
        return self._ddp.no_sync() if self._ddp is not None and not last \
            else contextlib.nullcontext()

    def _all_reduce_logged(self, sums: torch.Tensor, rows: torch.Tensor | None) -> None:
        """On log steps: the loss means over all ranks' micro-batches, and the summed routing
        rows (the v2 routing stats, or the load counts of a model without them)."""
        if self.world_size == 1:
            return
        cdist.all_reduce_sum_([sums] + ([] if rows is None else [rows]))
        sums.div_(self.world_size)

    def _eval_batches(self):
        """(global index, batch) of this rank's share of the eval loader, ``eval_max_batches``
        counted over all ranks."""
        cap = self.config.eval_max_batches
        batches = self.eval_dataloader
        if self.world_size > 1:
            batches = shard_batches(self.eval_dataloader, self.rank, self.world_size, even=False)
        for j, raw in enumerate(batches):
            i = j * self.world_size + self.rank
            if cap is not None and i >= cap:
                break
            yield i, raw

    def _all_reduce_eval_sums(self, sums: list[torch.Tensor], n: int) -> int:
        """Sum the eval sums (in place) and the batch count over the ranks."""
        if self.world_size == 1:
            return n
        count = torch.tensor(float(n), dtype=sums[0].dtype, device=sums[0].device)
        cdist.all_reduce_sum_([*sums, count])
        return int(count)
