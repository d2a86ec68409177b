"""What HSTU's relative biases cost the decoder on CPU: none, position, position + time, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/relative_bias.py            # 5 rounds
    OMP_NUM_THREADS=1 .venv/bin/python bench/relative_bias.py --rounds 9

One `InterestDecoder` forward and backward per cell at the ML-1M causal preset's shape (B 128, L 200,
D 64, 2 heads, FFN 128, 4 layers, causal, dropout 0.2, 20 interest tokens) under bf16 autocast (fp32
where the CPU lacks native bf16), the cells interleaved round by round; the median is printed with
its ratio to the decoder without biases. The time bias's extra work: the B x L x L buckets once per
forward, then per layer their gather, its backward, and the B x H x L x L sum with the position bias.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELLS = {"none": {}, "position": {"relative_position_bias": True},
         "position + time": {"relative_position_bias": True, "relative_time_bias": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from missrec_torchrec import precision
    from missrec_torchrec.model import ModelConfig
    from missrec_torchrec.model.layers import InterestDecoder, Memory

    b, n, d = 128, 200, 64
    base = ModelConfig(hidden=d, heads=2, ffn=128, max_len=n, dropout=0.2, n_dec_layers=4, causal=True)
    bf16 = precision.resolve("auto", torch.device("cpu")) == "bf16"
    torch.manual_seed(0)
    x = torch.randn(b, n, d, requires_grad=True)
    mask = torch.arange(n)[None] < torch.randint(5, n + 1, (b, 1))
    memory = Memory(torch.randn(b, 20, d), torch.ones(b, 20, dtype=torch.bool), None)
    times = 10**9 + torch.randint(1, 10**6, (b, n + 1)).cumsum(1)
    decoders = {name: InterestDecoder(replace(base, **keys)).train() for name, keys in CELLS.items()}

    def step(name: str) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = decoders[name](x, mask, memory, torch.ones(n, n, dtype=torch.bool).tril(), times=times)
        y.float().square().mean().backward()
        return time.perf_counter() - start

    for name in CELLS:  # warm-up
        step(name)
    seconds = {name: [] for name in CELLS}
    for _ in range(args.rounds):
        for name in CELLS:
            seconds[name].append(step(name))
    none = statistics.median(seconds["none"])
    print(f"decoder forward + backward, B {b} L {n} D {d}, 4 layers, {'bf16' if bf16 else 'fp32'}, "
          f"{torch.get_num_threads()} thread(s), median of {args.rounds}")
    print("| biases | seconds | vs none |\n|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / none:.2f}x |")


if __name__ == "__main__":
    main()
