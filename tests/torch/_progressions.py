"""A learnable toy corpus shared by the trainer tests and the data-parallel trainer worker."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

V, S = 64, 17


class Progressions(Dataset):
    """Arithmetic progressions mod V (random start, stride 1–3): learnable in a few steps."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, V, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(S)) % V

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}
