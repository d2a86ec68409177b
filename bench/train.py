"""Training and evaluation benchmark: steady-state samples/s and users/s per mode, side by side.

    .venv/bin/python bench/train.py                        # reference-shape case, every lever, ~12 min on 2 cores per round
    .venv/bin/python bench/train.py --case paper-5k --procs 1,2   # 5,000 items, 1 vs 2 gloo processes
    .venv/bin/python bench/train.py --mode today --mode 'wide:model.hidden=600' --steps 8

Cases (one synthetic dataset each, `missrec prepare synthetic`, 512-d `text` and `image` features,
generated once under --work and reused):
- `reference-shape`: the data of issue 10's side-by-side run against the reference implementation:
  3,000 users, 1,000 items, sequences of 5-60 (mean ~17.7), 10% of items without an image.
- `paper-5k`: 5,000 items, 2e5 interactions (full softmax over a catalogue like the paper's Amazon
  domains).

Modes: the first is `today`, the padded fp32 path this project had before issue 10 (every history
padded to 50, torch dropout, SDPA, every decoder position computed, history rows adapted again,
fp32, evaluation through the sharded forward); then each speed lever switched on alone; then
`fast` (the defaults: every lever), `fast` with each lever switched off alone, and `causal` (the
defaults plus the one-pass causal model). Every (mode, processes) cell runs in fresh
processes: `Trainer` from `load_config("paper", overrides)`, one re-clustering, a warm-up epoch of
--warmup steps, then a measured epoch of as many steps as fill --seconds (at least --steps, at most
--max-steps), then (1 process only) one untimed validation pass and --eval-passes timed ones (the median
reported) over every user, unmasked and with the history masked. Samples/s: global training rows (batch x ranks) per second, data loading
included. Targets/s: next-item predictions (one per row; causal: one per real position).

Threads: each cell gets the same cores (--cores): 1 process uses all of them, 2 processes one share
each. The reference implementation's figures are external: issue 10's (official code, CPU, 2 cores,
same data shape, another machine), or the ones measured here with its own code and passed with
--ref-samples/--ref-users (README: how it was run); every other ratio is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
TODAY = ("data.length_buckets=false model.fast_dropout=false model.attention=sdpa model.last_query_only=false "
         "train.precision=fp32 train.gather_history=false eval.engine=dmp model.project_centroids=false "
         "model.fold_single_query=false train.blocked_softmax=false")
LEVERS = {
    "+fast dropout": "model.fast_dropout=true",
    "+math attention": "model.attention=math",
    "+last query only": "model.last_query_only=true",
    "+length buckets": "data.length_buckets=true",
    "+gather history": "train.gather_history=true",
    "+bf16": "train.precision=bf16",
    "+catalogue eval": "eval.engine=catalogue",
    "+projected centroids": "model.project_centroids=true",
    "+folded single query": "model.fold_single_query=true",
    "+blocked softmax": "train.blocked_softmax=true",
}


def _lever(flag: str) -> str:
    key = flag.split("=")[0]
    return " ".join([o for o in TODAY.split() if not o.startswith(key + "=")] + [flag])


def _without(flag: str) -> str:
    return next(o for o in TODAY.split() if o.startswith(flag.split("=")[0] + "="))


DEFAULT_MODES = ([f"today:{TODAY}"] + [f"{name}:{_lever(flag)}" for name, flag in LEVERS.items()] + ["fast"]
                 + [f"fast -{name[1:]}:{_without(flag)}" for name, flag in LEVERS.items()]
                 + ["causal:model.causal=true"])
PRESET = "paper"
# Issue 10: the reference implementation (gimpong/MM23-MISSRec, CPU, 2 cores) on the reference shape.
REFERENCE = {"samples_per_s": 284.0, "targets_per_s": 284.0, "eval_users_per_s": 750.0}
CASES = {
    "reference-shape": ["--users", "3000", "--items", "1000", "--mean-len", "17.7", "--min-len", "5",
                        "--max-len", "60", "--missing", "0.1"],
    "paper-5k": ["--items", "5000", "--interactions", "2e5"],
}


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
    """The case's synthetic dataset, generated once and reused across runs."""
    out = args.work / args.case
    if (out / "stats.json").is_file():
        return out
    sys.path.insert(0, str(ROOT))
    from datapipes.sources import prepare

    prepare("synthetic", out, [*CASES[args.case], "--modalities", "text:512,image:512", "--seed", "0"])
    return out


