"""The embedding collections' lookups as the dense tensors the MISSRec head reads."""

from __future__ import annotations

from typing import Dict, Iterable

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor


def dense_history(jt: JaggedTensor, max_len: int) -> torch.Tensor:
    """Jagged rows of [len_b, dim] -> B x max_len x dim, left-aligned, zero-padded (FBGEMM kernel)."""
    return torch.ops.fbgemm.jagged_to_padded_dense(jt.values(), [jt.offsets()], [max_len], 0.0)


def materialise(outputs: Iterable) -> Dict[str, JaggedTensor]:
    """One dict of every collection's output, waiting on those that come as awaitables."""
    merged: Dict[str, JaggedTensor] = {}
    for out in outputs:
        if hasattr(out, "wait"):  # sharded collections may return awaitables
            out = out.wait()
        merged.update(out)
    return merged
