"""model.repeat_bias: one learned scalar lowering the scores of the items in a user's history window.

Every exact path (the forward's B x N scores, the catalogue engine's rank counts, `missrec score`'s
top-K, on 1 and 2 ranks, rank-local and held) against ranks and top-K lists computed by hand from the forward's scores
without the bias; what it learns on data that never repeats and on data that mostly does; checkpoints;
PEFT; and what is refused."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest
import torch

from datapipes.batch import PAD
from datapipes.schema import DataError
from missrec_torchrec import repeats, scoring, user_blocks
from missrec_torchrec.cli import main
from missrec_torchrec.config import ConfigError, load_config
from missrec_torchrec.model.core import peft_trainable
from missrec_torchrec.session import load_run, open_session
from test_chunked_bank import BLOCK, CHUNK, GROUP_FLOATS, ITEMS, chunked_ranks
from test_distributed import launch
from test_score import assert_same_topk, rows
from test_train import small_overrides

QUIET = ["log.progress=false", "data.eval_batch_size=32"]
FORCED = 0.25  # a bias large enough to move many ranks (one epoch learns little of it)


@pytest.fixture(scope="module")
def run(synthetic_odd, tmp_path_factory):
    """One epoch with the bias on a 121-item synthetic catalogue (text, image and IDs; fp32)."""
    from missrec_torchrec.trainer import train

    folder = tmp_path_factory.mktemp("rb-run")
    train(load_config("ml100k", small_overrides(synthetic_odd, folder, **{
        "train.epochs": 1, "checkpoint.run_dir": folder / "run", "train.precision": "fp32",
        "model.use_id": "true", "model.repeat_bias": "true"})))
    return str(folder / "run")


def open_run(run_dir: str, bias: float = FORCED):
    step_dir, cfg = load_run(run_dir, QUIET)
    cfg.eval.mask_history = True  # the streams then carry the seen lists; each engine is told below
    session = open_session(cfg.for_inference(), step_dir)
    with torch.no_grad():
        session.head.repeat_bias.fill_(bias)
    return session


@contextlib.contextmanager
def without_bias(head):
    bias = head.repeat_bias
    head.repeat_bias = None
    try:
        yield float(bias.detach())
    finally:
        head.repeat_bias = bias


@torch.no_grad()
def by_hand(session, split: str = "test"):
    """(user, target, seen items, window items, N scores): the forward's scores without the bias,
    less the bias at each distinct item of the user's history window, one item at a time."""
    session.cfg.eval.mask_history = True  # the stream then carries the seen lists
    with without_bias(session.head) as bias:
        for batch in session.stream(split, session.candidates("catalogue")):
            scores = session.dmp(batch)[1]["scores"]
            offsets = batch.seen_offsets.tolist()
            for b in torch.nonzero(batch.user >= 0).squeeze(1).tolist():
                row = scores[b].clone()
                window = set(batch.history[b][batch.history[b] != PAD].tolist())
                for item in window:
                    row[item] -= bias
                seen = batch.seen_values[offsets[b] : offsets[b + 1]]
                yield int(batch.user[b]), int(batch.target[b]), seen[seen >= 0], window, row


def hand_ranks(session, mask: bool) -> dict:
    out = {}
    for user, target, seen, _, scores in by_hand(session):
        rivals = torch.ones(ITEMS, dtype=torch.bool)
        if mask:
            rivals[seen] = False
        rivals[target] = False
        out[user] = 1 + int((~(scores[rivals] < scores[target])).sum())
    return out


def hand_topk(session, k: int = 10) -> dict:
    out = {}
    for user, _, _, _, scores in by_hand(session):
        top, idx = scores.topk(k)
        out[user] = (idx.tolist(), top.tolist())
    return out


# ---- the exact paths against the hand-made scores -----------------------------------------------


@pytest.mark.parametrize("mask", [False, True])
def test_engines_rank_as_the_hand_lowered_scores(run, mask, monkeypatch):
    monkeypatch.setattr(user_blocks, "SCORE_FLOATS", GROUP_FLOATS)
    session = open_run(run)
    want = hand_ranks(session, mask)
    assert chunked_ranks(session, "test", mask, CHUNK, BLOCK) == want
    assert chunked_ranks(session, "test", mask, CHUNK, BLOCK, held="held") == want
    assert chunked_ranks(session, "test", mask, 0, 0, engine="dmp") == want
    # The bias matters here (so the equalities above test it), and targets seen before exist.
    with torch.no_grad():
        session.head.repeat_bias.zero_()
    assert chunked_ranks(session, "test", mask, CHUNK, BLOCK) != want
    assert chunked_ranks(session, "test", mask, CHUNK, BLOCK, held="held") != want
    assert any(target in window for _, target, _, window, _ in by_hand(session))


