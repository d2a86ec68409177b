"""This process's random number generators (torch CPU and CUDA, numpy, Python) as one checkpointable
value: each rank saves its own with every checkpoint and gets it back on a same-world-size resume."""

from __future__ import annotations

import random
from typing import Any, Dict, Mapping

import numpy as np
import torch


def capture_rng_state() -> Dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states, in torch.load-safe types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "python": random.getstate(),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
