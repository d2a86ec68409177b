"""Shared fixtures: small real datasets built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores in CI: one intra-op thread per process keeps multi-process tests from oversubscribing.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _synthetic(tmp_path_factory, name: str, users: int, items: int, mean_len: int, topics: int, seed: int):
    from missrec_torchrec.cli import main

    out = tmp_path_factory.mktemp("data") / name
    rc = main(
        [
            "prepare", "synthetic", "--out", str(out), "--users", str(users), "--items", str(items),
            "--modalities", "text:32,image:16", "--mean-len", str(mean_len), "--topics", str(topics),
            "--seed", str(seed), "--rows-per-group", "64",
        ]
    )
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def synthetic_mm(tmp_path_factory):
    """A tiny synthetic catalogue with planted topics and two modalities (text 32-d, image 16-d)."""
    return _synthetic(tmp_path_factory, "synthetic-mm", users=240, items=120, mean_len=12, topics=8, seed=3)


@pytest.fixture(scope="session")
def synthetic_other(tmp_path_factory):
    """Another catalogue (different items and IDs, same modalities): the fine-tuning target of transfer tests."""
    return _synthetic(tmp_path_factory, "synthetic-other", users=160, items=90, mean_len=10, topics=6, seed=11)


@pytest.fixture(scope="session")
def synthetic_odd(tmp_path_factory):
    """121 items: two ranks own 60 and 61, so chunked scans and blocks meet uneven ranges."""
    return _synthetic(tmp_path_factory, "synthetic-odd", users=200, items=121, mean_len=12, topics=8, seed=5)
