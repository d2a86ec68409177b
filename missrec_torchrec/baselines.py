"""`missrec baselines`: popularity, first-order Markov and item-kNN under the evaluation protocol.

They read the prepared dataset through the same eval stream as `missrec train` (SequenceStream: the
last `model.max_len` items before the target as the history, the user's whole earlier history
masked when `eval.mask_history`), score the whole catalogue and rank it with the trainer's metric
code (RankingMetrics: ties and NaNs count against the target), so their rows sit next to a model's.

Counts come from every user's training part (items[:train_end], what a model trains on), for both
splits:
- popularity: how often each item occurs in the training parts;
- markov: how often item j directly follows the user's last history item in a training part; equal
  counts (every item, after a last item that is never followed in training) are ordered by
  popularity;
- knn: cosine between each item's feature vector (one modality, L2-normalised rows) and the mean of
  the normalised vectors of the user's last `knn_last` history items; items without the modality
  score 0.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from datapipes.schema import STATS_FILE, DataError
from missrec_torchrec.config import Config, load_config
from missrec_torchrec.config_checks import metric_names

HELP = "popularity, first-order Markov and item-kNN rows under the evaluation protocol"
NAMES = ("popularity", "markov", "knn")
KNN_LAST = 5


@dataclass
class Fitted:
    popularity: np.ndarray  # [N] training-part occurrences
    transitions: "object"  # scipy CSR [N, N]: counts of (item, next item) in the training parts
    features: Optional[np.ndarray]  # [N, d] L2-normalised rows of the kNN modality (None: no kNN)
    knn_last: int


def training_parts(root: Path, batch_size: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Every user's training part as (offsets, flat items), a batch of users at a time.

    The validation stream's `seen` history is the whole sequence before the validation target,
    i.e. items[:train_end]; reading it there keeps one parser of users.parquet.
    """
    from datapipes.stream import SequenceStream  # torch loads only when the command runs

    for batch in SequenceStream(root, "valid", batch_size=batch_size, max_len=1, with_seen=True):
        yield batch.seen_offsets.numpy(), batch.seen_values.numpy()