@pytest.mark.parametrize("held", ["rank_local", "held"])
def test_score_topk_is_the_hand_lowered_topk(run, tmp_path, monkeypatch, held):
    monkeypatch.setattr(user_blocks, "SCORE_FLOATS", GROUP_FLOATS)
    out = tmp_path / "top.parquet"
    # The checkpoint's own (learned) bias: `score` opens the run itself.
    scoring.score(scoring.ScoreOptions(checkpoint=Path(run), out=out, topk=10, chunk_items=CHUNK, batch_size=32,
                                       overrides=[*QUIET, f"eval.block_users={BLOCK}", f"eval.catalogue={held}"]))
    step_dir, cfg = load_run(run, QUIET)
    cfg.eval.mask_history = True
    session = open_session(cfg.for_inference(), step_dir)
    assert float(session.head.repeat_bias.detach()) != 0.0
    assert_same_topk(rows(out), hand_topk(session))


HELD = ("rank_local", "held")  # eval.catalogue


def _two_rank_worker(run_dir: str, out: str) -> dict:
    torch.set_num_threads(1)
    user_blocks.SCORE_FLOATS = GROUP_FLOATS
    session = open_run(run_dir)
    ranks = {held: chunked_ranks(session, "test", False, CHUNK, BLOCK, held=held) for held in HELD}
    for held in HELD:
        scoring.score(scoring.ScoreOptions(checkpoint=Path(run_dir), out=Path(out) / f"{held}.parquet", topk=10,
                                           chunk_items=CHUNK, batch_size=32,
                                           overrides=[*QUIET, f"eval.block_users={BLOCK}", f"eval.catalogue={held}"]))
    return ranks


def test_two_ranks_rank_and_score_as_the_hand_lowered_scores(run, tmp_path):
    results = launch(_two_rank_worker, 2, run, str(tmp_path))
    session = open_run(run)
    want = hand_ranks(session, False)
    step_dir, cfg = load_run(run, QUIET)
    learned = hand_topk(open_session(cfg.for_inference(), step_dir))
    for held in HELD:
        assert {**results[0][held], **results[1][held]} == want, held
        assert_same_topk(rows(tmp_path / f"{held}.parquet"), learned)


def test_masks_mark_each_rows_window_and_each_positions_prefix():
    rng = random.Random(0)
    history = torch.tensor([[rng.randrange(6) for _ in range(5)] for _ in range(4)])
    history[1, 3:] = PAD
    history[2, 1:] = PAD
    whole = repeats.history_columns(history, 6)
    prefix = repeats.prefix_columns(history, 6)
    row = 0
    for b in range(4):
        real = [int(i) for i in history[b] if i != PAD]
        assert whole[b].nonzero().squeeze(1).tolist() == sorted(set(real))
        for p in range(len(real)):
            assert prefix[row].nonzero().squeeze(1).tolist() == sorted(set(real[: p + 1])), (b, p)
            row += 1
    assert row == prefix.shape[0]


# ---- learning ----------------------------------------------------------------------------------


def interaction_log(path: Path, repeat: bool, users: int = 150, items: int = 40) -> Path:
    """Sequences of 8-12 items: a walk over consecutive items that never comes back (repeat=False),
    or draws from each user's own 3 items, so the next item is almost always one seen before."""
    rng = random.Random(1)
    lines = ["user_id,item_id,timestamp"]
    for u in range(users):
        start, mine = rng.randrange(items), rng.sample(range(items), 3)
        for t in range(rng.randrange(8, 13)):
            item = rng.choice(mine) if repeat else (start + t) % items
            lines.append(f"u{u},i{item},{1000 + t}")
    path.write_text("\n".join(lines) + "\n")
    return path


