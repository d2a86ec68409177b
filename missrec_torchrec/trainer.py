"""`missrec train` / `missrec evaluate`: MISSRec under DistributedModelParallel.

One code path for 1 process, torchrun and TorchX; gloo on CPU, NCCL on GPU. Per epoch: interest
discovery (k-means over the catalogue's adapted vectors, split across ranks), training steps driven
by TrainPipelineSparseDist, validation with full ranking, a checkpoint, early stopping. At the end
the best checkpoint is reloaded and the test split evaluated.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from datapipes.batch import SeqBatch
from datapipes.candidates import Candidates
from datapipes.io import creating, staged_file
from datapipes.schema import DataError, DatasetInfo
from datapipes.stream import SequenceStream, make_loader
from missrec_torchrec import distributed as mdist
from missrec_torchrec import evaluate as evaluation
from missrec_torchrec import precision, resources
from missrec_torchrec.config import Config, check_resume_config, dump_config
from missrec_torchrec.model.core import peft_trainable
from missrec_torchrec.metrics import early_stopping
from missrec_torchrec.run_log import RunLog
from missrec_torchrec.recommender import ID_TABLE, MISSRecModel
from missrec_torchrec.session import CORE_FILE, Session, broadcast, build_model, log0


def run_name(cfg: Config) -> str:
    m, t, d = cfg.model, cfg.train, cfg.data
    parts = [
        cfg.experiment.name,
        t.mode,
        "trans" if m.use_id else "induct",
        "+".join(d.modalities) or "idonly",
        f"d{m.hidden}",
        f"lr{t.lr:g}",
        f"b{d.batch_size}",
        f"s{cfg.experiment.seed}",
        precision.resolve(t.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    ]
    if t.init_checkpoint:
        parts.append("peft" if t.peft else "ft")
    return "-".join(parts) + time.strftime("-%Y%m%d-%H%M%S")


# ------------------------------------------------------------------------------------------------


class Trainer:
    """Training on a `Session`: the optimizer, the run folder, checkpoints, logging and the epochs."""

    def __init__(self, cfg: Config, write_config: bool = True):
        self.cfg = cfg
        # Before anything is prepared or written (config.yaml is rewritten below): a resumed run's
        # config must match the saved one, apart from the keys the user allowed to change.
        changes = check_resume_config(cfg) if write_config else []
        for change in changes:
            log0(f"resuming with a changed {change}")
        self.session = s = Session(cfg)
        # The names the training loop reads, from the session.
        self.rank, self.world, self.device, self.pg = s.rank, s.world, s.device, s.pg
        self.info, self.dmp, self.head, self.model_cfg = s.info, s.dmp, s.head, s.model_cfg
        self.precision, self.modality_dims = s.precision, s.modality_dims
        self.run_dir = self._make_run_dir(write_config)
        t = cfg.train
        self.optimizer = mdist.build_optimizer(
            self.dmp,
            frozen_tables=s.fused_frozen,
            # fused: one pass over each tensor for the whole update (foreach makes ~10; 5x slower here).
            dense_kwargs={"lr": t.lr, "weight_decay": t.weight_decay, "fused": True},
        )
        # Dropout and augmentation differ per rank; data order comes from the streams' own seeds.
        torch.manual_seed(cfg.experiment.seed * 1000 + self.rank)
        resources.report_bound(self.dmp, self.head)
        self.log = RunLog(cfg, self.rank, self.run_dir)
        self.ckpt = s.checkpoints(self.run_dir / "checkpoints", keep_last=cfg.checkpoint.keep)
        self.stream: Optional[SequenceStream] = None  # the training stream of the current epoch
        self._position: Optional[Dict[str, Any]] = None  # a resumed rank's data position, until used

    def _make_run_dir(self, write_config: bool) -> Path:
        c = self.cfg.checkpoint
        name = c.run_dir or str(Path(self.cfg.experiment.out_dir) / run_name(self.cfg))
        run_dir = Path(broadcast(name))
        # A resumed run's config.yaml is replaced only once its checkpoint has loaded (`load`), so a
        # refused resume leaves the run folder as it was.
        self._config_pending = False
        if self.rank == 0 and write_config:
            with creating(run_dir):
                run_dir.mkdir(parents=True, exist_ok=True)
                self._config_pending = bool(c.resume) and (run_dir / "config.yaml").is_file()
                if not self._config_pending:
                    (run_dir / "config.yaml").write_text(dump_config(self.cfg))
        return run_dir

    def _candidates(self) -> Candidates:
        """The candidates of every training batch (asked with the model in train mode)."""
        t = self.cfg.train
        if t.mode == "pretrain":
            return self.session.candidates("none")
        if self.head.loss == "sampled_softmax":
            return self.session.candidates("sampled", t.num_negatives)
        return self.session.candidates("catalogue")

    # -- interests and evaluation: the session's -----------------------------------------------

    def recluster(self, epoch: int, position: int = 0) -> Dict[str, float]:
        return self.session.refresh_interests(epoch, position)

    def evaluate(self, split: str) -> Dict[str, float]:
        return evaluation.evaluate(self.session, split)

    # -- training ------------------------------------------------------------------------------

    def train_epoch(self, epoch: int, progress: Dict[str, Any]) -> Dict[str, float]:
        """One epoch from `progress["skip_batches"]` on. With checkpoint.every_steps > 0 the epoch runs
        in segments, each drained by its own pipeline and followed by a checkpoint holding each rank's
        data position, so a killed run resumes mid-epoch on exactly the same batches."""
        skip = int(progress.get("skip_batches", 0))
        stream = self.open_stream(epoch, skip)
        steps = len(stream) - skip
        batches = iter(make_loader(stream))
        self.head.aug_generator = None
        self.log.open_bar(epoch, steps)
        ckpt_every = int(self.cfg.checkpoint.every_steps or 0)
        recluster_every = int(self.cfg.train.recluster_every or 0)
        totals = {"loss": 0.0, "main": 0.0, "reg": 0.0, "targets": 0.0}
        done = 0
        t0 = time.time()
        while done < steps:
            # A segment ends where the next checkpoint or re-clustering is due (positions in the epoch).
            n = steps - done
            for period in (ckpt_every, recluster_every):
                if period:
                    n = min(n, period - (skip + done) % period)
            with resources.phase("train") as phase:
                ran = phase["steps"] = self._segment(itertools.islice(batches, n), progress, totals, done, t0)
            if ran == 0:
                raise DataError(f"{self.info.root}: the training stream ended after {skip + done} of "
                                f"{skip + steps} batches in epoch {epoch}")
            done += ran
            position = skip + done
            if done < steps:
                if recluster_every and position % recluster_every == 0:
                    progress["interest"] = self.recluster(epoch, position)
                    self.log.interest(progress["interest"], progress["step"])
                if ckpt_every and position % ckpt_every == 0:
                    progress["skip_batches"] = position
                    self.save(progress)
        progress["skip_batches"] = 0
        self.session.publish_ids()
        self.log.close_bar()
        return self._epoch_stats(totals, done, time.time() - t0)

    def open_stream(self, epoch: int, skip: int) -> SequenceStream:
        """The epoch's training stream after its first `skip` batches, the model in train mode.

        A resumed rank continues from its own saved position (`load` checked its plan). Without one
        (the world size changed, or a checkpoint from before positions were saved) every rank skips
        `skip` batches of the new plan: the epoch keeps its length, not its rows."""
        self.dmp.train()
        self.stream = stream = self.session.stream("train", self._candidates())
        stream.set_epoch(epoch)
        position, self._position = self._position, None
        if skip:
            stream.load_state_dict(position or {"epoch": epoch, "batches": skip})
        return stream

    def _segment(self, part: Iterator[SeqBatch], progress: Dict[str, Any], totals: Dict[str, Any], done: int,
                 t0: float) -> int:
        """Training steps over `part`, drained by a pipeline of its own; returns how many ran."""
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipeline = TrainPipelineSparseDist(self.dmp, self.optimizer, self.device, execute_all_batches=True)
        rows = self.cfg.data.batch_size * self.world
        ran = 0
        while True:
            try:
                out = pipeline.progress(part)
            except StopIteration:
                break
            ran += 1
            progress["step"] += 1
            step = progress["step"]
            # Sums stay tensors: the host reads values only at the logging cadence (a GPU never waits).
            for k in totals:
                if k in out:
                    totals[k] = totals[k] + out[k].detach()
            self.log.step(out, step, (done + ran) * rows / max(time.time() - t0, 1e-9))
            self._maybe_fail(step)
        pipeline.detach()
        return ran

    def _epoch_stats(self, totals: Dict[str, Any], done: int, seconds: float) -> Dict[str, float]:
        # Next-item predictions trained on, all ranks: one per row, or (causal) one per real position,
        # which the causal forward counts.
        counted = float(totals.pop("targets"))
        targets = mdist.all_reduce_scalar(counted if self.model_cfg.causal else float(done * self.cfg.data.batch_size),
                                          "sum", self.pg, self.device)
        stats = {k: float(v) / max(done, 1) for k, v in totals.items()}
        rows = self.cfg.data.batch_size * self.world
        stats.update(steps=done, seconds=seconds, samples_per_s=done * rows / max(seconds, 1e-9),
                     targets_per_s=targets / max(seconds, 1e-9))
        return stats

    def _maybe_fail(self, step: int) -> None:
        # Test hook: simulates a crash at a given step so kill-and-resume can be tested end to end.
        fail_at = os.environ.get("MISSREC_FAIL_AT_STEP")
        if fail_at and step == int(fail_at):
            raise SystemExit(f"MISSREC_FAIL_AT_STEP={fail_at}: simulated crash")

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, progress: Dict[str, Any], metric: Optional[float] = None) -> Path:
        # The dense core alone, to initialise a run on another catalogue (train.init_checkpoint). It is
        # written into the step folder before the folder is published and the pointers move.
        core = {"core": self.head.core.state_dict(), "modality_dims": self.modality_dims,
                "model": self.model_cfg.to_dict()}
        self.session.publish_ids()
        # Each rank's place in the training data: the batch `progress` stands at, under this run's plan.
        stream = self.stream or self.session.stream("train")
        position = stream.position(progress.get("epoch", stream.epoch), progress.get("skip_batches", 0))
        with resources.phase("checkpoint"):
            return self.ckpt.save(progress["step"], self.dmp, self.optimizer, progress=progress, metric=metric,
                                  rank_state={"stream": position}, extra_files={CORE_FILE: core})

    def load(self, which: Any = "latest", optimizer: bool = True) -> Optional[Dict[str, Any]]:
        """`which` into the model (and optimizer). "latest" resumes: this rank's data position is kept
        for the next epoch, and a mid-epoch position whose data plan differs from this run's is refused
        before the run folder changes."""
        restored = self.session.load(self.ckpt, which, self.optimizer if optimizer else None)
        if restored is not None and which == "latest":
            self._position = (restored.rank_state or {}).get("stream")
            if self._position and self._position["batches"]:
                try:
                    self.session.stream("train").load_state_dict(self._position)
                except ValueError as e:
                    raise DataError(f"{self.run_dir}: {e} since {restored.path.name} (batch "
                                    f"{self._position['batches']} of epoch {self._position['epoch']}); "
                                    f"resume with the run's data settings") from None
        if self._config_pending:  # the resumed checkpoint fits: the run's config.yaml may now change
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
            self._config_pending = False
        if restored is None:
            return None
        return dict(restored.progress, path=str(restored.path))

    # -- the whole run -------------------------------------------------------------------------

    def fit(self) -> Dict[str, Any]:
        t = self.cfg.train
        progress: Dict[str, Any] = {"epoch": 0, "step": 0, "best": None, "best_epoch": -1, "bad_epochs": 0,
                                    "skip_batches": 0, "history": [], "interest": {}}
        if self.cfg.checkpoint.resume:
            restored = self.load("latest")
            if restored is not None:
                progress.update({k: v for k, v in restored.items() if k in progress})
                log0(f"resumed from {restored['path']} (epoch {progress['epoch']}, step {progress['step']}, "
                     f"batch {progress['skip_batches']} of the epoch)")
        while progress["epoch"] < t.epochs:
            epoch = progress["epoch"]
            if not progress["skip_batches"]:
                progress["interest"] = self.recluster(epoch)
                self.log.interest(progress["interest"], progress["step"])
            stats = self.train_epoch(epoch, progress)
            row: Dict[str, Any] = {"epoch": epoch, **{f"train/{k}": v for k, v in stats.items()}}
            row.update({f"interest/{k}": v for k, v in progress.get("interest", {}).items()})
            value, stop = self._validate(epoch, progress, row)
            progress["epoch"] = epoch + 1
            progress["history"].append(row)
            self.save(progress, metric=value)
            self.log.epoch(row)
            if stop:
                ev = self.cfg.eval
                log0(f"early stop: no {ev.metric} improvement for {ev.patience} validations")
                break
        refit = self.cfg.data.train_through_valid
        if refit:
            log0(f"data.train_through_valid: no validation; testing the weights after epoch {progress['epoch'] - 1}")
        if progress["epoch"] == 0 or (not refit and self.load("best", optimizer=False) is None):
            # train.epochs=0: the initial (e.g. pre-trained, zero-shot) weights, with fresh interests.
            log0("no validated checkpoint: testing the initial weights")
            progress["interest"] = self.recluster(progress["epoch"])
        return self._finish(progress)

    def _validate(self, epoch: int, progress: Dict[str, Any], row: Dict[str, Any]) -> Tuple[Optional[float], bool]:
        """(validation metric or None, early stop) after `epoch`; valid/* go into `row`."""
        t, ev = self.cfg.train, self.cfg.eval
        if self.cfg.data.train_through_valid:  # the validation targets are training targets: nothing to select
            progress["best_epoch"] = epoch
            return None, False
        if (epoch + 1) % ev.every != 0 and epoch + 1 != t.epochs:
            return None, False
        valid = self.evaluate("valid")
        row.update({f"valid/{k}": v for k, v in valid.items()})
        value = valid[ev.metric]
        improved, bad, stop = early_stopping(value, progress["best"], progress["bad_epochs"],
                                             ev.patience, ev.recbole_stopping)
        progress["bad_epochs"] = bad
        if improved:
            progress.update(best=value, best_epoch=epoch)
        return value, stop

    def _finish(self, progress: Dict[str, Any]) -> Dict[str, Any]:
        """Test the loaded weights, write results.json (and the fingerprints, hparams); the run's result."""
        t, metric = self.cfg.train, self.cfg.eval.metric
        test = self.evaluate("test")
        if self.cfg.log.fingerprint:
            self._write_fingerprint()
        result = {
            "run_dir": str(self.run_dir),
            "best_epoch": progress["best_epoch"],
            f"best_valid_{metric}": progress["best"],
            "test": test,
            "history": progress["history"],
        }
        if self.rank == 0:
            with staged_file(self.run_dir / "results.json") as tmp:
                Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
            self.log.finish({"mode": t.mode, "use_id": self.model_cfg.use_id, "hidden": self.model_cfg.hidden,
                             "lr": t.lr, "batch_size": self.cfg.data.batch_size,
                             "modalities": "+".join(self.modality_dims), "world_size": self.world,
                             "precision": self.precision}, test)
        return result

    @torch.no_grad()
    def _write_fingerprint(self) -> None:
        """Per rank: a hash of the dense weights and whether every frozen table still equals its
        features. Ranks must agree (DDP) and frozen tables must never move; tests read these files."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.head.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        unchanged = True
        for m in self.session.model.frozen_tables:  # each rank its own shards, against its own rows
            rows = self.info.feature_rows(m)
            for shard, (r0, c0) in mdist.local_shards(mdist.table_weight(self.session.dmp, m)):
                n, d = shard.shape
                unchanged &= bool(torch.equal(shard.cpu(), torch.from_numpy(rows[r0 : r0 + n, c0 : c0 + d])))
        record = {"rank": self.rank, "dense": digest.hexdigest(), "frozen_tables_unchanged": unchanged}
        (self.run_dir / f"fingerprint.rank{self.rank}.json").write_text(json.dumps(record) + "\n")


def count_parameters(model: MISSRecModel) -> Dict[str, int]:
    dense = sum(p.numel() for p in model.head.parameters())
    trainable_dense = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    tables = {c.name: c.num_embeddings * c.embedding_dim
              for group in (model.features, model.ids) for ec in group.values() for c in ec.embedding_configs()}
    if model.head.id_table is not None:
        tables.pop(ID_TABLE)  # dense_adam: the dense table (counted above) trains; its sharded mirror is a copy
    state = sum(c.num_embeddings * c.embedding_dim for ec in model.state.values() for c in ec.embedding_configs())
    frozen = sum(v for k, v in tables.items() if k in model.frozen_tables)
    trainable_tables = sum(v for k, v in tables.items() if k not in model.frozen_tables)
    return {
        "total": dense + frozen + trainable_tables,
        "trainable": trainable_dense + trainable_tables,
        "dense": dense,
        "dense_trainable": trainable_dense,
        "frozen_tables": frozen,
        "trainable_tables": trainable_tables,
        "item_state": state,
    }


def dry_run(cfg: Config, world_size: Optional[int] = None) -> Dict[str, Any]:
    """Build the model, plan its sharding for `world_size` ranks, print plan and parameter counts."""
    info = DatasetInfo.open(cfg.data.dataset)
    t = cfg.train
    model = build_model(cfg, info)
    dims = {m: info.modalities[m].dim for m in cfg.data.modalities}
    if t.init_checkpoint and t.peft:
        peft_trainable(model.head.core)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    plan = mdist.plan_sharding(model, sharding_type=t.sharding, world_size=world, compute_device="cpu")
    counts = count_parameters(model)
    print(f"dataset {info.root}: {info.num_items:,} items, modalities {dims}")
    print(f"sharding plan for {world} rank(s):")
    print(mdist.format_plan(plan))
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return counts


def train(cfg: Config) -> Dict[str, Any]:
    return Trainer(cfg).fit()