def successive_pairs(offsets: np.ndarray, values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(item, next item) for every two successive items of the same row."""
    follows = np.ones(max(len(values) - 1, 0), dtype=bool)
    starts = offsets[1:-1]
    follows[starts[(starts > 0) & (starts < len(values))] - 1] = False  # pair crosses into the next row
    return values[:-1][follows], values[1:][follows]


def count(root: Path, num_items: int, batch_size: int) -> Tuple[np.ndarray, "object"]:
    """(popularity, transition counts) over the training parts."""
    from scipy.sparse import coo_matrix

    popularity = np.zeros(num_items, dtype=np.int64)
    src: List[np.ndarray] = []
    dst: List[np.ndarray] = []
    for offsets, values in training_parts(root, batch_size):
        popularity += np.bincount(values, minlength=num_items)
        a, b = successive_pairs(offsets, values)
        src.append(a)
        dst.append(b)
    a, b = np.concatenate(src), np.concatenate(dst)
    transitions = coo_matrix((np.ones(len(a)), (a, b)), shape=(num_items, num_items)).tocsr()  # sums repeats
    return popularity, transitions


def normalised_features(info, modality: Optional[str]) -> Optional[np.ndarray]:
    if modality is None:
        return None
    if modality not in info.modalities:
        raise DataError(f"{info.root}: no {modality!r} feature table for item-kNN (has: "
                        f"{', '.join(info.modalities) or 'none'})")
    vectors, present = info.load_features(modality)
    vectors = np.where(present[:, None], vectors, 0.0).astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def last_items(history: np.ndarray, lengths: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """The last n items of each left-aligned history, [B, n], and which of them are real."""
    pos = lengths[:, None] - n + np.arange(n)[None, :]
    real = pos >= 0
    return np.take_along_axis(history, np.maximum(pos, 0), axis=1), real


def scores(name: str, fit: Fitted, history: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[B, N] float64 scores of baseline `name` for a batch of histories."""
    pop = fit.popularity.astype(np.float64)
    if name == "popularity":
        return np.broadcast_to(pop, (len(lengths), len(pop)))
    if name == "markov":
        last = last_items(history, lengths, 1)[0][:, 0]
        # Popularity scaled below 1 breaks ties between equal counts and never outranks one count.
        return fit.transitions[last].toarray() + pop / (pop.max() + 1.0)
    items, real = last_items(history, lengths, fit.knn_last)
    mean = (fit.features[items] * real[:, :, None]).sum(1) / real.sum(1, keepdims=True)
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return (fit.features @ mean.T).T.astype(np.float64)


def evaluate(cfg: Config, fit: Fitted, split: str, names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Each baseline's metrics over one split, batch by batch through the trainer's metric code."""
    import torch

    from datapipes.stream import SequenceStream
    from missrec_torchrec.metrics import RankingMetrics, target_ranks

    mask = cfg.eval.mask_history
    stream = SequenceStream(cfg.data.dataset, split, batch_size=cfg.data.eval_batch_size,
                            max_len=cfg.model.max_len, with_seen=mask)
    prefixes = ["", "cold/"] if cfg.eval.cold_start else [""]
    metrics = {(n, p): RankingMetrics(cfg.eval.ks) for n in names for p in prefixes}
    # Cold targets as `missrec train` counts them: items in no user's training part.
    cold = torch.from_numpy(fit.popularity == 0)
    for batch in stream:
        exclude = (batch.seen_offsets, batch.seen_values) if mask else (None, None)
        history, lengths = batch.history.numpy(), batch.lengths.numpy()
        weights = {"": batch.weight, "cold/": batch.weight * cold[batch.target].to(batch.weight)}
        for n in names:
            s = torch.from_numpy(np.ascontiguousarray(scores(n, fit, history, lengths)))
            ranks = target_ranks(s, batch.target, *exclude)
            for p in prefixes:
                metrics[n, p].update_ranks(ranks, weights[p])
    out: Dict[str, Dict[str, float]] = {n: {} for n in names}
    for (n, p), m in metrics.items():
        out[n].update({f"{p}{k}": v for k, v in m.compute().items()})
    return out


def load_protocol(target: str, overrides: List[str]) -> Config:
    """The config of a preset / YAML path, or of a prepared dataset folder (defaults + its path)."""
    if (Path(target) / STATS_FILE).is_file():
        return load_config(None, [f"data.dataset={target}", *overrides])
    return load_config(target, overrides)


def knn_modality(cfg: Config, info, given: Optional[str]) -> Optional[str]:
    """--knn-modality, else the config's first modality the dataset has, else the dataset's first."""
    if given is not None:
        return given
    have = [m for m in cfg.data.modalities if m in info.modalities] or list(info.modalities)
    return have[0] if have else None


def run_rows(runs: Sequence[Path], split: str, metric_names: Sequence[str]) -> List[Dict[str, float]]:
    """Each finished run's metrics on `split` (valid: its best epoch's validation row)."""
    from missrec_torchrec.report import load_results

    rows = []
    for run in runs:
        result = load_results(run)
        if split == "test":
            rows.append(result["test"])
            continue
        best = [h for h in result["history"] if h["epoch"] == result["best_epoch"]]
        rows.append({m: best[0][f"valid/{m}"] for m in metric_names} if best else {})
    return rows


def check_run_protocol(run: Path, cfg: Config) -> None:
    """Refuse a run evaluated on another dataset, history cap or masking than the baselines."""
    import yaml

    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise DataError(f"{run}: no config.yaml (not a run folder)")
    theirs = yaml.safe_load(path.read_text())
    for section, key in (("data", "dataset"), ("model", "max_len"), ("eval", "mask_history")):
        a, b = theirs[section][key], getattr(getattr(cfg, section), key)
        same = Path(a).resolve() == Path(b).resolve() if key == "dataset" else a == b
        if not same:
            raise DataError(f"{run}: evaluated with {section}.{key}={a}, the baselines with {b}")


def table(results: Dict[str, Dict[str, Dict[str, float]]], runs: Sequence[Path], label: str,
          metric_names: Sequence[str]) -> str:
    """Markdown: one row per split and baseline, plus the runs (mean ± std over them) as `label`."""
    from missrec_torchrec.report import cell

    lines = ["| split | model | " + " | ".join(metric_names) + " |", "|---|---|" + "---|" * len(metric_names)]
    for split, per_name in results.items():
        if runs:
            got = run_rows(runs, split, metric_names)
            ok = all(m in r for r in got for m in metric_names)
            values = [cell([r[m] for r in got]) if ok else "n/a" for m in metric_names]
            lines.append(f"| {split} | {label} ({len(runs)} run{'s' * (len(runs) > 1)}) | " + " | ".join(values) + " |")
        for name, m in per_name.items():
            lines.append(f"| {split} | {name} | " + " | ".join(cell([m[k]]) for k in metric_names) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    from datapipes.schema import DatasetInfo

    if args.knn_last < 1:
        raise DataError(f"--knn-last {args.knn_last} is not >= 1")
    cfg = load_protocol(args.target, args.overrides)
    info = DatasetInfo.open(cfg.data.dataset)
    for r in args.runs:
        check_run_protocol(r, cfg)
    modality = knn_modality(cfg, info, args.knn_modality)
    features = normalised_features(info, modality)
    names = [n for n in NAMES if n != "knn" or modality is not None]
    popularity, transitions = count(info.root, info.num_items, cfg.data.eval_batch_size)
    fit = Fitted(popularity, transitions, features, args.knn_last)
    splits = ["valid", "test"] if args.split == "both" else [args.split]
    results = {s: evaluate(cfg, fit, s, names) for s in splits}
    ks = cfg.eval.ks
    print(f"baselines on {info.root}: {info.num_users:,} users, {info.num_items:,} items, full ranking, "
          f"histories of the last {cfg.model.max_len} items, history "
          f"{'masked' if cfg.eval.mask_history else 'not masked'}; counts from the training parts; "
          + (f"knn: {modality} features, mean of the last {args.knn_last} items" if modality else "knn: no features"))
    shown = metric_names(ks, cfg.eval.cold_start)
    print(table(results, args.runs, args.label, shown))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="DATASET_OR_CONFIG",
                   help="a prepared dataset folder (with the defaults' protocol) or a preset name / YAML path "
                   "(its data.dataset, model.max_len, eval.ks, eval.mask_history)")
    p.add_argument("--split", default="both", choices=["valid", "test", "both"], help="splits to report (default both)")
    p.add_argument("--knn-last", type=int, default=KNN_LAST,
                   help=f"item-kNN: mean of the user's last N history items (default {KNN_LAST})")
    p.add_argument("--knn-modality", default=None,
                   help="item-kNN: feature table to use (default: the config's first modality the dataset has)")
    p.add_argument("--run", dest="runs", action="append", default=[], type=Path, metavar="RUN_DIR",
                   help="also print a finished run's metrics (repeatable: mean ± std over the runs); its "
                   "config must have the same dataset, model.max_len and eval.mask_history")
    p.add_argument("--label", default="model", help="row label of the --run rows (default model)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides after DATASET_OR_CONFIG, flags before both (e.g. eval.mask_history=true)")
