"""Training benchmark: steady-state samples/s at the `paper` preset's dims, per mode, 1 and 2 processes.

    .venv/bin/python bench/train.py                      # padded, bucketed, causal; ~10 min on 2 cores
    .venv/bin/python bench/train.py --mode padded --mode 'wide:model.hidden=600' --steps 8

One synthetic dataset with 512-d `text` and `image` features (planted topics, `missrec prepare
synthetic`) is generated once under --work and reused. Every (mode, processes) cell runs in a fresh
process group: `Trainer` from `load_config("paper", overrides)`, one re-clustering (so interest
tokens look like training's), a warm-up epoch of --warmup steps, then a measured epoch of --steps
steps. Samples/s is that epoch's `train_epoch` statistic: global rows (batch x ranks) per second,
including data loading, pipeline set-up and the per-step all-to-alls, excluding evaluation.
Targets/s counts next-item predictions instead: a causal row (a window) trains every real position,
so rows/s alone would undersell it.

Threads: each cell gets the same cores (--cores): 1 process uses all of them, 2 processes one share
each, so the 2-process column shows sharding overhead, not extra hardware. A mode whose override
names a key that configs/defaults.yaml does not have yet is reported as "n/a (unknown key)".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODES = ["padded", "bucketed:data.length_buckets=true", "causal:model.causal=true"]
PRESET = "paper"


def parse_mode(text: str) -> Tuple[str, List[str]]:
    """'NAME[:KEY=VALUE KEY=VALUE ...]' -> (name, overrides); spaces separate overrides because values
    such as lists ([text,image]) contain commas."""
    name, _, rest = text.partition(":")
    return name.strip(), rest.split()


def check_mode(overrides: List[str]) -> Optional[str]:
    """None if the preset accepts the overrides, else the reason to print instead of a number."""
    sys.path.insert(0, str(ROOT))
    from missrec_torchrec.config import ConfigError, load_config

    try:
        load_config(PRESET, overrides)
    except ConfigError as e:
        return "n/a (unknown key)" if "unknown key" in str(e) else f"n/a ({e})"
    return None


def ensure_dataset(args: argparse.Namespace) -> Path:
    """The synthetic dataset, generated once per (items, interactions) and reused across runs."""
    out = args.work / f"paper-{args.items}-{args.interactions:.0e}"
    if (out / "stats.json").is_file():
        return out
    sys.path.insert(0, str(ROOT))
    from datapipes.sources import prepare, synthetic

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    synthetic.add_arguments(p)
    gen = p.parse_args(["--out", str(out), "--items", str(args.items), "--interactions", str(args.interactions),
                        "--modalities", "text:512,image:512", "--seed", "0"])
    prepare("synthetic", gen)
    return out


def base_overrides(args: argparse.Namespace, data: Path) -> List[str]:
    return [
        f"data.dataset={data}",
        f"data.batch_size={args.batch_size}",
        f"experiment.out_dir={args.work / 'runs'}",
        "log.tensorboard=false",
        "log.progress=false",
    ]


def measure(overrides: List[str], warmup: int, steps: int, seconds: float, max_steps: int) -> Dict[str, float]:
    """Runs inside each rank: warm-up epoch, then the measured epoch; rank 0's stats come back."""
    sys.path.insert(0, str(ROOT))
    import torch

    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import Trainer

    cfg = load_config(PRESET, overrides)
    trainer = Trainer(cfg)
    targets = count_targets(trainer, bool(cfg["model"].get("causal")))
    trainer.recluster(0)
    progress = {"step": 0, "skip_batches": 0}
    # The stream reads the step cap from the live config each epoch, so one Trainer does both epochs
    # and the measured one starts with compiled kernels, warm allocator and a filled shuffle buffer path.
    cfg["train"]["max_steps_per_epoch"] = warmup
    warm = trainer.train_epoch(0, progress)
    cfg["train"]["max_steps_per_epoch"] = measured_steps(trainer, warm, steps, seconds, max_steps)
    targets.zero_()
    stats = trainer.train_epoch(1, progress)
    if trainer.world > 1:
        torch.distributed.all_reduce(targets, group=trainer.pg)
    stats.update(world=trainer.world, targets_per_s=float(targets) / stats["seconds"])
    return stats


def measured_steps(trainer, warm: Dict[str, float], steps: int, seconds: float, max_steps: int) -> int:
    """Enough steps to fill `seconds` at the warm-up's pace, within [steps, max_steps].

    Bucketed batches differ in cost with their length, so a few steps are a noisy sample of an
    epoch; cheap steps buy more of them within the same time. Ranks adopt the largest count, since
    they must run the same number of collective steps.
    """
    import torch

    pace = warm["seconds"] / max(warm["steps"], 1)
    n = torch.tensor([min(max_steps, max(steps, round(seconds / max(pace, 1e-6))))])
    if trainer.world > 1:
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX, group=trainer.pg)
    return int(n)