def cpu_line() -> str:
    """The CPU model and whether it has native bf16, from lscpu (machines of one kind differ)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "cpu: lscpu not available"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    flags = set(fields.get("Flags", "").split())
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"cpu: {model}; native bf16: {', '.join(native) or 'none'}"


def base_overrides(args: argparse.Namespace, data: Path) -> List[str]:
    return [
        f"data.dataset={data}",
        f"data.batch_size={args.batch_size}",
        f"experiment.out_dir={args.work / 'runs'}",
        "log.tensorboard=false",
        "log.progress=false",
        # The paper preset shuffles the whole set (quirk 22); length buckets are a speed lever, so
        # every mode has them unless it says otherwise (today's path does).
        "data.length_buckets=true",
    ]


def measure(overrides: List[str], warmup: int, steps: int, seconds: float, max_steps: int,
            eval_passes: int) -> Dict[str, float]:
    """Runs inside each rank: warm-up epoch, the measured epoch, then (1 process) two validation
    passes; rank 0's stats come back."""
    sys.path.insert(0, str(ROOT))
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import Trainer

    cfg = load_config(PRESET, overrides)
    trainer = Trainer(cfg)
    trainer.recluster(0)
    progress = {"step": 0, "skip_batches": 0}
    # The stream reads the step cap from the live config each epoch, so one Trainer does both epochs
    # and the measured one starts with a warm allocator and autocast cache.
    cfg.train.max_steps_per_epoch = warmup
    warm = trainer.train_epoch(0, progress)
    cfg.train.max_steps_per_epoch = measured_steps(trainer, warm, steps, seconds, max_steps)
    stats = trainer.train_epoch(1, progress)
    stats.update(world=trainer.world, precision=trainer.precision)
    if trainer.world == 1:
        trainer.evaluate("valid")  # warm-up: first-call allocations and weight casts, not measured
        for masked in (False, True):
            cfg.eval.mask_history = masked
            rates = []
            # A pass takes well under a second when fast: the median of several is the figure.
            for _ in range(eval_passes):
                start = time.perf_counter()
                metrics = trainer.evaluate("valid")
                rates.append(metrics["count"] / (time.perf_counter() - start))
            key = "eval_masked" if masked else "eval"
            stats[key + "_users_per_s"] = statistics.median(rates)
            stats[key + "_ndcg@10"] = metrics["ndcg@10"]
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


