"""Re-clustering time, today's torch k-means against faiss, on the same points (bench/scale.py part (d)).

    .venv/bin/python bench/recluster.py                      # 100,000 64-d points, K = 8,192 and 65,536
    .venv/bin/python bench/recluster.py --points 200000 --ks 8192

Random Gaussian points (one modality). Each cell is one `discover_interests` call, k-means and the
assignment of every point, with the defaults' k-means (5 passes, minibatch 2,048) and
model.kmeans_backend torch, then faiss: the same points, seed and K, one process, the threads torch
has (faiss follows them). faiss trains on at most 256 x K points, so it samples only once the points
exceed that. The mean squared distance of a point to its centroid shows what each run's clusters are
worth: speed bought with worse clusters would show there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("torch", "faiss")


def time_recluster(points: int, dim: int, k: int, backend: str) -> Dict[str, float]:
    """Seconds of one re-clustering and the mean squared distance of a point to its centroid."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    from missrec_torchrec.model import ModelConfig, discover_interests

    vectors = torch.randn(points, dim, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    table, ids = discover_interests({"text": vectors}, ModelConfig(kmeans_backend=backend),
                                    generator=torch.Generator().manual_seed(1), k=k)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "msd": float((vectors - table[ids["text"].long()]).pow(2).sum(1).mean())}


def measure(points: int, dim: int, ks: List[int]) -> Dict[int, Dict[str, Dict[str, float]]]:
    out = {}
    for k in ks:
        out[k] = {b: time_recluster(points, dim, k, b) for b in BACKENDS}
        print(f"  K={k:,}: " + ", ".join(f"{b} {out[k][b]['seconds']:.1f}s" for b in BACKENDS), file=sys.stderr,
              flush=True)
    return out


def print_recluster(rows: Dict[int, Dict[str, Dict[str, float]]], points: int, dim: int) -> None:
    import torch

    print(f"\n(d) one re-clustering (k-means + assignment of every point), {points:,} random {dim}-d points, "
          f"1 process, {torch.get_num_threads()} threads; today's torch k-means vs faiss on the same points")
    print("| K | torch s | faiss s | speed-up | mean sq. distance to centroid, torch | the same, faiss |")
    print("|---|---|---|---|---|---|")
    for k, r in rows.items():
        t, f = r["torch"], r["faiss"]
        print(f"| {k:,} | {t['seconds']:.2f} | {f['seconds']:.2f} | {t['seconds'] / f['seconds']:.1f}x | "
              f"{t['msd']:.2f} | {f['msd']:.2f} |")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--points", type=int, default=100_000, help="points to cluster (default 100000)")
    p.add_argument("--dim", type=int, default=64, help="their dimension (default 64)")
    p.add_argument("--ks", type=int, nargs="+", default=[8192, 65536], help="cluster counts (default 8192 65536)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args()
    print_recluster(measure(args.points, args.dim, args.ks), args.points, args.dim)


if __name__ == "__main__":
    main()