def count_targets(trainer, causal: bool) -> "torch.Tensor":
    """Next-item predictions fed to this rank, counted as batches enter the pipeline.

    A causal row is a window whose every real position is a training target, so rows/s alone would
    undersell it; the trainer reports rows only, hence this wrapper around its batch generator (it
    sees exactly the batches the epoch trains on, since each segment islices its step count).
    """
    import torch

    box = torch.zeros(1, dtype=torch.float64)
    inner = trainer._with_candidates

    def counted(batches, candidates_fn):
        for batch in inner(batches, candidates_fn):
            box.add_(float(batch.lengths.sum()) if causal else batch.batch_size)
            yield batch

    trainer._with_candidates = counted
    return box


def run_cell(args: argparse.Namespace, overrides: List[str], procs: int) -> Dict[str, float]:
    """One (mode, processes) cell in fresh processes; parses the JSON line rank 0 prints last."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(max(1, args.cores // procs)))
    child = [__file__, "--_child", json.dumps(overrides), "--warmup", str(args.warmup), "--steps", str(args.steps),
             "--seconds", str(args.seconds), "--max-steps", str(args.max_steps)]
    if procs == 1:
        cmd = [sys.executable, *child]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *child]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        # torchrun ends with a banner; the exception line is the last one naming an error.
        lines = proc.stderr.strip().splitlines() or ["(no stderr)"]
        errors = [ln for ln in lines if "Error" in ln] or lines
        return {"error": "failed: " + errors[-1].strip()[:80]}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def fmt_cell(cell: Dict, key: str, ref: Optional[float], steps: bool = False) -> str:
    """'rate (ratio to the reference[; steps measured])', or the cell's reason for having no number."""
    if "error" in cell:
        return cell["error"]
    notes = [f"{cell[key] / ref:.2f}x"] if ref else []
    if steps:
        notes.append(f"{cell['steps']} steps")
    return f"{cell[key]:.0f}" + (f" ({'; '.join(notes)})" if notes else "")


def print_table(rows: List[Tuple[str, List[str], Dict[int, Dict]]], procs: List[int]) -> None:
    first = rows[0][2].get(procs[0], {})
    refs = {k: first.get(k) for k in ("samples_per_s", "targets_per_s")}
    head = ["mode", "overrides"]
    for p in procs:
        head += [f"{p} proc samples/s", f"{p} proc targets/s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, overrides, cells in rows:
        line = [name, " ".join(overrides) or "(none)"]
        for p in procs:
            line += [fmt_cell(cells[p], "samples_per_s", refs["samples_per_s"], steps=True),
                     fmt_cell(cells[p], "targets_per_s", refs["targets_per_s"])]
        print("| " + " | ".join(line) + " |")
    print(f"\n(ratio) = against {rows[0][0]} with {procs[0]} process. samples = training rows (batch x ranks); "
          "targets = next-item predictions in those rows (one per row, except causal: one per real position).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", action="append", metavar="NAME[:KEY=VALUE ...]",
                   help="a mode: a name and config overrides, space-separated; repeat for several "
                        f"(default: {' / '.join(DEFAULT_MODES)}); the first is the ratio reference")
    p.add_argument("--procs", default="1,2",
                   help="process counts, comma-separated (default 1,2; more than 1 runs under torchrun, gloo)")
    p.add_argument("--steps", type=int, default=3, help="fewest measured training steps per cell (default 3)")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="measure as many steps as fill this many seconds at the warm-up's pace, at least --steps "
                        "(default 30)")
    p.add_argument("--max-steps", type=int, default=64, help="most measured steps per cell (default 64)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per cell, not measured (default 1)")
    p.add_argument("--batch-size", type=int, default=512, help="rows per rank per step (default 512, the paper's)")
    p.add_argument("--items", type=int, default=5_000,
                   help="catalogue size; full softmax scores all of it every step (default 5000, about the "
                        "paper's Amazon domains)")
    p.add_argument("--interactions", type=float, default=2e5, help="synthetic interactions (default 2e5)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="torch threads shared by each cell's processes (default: all cores)")
    p.add_argument("--work", type=Path, default=Path("/tmp/missrec-bench-train"),
                   help="dataset and run folders (default /tmp/missrec-bench-train)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        stats = measure(json.loads(args._child), args.warmup, args.steps, args.seconds, args.max_steps)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(stats), flush=True)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    data = ensure_dataset(args)
    procs = [int(x) for x in args.procs.split(",")]
    print(f"preset {PRESET} (512-d text+image, hidden 300, full softmax over {args.items:,} items), batch "
          f"{args.batch_size}/rank, {args.warmup} warm-up step(s), then {args.steps}..{args.max_steps} measured steps "
          f"(~{args.seconds:.0f}s), {args.cores} cores per cell", flush=True)
    rows = []
    for text in args.mode or DEFAULT_MODES:
        name, overrides = parse_mode(text)
        reason = check_mode(overrides)
        cells = {}
        for n in procs:
            start = time.perf_counter()
            cells[n] = {"error": reason} if reason else run_cell(args, base_overrides(args, data) + overrides, n)
            took = time.perf_counter() - start
            print(f"  {name} x{n}: {fmt_cell(cells[n], 'samples_per_s', None)} ({took:.0f}s)", file=sys.stderr, flush=True)
        rows.append((name, overrides, cells))
    print_table(rows, procs)


if __name__ == "__main__":
    main()
