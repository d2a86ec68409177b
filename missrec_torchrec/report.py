"""Test metrics of finished runs as a Markdown table: `missrec summarize RUN [RUN...]`.

Runs that differ only in the seed are one row, reported as mean ± std (sample std, as protocols that ask
for "≥ 3 seeds" report it); `--group` names the rows, e.g. one label per run. `--row` adds a fixed row
(a baseline or a published number) next to them, and `--bars` draws the table as a bar chart.
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


Rows = Dict[str, List[Dict[str, float]]]  # label -> one test-metrics dict per run


def collect(run_dirs: Sequence[Path | str], groups: Optional[Sequence[str]], metrics: Sequence[str]) -> Rows:
    """Each group's runs' test metrics (default: one group per run folder name)."""
    if groups is not None and len(groups) != len(run_dirs):
        raise DataError(f"--group given {len(groups)} times for {len(run_dirs)} runs")
    groups = list(groups) if groups is not None else [Path(r).name for r in run_dirs]
    rows: Rows = {}
    for group, run in zip(groups, run_dirs):
        test = load_results(run)["test"]
        missing = [m for m in metrics if m not in test]
        if missing:
            raise DataError(f"{run}: results.json has no test {', '.join(missing)} (has: {', '.join(sorted(test))})")
        rows.setdefault(group, []).append(test)
    return rows


def fixed_row(spec: str, metrics: Sequence[str]) -> Rows:
    """`LABEL:metric=value,metric=value` (e.g. a published row) as a one-run row with every metric."""
    label, sep, body = spec.rpartition(":")
    values: Dict[str, float] = {}
    for part in body.split(",") if sep else []:
        name, eq, value = part.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise DataError(f"--row {spec!r}: {part!r} is not metric=number") from None
    if not label or not values:
        raise DataError(f"--row {spec!r} is not LABEL:metric=value[,metric=value...]")
    missing = [m for m in metrics if m not in values]
    if missing:
        raise DataError(f"--row {spec!r} has no {', '.join(missing)}")
    return {label: [values]}


def table(rows: Rows, metrics: Sequence[str]) -> str:
    lines = ["| run | runs | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for group, tests in rows.items():
        lines.append(f"| {group} | {len(tests)} | " + " | ".join(cell([t[m] for t in tests]) for m in metrics) + " |")
    return "\n".join(lines)


def rows_of(run_dirs: Sequence[Path | str], groups: Optional[Sequence[str]] = None,
            metrics: Sequence[str] = DEFAULT_METRICS, fixed: Sequence[str] = ()) -> Rows:
    """The groups' runs, then one row per `fixed` spec."""
    rows = collect(run_dirs, groups, metrics)
    for spec in fixed:
        rows.update(fixed_row(spec, metrics))
    return rows


def summarize(run_dirs: Sequence[Path | str], groups: Optional[Sequence[str]] = None,
              metrics: Sequence[str] = DEFAULT_METRICS, fixed: Sequence[str] = ()) -> str:
    """One Markdown row per group, then one per `fixed` row spec; columns: runs, metrics."""
    return table(rows_of(run_dirs, groups, metrics, fixed), metrics)
