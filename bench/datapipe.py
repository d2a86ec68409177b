"""Data-pipe benchmark: synthetic generation and streaming into KJT batches at growing sizes.

    .venv/bin/python bench/datapipe.py                 # 1e6 and 1e7 interactions
    .venv/bin/python bench/datapipe.py --max 1e8       # and 1e8 (about 0.6 GB of disk per 1e8)

For every size it generates a synthetic dataset (`missrec prepare synthetic`), then streams the
training split through `SequenceStream` (one process, no loader workers, one torch thread) for up
to --stream-seconds. Each phase runs in a fresh subprocess so its peak RSS (`ru_maxrss`) is its
own and sizes do not contaminate each other.

Throughput unit: **interactions/s = item ids placed into the KJT per second**, i.e. per batch
sum(history lengths) + batch size (targets), counted once per table. Goals: >= 2 M/s per process,
and streaming peak RSS at the largest size <= 1.2x the next size down (flat memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = [1e6, 1e7, 1e8]
BYTES_PER_INTERACTION = 12  # users.parquet is ~5.2 bytes per interaction; keep a wide margin


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def generate(size: float, out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from datapipes.sources import prepare

    items = int(min(1e6, max(1e4, size / 100)))
    start = time.perf_counter()
    stats = prepare("synthetic", out, ["--interactions", str(size), "--items", str(items), "--seed", "0"],
                    overwrite=True)
    return {"seconds": time.perf_counter() - start, "rss_mb": peak_rss_mb(), "interactions": stats["interactions"],
            "users": stats["users"], "training_rows": stats["training_rows"]}


def stream(data: Path, batch_size: int, max_len: int, seconds: float) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    from datapipes.stream import SequenceStream

    s = SequenceStream(data, batch_size=batch_size, max_len=max_len, seed=0)
    start = time.perf_counter()
    total = len(s)  # includes planning: one pass over the train_end column
    batches = ids = 0
    for batch in s:
        batches += 1
        ids += int(batch.lengths.sum()) + batch.batch_size
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "batches": batches, "epoch_batches": total, "rows": batches * batch_size,
            "ids": ids, "ids_per_s": ids / elapsed, "rss_mb": peak_rss_mb()}


def child(*argv: str) -> dict:
    """Run this file in a fresh interpreter for one phase; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, __file__, *argv], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench phase {argv[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max", type=float, default=1e7, help="largest size in interactions (1e6, 1e7 or 1e8; default 1e7)")
    p.add_argument("--work", type=Path, default=Path("/tmp/missrec-bench"),
                   help="where datasets go (default /tmp/missrec-bench)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--stream-seconds", type=float, default=60.0, help="streaming time cap per size (default 60)")
    p.add_argument("--keep", action="store_true", help="keep the generated datasets")
    p.add_argument("--_generate", nargs=2, metavar=("SIZE", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--_stream", metavar="DATA", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._generate:
        print(json.dumps(generate(float(args._generate[0]), Path(args._generate[1]))))
        return
    if args._stream:
        print(json.dumps(stream(Path(args._stream), args.batch_size, args.max_len, args.stream_seconds)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    sizes = [s for s in SIZES if s <= args.max]
    print(f"batch {args.batch_size}, max_len {args.max_len}, streaming capped at {args.stream_seconds:.0f}s per size; "
          "interactions/s = history + target ids put into the KJT per second, one process, 1 thread")
    header = (f"{'size':>6} {'users':>10} {'gen s':>7} {'gen RSS MB':>10} {'batches':>16} {'stream s':>8} "
              f"{'ids/s (M)':>9} {'rows/s (k)':>10} {'stream RSS MB':>13}")
    print(header)
    print("-" * len(header))
    rss = {}
    for size in sizes:
        need = size * BYTES_PER_INTERACTION
        free = shutil.disk_usage(args.work).free
        if free < 2 * need:
            print(f"{size:>6.0e}  skipped: {free / 1e9:.1f} GB free under {args.work}, need ~{2 * need / 1e9:.1f} GB")
            continue
        out = args.work / f"synthetic-{size:.0e}"
        gen = child("--_generate", str(size), str(out))
        st = child("--_stream", str(out), "--batch-size", str(args.batch_size), "--max-len", str(args.max_len),
                   "--stream-seconds", str(args.stream_seconds))
        rss[size] = st["rss_mb"]
        print(f"{size:>6.0e} {gen['users']:>10,} {gen['seconds']:>7.1f} {gen['rss_mb']:>10.0f} "
              f"{st['batches']:>7,}/{st['epoch_batches']:<8,} {st['seconds']:>8.1f} {st['ids_per_s'] / 1e6:>9.2f} "
              f"{st['rows'] / st['seconds'] / 1e3:>10.0f} {st['rss_mb']:>13.0f}", flush=True)
        if not args.keep:
            shutil.rmtree(out)
    done = sorted(rss)
    if len(done) >= 2:
        a, b = done[-2], done[-1]
        print(f"streaming peak RSS {b:.0e} / {a:.0e}: {rss[b] / rss[a]:.2f}x (goal <= 1.2x)")


if __name__ == "__main__":
    main()
