"""The learned repeat bias (model.repeat_bias; docs/model.md, "Beyond the paper: learned repeat bias"):
the scores of the items in a row's history window, lowered by one learned scalar.

This module marks those items among the catalogue's columns for the forward's B x N scores. The
inference scans mark them as (row, item) pairs instead (`user_blocks.Seen.of_window`), since no rank
holds a row's whole catalogue there.
"""

from __future__ import annotations

from typing import Optional

import torch

from datapipes.batch import PAD


def _columns(items: torch.Tensor, keep: torch.Tensor, num_items: int) -> torch.Tensor:
    """rows x N bool: the kept items of each row (items, keep: rows x W)."""
    # Dropped entries go to a spare column: a PAD clamped to item 0 would race a real item 0.
    at = torch.where(keep, items.to(torch.int64), num_items)
    out = torch.zeros(items.shape[0], num_items + 1, dtype=torch.bool, device=items.device)
    return out.scatter_(1, at, True)[:, :num_items]


def history_columns(history: torch.Tensor, num_items: int) -> torch.Tensor:
    """B x N: whether item j occurs in row b's history window (B x L, PAD excluded)."""
    return _columns(history, history != PAD, num_items)


def prefix_columns(history: torch.Tensor, num_items: int) -> torch.Tensor:
    """P x N, one row per real position (b, p) of `history` in row-major order (as `y[valid]`):
    whether item j occurs at positions 0..p of row b, the window prefix a causal position reads."""
    valid = history != PAD
    length = history.shape[1]
    upto = torch.ones(length, length, dtype=torch.bool, device=history.device).tril()  # [p, q]: q <= p
    keep = (upto.unsqueeze(0) & valid.unsqueeze(1))[valid]
    items = history.unsqueeze(1).expand(-1, length, -1)[valid]
    return _columns(items, keep, num_items)


def lowered(scores: torch.Tensor, bias: Optional[torch.Tensor], history: torch.Tensor,
            per_position: bool = False) -> torch.Tensor:
    """`scores` (rows x N, every catalogue item in index order) less `bias` at each row's history
    items: the rows of `history`, or with `per_position` its real positions' prefixes."""
    if bias is None:
        return scores
    num_items = scores.shape[1]
    at = prefix_columns(history, num_items) if per_position else history_columns(history, num_items)
    if at.shape[0] != scores.shape[0]:
        raise ValueError(f"model.repeat_bias: {scores.shape[0]} score rows for {at.shape[0]} history rows")
    return scores - bias * at.to(scores.dtype)
