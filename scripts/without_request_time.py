"""Test a time-bias checkpoint (model.relative_time_bias) as if each held-out item's timestamp were
unknown: every test row's request time, which times the last position's query, becomes its last
history item's time (what `missrec score`'s split `all` uses). The model was trained knowing the
request time, so this bounds from below what the time bias gives without it.

    .venv/bin/python scripts/without_request_time.py runs/ml1m-trans-2x4-rab-rabt-s2020/checkpoints/best

An analysis, not a product path: it wraps the stream's `collate` rather than adding a key.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import datapipes.stream as stream
from missrec_torchrec.evaluate import evaluate_checkpoint

_collate = stream.collate


def _last_item_as_request_time(history_values, lengths, *args, times=None, target_time=None, **kwargs):
    if times is not None and len(times):
        last = np.cumsum(lengths) - 1  # each row's last history item in the flat `times`
        target_time = np.where(lengths > 0, times[np.clip(last, 0, None)], target_time)
    return _collate(history_values, lengths, *args, times=times, target_time=target_time, **kwargs)


if __name__ == "__main__":
    stream.collate = _last_item_as_request_time
    evaluate_checkpoint(Path(sys.argv[1]), "test")
