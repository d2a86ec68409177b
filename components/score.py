"""TorchX entry point for offline batch scoring (`missrec score`).

As a module it is what every rank runs (`python -m components.score [score args]`); as a TorchX
component file it offers `score`:

    torchx run components/score.py:score -j 1x2 -- --checkpoint runs/<run> --out scores.parquet
    torchx run components/score.py:score -j 2x8 -- --checkpoint runs/<run> --out s.parquet --split all --resume
"""

import sys
from typing import List, Optional

import torchx.specs as specs

from components.launch import ddp_app, script_args


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
    return ddp_app("components.score", list(score_args), j, cpu, gpu, memMB, name, rdzv_port, env)


def score_argv(argv: List[str]) -> List[str]:
    return ["score", *script_args(argv, __file__)]


if __name__ == "__main__":
    from missrec_torchrec.cli import main

    sys.exit(main(score_argv(sys.argv[1:])))
