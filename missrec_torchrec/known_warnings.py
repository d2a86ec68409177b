"""Library warnings known to be harmless in this project, silenced once at start-up by the CLI."""

from __future__ import annotations

import logging
import warnings


def quiet_known_warnings() -> None:
    """Silence the library warnings known to be harmless here, each for the reason given; any other
    warning still shows."""
    known = [
        # torchrec's DistributedModelParallel passes this DDP argument itself: nothing of ours to change.
        (FutureWarning, r"`broadcast_buffers` is deprecated"),
        # torchrec's sharded state_dict hands out ShardedTensors; we read them as it gives them.
        (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
        # The planner's default storage reservation over-estimates dense tensors only in dry runs; it
        # can only make a plan more cautious, and our plans are checked by tests and --dry-run.
        (FutureWarning, r"HeuristicalStorageReservation is known to cause issues"),
        # load_table_rows only reads the (Arrow-backed, read-only) feature rows, copying them into the
        # table; nothing writes through that tensor.
        (UserWarning, r"The given NumPy array is not writable"),
        # torchdata's StatefulDataLoader calls a deprecated torch function internally.
        (UserWarning, r"'set_vital' is deprecated"),
    ]
    for category, message in known:
        warnings.filterwarnings("ignore", message=message, category=category)
    logged = {
        # We build the planner's Topology directly (CPU/gloo or the local GPUs) and planning works with
        # it; the factory would add validation against fleet hardware configs, which we do not use,
        # so the message's "otherwise, the job will fail" does not apply.
        "torchrec.distributed.planner.types": "The topology was constructed directly",
        # The same dry-run estimate as HeuristicalStorageReservation above, logged once more.
        "torchrec.distributed.planner.storage_reservations": "There is a known issue with TorchRec's dense",
        # TrainPipelineSparseDist asks torch.fx whether it is tracing; the API note is for its authors.
        "torch.fx._symbolic_trace": "is_fx_tracing will return true",
    }
    for name, prefix in logged.items():
        logging.getLogger(name).addFilter(lambda record, prefix=prefix: not record.getMessage().startswith(prefix))
