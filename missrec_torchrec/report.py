"""Test metrics of finished runs as a Markdown table: `missrec summarize RUN [RUN...]`.

Runs that differ only in the seed are one row, reported as mean ± std (sample std, as protocols that ask
for "≥ 3 seeds" report it); `--group` names the rows, e.g. one label per run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from datapipes.schema import DataError

DEFAULT_METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50")


def load_results(run_dir: Path | str) -> Dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise DataError(f"{run_dir}: no results.json (the run has not finished its test evaluation)")
    return json.loads(path.read_text())


def cell(values: List[float]) -> str:
    """'.2853' for one run, '.2853 ± .0012' for several; digits as the published tables print them."""
    def fmt(v: float) -> str:
        return f"{v:.4f}".replace("0.", ".", 1) if 0 <= v < 1 else f"{v:.4f}"

    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def summarize(
    run_dirs: Sequence[Path | str],
    groups: Optional[Sequence[str]] = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> str:
    """One Markdown row per group (default: one group per run folder name), columns: runs, metrics."""
    if groups is not None and len(groups) != len(run_dirs):
        raise DataError(f"--group given {len(groups)} times for {len(run_dirs)} runs")
    groups = list(groups) if groups is not None else [Path(r).name for r in run_dirs]
    rows: Dict[str, List[Dict[str, float]]] = {}
    for group, run in zip(groups, run_dirs):
        test = load_results(run)["test"]
        missing = [m for m in metrics if m not in test]
        if missing:
            raise DataError(f"{run}: results.json has no test {', '.join(missing)} (has: {', '.join(sorted(test))})")
        rows.setdefault(group, []).append(test)
    lines = ["| run | runs | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for group, tests in rows.items():
        lines.append(f"| {group} | {len(tests)} | " + " | ".join(cell([t[m] for t in tests]) for m in metrics) + " |")
    return "\n".join(lines)
