"""Which items the rows of a batch are scored against: the candidate policy a stream's collate applies.

- `none`: no candidates (pre-training scores each row against the batch's own targets).
- `catalogue`: every item in index order (full softmax, evaluation); one tensor shared by every batch.
- `sampled`: `num_negatives` items drawn uniformly, with replacement, shared by the batch's rows
  (sampled softmax). The draw is seeded by the batch's place in the data (seed, epoch, data worker,
  batch index), so a resumed epoch sees the same negatives as an uninterrupted one.

`sequence_rows=False` leaves the history and target features empty, for a model that takes those
vectors from the catalogue rows (see `datapipes.batch.collate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

KINDS = ("none", "catalogue", "sampled")


@dataclass(frozen=True)
class Candidates:
    kind: str
    num_items: int
    num_negatives: int = 0
    sequence_rows: bool = True
    catalogue: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"candidate kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "sampled" and self.num_negatives < 1:
            raise ValueError(f"sampled candidates need num_negatives >= 1, got {self.num_negatives}")
        items = self.num_items if self.kind == "catalogue" else 0
        object.__setattr__(self, "catalogue", torch.arange(items, dtype=torch.int64))

    @property
    def count(self) -> int:
        """Candidates per batch."""
        return self.num_negatives if self.kind == "sampled" else int(self.catalogue.numel())

    def draw(self, key: Sequence[int]) -> torch.Tensor:
        """The candidate item ids of the batch that `key` (integers naming its place in the data) seeds."""
        if self.kind != "sampled":
            return self.catalogue
        return torch.from_numpy(np.random.default_rng(list(key)).integers(0, self.num_items, self.num_negatives))
