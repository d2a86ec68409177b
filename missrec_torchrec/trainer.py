"""`missrec train` / `missrec evaluate`: MISSRec under DistributedModelParallel.

One code path for 1 process, torchrun and TorchX; gloo on CPU, NCCL on GPU. Per epoch: interest
discovery (k-means over the catalogue's adapted vectors, split across ranks), training steps driven
by TrainPipelineSparseDist, validation with full ranking, a checkpoint, early stopping. At the end
the best checkpoint is reloaded and the test split evaluated.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from datapipes import features, sources
from datapipes.batch import SeqBatch, add_candidates
from datapipes.schema import DataError, DatasetInfo, atomic_file, creating
from datapipes.stream import SequenceStream, make_loader
from missrec_torchrec import checkpoint as ckpt
from missrec_torchrec import distributed as mdist
from missrec_torchrec import precision
from missrec_torchrec.catalogue import ItemBank, ec_of
from missrec_torchrec.config import ConfigError, check_resume_config, dump_config
from missrec_torchrec.metrics import RankingMetrics, target_ranks
from missrec_torchrec.model.config import ModelConfig
from missrec_torchrec.model.core import peft_trainable
from missrec_torchrec.model.interest import discover_interests
from missrec_torchrec.recommender import AUG_TABLE, MISSRecModel, candidates_key

CORE_FILE = "core.pt"  # the dense core + its config, for fine-tuning on another catalogue


def log0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# ------------------------------------------------------------------------------------------------
# Data set-up


def ensure_dataset(cfg: Dict[str, Any]) -> DatasetInfo:
    """Prepare the dataset and its feature tables on rank 0 when missing; every rank then opens it."""
    data = cfg["data"]
    root = Path(data["dataset"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        if not root.exists():
            if not data.get("prepare_source"):
                raise DataError(f"{root}: dataset not found and data.prepare_source is null")
            log0(f"preparing {root} from {data['prepare_source']}")
            log0(sources.summary(root, sources.prepare(data["prepare_source"], root, data["prepare_args"])))
        have = DatasetInfo.open(root).modalities
        for spec in data.get("features") or []:
            if spec["modality"] not in have:
                log0(f"computing {spec['modality']} features with {spec['encoder']}")
                log0(features.summary(features.compute_features(root, spec["modality"], spec["encoder"])))
    if dist.is_initialized():
        dist.barrier()
    info = DatasetInfo.open(root)
    missing = [m for m in data["modalities"] if m not in info.modalities]
    if missing:
        raise DataError(f"{root}: no feature table for modalities {missing} (have {sorted(info.modalities)})")
    return info


def run_name(cfg: Dict[str, Any]) -> str:
    m, t, d = cfg["model"], cfg["train"], cfg["data"]
    parts = [
        cfg["experiment"]["name"],
        t["mode"],
        "trans" if m["use_id"] else "induct",
        "+".join(d["modalities"]) or "idonly",
        f"d{m['hidden']}",
        f"lr{t['lr']:g}",
        f"b{d['batch_size']}",
        f"s{cfg['experiment']['seed']}",
        precision.resolve(t["precision"], torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    ]
    if t.get("init_checkpoint"):
        parts.append("peft" if t["peft"] else "ft")
    return "-".join(parts) + time.strftime("-%Y%m%d-%H%M%S")


def _broadcast(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_model(cfg: Dict[str, Any], info: DatasetInfo) -> MISSRecModel:
    """The unsharded model (tables on the meta device) for a config and a prepared dataset."""
    mods = info.modalities
    names = cfg["data"]["modalities"]
    missing = [m for m in names if m not in mods]
    if missing:
        raise DataError(f"{info.root}: no feature table for modalities {missing} (have {sorted(mods)})")
    model_cfg = ModelConfig.from_dict(cfg["model"])
    t = cfg["train"]
    aug_dim = mods[AUG_TABLE].dim if (t["mode"] == "pretrain" and AUG_TABLE in mods and "text" in names) else None
    points = (
        sum(mods[m].present for m in names) if model_cfg.mask_missing_modality else info.num_items * len(names)
    )
    return MISSRecModel(
        model_cfg,
        {m: mods[m].dim for m in names},
        info.num_items,
        mode=t["mode"],
        loss=t["loss"],
        aug_dim=aug_dim,
        cluster_points=points,
    )


# ------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: Dict[str, Any], write_config: bool = True):
        self.cfg = cfg
        # Before anything is prepared or written (config.yaml is rewritten below): a resumed run's
        # config must match the saved one, apart from the keys the user allowed to change.
        changes = check_resume_config(cfg) if write_config else []
        self.rank, self.world, self.device, self.pg = mdist.init_distributed()
        for change in changes:
            log0(f"resuming with a changed {change}")
        seed_everything(cfg["experiment"]["seed"])
        self.info = ensure_dataset(cfg)
        self.num_items = self.info.num_items
        d, t = cfg["data"], cfg["train"]
        if t["softmax_items"] not in ("all", "training"):
            raise ConfigError(f"train.softmax_items must be all or training, got {t['softmax_items']!r}")
        self.model_cfg = ModelConfig.from_dict(cfg["model"])
        # Same seed on every rank: identical dense initialisation (DDP also broadcasts rank 0's).
        self.model = build_model(cfg, self.info)
        self.modality_dims = {m: self.info.modalities[m].dim for m in d["modalities"]}
        if t.get("init_checkpoint"):
            self._load_core(Path(t["init_checkpoint"]))
            if t["peft"]:
                peft_trainable(self.model.head.core)
        self.run_dir = self._make_run_dir(write_config)
        self.dmp = mdist.plan_and_shard(
            self.model,
            sharding_type=t["sharding"],
            frozen_tables=self.model.frozen_tables,
            trainable_fused=(t["sparse_optimizer"], {"lr": t["sparse_lr"]}),
            pg=self.pg,
            device=self.device,
        )
        self.head = self.dmp.module.head if hasattr(self.dmp.module, "head") else self.model.head
        self.precision = precision.resolve(t["precision"], self.device)
        self.head.precision = self.precision
        self.head.gather_history = bool(t["gather_history"])
        self._load_frozen_tables()
        self._warm: Optional[torch.Tensor] = None  # items in some training sequence (cold start)
        if t["softmax_items"] == "training":
            self.head.softmax_items.copy_(self._training_items())
            self.head.restrict_softmax = True
        self.optimizer = mdist.build_optimizer(
            self.dmp,
            frozen_tables=self.model.frozen_tables,
            # foreach: one kernel per op over all ~40 dense tensors (off by default on CPU).
            dense_kwargs={"lr": t["lr"], "weight_decay": t["weight_decay"], "foreach": True},
        )
        # Dropout and augmentation differ per rank; data order comes from the streams' own seeds.
        torch.manual_seed(cfg["experiment"]["seed"] * 1000 + self.rank)
        self.kjt_groups = self.model.kjt_groups
        self.all_items = torch.arange(self.num_items, dtype=torch.int64)
        self.writer = None
        if self.rank == 0 and cfg["log"]["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        self.ckpt_dir = self.run_dir / "checkpoints"
        # Frozen feature tables are reloaded from the dataset, so checkpoints leave them out.
        frozen_keys = tuple(k for k in self.dmp.state_dict()
                            if any(f".{m}." in k for m in self.model.frozen_tables) and k.startswith("features."))
        self.ckpt = ckpt.CheckpointManager(self.ckpt_dir, keep_last=cfg["checkpoint"]["keep"], mode="max",
                                           pg=self.pg, skip_prefixes=frozen_keys)

    # -- set-up helpers ------------------------------------------------------------------------

    def _make_run_dir(self, write_config: bool) -> Path:
        c = self.cfg["checkpoint"]
        name = c["run_dir"] or str(Path(self.cfg["experiment"]["out_dir"]) / run_name(self.cfg))
        run_dir = Path(_broadcast(name))
        # A resumed run's config.yaml is replaced only once its checkpoint has loaded (`load`), so a
        # refused resume leaves the run folder as it was.
        self._config_pending = False
        if self.rank == 0 and write_config:
            with creating(run_dir):
                run_dir.mkdir(parents=True, exist_ok=True)
                self._config_pending = bool(c["resume"]) and (run_dir / "config.yaml").is_file()
                if not self._config_pending:
                    (run_dir / "config.yaml").write_text(dump_config(self.cfg))
        return run_dir

    def _load_core(self, path: Path) -> None:
        core_file = path if path.is_file() and path.name == CORE_FILE else resolve(path) / CORE_FILE
        if not core_file.is_file():
            raise DataError(f"{core_file}: no {CORE_FILE} in the init checkpoint")
        saved = torch.load(core_file, map_location="cpu", weights_only=True)
        dims = saved["modality_dims"]
        if dims != self.modality_dims:
            raise DataError(f"{core_file}: checkpoint modalities {dims} differ from dataset {self.info.root}'s "
                            f"{self.modality_dims}")
        try:
            missing, unexpected = self.model.head.core.load_state_dict(saved["core"], strict=False)
        except RuntimeError as e:  # "size mismatch for ...": other model settings
            reason = next((l.strip() for l in str(e).splitlines() if "mismatch" in l), str(e).splitlines()[0])
            raise DataError(f"{core_file}: core weights do not fit this model ({reason[:300]})") from None
        bad = [k for k in missing + unexpected if not k.startswith("fusion_alpha")]
        if bad:
            raise DataError(f"{core_file}: core weights do not match this model ({bad[:4]} ...)")
        log0(f"loaded the pre-trained core from {core_file}")

    def _load_frozen_tables(self) -> None:
        for m in self.model.frozen_tables:
            vectors, present = self.info.load_features(m)
            mdist.load_table_rows(self.dmp, m, vectors)
            if m in self.modality_dims:
                getattr(self.head, f"present_{m}").copy_(torch.from_numpy(present))

    def _stream(self, split: str) -> SequenceStream:
        d = self.cfg["data"]
        train = split == "train"
        return SequenceStream(
            self.info.root,
            split=split,
            batch_size=d["batch_size"] if train else d["eval_batch_size"],
            max_len=self.model_cfg.max_len,
            kjt_groups=self.kjt_groups,
            rank=self.rank,
            world_size=self.world,
            seed=self.cfg["experiment"]["seed"],
            shuffle_buffer=d["shuffle_buffer"],
            prefix_sample=d["prefix_sample"] if train else 1.0,
            with_seen=(not train) and self.cfg["eval"]["mask_history"],
            steps_per_epoch=self.cfg["train"]["max_steps_per_epoch"] if train else None,
            num_workers=d["num_workers"] if train else 0,
            # Fast modes: batches padded to their own longest history; causal = one row per window.
            length_buckets=d["length_buckets"],
            windows=train and self.model_cfg.causal,
        )

    def _candidates(self) -> torch.Tensor:
        t = self.cfg["train"]
        if t["mode"] == "pretrain":
            return self.all_items[:0]
        if t["loss"] == "sampled_softmax":
            return torch.randint(self.num_items, (t["num_negatives"],))
        return self.all_items

    def _with_candidates(self, batches, candidates_fn) -> Iterator[SeqBatch]:
        for batch in batches:
            yield add_candidates(batch, self.kjt_groups, candidates_fn())

    # -- interest discovery --------------------------------------------------------------------

    @torch.no_grad()
    def recluster(self, epoch: int, position: int = 0) -> Dict[str, float]:
        """k-means over the catalogue's adapted modality vectors; each rank clusters its item slice."""
        t0 = time.time()
        head, core = self.head, self.head.core
        if not head.modalities:  # ID-only model: no modality vectors, no interests
            return {"clusters": 0.0, "seconds": 0.0}
        was_training = core.training
        core.eval()
        lo = self.rank * self.num_items // self.world
        hi = (self.rank + 1) * self.num_items // self.world
        ids = self.all_items[lo:hi].to(self.device)
        points, present = {}, {}
        for m in head.modalities:
            ec = ec_of(self, m)
            raw = mdist.lookup_rows(ec, candidates_key(m), ids, pg=self.pg)
            points[m] = core.adapt({m: raw})[m].float()
            present[m] = getattr(head, f"present_{m}")[lo:hi]
        gen = torch.Generator().manual_seed(self.cfg["experiment"]["seed"] + 1_000_003 * epoch + position)
        table, local = discover_interests(
            points, self.model_cfg, present, generator=gen, group=self.pg, k=head.num_clusters
        )
        head.centroids.copy_(table)
        for m, assign_local in local.items():
            full = self._gather_slices(assign_local, lo, hi)
            getattr(head, f"assign_{m}").copy_(full)
        core.train(was_training)
        sizes = torch.zeros(head.num_clusters + 1, dtype=torch.int64)
        for m in head.modalities:
            sizes += torch.bincount(getattr(head, f"assign_{m}").cpu(), minlength=head.num_clusters + 1)
        used = sizes[1:]
        stats = {
            "clusters": float(head.num_clusters),
            "clusters_used": float((used > 0).sum()),
            "largest_cluster": float(used.max()),
            "seconds": time.time() - t0,
        }
        return stats

    def _gather_slices(self, local: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        if self.world == 1:
            return local.cpu()
        size = -(-self.num_items // self.world) + 1
        padded = torch.zeros(size, dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local
        gathered = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=self.pg)
        parts = []
        for r, g in enumerate(gathered):
            rlo, rhi = r * self.num_items // self.world, (r + 1) * self.num_items // self.world
            parts.append(g[: rhi - rlo])
        return torch.cat(parts).cpu()

    # -- training ------------------------------------------------------------------------------

    def train_epoch(self, epoch: int, progress: Dict[str, Any]) -> Dict[str, float]:
        """One epoch from `progress["skip_batches"]` on. With checkpoint.every_steps > 0 the epoch runs
        in segments, each drained by its own pipeline and followed by a checkpoint holding the
        data-pipe position, so a killed run resumes mid-epoch on exactly the same batches."""
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        skip = int(progress.get("skip_batches", 0))
        stream = self._stream("train")
        stream.set_epoch(epoch)
        if skip:
            stream.load_state_dict({"epoch": epoch, "batches": skip})
        steps = len(stream) - skip
        batches = self._with_candidates(iter(make_loader(stream)), self._candidates)
        self.dmp.train()
        self.head.aug_generator = None
        bar = None
        if self.rank == 0 and self.cfg["log"]["progress"]:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True, leave=False)
        every = max(1, int(self.cfg["log"]["every"]))
        ckpt_every = int(self.cfg["checkpoint"]["every_steps"] or 0)
        recluster_every = int(self.cfg["train"]["recluster_every"] or 0)
        totals = {"loss": 0.0, "main": 0.0, "reg": 0.0, "targets": 0.0}
        done = 0
        t0 = time.time()
        rows = self.cfg["data"]["batch_size"] * self.world
        while done < steps:
            # A segment ends where the next checkpoint or re-clustering is due (positions in the epoch).
            n = steps - done
            for period in (ckpt_every, recluster_every):
                if period:
                    n = min(n, period - (skip + done) % period)
            pipeline = TrainPipelineSparseDist(self.dmp, self.optimizer, self.device, execute_all_batches=True)
            part = itertools.islice(batches, n)
            before = done
            while True:
                try:
                    out = pipeline.progress(part)
                except StopIteration:
                    break
                done += 1
                progress["step"] += 1
                step = progress["step"]
                # Sums stay tensors: the host reads values only at the logging cadence (a GPU never waits).
                for k in totals:
                    if k in out:
                        totals[k] = totals[k] + out[k].detach()
                if bar is not None:
                    bar.update(1)
                    if step % every == 0:
                        bar.set_postfix(loss=f"{float(out['loss']):.4f}")
                if self.writer is not None and step % every == 0:
                    self.writer.add_scalar("train/loss", float(out["loss"]), step)
                    self.writer.add_scalar("train/main", float(out.get("main", out["loss"])), step)
                    self.writer.add_scalar("train/regulariser", float(out.get("reg", 0.0)), step)
                    self.writer.add_scalar("train/lr", self.cfg["train"]["lr"], step)
                    self.writer.add_scalar("train/samples_per_s", done * rows / max(time.time() - t0, 1e-9), step)
                self._maybe_fail(step)
            pipeline.detach()
            if done == before:
                raise DataError(f"{self.info.root}: the training stream ended after {skip + done} of "
                                f"{skip + steps} batches in epoch {epoch}")
            position = skip + done
            if done < steps:
                if recluster_every and position % recluster_every == 0:
                    progress["interest"] = self.recluster(epoch, position)
                    self._log_interest(progress["interest"], progress["step"])
                if ckpt_every and position % ckpt_every == 0:
                    progress["skip_batches"] = position
                    self.save(progress)
        progress["skip_batches"] = 0
        if bar is not None:
            bar.close()
        seconds = time.time() - t0
        # Next-item predictions trained on, all ranks: one per row, or (causal) one per real position,
        # which the causal forward counts.
        counted = float(totals.pop("targets"))
        targets = torch.tensor([counted if self.model_cfg.causal else float(done * self.cfg["data"]["batch_size"])])
        if self.world > 1:
            dist.all_reduce(targets, group=self.pg)
        stats = {k: float(v) / max(done, 1) for k, v in totals.items()}
        stats.update(steps=done, seconds=seconds, samples_per_s=done * rows / max(seconds, 1e-9),
                     targets_per_s=float(targets) / max(seconds, 1e-9))
        return stats

    def _maybe_fail(self, step: int) -> None:
        # Test hook: simulates a crash at a given step so kill-and-resume can be tested end to end.
        fail_at = os.environ.get("MISSREC_FAIL_AT_STEP")
        if fail_at and step == int(fail_at):
            raise SystemExit(f"MISSREC_FAIL_AT_STEP={fail_at}: simulated crash")

    # -- evaluation ----------------------------------------------------------------------------

    def _training_items(self) -> torch.Tensor:
        """Whether each item occurs in some training sequence; read once (a pass over users.parquet)."""
        if self._warm is None:
            self._warm = torch.from_numpy(self.info.training_items())
        return self._warm

    @torch.no_grad()
    def evaluate(self, split: str) -> Dict[str, float]:
        ev = self.cfg["eval"]
        groups = {"": RankingMetrics(ks=ev["ks"])}
        if ev["cold_start"]:
            warm = self._training_items()
            groups["cold/"] = RankingMetrics(ks=ev["ks"])
        stream = self._stream(split)
        self.dmp.eval()
        for batch, ranks in self._ranked(stream, ev):
            for prefix, metrics in groups.items():
                weight = batch.weight
                if prefix:  # cold start: only targets that no training sequence contains
                    weight = weight * (~warm[batch.target.cpu()]).to(weight)
                metrics.update_ranks(ranks, weight)
        self.dmp.train()
        return {f"{prefix}{k}": v for prefix, metrics in groups.items() for k, v in metrics.compute(self.pg).items()}

    def _ranked(self, stream: SequenceStream, ev: Dict[str, Any]) -> Iterator:
        """(batch, target ranks) over a split. eval.engine=catalogue: the catalogue adapted once,
        users encoded in length-sorted sub-batches, items scored in chunks (catalogue.py);
        dmp: each batch through the sharded model's forward with the catalogue as candidates."""
        bank = ItemBank(self, self.precision) if ev["engine"] == "catalogue" else None
        batches = stream if bank is not None else self._with_candidates(stream, lambda: self.all_items)
        for batch in batches:
            batch = batch.to(self.device)
            exclude = (batch.seen_offsets, batch.seen_values) if ev["mask_history"] else (None, None)
            if bank is not None:
                yield batch, bank.ranks(bank.encode(batch.history), batch.target, ev["chunk_items"], *exclude)
            else:
                yield batch, target_ranks(self.dmp(batch)[1]["scores"], batch.target, *exclude)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, progress: Dict[str, Any], metric: Optional[float] = None) -> Path:
        # The dense core alone, to initialise a run on another catalogue (train.init_checkpoint). It is
        # written into the step folder before the folder is published and the pointers move.
        core = {"core": self.head.core.state_dict(), "modality_dims": self.modality_dims,
                "model": self.model_cfg.to_dict()}
        return self.ckpt.save(progress["step"], self.dmp, self.optimizer, progress=progress, metric=metric,
                              extra_files={CORE_FILE: core})

    def load(self, which: Any = "latest", optimizer: bool = True) -> Optional[Dict[str, Any]]:
        try:
            restored = self.ckpt.load(self.dmp, self.optimizer if optimizer else None, which=which)
        except ckpt.CheckpointMismatch as e:
            raise DataError(ckpt.describe_mismatch(e, self.info.root, self.num_items, self.modality_dims)) from None
        if self._config_pending:  # the resumed checkpoint fits: the run's config.yaml may now change
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
            self._config_pending = False
        if restored is None:
            return None
        return dict(restored.progress, path=str(restored.path))

    # -- the whole run -------------------------------------------------------------------------

    def fit(self) -> Dict[str, Any]:
        t, ev = self.cfg["train"], self.cfg["eval"]
        metric = ev["metric"]
        progress: Dict[str, Any] = {"epoch": 0, "step": 0, "best": None, "best_epoch": -1, "bad_epochs": 0,
                                    "skip_batches": 0, "history": [], "interest": {}}
        if self.cfg["checkpoint"]["resume"]:
            restored = self.load("latest")
            if restored is not None:
                progress.update({k: v for k, v in restored.items() if k in progress})
                log0(f"resumed from {restored['path']} (epoch {progress['epoch']}, step {progress['step']}, "
                     f"batch {progress['skip_batches']} of the epoch)")
        while progress["epoch"] < t["epochs"]:
            epoch = progress["epoch"]
            if not progress["skip_batches"]:
                progress["interest"] = self.recluster(epoch)
                self._log_interest(progress["interest"], progress["step"])
            stats = self.train_epoch(epoch, progress)
            row: Dict[str, Any] = {"epoch": epoch, **{f"train/{k}": v for k, v in stats.items()}}
            row.update({f"interest/{k}": v for k, v in progress.get("interest", {}).items()})
            value = None
            if (epoch + 1) % ev["every"] == 0 or epoch + 1 == t["epochs"]:
                valid = self.evaluate("valid")
                row.update({f"valid/{k}": v for k, v in valid.items()})
                value = valid[metric]
                if progress["best"] is None or value > progress["best"]:
                    progress.update(best=value, best_epoch=epoch, bad_epochs=0)
                else:
                    progress["bad_epochs"] += 1
            progress["epoch"] = epoch + 1
            progress["history"].append(row)
            self.save(progress, metric=value)
            self._log_epoch(row)
            if progress["bad_epochs"] >= ev["patience"]:
                log0(f"early stop: no {metric} improvement for {ev['patience']} validations")
                break
        if self.load("best", optimizer=False) is None:
            # train.epochs=0: the initial (e.g. pre-trained, zero-shot) weights, with fresh interests.
            log0("no validated checkpoint: testing the initial weights")
            progress["interest"] = self.recluster(progress["epoch"])
        test = self.evaluate("test")
        if self.cfg["log"]["fingerprint"]:
            self._write_fingerprint()
        result = {
            "run_dir": str(self.run_dir),
            "best_epoch": progress["best_epoch"],
            f"best_valid_{metric}": progress["best"],
            "test": test,
            "history": progress["history"],
        }
        if self.rank == 0:
            with atomic_file(self.run_dir / "results.json") as tmp:
                Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
            if self.writer is not None:
                hparams = {
                    "mode": t["mode"], "use_id": self.model_cfg.use_id, "hidden": self.model_cfg.hidden,
                    "lr": t["lr"], "batch_size": self.cfg["data"]["batch_size"],
                    "modalities": "+".join(self.modality_dims), "world_size": self.world,
                    "precision": self.precision,
                }
                self.writer.add_hparams(hparams, {f"hparam/test_{k}": v for k, v in test.items()})
                self.writer.close()
            log0("test " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(test.items())))
        return result

    @torch.no_grad()
    def _write_fingerprint(self) -> None:
        """Per rank: a hash of the dense weights and whether every frozen table still equals its
        features. Ranks must agree (DDP) and frozen tables must never move; tests read these files."""
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.head.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        unchanged = True
        for m in self.model.frozen_tables:
            rows = mdist.lookup_rows(ec_of(self, m), candidates_key(m), self.all_items.to(self.device), pg=self.pg)
            unchanged &= bool(torch.equal(rows.cpu(), torch.from_numpy(self.info.load_features(m)[0])))
        record = {"rank": self.rank, "dense": digest.hexdigest(), "frozen_tables_unchanged": unchanged}
        (self.run_dir / f"fingerprint.rank{self.rank}.json").write_text(json.dumps(record) + "\n")

    def _log_interest(self, stats: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in stats.items():
                self.writer.add_scalar(f"interest/{k}", v, step)

    def _log_epoch(self, row: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        epoch = row["epoch"]
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    # train/* and interest/* are also logged per step under the same names: their epoch
                    # summaries go under epoch/ so the step-indexed curves are not mixed with epoch indices.
                    tag = k if k.startswith("valid/") else "epoch/" + k.replace("/", "_")
                    self.writer.add_scalar(tag, v, epoch)
        shown = {k: v for k, v in row.items() if k.startswith("valid/") or k in ("train/loss", "train/samples_per_s")}
        log0(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))


def count_parameters(model: MISSRecModel) -> Dict[str, int]:
    dense = sum(p.numel() for p in model.head.parameters())
    trainable_dense = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    tables = {c.name: c.num_embeddings * c.embedding_dim
              for group in (model.features, model.ids) for ec in group.values() for c in ec.embedding_configs()}
    frozen = sum(v for k, v in tables.items() if k in model.frozen_tables)
    trainable_tables = sum(v for k, v in tables.items() if k not in model.frozen_tables)
    return {
        "total": dense + frozen + trainable_tables,
        "trainable": trainable_dense + trainable_tables,
        "dense": dense,
        "dense_trainable": trainable_dense,
        "frozen_tables": frozen,
        "trainable_tables": trainable_tables,
    }


def dry_run(cfg: Dict[str, Any], world_size: Optional[int] = None) -> Dict[str, Any]:
    """Build the model, plan its sharding for `world_size` ranks, print plan and parameter counts."""
    info = DatasetInfo.open(cfg["data"]["dataset"])
    t = cfg["train"]
    model = build_model(cfg, info)
    dims = {m: info.modalities[m].dim for m in cfg["data"]["modalities"]}
    if t.get("init_checkpoint") and t["peft"]:
        peft_trainable(model.head.core)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    plan = mdist.plan_sharding(model, sharding_type=t["sharding"], world_size=world, compute_device="cpu")
    counts = count_parameters(model)
    print(f"dataset {info.root}: {info.num_items:,} items, modalities {dims}")
    print(f"sharding plan for {world} rank(s):")
    print(mdist.format_plan(plan))
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return counts


def train(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return Trainer(cfg).fit()


def resolve(path: Path) -> Path:
    try:
        return ckpt.resolve_checkpoint(path)
    except ckpt.CheckpointError as e:
        raise DataError(str(e)) from None


def evaluate_checkpoint(checkpoint: Path, split: str = "test", overrides: Optional[List[str]] = None) -> Dict[str, float]:
    """Evaluate a saved checkpoint (a `step_N` folder or a run's `checkpoints/` folder) on `split`."""
    from missrec_torchrec.config import load_config

    checkpoint = resolve(checkpoint)
    run_dir = checkpoint.parent.parent
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise DataError(f"{config_file}: missing; is {checkpoint} inside a run folder?")
    cfg = load_config(config_file, overrides)
    cfg["checkpoint"]["run_dir"] = str(run_dir)
    cfg["log"]["tensorboard"] = False
    cfg["train"]["init_checkpoint"] = None  # the checkpoint below holds every weight
    trainer = Trainer(cfg, write_config=False)
    trainer.load(checkpoint, optimizer=False)
    result = trainer.evaluate(split)
    log0(f"{split} " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(result.items())))
    return result
