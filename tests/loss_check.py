"""Shared by the tests that train a model a few steps and check that the loss falls."""

from __future__ import annotations

from typing import Callable, Tuple

import torch


def loss_before_and_after(core: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor],
                          steps: int) -> Tuple[float, float]:
    """The loss without dropout before and after `steps` optimiser steps in training mode."""
    core.eval()
    with torch.no_grad():
        before = float(loss_fn())
    core.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    core.eval()
    with torch.no_grad():
        after = float(loss_fn())
    return before, after