def run_cell(args: argparse.Namespace, overrides: List[str], procs: int) -> Dict[str, float]:
    """One (mode, processes) cell in fresh processes; parses the JSON line rank 0 prints last."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(max(1, args.cores // procs)))
    child = [__file__, "--_child", json.dumps(overrides), "--warmup", str(args.warmup), "--steps", str(args.steps),
             "--seconds", str(args.seconds), "--max-steps", str(args.max_steps),
             "--eval-passes", str(args.eval_passes)]
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


def median_cell(cells: List[Dict]) -> Dict:
    """Each number the median over rounds (an error in any round is the cell's)."""
    errors = [c for c in cells if "error" in c]
    if errors:
        return errors[0]
    out = dict(cells[0])
    for key, value in cells[0].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        median = statistics.median_low if isinstance(value, int) else statistics.median
        out[key] = median(c[key] for c in cells)
    return out


def fmt_cell(cell: Dict, key: str, today: Optional[float], external: Optional[float] = None,
             steps: bool = False) -> str:
    """'rate (x today[; x reference][; steps measured])', or the cell's reason for having no number."""
    if "error" in cell:
        return cell["error"]
    if key not in cell:
        return ""
    notes = [f"{cell[key] / today:.2f}x"] if today else []
    if external:
        notes.append(f"{cell[key] / external:.1f}x ref")
    if steps:
        notes.append(f"{cell['steps']} steps")
    return f"{cell[key]:.0f}" + (f" ({'; '.join(notes)})" if notes else "")


COLUMNS = [("samples/s", "samples_per_s"), ("targets/s", "targets_per_s")]
EVAL_COLUMNS = [("eval users/s", "eval_users_per_s"), ("eval users/s, masked", "eval_masked_users_per_s")]


def print_table(rows: List[Tuple[str, List[str], Dict[int, Dict]]], procs: List[int],
                reference: Optional[Dict[str, float]], source: str) -> None:
    first = rows[0][2].get(procs[0], {})
    head = ["mode", "precision"]
    for p in procs:
        head += [f"{p} proc {title}" for title, _ in COLUMNS]
    head += [title for title, _ in EVAL_COLUMNS] + ["valid NDCG@10 (unmasked / masked)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, _, cells in rows:
        one = cells[procs[0]]
        line = [name, one.get("precision", "")]
        for p in procs:
            for _, key in COLUMNS:
                ref = reference.get(key) if reference else None
                line.append(fmt_cell(cells[p], key, first.get(key), ref, steps=key == "samples_per_s"))
        for _, key in EVAL_COLUMNS:
            ref = reference["eval_users_per_s"] if reference else None
            line.append(fmt_cell(one, key, first.get(key), ref))
        line.append(f"{one['eval_ndcg@10']:.4f} / {one['eval_masked_ndcg@10']:.4f}" if "eval_ndcg@10" in one else "")
        print("| " + " | ".join(line) + " |")
    print(f"\n(Nx) = against {rows[0][0]} with {procs[0]} process, measured in this run. samples = training rows "
          "(batch x ranks); targets = next-item predictions in those rows (one per row, except causal: one per "
          "real position). Evaluation: every validation user, full ranking, 1 process.")
    if reference:
        print(f"(Nx ref) = against the reference implementation's figures ({source}; external: its official code, "
              f"2 cores, same data shape): {reference['samples_per_s']:.0f} samples/s, "
              f"{reference['eval_users_per_s']:.0f} users/s.")
    print("overrides: " + "; ".join(f"{name}: {' '.join(o) or '(defaults)'}" for name, o, _ in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", action="append", metavar="NAME[:KEY=VALUE ...]",
                   help="a mode: a name and config overrides, space-separated; repeat for several "
                        f"(default: {' / '.join(DEFAULT_MODES)}); the first is the ratio reference")
    p.add_argument("--case", choices=sorted(CASES), default="reference-shape", help="data set (default reference-shape)")
    p.add_argument("--procs", default="1",
                   help="process counts, comma-separated (default 1; more than 1 runs under torchrun, gloo)")
    p.add_argument("--steps", type=int, default=3, help="fewest measured training steps per cell (default 3)")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="measure as many steps as fill this many seconds at the warm-up's pace, at least --steps "
                        "(default 30)")
    p.add_argument("--max-steps", type=int, default=64, help="most measured steps per cell (default 64)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per cell, not measured (default 1)")
    p.add_argument("--ref-samples", type=float, help="the reference implementation's training samples/s measured on "
                   "this machine (default: issue 10's 284, from another machine)")
    p.add_argument("--ref-users", type=float, help="its validation users/s measured on this machine (default: 750)")
    p.add_argument("--rounds", type=int, default=1,
                   help="times every mode runs, in turn; each cell reports its median round (default 1)")
    p.add_argument("--eval-passes", type=int, default=3,
                   help="timed validation passes per cell and masking, the median reported (default 3)")
    p.add_argument("--batch-size", type=int, default=512, help="rows per rank per step (default 512, the paper's)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="torch threads shared by each cell's processes (default: all cores)")
    p.add_argument("--work", type=Path, default=Path("/tmp/missrec-bench-train"),
                   help="dataset and run folders (default /tmp/missrec-bench-train)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        stats = measure(json.loads(args._child), args.warmup, args.steps, args.seconds, args.max_steps,
                        args.eval_passes)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(stats), flush=True)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    data = ensure_dataset(args)
    procs = [int(x) for x in args.procs.split(",")]
    stats = json.loads((data / "stats.json").read_text())
    print(f"case {args.case}: {stats['users']:,} users, {stats['items']:,} items, {stats['training_rows']:,} training "
          f"rows; preset {PRESET} (512-d text+image, hidden 300, full softmax), batch {args.batch_size}/rank, "
          f"{args.warmup} warm-up step(s), then {args.steps}..{args.max_steps} measured steps (~{args.seconds:.0f}s), "
          f"{args.cores} cores per cell", flush=True)
    print(cpu_line(), flush=True)
    modes = [parse_mode(text) for text in args.mode or DEFAULT_MODES]
    runs: Dict[Tuple[int, int], List[Dict]] = {}
    # Rounds over every mode in turn: a machine whose speed drifts over the run moves every mode
    # alike, and each cell reports its median round.
    for _ in range(args.rounds):
        for i, (name, overrides) in enumerate(modes):
            reason = check_mode(overrides)
            for n in procs:
                start = time.perf_counter()
                cell = {"error": reason} if reason else run_cell(args, base_overrides(args, data) + overrides, n)
                runs.setdefault((i, n), []).append(cell)
                took = time.perf_counter() - start
                print(f"  {name} x{n}: {fmt_cell(cell, 'samples_per_s', None)} ({took:.0f}s)", file=sys.stderr, flush=True)
    rows = [(name, overrides, {n: median_cell(runs[i, n]) for n in procs}) for i, (name, overrides) in enumerate(modes)]
    reference, source = None, ""
    if args.case == "reference-shape":
        reference = dict(REFERENCE)
        source = "issue 10, another machine"
        if args.ref_samples:
            reference.update(samples_per_s=args.ref_samples, targets_per_s=args.ref_samples)
            source = "measured on this machine, passed with --ref-samples/--ref-users"
        if args.ref_users:
            reference["eval_users_per_s"] = args.ref_users
    print_table(rows, procs, reference, source)


if __name__ == "__main__":
    main()
