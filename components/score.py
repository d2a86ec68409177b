"""TorchX entry point for offline batch scoring (`missrec score`).

As a module it is what every rank runs (`python -m components.score [score args]`); as a TorchX
component file it offers `score`:

    torchx run components/score.py:score -j 1x2 -- --checkpoint runs/<run> --out scores.parquet
    torchx run components/score.py:score -j 2x8 -- --checkpoint runs/<run> --out s.parquet --split all --resume
"""

import os
import sys
from typing import List, Optional

import torchx.specs as specs
from torchx.components import dist

_THIS = os.path.normpath("components/score.py")


def score(
    *score_args: str,
    j: str = "1x2",
    cpu: int = 2,
    memMB: int = 4096,
    gpu: int = 0,
    name: str = "missrec-score",
    rdzv_port: int = 29500,
    env: Optional[dict] = None,
) -> specs.AppDef:
    """Write every user's top-K items to Parquet with a trained checkpoint, under torchrun.

    Args:
        score_args: arguments for `missrec score` (at least --checkpoint RUN and --out FILE)
        j: nodes x processes per node, e.g. 1x2 (a laptop) or 2x8
        cpu: CPUs per replica
        memMB: memory per replica in MB
        gpu: GPUs per replica (NCCL is used when > 0)
        name: job name
        rdzv_port: rendezvous port on the first node
        env: extra environment variables
    """
    return dist.ddp(
        *score_args,
        m="components.score",
        j=j,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        name=name,
        rdzv_port=rdzv_port,
        env=env,
    )


def _score_argv(argv: List[str]) -> List[str]:
    # As with components/train.py: drop the component path if torchx passes it, and a leading "--".
    if argv and os.path.normpath(argv[0]) in (_THIS, os.path.abspath(_THIS)):
        argv = argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    return ["score", *argv]


if __name__ == "__main__":
    from missrec_torchrec.cli import main

    sys.exit(main(_score_argv(sys.argv[1:])))
