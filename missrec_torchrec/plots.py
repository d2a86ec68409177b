"""Training curves as PNG from runs' TensorBoard logs: `missrec plot RUN [RUN...] --out curves.png`.

One panel per tag (default: the step-level training loss and the per-epoch validation NDCG@10), one
line per run. Reads what the trainer wrote to RUN/tb, so it also plots runs that are still going.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from datapipes.io import check_writable, staged_file
from datapipes.schema import DataError

DEFAULT_TAGS = ("train/loss", "valid/ndcg@10")
Series = List[Tuple[int, float]]


def read_scalars(run_dir: Path | str) -> Dict[str, Series]:
    """Every scalar tag of RUN/tb as (step, value) pairs sorted by step; a step logged twice (a
    resumed run replays from its checkpoint) keeps its latest value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = Path(run_dir) / "tb"
    if not tb.is_dir():
        raise DataError(f"{run_dir}: no TensorBoard folder {tb} (was the run made with log.tensorboard=false?)")
    out: Dict[str, Dict[int, Tuple[float, float]]] = {}
    for events in sorted(tb.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series = out.setdefault(tag, {})
            for e in acc.Scalars(tag):
                if e.step not in series or e.wall_time >= series[e.step][0]:
                    series[e.step] = (e.wall_time, e.value)
    return {tag: sorted((s, v) for s, (_, v) in series.items()) for tag, series in out.items()}


def plot_runs(
    run_dirs: Sequence[Path | str],
    out: Path | str,
    labels: Optional[Sequence[str]] = None,
    tags: Sequence[str] = DEFAULT_TAGS,
    title: Optional[str] = None,
) -> Dict[str, Dict[str, Series]]:
    """Write one PNG with a panel per tag and a line per run; returns {label: {tag: series}} as drawn."""
    check_writable(Path(out).parent, out)  # before reading every run
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if labels is not None and len(labels) != len(run_dirs):
        raise DataError(f"--label given {len(labels)} times for {len(run_dirs)} runs")
    labels = list(labels) if labels is not None else [Path(r).name for r in run_dirs]
    drawn: Dict[str, Dict[str, Series]] = {}
    for label, run in zip(labels, run_dirs):
        scalars = read_scalars(run)
        missing = [t for t in tags if t not in scalars]
        if missing:
            raise DataError(f"{run}: no TensorBoard scalar {', '.join(missing)} (has: {', '.join(sorted(scalars))})")
        drawn[label] = {t: scalars[t] for t in tags}

    fig, axes = plt.subplots(1, len(tags), figsize=(5.5 * len(tags), 4), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        for label, series in drawn.items():
            steps, values = zip(*series[tag])
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(tag)
        ax.set_xlabel("epoch" if tag.startswith("valid/") else "step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    with staged_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return drawn


def plot_bars(
    rows: Dict[str, List[Dict[str, float]]],
    metrics: Sequence[str],
    out: Path | str,
    title: Optional[str] = None,
) -> Dict[str, Dict[str, Tuple[float, float]]]:
    """A results table as one PNG: a panel per metric, a bar per row at its mean over runs, the sample
    std as an error bar and each run as a dot (the seed spread). Returns {metric: {row: (mean, std)}}."""
    import statistics

    check_writable(Path(out).parent, out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn: Dict[str, Dict[str, Tuple[float, float]]] = {}
    labels = list(rows)
    cols = min(4, len(metrics))  # panels wrap into rows of four
    rows_ = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(max(3.5, 0.55 * len(labels) + 1.5) * cols, 4.2 * rows_),
                             squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        drawn[metric] = {}
        for x, label in enumerate(labels):
            values = [r[metric] for r in rows[label]]
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            drawn[metric][label] = (mean, std)
            ax.bar(x, mean, yerr=std if len(values) > 1 else None, capsize=4, color=f"C{x % 10}", alpha=0.75)
            if len(values) > 1:
                ax.scatter([x] * len(values), values, color="black", s=9, zorder=3)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"test {metric}")
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with staged_file(Path(out)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return drawn
