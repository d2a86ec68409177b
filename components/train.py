"""TorchX entry point for MISSRec training.

As a module it is what every rank runs (`python -m components.train [trainer args]`); as a TorchX
component file it offers `train` (and the design card's `dist.ddp` form through .torchxconfig):

    torchx run dist.ddp -j 2x8 components/train.py -- --config ml100k train.epochs=1
    torchx run components/train.py:train -j 1x2 -- --config ml100k
"""

# No `from __future__ import annotations`: torchx 0.7 reads the component's annotations at run time.
import sys
from typing import List, Optional

import torchx.specs as specs

from components.launch import ddp_app, script_args


def train(
    *trainer_args: str,
    j: str = "1x2",
    cpu: int = 2,
    memMB: int = 4096,
    gpu: int = 0,
    name: str = "missrec-train",
    rdzv_port: int = 29500,
    env: Optional[dict] = None,
) -> specs.AppDef:
    """Train MISSRec under torchrun on the local or a cluster scheduler.

    Args:
        trainer_args: arguments for `missrec train` (default: --config ml100k)
        j: nodes x processes per node, e.g. 1x2 (a laptop) or 2x8
        cpu: CPUs per replica
        memMB: memory per replica in MB
        gpu: GPUs per replica (NCCL is used when > 0)
        name: job name
        rdzv_port: rendezvous port on the first node
        env: extra environment variables
    """
    return ddp_app("components.train", list(trainer_args), j, cpu, gpu, memMB, name, rdzv_port, env)


def trainer_argv(argv: List[str]) -> List[str]:
    argv = script_args(argv, __file__)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", "ml100k", *argv]
    return ["train", *argv]


if __name__ == "__main__":
    from missrec_torchrec.cli import main

    sys.exit(main(trainer_argv(sys.argv[1:])))
