"""What the TorchX component files share: the torchrun app and the clean-up of their own argv."""

import os
from typing import List, Optional

import torchx.specs as specs
from torchx.components import dist


def ddp_app(module: str, args: List[str], j: str, cpu: int, gpu: int, memMB: int, name: str,
            rdzv_port: int, env: Optional[dict]) -> specs.AppDef:
    """`dist.ddp` running `python -m module args...` on every rank."""
    return dist.ddp(*args, m=module, j=j, cpu=cpu, gpu=gpu, memMB=memMB, name=name, rdzv_port=rdzv_port, env=env)


def script_args(argv: List[str], component_file: str) -> List[str]:
    """The arguments meant for `missrec`: `torchx run dist.ddp ... components/x.py -- ARGS` hands the
    component path itself, then a "--", to the script before ARGS."""
    if argv and os.path.abspath(argv[0]) == os.path.abspath(component_file):
        argv = argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    return argv
