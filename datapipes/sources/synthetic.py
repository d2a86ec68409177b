"""`missrec prepare synthetic`: a generated dataset with planted, learnable structure.

Every item belongs to one of T latent topics. Each modality's feature vector is the topic's
centroid plus noise (L2-normalised), zeroed and flagged absent for a `--missing` fraction of items.
Each user prefers 1-3 topics; a sequence walks over topics like a Markov chain (with probability
`--stay` the next item keeps the previous item's topic, otherwise a preferred topic is drawn, and
rarely any topic) and picks items within a topic by a skewed popularity. A sequence model can learn
"next item shares the last item's topic", which item popularity alone cannot. Timestamps are
log-uniform gaps of 1 s to 30 days, independent of the items (nothing to learn from them).

Scale: users are generated in chunks with vectorised numpy and streamed through `UsersWriter`, so
memory stays flat up to 1e8+ interactions. Every random number comes from a counter-based
generator (Philox) addressed by (seed, stream, position of the user / interaction / item), so the
output is identical for any chunk size and deterministic for a seed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from datapipes.schema import (
    FEATURE_DTYPES,
    FEATURES_DIR,
    ITEMS_FILE,
    USERS_FILE,
    DEFAULT_USERS_PER_ROW_GROUP,
    DataError,
    FeatureWriter,
    UsersWriter,
    feature_path,
    write_items,
)

HELP = "generate a synthetic dataset with planted topic structure (for tests and scale benchmarks)"
DOMAIN = "synthetic"
MAX_PREFERRED = 3  # each user prefers 1..3 topics
FIRST_TIME, MAX_GAP = 1_600_000_000, 30 * 86_400  # seconds: each user's first interaction, the longest gap
FEATURE_CHUNK_VALUES = 1 << 22  # floats per feature chunk, so wide modalities stay flat in memory

# Philox key streams: one per kind of random quantity, so each is addressable by position alone.
S_ITEM_TOPIC, S_ITEM_POP, S_USER_LEN, S_USER_PREF, S_STEP, S_TIME = range(6)
S_MODALITY = 16  # modality m uses streams S_MODALITY + 3m .. + 3m + 2


def _number(group, flag: str, default: float, what: str) -> None:
    group.add_argument(flag, type=float, default=default, help=f"{what} (default {default})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    size = p.add_argument_group("size")
    size.add_argument("--users", type=int, default=None, help="number of users (default: --interactions / --mean-len)")
    size.add_argument("--interactions", type=float, default=None,
                      help="target total interactions, e.g. 1e8; sets --users (give one of the two; default 1e5)")
    size.add_argument("--items", type=int, default=10_000, help="catalogue size (default 10000)")
    size.add_argument("--mean-len", type=float, default=20.0, help="mean sequence length (default 20)")
    size.add_argument("--min-len", type=int, default=5, help="shortest sequence, >= 3 (default 5)")
    size.add_argument("--max-len", type=int, default=None,
                      help="longest sequence: longer draws are cut to it (default: no cap)")
    shape = p.add_argument_group("planted structure")
    shape.add_argument("--topics", type=int, default=50, help="latent topics (default 50)")
    _number(shape, "--stay", 0.7, "probability the next item keeps the previous item's topic")
    _number(shape, "--prefer", 0.9, "when the topic changes, probability it is one of the user's preferred topics")
    _number(shape, "--popularity", 1.0, "log-normal sigma of item popularity within a topic")
    feats = p.add_argument_group("features")
    feats.add_argument("--modalities", default="text:64,image:32",
                       help="feature tables as name:dim,... ('' for none; default text:64,image:32)")
    feats.add_argument("--dtype", choices=sorted(FEATURE_DTYPES), default="float32",
                       help="feature dtype (default float32)")
    feats.add_argument("--missing", type=float, default=0.1,
                       help="fraction of items missing each modality (zero vector, present=false; default 0.1)")
    _number(feats, "--noise", 1.0, "norm of the per-item noise added to the unit topic centroid")
    run_ = p.add_argument_group("run")
    run_.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    run_.add_argument("--rows-per-group", type=int, default=DEFAULT_USERS_PER_ROW_GROUP,
                      help=f"users per Parquet row group (default {DEFAULT_USERS_PER_ROW_GROUP})")
    run_.add_argument("--chunk", type=int, default=1 << 15,
                      help="users generated per step; bounds memory, does not change the output (default 32768)")


# ----------------------------------------------------------------------------------------------
# Counter-based random numbers


def uniforms(seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """Uniforms number start..start+count-1 of (seed, stream): the same values however they are chunked.

    Philox yields four 64-bit words per counter step and `random()` uses one word per double, so
    position `start` lives at counter start // 4, word start % 4.
    """
    key = np.array([seed, stream], dtype=np.uint64)
    gen = np.random.Generator(np.random.Philox(key=key, counter=start // 4))
    skip = start % 4
    return gen.random(count + skip)[skip:]


def normals(seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """Standard normals by Box-Muller; normal i uses uniforms 2i and 2i+1, so it is addressable too."""
    u = uniforms(seed, stream, 2 * start, 2 * count).reshape(-1, 2)
    return np.sqrt(-2.0 * np.log1p(-u[:, 0])) * np.cos(2.0 * np.pi * u[:, 1])


# ----------------------------------------------------------------------------------------------
# Arguments


def parse_modalities(text: str) -> List[Tuple[str, int]]:
    out: List[Tuple[str, int]] = []
    for part in filter(None, (s.strip() for s in text.split(","))):
        name, sep, dim = part.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name) or not dim.isdigit() or int(dim) < 1:
            raise DataError(f"--modalities: {part!r} is not name:dim (e.g. text:64)")
        if name in dict(out):
            raise DataError(f"--modalities: {name!r} given twice")
        out.append((name, int(dim)))
    return out


def check_args(args: argparse.Namespace) -> int:
    """Validate the flags; return the number of users."""
    if args.users is not None and args.interactions is not None:
        raise DataError("--users and --interactions: give one of them (the other follows from --mean-len)")
    if args.min_len < 3:
        raise DataError(f"--min-len {args.min_len}: leave-one-out needs at least 3 items per user")
    if args.mean_len < args.min_len:
        raise DataError(f"--mean-len {args.mean_len} is below --min-len {args.min_len}")
    if args.max_len is not None and args.max_len < max(args.min_len, args.mean_len):
        raise DataError(f"--max-len {args.max_len} is below --min-len {args.min_len} or --mean-len {args.mean_len}")
    if args.topics < 1 or args.items < args.topics:
        raise DataError(f"--topics {args.topics} must be >= 1 and <= --items {args.items}")
    for flag in ("stay", "prefer", "missing"):
        value = getattr(args, flag)
        if not 0.0 <= value <= 1.0:
            raise DataError(f"--{flag} {value} must lie in [0, 1]")
    if args.noise < 0 or args.popularity < 0:
        raise DataError("--noise and --popularity must be >= 0")
    if args.rows_per_group < 1 or args.chunk < 1:
        raise DataError("--rows-per-group and --chunk must be >= 1")
    if not 0 <= args.seed < 2**63:
        raise DataError(f"--seed {args.seed} must lie in [0, 2**63)")
    if args.users is not None:
        users = args.users
    else:
        interactions = 1e5 if args.interactions is None else args.interactions
        users = int(round(interactions / args.mean_len))
    if users < 1:
        raise DataError(f"--users {users}: need at least one user")
    return users


# ----------------------------------------------------------------------------------------------
# Items


class Catalogue:
    """Item topics and a within-topic popularity sampler (items grouped by topic, cumulative weights)."""

    def __init__(self, seed: int, items: int, topics: int, popularity: float):
        # Balanced topics (every topic non-empty): item i gets topic (rank of its uniform) mod T.
        rank = np.argsort(uniforms(seed, S_ITEM_TOPIC, 0, items), kind="stable")
        self.topic = np.empty(items, dtype=np.int64)
        self.topic[rank] = np.arange(items) % topics
        weight = np.exp(popularity * normals(seed, S_ITEM_POP, 0, items))
        self.by_topic = np.argsort(self.topic, kind="stable")  # item ids grouped by topic
        self.cum = np.cumsum(weight[self.by_topic])
        counts = np.bincount(self.topic, minlength=topics)
        self.end = np.cumsum(counts)  # exclusive end of each topic's slice of by_topic
        self.start = self.end - counts
        self.cum_lo = np.where(self.start > 0, self.cum[self.start - 1], 0.0)
        self.cum_hi = self.cum[self.end - 1]

    def sample(self, topic: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One item per (topic, uniform), with probability proportional to popularity within the topic."""
        x = self.cum_lo[topic] + u * (self.cum_hi[topic] - self.cum_lo[topic])
        pos = np.searchsorted(self.cum, x, side="right")
        pos = np.clip(pos, self.start[topic], self.end[topic] - 1)  # guards float round-off at the edges
        return self.by_topic[pos]