def trained(tmp_path: Path, repeat: bool, **extra):
    from missrec_torchrec.trainer import Trainer

    data = tmp_path / "data"
    assert main(["prepare", "interactions", "--path", str(interaction_log(tmp_path / "log.csv", repeat)),
                 "--k-core", "0", "--out", str(data)]) == 0
    cfg = load_config("ml100k", small_overrides(data, tmp_path, **{
        "data.modalities": "[]", "model.use_id": "true", "model.repeat_bias": "true", "train.epochs": 3,
        "train.lr": 1e-2, "train.precision": "fp32", "log.fingerprint": "false", "eval.ks": "[10]",
        "checkpoint.run_dir": tmp_path / "run", **extra}))
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer.session


@torch.no_grad()
def history_share(session, k: int = 10) -> float:
    """Share of the test top-k slots that hold an item of the user's history window."""
    hits = slots = 0
    for batch in session.stream("test", session.candidates("catalogue")):
        top = session.dmp(batch)[1]["scores"].topk(k, dim=1).indices
        real = batch.user >= 0
        hits += int(repeats.history_columns(batch.history, session.num_items).gather(1, top)[real].sum())
        slots += int(real.sum()) * k
    return hits / slots


def test_no_repeats_learn_a_positive_bias_that_clears_the_top10(tmp_path):
    session = trained(tmp_path, repeat=False)
    bias = float(session.head.repeat_bias.detach())
    assert bias > 0.05, bias
    session.dmp.eval()
    share = history_share(session)
    with without_bias(session.head):
        assert share < history_share(session)


def test_repeats_learn_a_negative_bias(tmp_path):
    assert float(trained(tmp_path, repeat=True).head.repeat_bias.detach()) < -0.05


def test_causal_training_learns_the_bias_too(tmp_path):
    assert float(trained(tmp_path, repeat=False, **{"model.causal": "true"}).head.repeat_bias.detach()) > 0.05


# ---- checkpoints, PEFT, refusals ------------------------------------------------------------------


def test_checkpoint_keeps_the_bias_exactly(run, tmp_path):
    session = open_run(run, bias=0.123456789)
    value = session.head.repeat_bias.detach().clone()
    step = session.checkpoints(tmp_path / "ckpt").save(9, session.dmp, None)
    other = open_run(run, bias=-1.0)
    other.load_weights(step)
    assert torch.equal(other.head.repeat_bias.detach(), value)


def test_export_records_the_bias(run, tmp_path):
    import json

    from missrec_torchrec import export

    folder = export.export_items(run, tmp_path / "items", overrides=QUIET)
    record = json.loads((Path(folder) / "export.json").read_text())
    step_dir, cfg = load_run(run, QUIET)
    learned = float(open_session(cfg.for_inference(), step_dir).head.repeat_bias.detach())
    assert record["repeat_bias"] == learned != 0.0 and "repeat_bias" in record["scoring"]


def test_peft_leaves_the_bias_trainable(run):
    session = open_run(run)
    peft_trainable(session.head.core)
    assert session.head.repeat_bias.requires_grad
    assert not session.head.core.encoder.layers[0].self_attn.in_proj_weight.requires_grad


def test_off_registers_nothing():
    from missrec_torchrec.recommender import MISSRecHead
    from missrec_torchrec.model.config import ModelConfig

    cfg = ModelConfig(hidden=8, heads=2)
    assert "repeat_bias" not in MISSRecHead(cfg, {"text": 4}, 10).state_dict()
    on = MISSRecHead(ModelConfig(hidden=8, heads=2, repeat_bias=True), {"text": 4}, 10)
    assert float(on.state_dict()["repeat_bias"]) == 0.0


@pytest.mark.parametrize("override,words", [
    ("train.loss=sampled_softmax", "train.loss"),
    ("train.mode=pretrain", "train.mode=pretrain"),
])
def test_config_refuses_what_cannot_learn_it(override, words):
    with pytest.raises(ConfigError, match="model.repeat_bias") as e:
        load_config("ml100k", ["model.repeat_bias=true", override])
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flags", [{"approx": 15}, {"ann": "hnsw"}])
def test_score_refuses_candidate_modes(run, tmp_path, flags):
    with pytest.raises(DataError, match="repeat_bias"):
        scoring.score(scoring.ScoreOptions(checkpoint=Path(run), out=tmp_path / "x.parquet", overrides=QUIET, **flags))
