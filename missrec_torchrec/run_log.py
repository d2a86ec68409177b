"""What a training run reports as it goes: the progress bar, TensorBoard scalars and hparams, and the
console lines. Rank 0 reports; on other ranks every call does nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from missrec_torchrec.config import Config
from missrec_torchrec.session import log0


class RunLog:
    def __init__(self, cfg: Config, rank: int, run_dir: Path):
        self.cfg, self.rank = cfg, rank
        self.every = max(1, int(cfg.log.every))
        self.bar = None
        self.writer = None
        if rank == 0 and cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow to import; only when logging

            self.writer = SummaryWriter(str(run_dir / "tb"))

    def open_bar(self, epoch: int, steps: int) -> None:
        """The epoch's progress bar (log.progress), `steps` steps long."""
        if self.rank == 0 and self.cfg.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True, leave=False)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def step(self, out: Mapping[str, torch.Tensor], step: int, samples_per_s: float) -> None:
        """A training step: the bar moves; every log.every steps the loss is read (a host sync) and logged."""
        if self.bar is not None:
            self.bar.update(1)
            if step % self.every == 0:
                self.bar.set_postfix(loss=f"{float(out['loss']):.4f}")
        if self.writer is not None and step % self.every == 0:
            self.writer.add_scalar("train/loss", float(out["loss"]), step)
            self.writer.add_scalar("train/main", float(out.get("main", out["loss"])), step)
            self.writer.add_scalar("train/regulariser", float(out.get("reg", 0.0)), step)
            self.writer.add_scalar("train/lr", self.cfg.train.lr, step)
            self.writer.add_scalar("train/samples_per_s", samples_per_s, step)

    def interest(self, stats: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in stats.items():
                self.writer.add_scalar(f"interest/{k}", v, step)

    def epoch(self, row: Mapping[str, Any]) -> None:
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

    def finish(self, hparams: Mapping[str, Any], test: Mapping[str, float]) -> None:
        """The run's hyper-parameters with its test metrics, then the writer closes."""
        if self.writer is not None:
            self.writer.add_hparams(dict(hparams), {f"hparam/test_{k}": v for k, v in test.items()})
            self.writer.close()
        log0("test " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(test.items())))
