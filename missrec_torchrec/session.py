"""A MISSRec model opened on its dataset: what training, evaluation and scoring share.

`Session(cfg)` joins the process group, opens the dataset (preparing it first when `prepare`),
builds the model, loads a pre-trained core (train.init_checkpoint), shards it with
DistributedModelParallel and fills the frozen feature tables. It offers the data streams, the
sharded collection of a table, the rank-local catalogue (`ChunkedBank`: user vectors, this rank's
item chunks), interest refresh and checkpoint loading. It owns no optimizer and writes nothing: the trainer adds those.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from datapipes import features, sources
from datapipes.candidates import Candidates
from datapipes.rows import check_times
from datapipes.schema import STATS_FILE, DataError, DatasetInfo
from datapipes.stream import SequenceStream
from missrec_torchrec import checkpoint as ckpt
from missrec_torchrec import distributed as mdist
from missrec_torchrec import item_state, precision, resources
from missrec_torchrec.catalogue import ChunkedBank
from missrec_torchrec.config import Config, ConfigError, load_config
from missrec_torchrec.interest_state import InterestState, item_slice
from missrec_torchrec.item_state import STATE_GROUP, STATE_TABLE
from missrec_torchrec.model.core import peft_trainable
from missrec_torchrec.recommender import AUG_TABLE, ID_GROUP, ID_TABLE, MISSRecModel

CORE_FILE = "core.pt"  # the dense core + its config, for fine-tuning on another catalogue


def process_rank() -> int:
    # Before the process group exists (argument checks) torchrun's env var tells the rank.
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def log0(*args) -> None:
    if process_rank() == 0:
        print(*args, flush=True)


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve(path: Path) -> Path:
    """The complete checkpoint folder a run, checkpoints/ or step_N path names."""
    try:
        return ckpt.resolve_checkpoint(path)
    except ckpt.CheckpointError as e:
        raise DataError(str(e)) from None


def load_run(checkpoint: Path | str, overrides: Optional[List[str]] = None) -> Tuple[Path, Config]:
    """(complete checkpoint folder, the run's config with overrides) from a run or checkpoint path."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise DataError(f"{checkpoint}: no such run or checkpoint folder")
    step_dir = resolve(checkpoint)
    config_file = step_dir.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise DataError(f"{config_file}: missing; is {step_dir} inside a run folder?")
    return step_dir, load_config(config_file, overrides)


def open_session(cfg: Config, step_dir: Path) -> "Session":
    """The model of an inference config (`Config.for_inference`) with the checkpoint's weights, in eval mode."""
    session = Session(cfg, prepare=False)
    session.load_weights(step_dir)
    return session


# ------------------------------------------------------------------------------------------------
# Dataset and model


def ensure_dataset(cfg: Config) -> DatasetInfo:
    """Prepare the dataset and its feature tables on rank 0 when missing; every rank then opens it."""
    data, root = cfg.data, Path(cfg.data.dataset)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        if not root.exists():
            if not data.prepare_source:
                raise DataError(f"{root}: dataset not found and data.prepare_source is null")
            log0(f"preparing {root} from {data.prepare_source}")
            log0(sources.summary(root, sources.prepare(data.prepare_source, root, data.prepare_args)))
        have = DatasetInfo.open(root).modalities
        for spec in data.features or []:
            if spec["modality"] not in have:
                log0(f"computing {spec['modality']} features with {spec['encoder']}")
                log0(features.summary(features.compute_features(root, spec["modality"], spec["encoder"])))
    if dist.is_initialized():
        dist.barrier()
    info = DatasetInfo.open(root)
    missing = [m for m in data.modalities if m not in info.modalities]
    if missing:
        raise DataError(f"{root}: no feature table for modalities {missing} (have {sorted(info.modalities)})")
    return info


def check_features(cfg: Config) -> None:
    """Refuse a bad feature table of an existing dataset (NaN/inf, rows, dim), or missing timestamps
    under model.relative_time_bias, in one line. A dataset the trainer prepares itself is checked as it
    loads. Each rank checks its own item slice and share of users, one row group at a time (a 1e7-item
    table is never read whole, nor by every rank), and every rank stops with the first rank's message."""
    root = Path(cfg.data.dataset)
    if not (root / STATS_FILE).is_file():
        return
    info = DatasetInfo.open(root)
    rank, world, _, pg = mdist.init_distributed()  # the trainer joins the same process group
    resources.mark_runtime()  # before any table is read
    lo, hi = item_slice(rank, world, info.num_items)
    used = [m for m in (*cfg.data.modalities, *[AUG_TABLE] * (cfg.train.mode == "pretrain")) if m in info.modalities]
    error = None
    try:
        for name in used:
            info.check_features(name, lo, hi)
        if cfg.model.relative_time_bias:
            check_times(info.users_path, info.num_items, rank, world)
    except DataError as e:
        error = str(e)
    if error := mdist.first_error(error, pg):
        raise DataError(error)


def build_model(cfg: Config, info: DatasetInfo) -> MISSRecModel:
    """The unsharded model (tables on the meta device) for a config and a prepared dataset."""
    mods = info.modalities
    names = cfg.data.modalities
    missing = [m for m in names if m not in mods]
    if missing:
        raise DataError(f"{info.root}: no feature table for modalities {missing} (have {sorted(mods)})")
    model_cfg = cfg.model
    t = cfg.train
    aug_dim = mods[AUG_TABLE].dim if (t.mode == "pretrain" and AUG_TABLE in mods and "text" in names) else None
    points = (
        sum(mods[m].present for m in names) if model_cfg.mask_missing_modality else info.num_items * len(names)
    )
    loss = t.finetune_loss(info.num_items)
    if model_cfg.repeat_bias and loss != "full_softmax":
        raise ConfigError(f"config key model.repeat_bias: needs the full softmax, and train.loss auto is sampled "
                          f"softmax for {info.num_items:,} items (train.full_softmax_max_items)")
    return MISSRecModel(
        model_cfg,
        {m: mods[m].dim for m in names},
        info.num_items,
        mode=t.mode,
        loss=loss,
        aug_dim=aug_dim,
        table_dtypes={m: info.dtype for m, info in mods.items()},
        cluster_points=points,
        dense_ids=t.sparse_optimizer == "dense_adam",
        mixed_negatives=t.in_batch_negatives,
    )


def load_core(model: MISSRecModel, path: Path, modality_dims: Dict[str, int], dataset: Path) -> None:
    """A pre-trained dense core (train.init_checkpoint: a run, step folder or core.pt) into `model`."""
    core_file = path if path.is_file() and path.name == CORE_FILE else resolve(path) / CORE_FILE
    if not core_file.is_file():
        raise DataError(f"{core_file}: no {CORE_FILE} in the init checkpoint")
    saved = torch.load(core_file, map_location="cpu", weights_only=True)
    dims = saved["modality_dims"]
    if dims != modality_dims:
        raise DataError(f"{core_file}: checkpoint modalities {dims} differ from dataset {dataset}'s {modality_dims}")
    core = saved["core"]
    rows, saved_rows = model.head.core.positions.num_embeddings, len(core.get("positions.weight", ()))
    if saved_rows > rows:
        # Positions count from a window's first item, so a window of at most `rows` items reads
        # exactly these first rows in the pre-trained model too.
        log0(f"{core_file}: using the first {rows} of its {saved_rows} position rows (model.max_len={rows})")
        core = {**core, "positions.weight": core["positions.weight"][:rows]}
    try:
        missing, unexpected = model.head.core.load_state_dict(core, strict=False)
    except RuntimeError as e:  # "size mismatch for ...": other model settings
        reason = next((l.strip() for l in str(e).splitlines() if "mismatch" in l), str(e).splitlines()[0])
        raise DataError(f"{core_file}: core weights do not fit this model ({reason[:300]})") from None
    bad = [k for k in missing + unexpected if not k.startswith("fusion_alpha")]
    if bad:
        raise DataError(f"{core_file}: core weights do not match this model ({bad[:4]} ...)")
    log0(f"loaded the pre-trained core from {core_file}")


# ------------------------------------------------------------------------------------------------


class Session:
    """The sharded model on its dataset (see module doc). `prepare`: build a missing dataset and its
    feature tables first (training); inference opens what is there."""

    def __init__(self, cfg: Config, prepare: bool = True):
        self.cfg = cfg
        self.rank, self.world, self.device, self.pg = mdist.init_distributed()
        resources.enable(cfg.log.resources, self.rank)
        resources.mark_runtime()
        seed_everything(cfg.experiment.seed)
        self.info = ensure_dataset(cfg) if prepare else DatasetInfo.open(cfg.data.dataset)
        self.num_items = self.info.num_items
        d, t = cfg.data, cfg.train
        self.model_cfg = cfg.model
        # Same seed on every rank: identical dense initialisation (DDP also broadcasts rank 0's).
        self.model = build_model(cfg, self.info)
        self.modality_dims = {m: self.info.modalities[m].dim for m in d.modalities}
        if t.init_checkpoint:
            load_core(self.model, Path(t.init_checkpoint), self.modality_dims, self.info.root)
            if t.peft:
                peft_trainable(self.model.head.core)
        # dense_adam: the dense table in the head trains; the sharded ID table only mirrors it.
        dense_ids = self.model.head.id_table is not None
        self.fused_frozen = self.model.frozen_tables + [STATE_TABLE] + ([ID_TABLE] if dense_ids else [])
        self.dmp = mdist.plan_and_shard(
            self.model,
            sharding_type=item_state.sharding(t.sharding, list(self.model.table_dims)),
            frozen_tables=self.fused_frozen,
            trainable_fused=("sgd" if dense_ids else t.sparse_optimizer, {"lr": t.sparse_lr}),
            pg=self.pg,
            device=self.device,
        )
        self.head = self.dmp.module.head if hasattr(self.dmp.module, "head") else self.model.head
        self.precision = precision.resolve(t.precision, self.device)
        self.head.precision = self.precision
        self.head.gather_history = bool(t.gather_history)
        self.head.blocked_softmax = bool(t.blocked_softmax)
        self._load_frozen_tables()
        self.publish_ids()
        self._warm: Optional[torch.Tensor] = None  # items in some training sequence (cold start)
        self.kjt_groups = self.model.kjt_groups
        self.all_items = torch.arange(self.num_items, dtype=torch.int64)
        self.interests = InterestState(self)
        keys = list(self.dmp.state_dict())
        self.state_key = next(k for k in keys if k.endswith(f"embeddings.{STATE_TABLE}.weight"))
        # Frozen feature tables are reloaded from the dataset, so checkpoints leave them out.
        self.frozen_keys = tuple(k for k in keys if any(f".{m}." in k for m in self.model.frozen_tables)
                                 and k.startswith("features.") and k != self.state_key)

    @torch.no_grad()
    def publish_ids(self) -> None:
        """dense_adam: copy the dense ID table into its sharded mirror, which evaluation, scoring,
        export and checkpoints read (at set-up, after every epoch, before evaluating and saving)."""
        if self.head.id_table is not None:
            mdist.load_table_rows(self.dmp, ID_TABLE, self.head.id_table.weight[: self.num_items].detach())

    def _load_frozen_tables(self) -> None:
        """Every rank fills its own shards of the frozen feature tables from the Parquet row groups
        holding them, so no rank reads a row-wise table whole; `feature_rows_decoded` says how many
        rows each table cost this rank. A bad row stops every rank with the reader's message. Then
        each rank writes its own rows of the item state: presence, softmax flags, log-Q."""
        lo, hi = item_slice(self.rank, self.world, self.num_items)
        presence: Dict[str, torch.Tensor] = {}
        self.feature_rows_decoded: Dict[str, int] = {}
        error = None
        for m in self.model.frozen_tables:
            try:
                rows = self.info.feature_rows(m)
                mdist.load_table_rows(self.dmp, m, rows)
                self.feature_rows_decoded[m] = rows.rows_decoded
                if m in self.modality_dims:
                    presence[m] = torch.from_numpy(rows.present(lo, hi))
            except DataError as e:
                error = error or str(e)
        error = mdist.first_error(error, self.pg)
        if error:
            raise DataError(error)
        self._write_state(lo, hi, presence)

    @torch.no_grad()
    def _write_state(self, lo: int, hi: int, presence: Dict[str, torch.Tensor]) -> None:
        t, head = self.cfg.train, self.head
        rows = self.own_state()
        rows.copy_(item_state.default_rows(hi - lo, head.modalities, self.num_items))
        in_softmax = logq = None
        if t.softmax_items == "training":
            in_softmax = torch.from_numpy(self.info.training_items(self.cfg.data.train_through_valid)[lo:hi])
            head.restrict_softmax = True
        if head.mixed_negatives and head.loss == "sampled_softmax":
            counts = torch.from_numpy(self.info.target_counts(self.cfg.data.train_through_valid)).double()
            logq = (counts[lo:hi].clamp(min=1) / counts.sum()).log()
        item_state.write_columns(rows, head.modalities, present=presence, in_softmax=in_softmax, logq=logq)

    def own_state(self) -> torch.Tensor:
        """This rank's rows of the item state (its `item_slice`): a view of its shard, written in place."""
        lo, hi = item_slice(self.rank, self.world, self.num_items)
        rows = mdist.own_rows(self.dmp, STATE_TABLE, lo, hi) if hi > lo else None
        if rows is None and hi > lo:
            raise RuntimeError(f"rank {self.rank}: the item state's shard does not hold items [{lo}, {hi})")
        return rows if rows is not None else torch.zeros(0, item_state.width(self.head.modalities), device=self.device)

    # -- data ----------------------------------------------------------------------------------

    def candidates(self, kind: str, num_negatives: int = 0) -> Candidates:
        """A candidate policy (`datapipes.candidates`) for the model in its current train/eval mode:
        the history and target features stay empty where the model gathers them from the catalogue."""
        policy = Candidates(kind, self.num_items, num_negatives)
        return replace(policy, sequence_rows=not self.head.gathers_rows(policy.count))

    def stream(self, split: str, candidates: Optional[Candidates] = None) -> SequenceStream:
        """The split's batches for this rank: training rows, or one row per user to evaluate; with
        `candidates`, each batch holds its candidate items."""
        d = self.cfg.data
        train = split == "train"
        return SequenceStream(
            self.info.root,
            split=split,
            batch_size=d.batch_size if train else d.eval_batch_size,
            max_len=self.model_cfg.max_len,
            kjt_groups=self.kjt_groups,
            rank=self.rank,
            world_size=self.world,
            seed=self.cfg.experiment.seed,
            shuffle_buffer=d.shuffle_buffer,
            prefix_sample=d.prefix_sample if train else 1.0,
            with_seen=(not train) and self.cfg.eval.mask_history,
            steps_per_epoch=self.cfg.train.max_steps_per_epoch if train else None,
            num_workers=d.num_workers if train else 0,
            # Fast modes: batches padded to their own longest history; causal = one row per window.
            length_buckets=d.length_buckets,
            windows=train and self.model_cfg.causal, through_valid=train and d.train_through_valid,
            times=self.model_cfg.relative_time_bias,
            candidates=candidates,
            max_users=None if train else self.cfg.eval.max_users,
        )

    def training_items(self) -> torch.Tensor:
        """Whether each item occurs in some training sequence (through the validation target with
        data.train_through_valid); read once (a pass over users.parquet)."""
        if self._warm is None:
            self._warm = torch.from_numpy(self.info.training_items(self.cfg.data.train_through_valid))
        return self._warm

    # -- tables, items, users, interests -------------------------------------------------------

    def collection(self, table: str):
        """The (sharded) collection holding `table`, modality or ID."""
        module = self.dmp.module
        for group, tables in self.kjt_groups.items():
            if table in tables:
                return {ID_GROUP: module.ids, STATE_GROUP: module.state}.get(group, module.features)[group]
        raise KeyError(table)

    def item_bank(self) -> ChunkedBank:
        """This rank's share of the catalogue at inference: users encoded from looked-up rows, its own
        items scanned in chunks (catalogue.py). Holds no item vectors until scanned."""
        return ChunkedBank(self, self.precision)

    def refresh_interests(self, epoch: int, position: int = 0) -> Dict[str, float]:
        return self.interests.refresh(epoch, position)

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpoints(self, folder: Path, keep_last: int = 3) -> ckpt.CheckpointManager:
        """A checkpoint manager for this model's state (frozen tables left out)."""
        return ckpt.CheckpointManager(folder, keep_last=keep_last, mode="max", pg=self.pg,
                                      skip_prefixes=self.frozen_keys, ties=self.cfg.eval.recbole_stopping,
                                      absent_ok=(self.state_key,))

    def load(self, manager: ckpt.CheckpointManager, which: Any, optimizer=None) -> Optional[ckpt.Restored]:
        """`which` into the model (and optimizer); a checkpoint of another dataset or model is one line."""
        try:
            restored = manager.load(self.dmp, optimizer, which=which)
        except ckpt.CheckpointMismatch as e:
            raise DataError(ckpt.describe_mismatch(e, self.info.root, self.num_items, self.modality_dims)) from None
        if restored is not None and self.state_key in restored.absent:
            # Written before the item state: this rank's rows of its N-long cluster buffers (presence,
            # softmax flags and log-Q were never saved: the set-up's values stand).
            lo, hi = item_slice(self.rank, self.world, self.num_items)
            clusters = item_state.legacy_clusters(restored.path, self.head.modalities, self.num_items)
            with torch.no_grad():
                item_state.write_columns(self.own_state(), self.head.modalities,
                                         clusters={m: c[lo:hi].to(self.device) for m, c in clusters.items()})
        return restored

    def load_weights(self, step_dir: Path) -> None:
        """A complete checkpoint's weights for inference (no optimizer state), then eval mode."""
        try:
            self.load(self.checkpoints(step_dir.parent), step_dir)
        except DataError:  # already one line naming the checkpoint (and the dataset it does not match)
            raise
        except Exception as e:  # DCP and load_state_dict raise many types; for the user it is one bad input
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{step_dir}: cannot load the checkpoint into this model ({reason[:300]})") from None
        self.dmp.eval()
