"""Scale benchmark: catalogue sweep 1e5 -> 1e6 -> 1e7 items (1e8 with --max 1e8) at the paper's dims.

    .venv/bin/python bench/scale.py                    # 1e5, 1e6, 1e7 items
    .venv/bin/python bench/scale.py --max 1e8          # and 1e8 (planner dry run and estimates only)

No dataset is written: the model is built from the `paper` preset (512-d text + image tables, a
300-d trainable ID table, hidden 300) plus --interest-cap, and fed random tensors. Per size:

(a) memory per rank, 2 ranks, row-wise: the TorchRec planner's storage estimate per shard (a dry
    run on the meta device: weights, optimizer state, I/O buffers), split into the ID table and the
    frozen feature tables; the replicated interest buffers every rank holds (measured: the head's
    buffers as allocated); and an estimate of the re-clustering working set per rank.
(b) interest discovery: K = ceil(ratio x 2N) capped at model.interest_cap. `discover_interests`
    runs on a random subsample of adapted vectors with that K (at least K points, else k-means
    cannot initialise) and the time is scaled to 2N points: with K fixed every k-means step and the
    final assignment are linear in the points. One process, all cores. The uncapped column scales
    the same measured rate by K_uncapped / K.
(c) one training step (forward, backward, fused + Adam updates), 1 process, all cores: through the
    real DMP (tables materialised with random rows) where the tables fit --table-budget-gib, and
    "head only" at every size (random embedding outputs into MISSRecHead: everything but the
    lookups). Sampled softmax (--negatives uniform candidates) always; full softmax where its
    B x N score matrices fit --full-budget-gib.
Each step measurement runs in a fresh subprocess so its peak RSS is its own.
(d) one re-clustering, today's torch k-means against faiss (model.kmeans_backend) on the same points,
    at K = 8,192 and 65,536 (bench/recluster.py, which also runs alone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import recluster

ROOT = Path(__file__).resolve().parent.parent
SIZES = [1e5, 1e6, 1e7, 1e8]
DIMS = {"text": 512, "image": 512}  # the paper's CLIP features
GIB = 1024**3
WORLD = 2  # ranks in the memory plan


def setup_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def model_config(cap: Optional[int], loss: str):
    setup_path()
    from missrec_torchrec.config import load_config

    cfg = load_config("paper", [f"model.interest_cap={'null' if cap is None else cap}", f"train.loss={loss}"])
    return cfg.model


def build(n: int, cap: Optional[int], loss: str, table_device: str = "meta"):
    setup_path()
    import torch

    from missrec_torchrec.recommender import MISSRecModel

    return MISSRecModel(model_config(cap, loss), DIMS, n, loss=loss, cluster_points=n * len(DIMS),
                        table_device=torch.device(table_device))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


# -- (a) memory ----------------------------------------------------------------------------------


def plan_memory(n: int, cap: Optional[int]) -> Dict[str, float]:
    """Planner dry run for WORLD ranks, row-wise; GiB per rank (the max over ranks)."""
    setup_path()
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    from missrec_torchrec import distributed as mdist

    model = build(n, cap, "sampled_softmax")
    # The trainer attaches the fused optimizers before planning, so the planner counts their state.
    mdist.attach_fused_optimizers(model, set(model.frozen_tables), ("rowwise_adagrad", {"lr": 0.05}))
    # plan_sharding's default Topology caps a rank at 128 GB of DDR, which 1e8 items exceed; a large
    # cap lets the dry run report what the plan would need instead of refusing.
    topology = Topology(world_size=WORLD, local_world_size=WORLD, compute_device="cpu", ddr_cap=1 << 50)
    tables = [c.name for ec in mdist.embedding_collections(model).values() for c in ec.embedding_configs()]
    planner = EmbeddingShardingPlanner(
        topology=topology, constraints={t: ParameterConstraints(sharding_types=["row_wise"]) for t in tables})
    planner.plan(model, [EmbeddingCollectionSharder()])
    per_rank = {"id": [0.0] * WORLD, "features": [0.0] * WORLD, "id_weights": [0.0] * WORLD}
    for option in planner._best_plan:
        kind = "features" if option.name in model.frozen_tables else "id"
        for shard in option.shards:
            per_rank[kind][shard.rank] += (shard.storage.ddr + shard.storage.hbm) / GIB
            if kind == "id":
                per_rank["id_weights"][shard.rank] += math.prod(shard.size) * 4 / GIB
    buffers = sum(b.numel() * b.element_size() for b in model.head.buffers()) / GIB
    return {
        "id_gib": max(per_rank["id"]),
        "id_weights_gib": max(per_rank["id_weights"]),
        "features_gib": max(per_rank["features"]),
        "buffers_gib": buffers,
        "k": model.head.num_clusters,
        # recluster(): one modality's raw rows (lookup chunks + their cat), both modalities' adapted
        # points, and the stacked copy k-means clusters, for this rank's N / WORLD items.
        "recluster_gib": n / WORLD * (2 * max(DIMS.values()) + 2 * len(DIMS) * 300) * 4 / GIB,
    }


# -- (b) interest discovery ----------------------------------------------------------------------


def time_discovery(k: int, points: int, cap: Optional[int]) -> float:
    """Seconds of `discover_interests` on `points` random adapted vectors (split over the modalities)."""
    setup_path()
    import torch

    from missrec_torchrec.model.interest import discover_interests

    cfg = model_config(cap, "sampled_softmax")
    gen = torch.Generator().manual_seed(0)
    per_modality = math.ceil(points / len(DIMS))
    vectors = {m: torch.randn(per_modality, cfg.hidden, generator=gen) for m in DIMS}
    start = time.perf_counter()
    discover_interests(vectors, cfg, generator=gen, k=k)
    return time.perf_counter() - start


# -- (c) one training step -----------------------------------------------------------------------


def random_batch(n: int, kjt_groups, batch_size: int, max_len: int, candidates):
    """Training rows over random items whose history lengths mix like the synthetic source's training
    prefixes (sequences of 5 + geometric extra items, mean 20; a prefix of 1..len-2 items; mean ~9)."""
    setup_path()
    import numpy as np

    from datapipes.batch import collate

    rng = np.random.default_rng(0)
    seq_len = 5 + rng.geometric(1 / 16, batch_size) - 1
    lengths = np.minimum(rng.integers(1, seq_len - 1), max_len)
    values = rng.integers(0, n, int(lengths.sum()))
    return collate(values, lengths, rng.integers(0, n, batch_size), np.arange(batch_size), max_len, kjt_groups,
                   candidates=candidates)


def fill_interests(head, n: int) -> None:
    """Random cluster ids 1..K, so interest tokens per row are as many as a real re-clustering gives."""
    import torch

    for m in head.modalities:
        getattr(head, f"assign_{m}").copy_(torch.randint(1, head.num_clusters + 1, (n,)))
    head.centroids.normal_()


def candidate_ids(n: int, loss: str, negatives: int):
    import torch

    return torch.randint(n, (negatives,)) if loss == "sampled_softmax" else torch.arange(n)


def timed_steps(step, repeats: int) -> float:
    step()  # warm-up: allocator, first-call kernel set-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_dmp(n: int, loss: str, args) -> Dict[str, float]:
    """Median step time through the sharded model, 1 rank (row-wise: the rank holds every row)."""
    setup_path()
    from missrec_torchrec import distributed as mdist

    _, _, device, pg = mdist.init_distributed()
    model = build(n, args.interest_cap, loss)
    fill_interests(model.head, n)
    start = time.perf_counter()
    dmp = mdist.plan_and_shard(model, sharding_type="row_wise", frozen_tables=model.frozen_tables,
                               trainable_fused=("rowwise_adagrad", {"lr": 0.05}), pg=pg, device=device)
    shard_seconds = time.perf_counter() - start
    optimizer = mdist.build_optimizer(dmp, frozen_tables=model.frozen_tables, dense_kwargs={"lr": 1e-3})
    dmp.train()

    def step():
        batch = random_batch(n, model.kjt_groups, args.batch_size, model.config.max_len,
                             candidate_ids(n, loss, args.negatives))
        loss_value, _ = dmp(batch)
        loss_value.backward()
        optimizer.step()
        optimizer.zero_grad()

    seconds = timed_steps(step, args.repeats)
    return {"seconds": seconds, "shard_seconds": shard_seconds, "rss_gib": peak_rss_gib()}


def random_outputs(batch, dims: Dict[str, int], grad: bool):
    """What the collections would return for `batch`: {feature: JaggedTensor of random rows}."""
    import torch
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from datapipes.batch import candidates_key, history_key, target_key

    b, c = batch.batch_size, batch.candidates.numel()
    parts = {history_key: batch.lengths, target_key: torch.ones(b, dtype=torch.int64),
             candidates_key: torch.tensor([c] + [0] * (b - 1))}
    out = {}
    for table, dim in dims.items():
        for key, lengths in parts.items():
            values = torch.randn(int(lengths.sum()), dim, requires_grad=grad)
            out[key(table)] = JaggedTensor(values=values, lengths=lengths)
    return out


def step_head(n: int, loss: str, args) -> Dict[str, float]:
    """Median step time of MISSRecHead alone: the dense work, with the lookups replaced by random rows."""
    import torch

    from missrec_torchrec.recommender import ID_TABLE

    model = build(n, args.interest_cap, loss)
    head = model.head
    fill_interests(head, n)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    head.train()

    def step():
        batch = random_batch(n, model.kjt_groups, args.batch_size, model.config.max_len,
                             candidate_ids(n, loss, args.negatives))
        feats = random_outputs(batch, DIMS, grad=False)
        ids = random_outputs(batch, {ID_TABLE: model.config.hidden}, grad=True) if model.config.use_id else {}
        loss_value, _ = head(batch, [feats], [ids])
        loss_value.backward()
        optimizer.step()
        optimizer.zero_grad()

    return {"seconds": timed_steps(step, args.repeats), "rss_gib": peak_rss_gib()}


def child(args, *phase: str) -> Dict[str, float]:
    """Run one step measurement in a fresh interpreter; it prints one JSON line last."""
    flags = ["--interest-cap", str(args.interest_cap), "--batch-size", str(args.batch_size),
             "--negatives", str(args.negatives), "--repeats", str(args.repeats)]
    proc = subprocess.run([sys.executable, __file__, *flags, "--_step", *phase], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": last[:60]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the sweep -----------------------------------------------------------------------------------


def table_gib(n: int) -> float:
    """Weights of every table (text, image, ID) on one rank holding them all."""
    return n * (sum(DIMS.values()) + 300) * 4 / GIB


def full_softmax_gib(n: int, batch_size: int) -> float:
    """Full softmax's big tensors: a few B x N score matrices (per modality + ID, fused, logits and
    their grads) and the adapted catalogue with its grads."""
    return (8 * batch_size * n + 3 * n * (sum(DIMS.values()) + 3 * 300)) * 4 / GIB


def measure_steps(n: int, args) -> Dict[str, Dict]:
    out = {}
    for loss in ("sampled_softmax", "full_softmax"):
        if loss == "full_softmax" and full_softmax_gib(n, args.batch_size) > args.full_budget_gib:
            out[f"{loss}/dmp"] = out[f"{loss}/head"] = {"error": "n/a (> --full-budget-gib)"}
            continue
        if table_gib(n) + (loss == "full_softmax") * full_softmax_gib(n, args.batch_size) <= args.table_budget_gib:
            out[f"{loss}/dmp"] = child(args, "dmp", loss, str(n))
        else:
            out[f"{loss}/dmp"] = {"error": f"n/a (tables {table_gib(n):.0f} GiB)"}
        out[f"{loss}/head"] = child(args, "head", loss, str(n))
    return out


def growth(values: List[Optional[float]]) -> str:
    """Ratio of each size's value to the previous size's (one 10x step of the catalogue)."""
    parts = []
    for a, b in zip(values, values[1:]):
        parts.append(f"{b / a:.1f}x" if a and b else "-")
    return " / ".join(parts) if parts else "-"


def fmt_s(cell: Dict, key: str = "seconds") -> str:
    return cell.get("error") or f"{cell[key]:.2f}"


def print_memory(sizes: List[int], rows: Dict[int, Dict]) -> None:
    print(f"\n(a) memory per rank, {WORLD} ranks, row-wise, GiB: tables = planner storage estimate (dry run on the "
          "meta device); buffers = measured; recluster = estimate")
    print("| items | ID table (its weights) | feature tables | replicated buffers | recluster working set |")
    print("|---|---|---|---|---|")
    for n in sizes:
        m = rows[n]["memory"]
        print(f"| {n:.0e} | {m['id_gib']:.3f} ({m['id_weights_gib']:.3f}) | {m['features_gib']:.3f} | "
              f"{m['buffers_gib']:.3f} | {m['recluster_gib']:.2f} |")
    keys = ("id_gib", "features_gib", "buffers_gib", "recluster_gib")
    print("| growth per 10x | " + " | ".join(growth([rows[n]["memory"][k] for n in sizes]) for k in keys) + " |")


def print_discovery(sizes: List[int], rows: Dict[int, Dict], cap: int) -> None:
    print(f"\n(b) interest discovery (paper k-means: one pass + assignment), 1 process, K cap {cap:,}")
    print("| items | points (2N) | K capped | timed points | timed s | est. s for 2N | K uncapped | est. s uncapped |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        d = rows[n]["discovery"]
        print(f"| {n:.0e} | {2 * n:.0e} | {d['k']:,} | {d['points']:,} | {d['seconds']:.1f} | {d['full']:.3g} | "
              f"{d['k_uncapped']:,} | {d['full_uncapped']:.3g} |")
    col = lambda key: growth([rows[n]["discovery"][key] for n in sizes])  # noqa: E731
    print(f"| growth per 10x | | {col('k')} | | | {col('full')} | {col('k_uncapped')} | {col('full_uncapped')} |")


STEP_COLUMNS = ["sampled_softmax/dmp", "sampled_softmax/head", "full_softmax/dmp", "full_softmax/head"]


def print_steps(sizes: List[int], rows: Dict[int, Dict], args) -> None:
    print(f"\n(c) one training step, seconds (median of {args.repeats} after 1 warm-up), batch {args.batch_size}, "
          f"1 process; sampled = {args.negatives} uniform negatives + log-Q; DMP = real sharded tables")
    print("| items | sampled, DMP | sampled, head only | full, DMP | full, head only | peak RSS GiB, sampled DMP |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        s = rows[n]["steps"]
        rss = s["sampled_softmax/dmp"].get("rss_gib")
        cells = [fmt_s(s[c]) for c in STEP_COLUMNS] + [f"{rss:.1f}" if rss else "-"]
        print(f"| {n:.0e} | " + " | ".join(cells) + " |")
    cols = [growth([rows[n]["steps"][c].get("seconds") for n in sizes]) for c in STEP_COLUMNS]
    cols.append(growth([rows[n]["steps"]["sampled_softmax/dmp"].get("rss_gib") for n in sizes]))
    print("| growth per 10x | " + " | ".join(cols) + " |")


def discovery(n: int, args, cache: Dict[int, Dict]) -> Dict[str, float]:
    setup_path()
    from missrec_torchrec.model.interest import num_clusters

    cfg = model_config(args.interest_cap, "sampled_softmax")
    points = 2 * n
    k = num_clusters(cfg.interest_ratio, points, cfg.interest_cap)
    k_uncapped = num_clusters(cfg.interest_ratio, points, None)
    if k not in cache:  # the same K costs the same per point, so sizes sharing it share a timing
        timed = min(points, max(k, args.kmeans_points))
        cache[k] = {"points": timed, "seconds": time_discovery(k, timed, args.interest_cap)}
    t = cache[k]
    rate = t["seconds"] / t["points"] / k  # seconds per point per centroid
    return {"k": k, "points": t["points"], "seconds": t["seconds"], "full": rate * points * k,
            "k_uncapped": k_uncapped, "full_uncapped": rate * points * k_uncapped}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max", type=float, default=1e7, help="largest catalogue (1e5 .. 1e8; default 1e7)")
    p.add_argument("--interest-cap", type=int, default=100_000, help="model.interest_cap, the K cap (default 100000)")
    p.add_argument("--kmeans-points", type=int, default=0,
                   help="points to time k-means on (default 0 = the fewest it accepts, K)")
    p.add_argument("--batch-size", type=int, default=512, help="training rows per step (default 512)")
    p.add_argument("--negatives", type=int, default=1024, help="sampled-softmax negatives per step (default 1024)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per cell after one warm-up (default 2)")
    p.add_argument("--table-budget-gib", type=float, default=8.0,
                   help="materialise the real tables only up to this many GiB (default 8)")
    p.add_argument("--full-budget-gib", type=float, default=6.0,
                   help="run full softmax only while its score matrices fit this many GiB (default 6)")
    recluster.add_arguments(p.add_argument_group("(d) re-clustering"))
    p.add_argument("--skip", default="", help="comma-separated parts to skip: memory, discovery, steps, recluster")
    p.add_argument("--_step", nargs=3, metavar=("KIND", "LOSS", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._step:
        kind, loss, n = args._step
        result = (step_dmp if kind == "dmp" else step_head)(int(n), loss, args)
        print(json.dumps(result), flush=True)
        return

    skip = set(filter(None, args.skip.split(",")))
    sizes = [int(s) for s in SIZES if s <= args.max]
    rows: Dict[int, Dict] = {}
    cache: Dict[int, Dict] = {}
    for n in sizes:
        start = time.perf_counter()
        rows[n] = {}
        if "memory" not in skip:
            rows[n]["memory"] = plan_memory(n, args.interest_cap)
        if "discovery" not in skip:
            rows[n]["discovery"] = discovery(n, args, cache)
        if "steps" not in skip:
            rows[n]["steps"] = measure_steps(n, args)
        print(f"  {n:.0e} items: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    if "memory" not in skip:
        print_memory(sizes, rows)
    if "discovery" not in skip:
        print_discovery(sizes, rows, args.interest_cap)
    if "steps" not in skip:
        print_steps(sizes, rows, args)
    if "recluster" not in skip:
        recluster.print_recluster(recluster.measure(args.points, args.dim, args.ks), args.points, args.dim)


if __name__ == "__main__":
    main()
