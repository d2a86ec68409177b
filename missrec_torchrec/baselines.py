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

Users are `eval.max_users`' first users when it is set, the ones `missrec train` evaluates, so a
model row and the baselines rank the same targets. The catalogue is scored in item-range chunks of
at most `CHUNK_CELLS` scores per batch (`RankCounter`), and the kNN table stays in its stored dtype,
normalised a chunk at a time: at 1e7 items a dense users x items matrix or a float32 copy of the
features would not fit.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from datapipes.schema import STATS_FILE, DataError
from missrec_torchrec.config import Config, load_config
from missrec_torchrec.config_checks import metric_names

HELP = "popularity, first-order Markov and item-kNN rows under the evaluation protocol"
NAMES = ("popularity", "markov", "knn")
KNN_LAST = 5
CHUNK_CELLS = 1 << 24  # float64 scores per item chunk of a batch: 128 MiB


class UnitRows:
    """A feature table as L2-normalised float32 rows (absent rows 0), normalised on each read from
    the stored vectors, so that only the stored table stays in memory."""

    def __init__(self, vectors: np.ndarray, present: np.ndarray) -> None:
        self.vectors, self.present = vectors, present

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, rows) -> np.ndarray:
        vectors = np.where(self.present[rows][..., None], self.vectors[rows].astype(np.float32), np.float32(0))
        norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)


@dataclass
class Fitted:
    popularity: np.ndarray  # [N] training-part occurrences
    transitions: "object"  # scipy CSR [N, N]: counts of (item, next item) in the training parts
    features: Optional[UnitRows]  # the kNN modality (None: no kNN)
    knn_last: int

    @cached_property
    def tie_break(self) -> np.ndarray:
        """Popularity scaled below 1: it orders equal Markov counts and never outranks one count
        (once per run: the chunk loop reads slices of it)."""
        pop = self.popularity.astype(np.float64)
        return pop / (pop.max() + 1.0)


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
        src.append(a.astype(np.int32))  # item ids < 2**31; halves the 1e8 pairs of a 1e7 catalogue
        dst.append(b.astype(np.int32))
    a, b = np.concatenate(src), np.concatenate(dst)
    del src, dst
    ones = np.ones(len(a), dtype=np.int32)
    transitions = coo_matrix((ones, (a, b)), shape=(num_items, num_items)).tocsr()  # sums repeats
    return popularity, transitions


def normalised_features(info, modality: Optional[str]) -> Optional[UnitRows]:
    if modality is None:
        return None
    if modality not in info.modalities:
        raise DataError(f"{info.root}: no {modality!r} feature table for item-kNN (has: "
                        f"{', '.join(info.modalities) or 'none'})")
    rows = info.feature_rows(modality)  # stored dtype, checked and copied one row group at a time
    return UnitRows(rows[:], rows.present())


def last_items(history: np.ndarray, lengths: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """The last n items of each left-aligned history, [B, n], and which of them are real."""
    pos = lengths[:, None] - n + np.arange(n)[None, :]
    real = pos >= 0
    return np.take_along_axis(history, np.maximum(pos, 0), axis=1), real


def query(name: str, fit: Fitted, history: np.ndarray, lengths: np.ndarray):
    """What baseline `name` needs of a batch of histories: ones [B, 1] (popularity: the same for
    everyone), the last items' transition rows (markov, sparse [B, N]) or the unit mean of the last
    items (knn, [B, d])."""
    if name == "popularity":
        return np.ones((len(lengths), 1))
    if name == "markov":
        return fit.transitions[last_items(history, lengths, 1)[0][:, 0]]
    if name == "knn":
        items, real = last_items(history, lengths, fit.knn_last)
        mean = (fit.features[items] * real[:, :, None]).sum(1) / real.sum(1, keepdims=True)
        return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    raise ValueError(f"unknown baseline {name!r} (known: {', '.join(NAMES)})")


def block(name: str, fit: Fitted, q, lo: int, hi: int) -> np.ndarray:
    """[B, hi - lo] float64 scores of items lo..hi-1 (q: `query` of the batch, B rows)."""
    if name == "popularity":
        return q * fit.popularity[lo:hi].astype(np.float64)
    if name == "markov":
        return q[:, lo:hi].toarray() + fit.tie_break[lo:hi]
    return (fit.features[lo:hi] @ q.T).T.astype(np.float64)


def at(name: str, fit: Fitted, q, items: np.ndarray) -> np.ndarray:
    """[B] float64 scores of items[b] for row b, as `block` computes them (knn: up to float rounding,
    a dot product against a matrix product, which `RankCounter` allows for)."""
    if name == "popularity":
        return q[:, 0] * fit.popularity[items].astype(np.float64)
    if name == "markov":
        return np.asarray(q[np.arange(len(items)), items]).ravel() + fit.tie_break[items]
    return (fit.features[items] * q).sum(1).astype(np.float64)


def batch_ranks(name: str, fit: Fitted, batch, exclude) -> "object":
    """The batch's target ranks under baseline `name`, the catalogue scored chunk by chunk."""
    import torch

    from missrec_torchrec.metrics import RankCounter

    history, lengths = batch.history.numpy(), batch.lengths.numpy()
    target = batch.target.numpy().astype(np.int64)  # a copy: scipy indexing wants a writeable array
    q = query(name, fit, history, lengths)
    counter = RankCounter(batch.target, torch.from_numpy(at(name, fit, q, target)), *exclude)
    items = len(fit.popularity)
    width = max(1, CHUNK_CELLS // max(len(lengths), 1))
    for lo in range(0, items, width):
        hi = min(items, lo + width)
        counter.update(torch.from_numpy(np.ascontiguousarray(block(name, fit, q, lo, hi))), lo)
    return counter.ranks()


def evaluate(cfg: Config, fit: Fitted, split: str, names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Each baseline's metrics over one split, batch by batch through the trainer's metric code."""
    import torch

    from datapipes.stream import SequenceStream
    from missrec_torchrec.metrics import RankingMetrics

    mask = cfg.eval.mask_history
    stream = SequenceStream(cfg.data.dataset, split, batch_size=cfg.data.eval_batch_size,
                            max_len=cfg.model.max_len, with_seen=mask, max_users=cfg.eval.max_users)
    prefixes = ["", "cold/"] if cfg.eval.cold_start else [""]
    metrics = {(n, p): RankingMetrics(cfg.eval.ks) for n in names for p in prefixes}
    # Cold targets as `missrec train` counts them: items in no user's training part.
    cold = torch.from_numpy(fit.popularity == 0)
    for batch in stream:
        exclude = (batch.seen_offsets, batch.seen_values) if mask else (None, None)
        weights = {"": batch.weight, "cold/": batch.weight * cold[batch.target].to(batch.weight)}
        for n in names:
            ranks = batch_ranks(n, fit, batch, exclude)
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
    for section, key in (("data", "dataset"), ("model", "max_len"), ("eval", "mask_history"), ("eval", "max_users")):
        a, b = theirs[section].get(key), getattr(getattr(cfg, section), key)
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
    ranked = cfg.eval.max_users
    users = f"{info.num_users:,} users" + (
        f" (the first {ranked:,} ranked: eval.max_users)" if ranked and ranked < info.num_users else "")
    print(f"baselines on {info.root}: {users}, {info.num_items:,} items, full ranking, "
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
