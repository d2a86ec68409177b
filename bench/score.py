"""Batch-scoring benchmark: evaluation (full ranking) vs `missrec score`, exact, approximate and ANN.

    .venv/bin/python bench/score.py                             # 20k users x 50k items, a few minutes on 2 cores
    .venv/bin/python bench/score.py --users 2000 --items 5000   # a quick look
    .venv/bin/python bench/score.py --users 4000 --items 1000000 --approx 400 --no-evaluate  # exact vs ANN at 1e6

It prepares a synthetic dataset (text 64-d + image 32-d, planted topics), trains a small inductive
model for a few sampled-softmax steps (enough for non-random user vectors) and saves a checkpoint,
then times, on the test split, in one process:

- `Trainer.evaluate`: the B x N score matrix of every batch plus ranking metrics;
- `missrec score` exact: the whole catalogue in item chunks with a running top-K;
- `missrec score --approx K'` for several K': per-table cosine top-K', union re-scored exactly.
  Retrieval here is a brute-force scan (the same matrix products as exact scoring), so it shows
  recall and certificates, not the speed an ANN index would bring;
- `missrec score --ann hnsw|ivf`: a faiss index per table, each table's C = MULT x K nearest items by
  cosine, the union re-scored exactly. Its index build time is its own column, outside users/s.

users/s counts the scoring loop only (model set-up and the final merge excluded, as for the
evaluation). Approximate rows also give recall@K against the exact run and the share of users whose
top-K is provably exact (see missrec_torchrec/scoring.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prepare(out: Path, users: int, items: int) -> None:
    from missrec_torchrec.cli import main

    if out.exists():
        return
    rc = main(["prepare", "synthetic", "--out", str(out), "--users", str(users), "--items", str(items),
               "--mean-len", "20", "--topics", "200", "--seed", "0"])
    if rc:
        sys.exit("prepare failed")


def train_briefly(data: Path, run_dir: Path, steps: int, interest_cap: int):
    """A short sampled-softmax run, checkpointed; returns the live Trainer (for the evaluation timing)."""
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import Trainer

    overrides = {
        "data.dataset": data, "data.prepare_source": "null", "data.features": "[]",
        "data.modalities": "[text,image]", "data.batch_size": 512, "data.eval_batch_size": 1024,
        "model.hidden": 64, "model.heads": 2, "model.ffn": 128, "model.dropout": 0.1,
        "model.interest_ratio": 0.02, "model.interest_cap": interest_cap, "train.loss": "sampled_softmax",
        "train.epochs": 1,
        "train.max_steps_per_epoch": steps, "train.lr": 0.003, "checkpoint.run_dir": run_dir,
        "log.progress": "false", "log.tensorboard": "false",
    }
    cfg = load_config("ml100k", [f"{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(cfg)
    progress = {"epoch": 0, "step": 0, "skip_batches": 0}
    progress["interest"] = trainer.recluster(0)
    trainer.train_epoch(0, progress)
    progress["epoch"] = 1
    trainer.save(progress)
    return trainer


def timed_score(run_dir: Path, out: Path, topk: int, chunk: int, approx=None, ann=None, candidates=None) -> dict:
    from missrec_torchrec import scoring

    opts = scoring.ScoreOptions(checkpoint=run_dir, out=out, topk=topk, chunk_items=chunk, approx=approx, ann=ann,
                                ann_candidates=candidates, overwrite=True, overrides=["log.progress=false"])
    t0 = time.perf_counter()
    summary = scoring.score(opts)
    summary["wall"] = time.perf_counter() - t0
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--chunk-items", type=int, default=8192)
    p.add_argument("--approx", default="100,400", help="comma-separated per-table K' (default 100,400)")
    p.add_argument("--ann", default="hnsw:4,ivf:4,ivf:8", help="comma-separated ANN runs, each KIND or KIND:MULT "
                   "for --ann-candidates MULT (default hnsw:4,ivf:4,ivf:8; MULT: the scorer's default unless given)")
    p.add_argument("--no-evaluate", action="store_true", help="skip the evaluation row (at 1e6 items it costs "
                   "what the exact scan does)")
    p.add_argument("--interest-cap", type=int, default=1024,
                   help="model.interest_cap: the set-up's k-means stays short at 1e6 items (default 1024)")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "score")
    p.add_argument("--keep", action="store_true", help="keep the dataset and run folder")
    args = p.parse_args()

    import torch

    from missrec_torchrec import topk

    work = args.work / f"u{args.users}-i{args.items}"
    work.mkdir(parents=True, exist_ok=True)
    data, run_dir = work / "data", work / "run"
    t0 = time.perf_counter()
    prepare(data, args.users, args.items)
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = train_briefly(data, run_dir, args.train_steps, args.interest_cap)
    print(f"set-up (data + {args.train_steps} training steps) {time.perf_counter() - t0:.0f} s; "
          f"{args.users:,} users x {args.items:,} items, hidden 64, text 64-d + image 32-d, "
          f"{torch.get_num_threads()} torch threads, one process; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores", flush=True)

    rows = []
    if not args.no_evaluate:
        t = time.perf_counter()
        metrics = trainer.evaluate("test")
        seconds = time.perf_counter() - t
        rows.append(("evaluate (full ranking)", seconds, args.users / seconds, "", "", "",
                     f"hr@10 {metrics['hr@10']:.3f}"))
    del trainer

    exact_out = work / "exact.parquet"
    s = timed_score(run_dir, exact_out, args.topk, args.chunk_items)
    rows.append((f"score exact top-{args.topk}", s["seconds"], s["users_per_s"], "1.0000", "100.0%", "",
                 f"wall {s['wall']:.0f} s"))
    for k in [int(x) for x in args.approx.split(",") if x]:
        out = work / f"approx{k}.parquet"
        s = timed_score(run_dir, out, args.topk, args.chunk_items, approx=k)
        r = topk.topk_recall(out, exact_out)
        rows.append((f"score approx K'={k}", s["seconds"], s["users_per_s"], f"{r:.4f}",
                     f"{100 * s['certified']:.1f}%", "", f"wall {s['wall']:.0f} s"))
    for spec in [x for x in args.ann.split(",") if x]:
        kind, _, mult = spec.partition(":")
        out = work / f"ann-{kind}-{mult or 'default'}.parquet"
        s = timed_score(run_dir, out, args.topk, args.chunk_items, ann=kind, candidates=int(mult) if mult else None)
        r = topk.topk_recall(out, exact_out)
        name = f"score --ann {kind}" + (f" C={mult}K" if mult else "")
        rows.append((name, s["seconds"], s["users_per_s"], f"{r:.4f}", "", f"{s['index_seconds']:.1f}",
                     f"wall {s['wall']:.0f} s; {s['mode']}"))

    header = (f"{'mode':<26} {'loop s':>8} {'users/s':>9} {'recall@' + str(args.topk):>10} {'certified':>9} "
              f"{'index s':>8}  notes")
    print(header)
    print("-" * len(header))
    for name, sec, ups, rec, cert, build, note in rows:
        print(f"{name:<26} {sec:>8.1f} {ups:>9,.0f} {rec:>10} {cert:>9} {build:>8}  {note}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
