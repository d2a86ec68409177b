"""Shared fixtures: small real datasets built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores in CI: one intra-op thread per process keeps multi-process tests from oversubscribing.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def synthetic_mm(tmp_path_factory):
    """A tiny synthetic catalogue with planted topics and two modalities (text 32-d, image 16-d)."""
    from missrec_torchrec.cli import main

    out = tmp_path_factory.mktemp("data") / "synthetic-mm"
    rc = main(
        [
            "prepare", "synthetic", "--out", str(out), "--users", "240", "--items", "120",
            "--modalities", "text:32,image:16", "--mean-len", "12", "--topics", "8", "--seed", "3",
            "--rows-per-group", "64",
        ]
    )
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def synthetic_other(tmp_path_factory):
    """Another catalogue (different items and IDs, same modalities): the fine-tuning target of transfer tests."""
    from missrec_torchrec.cli import main

    out = tmp_path_factory.mktemp("data") / "synthetic-other"
    rc = main(
        [
            "prepare", "synthetic", "--out", str(out), "--users", "160", "--items", "90",
            "--modalities", "text:32,image:16", "--mean-len", "10", "--topics", "6", "--seed", "11",
            "--rows-per-group", "64",
        ]
    )
    assert rc == 0
    return out
