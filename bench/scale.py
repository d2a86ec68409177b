"""Scale benchmark (issue 15): the real commands on 2 ranks at 1e5 and 1e6 items (1e7 with --max), measured.

    .venv/bin/python bench/scale.py --data /work/scale-data              # 1e5 and 1e6 items
    .venv/bin/python bench/scale.py --data /work/scale-data --max 1e7    # and 1e7 (hours on 2 cores)
    .venv/bin/python bench/scale.py --logs OUT/logs                      # the table of one scale.sh run

Per size N it runs `scripts/scale.sh` (ITEMS=N, INTERACTIONS=10 N) into DATA/scale-N: a synthetic
dataset with two 128-d float16 feature tables (made once), 2-rank training with configs/scale-1e7.yaml
(row-wise tables, an ID table, sampled softmax, K = 65,536 interests by faiss, --steps steps,
evaluation of --eval-users users), `missrec score` of --exact-users users exactly and of --score-users
users with `--ann ivf` (rank-local indexes), with its recall@100 against exact scoring on
--recall-users users. Nothing is estimated: every number comes from the `resources` lines each
rank prints per phase (log.resources; missrec_torchrec/resources.py) and the commands' own summaries.

Columns. peak RSS: the largest of any phase on any rank of the command (its own peak, the high-water
mark being reset as each phase starts). bound: that rank's table shards with their optimizer state,
the dense model (+ gradients and Adam state), the head's buffers (per-item presence flags and cluster
ids, the centroids) and the runtime (interpreter, torch, TorchRec, measured before the dataset is
opened); ratio = peak / bound; for `--ann` also peak / (bound + the rank's indexes, which are
compressed copies of its own shards). start-up: process start to the first training step (imports, feature
check, tables filled, target counts). step: training seconds / steps. re-cluster: one interest
discovery. users/s: users evaluated or scored by both ranks / the slower rank's seconds, less
--ann's exact scan of its recall sample (recorded apart). All timings are on whatever else the
machine runs: the load average is printed with each size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
SIZES = [1e5, 1e6, 1e7]
GIB = 1024**3
MIB = 1024**2
DECODER = json.JSONDecoder()


def resource_lines(text: str) -> List[Dict]:
    """Every `resources {json}` record in a log (two ranks' lines may share a line of the file)."""
    out = []
    for match in re.finditer(r"resources (?=\{)", text):
        try:
            out.append(DECODER.raw_decode(text, match.end())[0])
        except json.JSONDecodeError:
            continue  # a line cut short by a killed process
    return out


def read_log(logs: Path, name: str) -> Optional[str]:
    path = logs / f"{name}.log"
    return path.read_text(errors="replace") if path.is_file() else None


def memory(records: List[Dict]) -> Dict[str, float]:
    """The command's worst rank: its peak over every phase, its bound, the ratio, the peak's phase."""
    bounds = {r["rank"]: r["bound"]["total"] for r in records if "bound" in r}
    worst: Dict[str, float] = {}
    for r in records:
        bound = bounds.get(r["rank"])
        if bound and (not worst or r["peak_bytes"] / bound > worst["ratio"]):
            worst = {"peak": r["peak_bytes"], "bound": bound, "ratio": r["peak_bytes"] / bound,
                     "phase": r["phase"], "rank": r["rank"]}
    return worst


def phase_stats(records: List[Dict], phase: str, **match) -> Dict[str, float]:
    """Seconds (the slower rank's), users and steps (summed over ranks) of a phase's first records."""
    rows = [r for r in records if r["phase"] == phase and all(r.get(k) == v for k, v in match.items())]
    if not rows:
        return {}
    first = {}
    for r in rows:  # a phase that repeats (epochs): the first occurrence per rank
        first.setdefault(r["rank"], r)
    rows = list(first.values())
    # uncounted_seconds: --ann's exact scan of its recall sample, a measurement rather than scoring.
    return {"seconds": max(r["seconds"] - r.get("uncounted_seconds", 0) for r in rows),
            "users": sum(r.get("users", 0) for r in rows),
            "steps": max(r.get("steps", 0) for r in rows)}


def summarise(logs: Path) -> Dict[str, object]:
    """One size's row from a scale.sh logs folder."""
    row: Dict[str, object] = {"logs": str(logs)}
    train = read_log(logs, "train")
    if train:
        rec = resource_lines(train)
        row["train_memory"] = memory(rec)
        row["startup"] = phase_stats(rec, "startup").get("seconds")
        steps = [r for r in rec if r["phase"] == "train"]
        by_rank: Dict[int, List[float]] = {}
        for r in steps:
            by_rank.setdefault(r["rank"], [0.0, 0.0])
            by_rank[r["rank"]][0] += r["seconds"]
            by_rank[r["rank"]][1] += r["steps"]
        if by_rank:
            row["step"] = max(s / max(n, 1) for s, n in by_rank.values())
        row["recluster"] = phase_stats(rec, "recluster").get("seconds")
        ev = phase_stats(rec, "evaluate", split="test")
        if ev:
            row["eval_users_per_s"] = ev["users"] / ev["seconds"]
            row["eval_users"] = ev["users"]
        row["phases"] = rec
        test = re.search(r"^test (.*)$", train, re.M)
        row["test"] = test.group(1).strip() if test else None
    for name, key in (("score", "score"), ("score-ann", "ann")):
        text = read_log(logs, name)
        if not text:
            continue
        rec = resource_lines(text)
        row[f"{key}_memory"] = memory(rec)
        sc = phase_stats(rec, "score")
        if sc:
            row[f"{key}_users_per_s"] = sc["users"] / sc["seconds"]
            row[f"{key}_users"] = sc["users"]
        setup = [r for r in rec if r["phase"] == "score_setup"]
        row[f"{key}_setup"] = max((r["seconds"] for r in setup), default=None)
        row[f"{key}_index"] = max((r.get("index_bytes", 0) for r in setup), default=0)
        if row[f"{key}_index"] and row[f"{key}_memory"]:  # the indexes are the rank's own shards, compressed
            m = row[f"{key}_memory"]
            m["with_index"] = m["peak"] / (m["bound"] + row[f"{key}_index"])
    for name in ("score-ann", "recall"):  # scripts/scale.sh measures recall in a run of its own
        recall = re.search(r"recall@(\d+) vs exact ([0-9.]+) on (\d+) sampled users", read_log(logs, name) or "")
        if recall:
            row["recall"] = float(recall.group(2))
            row["recall_users"] = int(recall.group(3))
    return row


def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def fmt_memory(m: Optional[Dict]) -> str:
    if not m:
        return "-"
    index = f"; {m['with_index']:.2f}x of bound + indexes" if "with_index" in m else ""
    return f"{m['peak'] / GIB:.2f} / {m['bound'] / GIB:.2f} = {m['ratio']:.2f}x ({m['phase']}{index})"


def print_table(rows: Dict[str, Dict]) -> None:
    print("| items | peak RSS / bound per rank, train GiB | the same, score | the same, score --ann | start-up s "
          "| step s | re-cluster s | eval users/s | score users/s | ANN users/s (index s, MiB per rank) "
          "| recall@100 ANN vs exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        ann = "-" if r.get("ann_users_per_s") is None else \
            f"{r['ann_users_per_s']:,.0f} ({fmt(r.get('ann_setup'), '.0f')}, {r.get('ann_index', 0) / MIB:,.0f})"
        recall = "-" if r.get("recall") is None else f"{r['recall']:.3f} ({r['recall_users']} users)"
        print(f"| {label} | {fmt_memory(r.get('train_memory'))} | {fmt_memory(r.get('score_memory'))} | "
              f"{fmt_memory(r.get('ann_memory'))} | "
              f"{fmt(r.get('startup'), '.0f')} | {fmt(r.get('step'), '.3f')} | {fmt(r.get('recluster'), '.0f')} | "
              f"{fmt(r.get('eval_users_per_s'), ',.0f')} | {fmt(r.get('score_users_per_s'), ',.0f')} | {ann} | "
              f"{recall} |")


def print_phases(rows: Dict[str, Dict]) -> None:
    """Each training phase's peak against the bound, per size: an excess that grows with N shows here."""
    print("\nTraining phases, the worse rank: peak RSS GiB (its excess over the rank's bound, MiB; of which "
          "held when the phase began, MiB)")
    names = ["startup", "recluster", "train", "evaluate", "checkpoint"]
    print("| items | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, r in rows.items():
        rec = r.get("phases") or []
        bounds = {x["rank"]: x["bound"]["total"] for x in rec if "bound" in x}
        cells = []
        for name in names:
            runs = [x for x in rec if x["phase"] == name]
            if not runs:
                cells.append("-")
                continue
            x = max(runs, key=lambda x: x["peak_bytes"] - bounds.get(x["rank"], 0))
            bound = bounds.get(x["rank"], 0)
            held = "" if "start_bytes" not in x else f"; {(x['start_bytes'] - bound) / MIB:+.0f}"
            cells.append(f"{x['peak_bytes'] / GIB:.2f} ({(x['peak_bytes'] - bound) / MIB:+.0f}{held})")
        print(f"| {label} | " + " | ".join(cells) + " |")


def run_size(n: int, args) -> Path:
    out = Path(args.data) / f"scale-{n:.0e}".replace("e+0", "e")
    env = dict(os.environ, ITEMS=str(n), INTERACTIONS=str(10 * n), STEPS=str(args.steps),
               EVAL_USERS=str(args.eval_users), EXACT_USERS=str(args.exact_users),
               SCORE_USERS=str(args.score_users), RECALL_USERS=str(args.recall_users), PY=sys.executable)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    print(f"  {n:.0e} items: scripts/scale.sh {out} (load average {load:.1f})", file=sys.stderr, flush=True)
    subprocess.run(["bash", str(ROOT / "scripts" / "scale.sh"), str(out)], cwd=ROOT, env=env, check=True,
                   stdout=sys.stderr)
    print(f"  {n:.0e} items: {time.perf_counter() - start:.0f} s, load average now {os.getloadavg()[0]:.1f}",
          file=sys.stderr, flush=True)
    return out / "logs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data", help="where the datasets and runs go (default data)")
    p.add_argument("--max", type=float, default=1e6, help="largest catalogue: 1e5, 1e6 or 1e7 (default 1e6)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300, as scale-1e7.yaml)")
    p.add_argument("--eval-users", type=int, default=4096, help="users evaluated (default 4096)")
    p.add_argument("--exact-users", type=int, default=2000, help="users scored exactly (default 2000)")
    p.add_argument("--score-users", type=int, default=20000, help="users scored with --ann ivf (default 20000)")
    p.add_argument("--recall-users", type=int, default=1000, help="users scored exactly too, for recall (1000)")
    p.add_argument("--logs", nargs="+", type=Path, help="only print the table of these scale.sh logs folders")
    args = p.parse_args()
    if args.logs:
        folders = {str(f): f for f in args.logs}
    else:
        folders = {f"{n:.0e}".replace("e+0", "e"): run_size(int(n), args) for n in SIZES if n <= args.max}
    rows = {label: summarise(f) for label, f in folders.items()}
    print_table(rows)
    print_phases(rows)
    for label, r in rows.items():
        if r.get("test"):
            print(f"\n{label}: test on {fmt(r.get('eval_users'), ',.0f')} users: {r['test']}")


if __name__ == "__main__":
    main()