def write_catalogue(out: Path, cat: Catalogue) -> None:
    n = len(cat.topic)
    ids = pa.array(np.arange(n, dtype=np.int64))
    keys = pc.cast(ids, pa.string())
    texts = pc.binary_join_element_wise("topic ", pc.cast(pa.array(cat.topic), pa.string()), " item ", keys, "")
    write_items(out / ITEMS_FILE, keys, DOMAIN, texts)


def write_features(out: Path, args, cat: Catalogue, modalities: List[Tuple[str, int]]) -> Dict[str, dict]:
    (out / FEATURES_DIR).mkdir(exist_ok=True)
    n, topics = len(cat.topic), len(cat.start)
    recorded = {}
    for m, (name, dim) in enumerate(modalities):
        s_centroid, s_noise, s_missing = S_MODALITY + 3 * m, S_MODALITY + 3 * m + 1, S_MODALITY + 3 * m + 2
        centroid = normals(args.seed, s_centroid, 0, topics * dim).reshape(topics, dim)
        centroid /= np.linalg.norm(centroid, axis=1, keepdims=True)
        writer = FeatureWriter(feature_path(out, name), dim, args.dtype)
        step = max(1, min(args.chunk, FEATURE_CHUNK_VALUES // dim))
        try:
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                noise = normals(args.seed, s_noise, lo * dim, (hi - lo) * dim).reshape(-1, dim)
                vec = centroid[cat.topic[lo:hi]] + noise * (args.noise / np.sqrt(dim))
                vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
                present = uniforms(args.seed, s_missing, lo, hi - lo) >= args.missing
                vec[~present] = 0.0
                writer.add(vec, present, source=f"synthetic {name}")
        finally:
            writer.close()
        recorded[name] = {"dim": dim, "dtype": args.dtype, "present": writer.present, "encoder": "synthetic"}
    return recorded


# ----------------------------------------------------------------------------------------------
# Users


def generate_users(args, cat: Catalogue, lo: int, hi: int,
                   first_step: int) -> Tuple[pa.ListArray, np.ndarray, pa.ListArray]:
    """(sequences, lengths, timestamps) of users lo..hi-1, whose first interaction is global
    interaction `first_step`."""
    n_users, topics = hi - lo, len(cat.start)
    # Lengths: min_len + geometric tail with the requested mean.
    extra = args.mean_len - args.min_len
    u = uniforms(args.seed, S_USER_LEN, lo, n_users)
    if extra > 0:
        tail = np.floor(np.log1p(-u) / np.log1p(-1.0 / (1.0 + extra)))
    else:
        tail = np.zeros(n_users)
    lengths = args.min_len + tail.astype(np.int64)
    if args.max_len is not None:
        np.minimum(lengths, args.max_len, out=lengths)
    # Preferences: 1..MAX_PREFERRED topic slots per user.
    u = uniforms(args.seed, S_USER_PREF, (MAX_PREFERRED + 1) * lo, (MAX_PREFERRED + 1) * n_users)
    u = u.reshape(n_users, MAX_PREFERRED + 1)
    n_pref = 1 + (u[:, 0] * MAX_PREFERRED).astype(np.int64)
    preferred = (u[:, 1:] * topics).astype(np.int64)

    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    owner = np.repeat(np.arange(n_users), lengths)
    u = uniforms(args.seed, S_STEP, 3 * first_step, 3 * total).reshape(total, 3)
    # A user's first step always draws a topic; later steps redraw with probability 1 - stay.
    redraw = u[:, 0] >= args.stay
    redraw[offsets[:-1]] = True
    from_preferred = u[:, 1] < args.prefer
    slot = np.minimum((u[:, 1] / max(args.prefer, 1e-12) * n_pref[owner]).astype(np.int64), n_pref[owner] - 1)
    anywhere = np.minimum(((u[:, 1] - args.prefer) / max(1.0 - args.prefer, 1e-12) * topics).astype(np.int64), topics - 1)
    drawn = np.where(from_preferred, preferred[owner, slot], anywhere)
    # Carry each drawn topic forward until the next redraw (first steps are redraws, so users never mix).
    last_draw = np.maximum.accumulate(np.where(redraw, np.arange(total), 0))
    items = cat.sample(drawn[last_draw], u[:, 2])
    # Timestamps: each user starts at FIRST_TIME, then log-uniform gaps of 1 s to 30 days (times have
    # no structure to learn; they let model.relative_time_bias run on synthetic data).
    gaps = np.exp(uniforms(args.seed, S_TIME, first_step, total) * np.log(MAX_GAP)).astype(np.int64)
    gaps[offsets[:-1]] = 0
    times = np.cumsum(gaps)
    times += FIRST_TIME - np.repeat(times[offsets[:-1]], lengths)
    starts = pa.array(offsets)
    return pa.ListArray.from_arrays(starts, pa.array(items)), lengths, pa.ListArray.from_arrays(starts, pa.array(times))


def run(args: argparse.Namespace, out: Path) -> dict:
    n_users = check_args(args)
    modalities = parse_modalities(args.modalities)
    cat = Catalogue(args.seed, args.items, args.topics, args.popularity)
    write_catalogue(out, cat)
    writer = UsersWriter(out / USERS_FILE, args.rows_per_group)
    step = 0
    try:
        with tqdm(total=n_users, unit="user", desc="synthetic users", disable=None) as bar:
            for lo in range(0, n_users, args.chunk):
                hi = min(n_users, lo + args.chunk)
                items, lengths, times = generate_users(args, cat, lo, hi, step)
                step += int(lengths.sum())
                keys = pc.cast(pa.array(np.arange(lo, hi, dtype=np.int64)), pa.string())
                writer.add(keys, DOMAIN, items, train_end=lengths - 2, valid_end=lengths - 1, timestamps=times)
                bar.update(hi - lo)
    finally:
        writer.close()
    recorded = write_features(out, args, cat, modalities)
    return {
        "source": "synthetic",
        "domains": [DOMAIN],
        "users": writer.users,
        "items": args.items,
        "interactions": writer.interactions,
        "interactions_raw": writer.interactions,
        "training_rows": writer.training_rows,
        "filter": {},
        "split": "leave-one-out",
        "modalities": recorded,
        "topics": args.topics,
        "synthetic": {
            "seed": args.seed,
            "mean_len": args.mean_len,
            "min_len": args.min_len,
            "max_len": args.max_len,
            "stay": args.stay,
            "prefer": args.prefer,
            "popularity": args.popularity,
            "missing": args.missing,
            "noise": args.noise,
        },
    }
