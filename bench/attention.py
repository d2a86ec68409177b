"""Training attention kernels on CPU: the written-out math path against SDPA, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/attention.py            # both shapes, bf16 (when the CPU has it) and fp32
    OMP_NUM_THREADS=1 .venv/bin/python bench/attention.py --rounds 9

One self-attention module (model/attention.py) forward and backward per cell, padded rows as the
training batches have them, at the ML-1M causal preset's shape (B 128, L 200, D 64, 2 heads, causal)
and the paper's (B 512, L 50, D 300, 4 heads, bidirectional), under bf16 autocast and in fp32, with
the attention dropout on (0.2) and off. The last column is the kernel `model.attention=auto` picks
for that cell (Attention.uses_math).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"ml1m-causal": (128, 200, 64, 2, True), "paper": (512, 50, 300, 4, False)}


def time_cell(shape: str, dtype, dropout: float, rounds: int) -> dict:
    """Median seconds of one forward and backward per kernel, the kernels interleaved round by round."""
    import torch

    from missrec_torchrec.model.attention import Attention

    b, s, d, h, causal = SHAPES[shape]
    torch.manual_seed(0)
    x = torch.randn(b, s, d, requires_grad=True)
    key_mask = torch.arange(s)[None] >= (s - torch.randint(5, s + 1, (b,)))[:, None]
    allowed = torch.ones(s, s, dtype=torch.bool).tril() if causal else None
    modules = {k: Attention(d, h, dropout, True, k).train() for k in ("math", "sdpa")}

    def step(module):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
            module(x, x, key_mask, allowed).float().square().mean().backward()

    times = {k: [] for k in modules}
    for _ in range(rounds + 1):  # the first round warms up
        for k, module in modules.items():
            start = time.perf_counter()
            step(module)
            times[k].append(time.perf_counter() - start)
    auto = Attention(d, h, dropout, True, "auto").train().uses_math(dtype, torch.device("cpu"))
    return {**{k: statistics.median(v[1:]) for k, v in times.items()}, "auto": "math" if auto else "sdpa"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    from missrec_torchrec.precision import native_bf16

    dtypes = [torch.bfloat16, torch.float32] if native_bf16(torch.device("cpu")) else [torch.float32]
    print(f"torch threads {torch.get_num_threads()}; ms per forward + backward (median of {args.rounds})")
    print(f"{'shape':12} {'dtype':9} {'dropout':>7} {'math':>7} {'sdpa':>7} {'sdpa/math':>9} {'auto':>5}")
    for shape in SHAPES:
        for dtype in dtypes:
            for dropout in (0.2, 0.0):
                t = time_cell(shape, dtype, dropout, args.rounds)
                print(f"{shape:12} {str(dtype)[6:]:9} {dropout:7.1f} {t['math']*1e3:7.0f} {t['sdpa']*1e3:7.0f} "
                      f"{t['sdpa'] / t['math']:9.2f} {t['auto']:>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
