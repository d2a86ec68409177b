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
