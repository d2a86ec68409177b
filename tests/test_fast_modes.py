"""Fast training modes: length-bucketed batches, one-pass causal training, and the ID-only model."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from datapipes.batch import PAD, collate
from datapipes.stream import SequenceStream
from missrec_torchrec import item_state
from missrec_torchrec.item_state import ItemState
from missrec_torchrec.model import ModelConfig
from missrec_torchrec.recommender import MISSRecHead, MISSRecModel

torch.set_num_threads(1)
DIMS = {"text": 12, "image": 8}
NUM_ITEMS = 40
SMALL = ModelConfig(hidden=16, heads=2, ffn=24, max_len=10, dropout=0.0, interest_ratio=0.2)


def seed_interests(head: MISSRecHead, seed: int = 0, state: Optional[torch.Tensor] = None) -> ItemState:
    """Random centroids and item clusters, some items missing their image: the item state of every
    item, written into `state` (the model's state table) when given."""
    g = torch.Generator().manual_seed(seed)
    head.centroids.copy_(torch.randn(head.centroids.shape, generator=g))
    head.centroids[0] = 0
    rows = item_state.default_rows(NUM_ITEMS, head.modalities, NUM_ITEMS)
    clusters = {m: torch.randint(1, head.num_clusters + 1, (NUM_ITEMS,), generator=g) for m in head.modalities}
    present = {}
    if "image" in head.modalities:
        clusters["image"][::5] = 0
        present["image"] = torch.arange(NUM_ITEMS) % 5 != 0
    item_state.write_columns(rows, head.modalities, clusters=clusters, present=present)
    if state is not None:
        with torch.no_grad():
            state.copy_(rows)
    return head.state(rows)


def make_model(config: ModelConfig, dims=DIMS, loss: str = "full_softmax") -> MISSRecModel:
    torch.manual_seed(0)
    model = MISSRecModel(config, dims, NUM_ITEMS, loss=loss, table_device=torch.device("cpu"))
    seed_interests(model.head, state=model.state_weight())
    return model


def make_rows(n: int, max_len: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len // 2 + 1, n)  # every row shorter than max_len: trimming bites
    values = rng.integers(0, NUM_ITEMS, int(lengths.sum()))
    return values, lengths, rng.integers(0, NUM_ITEMS, n), np.arange(n)


def make_times(n: int, seed: int = 2) -> np.ndarray:
    """n increasing timestamps whose gaps span 1 s to ~3 years, so they fall in many time buckets."""
    gaps = np.exp(np.random.default_rng(seed).uniform(0, 18, n)).astype(np.int64)
    return 10**9 + np.cumsum(gaps)


def make_batch(model, rows, width, candidates=None):
    """With model.relative_time_bias the rows get increasing timestamps, each target after its history."""
    values, lengths, target, user = rows
    times, target_time = None, None
    if model.head.config.relative_time_bias:
        ends = np.cumsum(lengths) + np.arange(len(lengths))  # each row's history times, then its target's
        flat = make_times(len(values) + len(lengths))
        target_time = flat[ends]
        times = np.delete(flat, ends)
    return collate(values, lengths, target, user, width, model.kjt_groups,
                   candidates=torch.arange(NUM_ITEMS) if candidates is None else candidates,
                   times=times, target_time=target_time)


# ---- 1. length buckets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [SMALL, replace(SMALL, use_id=True), ModelConfig.paper("transductive_ft", **{k: getattr(SMALL, k) for k in
                                                                               ("hidden", "heads", "ffn", "max_len", "dropout", "interest_ratio")})],
    ids=["inductive", "transductive", "paper"],
)
def test_trimmed_padding_gives_the_padded_scores_and_loss(config):
    model = make_model(config)
    rows = make_rows(24, config.max_len)
    padded, trimmed = make_batch(model, rows, config.max_len), make_batch(model, rows, int(rows[1].max()))
    assert trimmed.history.shape[1] < padded.history.shape[1]
    model.train()  # dropout 0: the training loss is deterministic
    loss_p, out_p = model(padded)
    loss_t, out_t = model(trimmed)
    torch.testing.assert_close(loss_t, loss_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_t["reg"], out_p["reg"], rtol=1e-5, atol=1e-7)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(trimmed)[1]["scores"], model(padded)[1]["scores"], rtol=1e-5, atol=1e-6)


def _reference_prefix_rows(dataset, max_len):
    users = pq.read_table(dataset / "users.parquet").to_pylist()
    return Counter(
        (u["user_index"], u["items"][k], tuple(u["items"][max(0, k - max_len) : k]))
        for u in users
        for k in range(1, u["train_end"])
    )


def _batch_rows(batch):
    out = []
    for i in range(batch.batch_size):
        n = int(batch.lengths[i])
        out.append((int(batch.user[i]), int(batch.target[i]), tuple(batch.history[i, :n].tolist())))
    return out


def _stream(dataset, **kw):
    kw = {"batch_size": 32, "max_len": 8, "seed": 4, "shuffle_buffer": 200, **kw}
    return SequenceStream(dataset, **kw)


def test_bucketed_epoch_yields_every_prefix_row_once_in_narrow_batches(synthetic_mm):
    ref = _reference_prefix_rows(synthetic_mm, 8)
    plain, bucketed = _stream(synthetic_mm), _stream(synthetic_mm, length_buckets=True)
    batches = list(bucketed)
    assert len(batches) == len(plain) == math.ceil(sum(ref.values()) / 32)
    rows = [r for b in batches for r in _batch_rows(b)]
    assert set(rows) == set(ref)
    assert sum((Counter(rows) - ref).values()) == len(rows) - sum(ref.values()) < 32  # only the wrap
    # Each batch is as wide as its longest history, and far narrower on average than max_len.
    assert all(b.history.shape[1] == int(b.lengths.max()) for b in batches)
    spread = np.mean([int(b.lengths.max() - b.lengths.min()) for b in batches])
    plain_spread = np.mean([int(b.lengths.max() - b.lengths.min()) for b in plain])
    assert spread < plain_spread / 2, (spread, plain_spread)
    # Deterministic, and a new epoch reorders.
    assert [r for b in _stream(synthetic_mm, length_buckets=True) for r in _batch_rows(b)] == rows
    bucketed.set_epoch(1)
    assert [r for b in bucketed for r in _batch_rows(b)][:32] != rows[:32]


def test_bucketed_stream_resumes_mid_epoch(synthetic_mm):
    full = [_batch_rows(b) for b in _stream(synthetic_mm, length_buckets=True)]
    s = _stream(synthetic_mm, length_buckets=True)
    it = iter(s)
    head = [_batch_rows(next(it)) for _ in range(5)]
    state = s.state_dict()
    resumed = _stream(synthetic_mm, length_buckets=True)
    resumed.load_state_dict(state)
    assert head + [_batch_rows(b) for b in resumed] == full
    with pytest.raises(ValueError, match="cannot resume"):
        _stream(synthetic_mm).load_state_dict(state)


# ---- 2. one-pass causal model --------------------------------------------------------------------


def _causal_head(config, dims=DIMS):
    torch.manual_seed(0)
    head = MISSRecHead(config, dims, NUM_ITEMS)
    return head.eval(), seed_interests(head)


def randomise_biases(head: MISSRecHead) -> None:
    """Non-zero relative position and time biases where the model has them (they start at 0),
    different per layer, head and column."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in head.core.decoder.layers:
            for bias in (layer.position_bias, layer.time_bias):
                if bias is not None:
                    bias.copy_(torch.randn(bias.shape, generator=g))


@pytest.mark.parametrize("keep_zero, position_bias, time_bias",
                         [(False, False, False), (True, False, False), (False, True, False), (False, True, True)])
def test_one_pass_causal_equals_every_prefix_run_separately(keep_zero, position_bias, time_bias):
    config = replace(SMALL, causal=True, use_id=True, interest_keep_zero=keep_zero, relative_position_bias=position_bias,
                     relative_time_bias=time_bias)
    head, state = _causal_head(config)
    # Offsets count within the window, and position p is timed by item p + 1 (the prefix's target):
    # a prefix run alone sees the same biases.
    randomise_biases(head)
    b, width = 6, config.max_len
    times = torch.from_numpy(make_times(b * (width + 1))).view(b, width + 1) if time_bias else None
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([10, 7, 1, 4, 10, 2])
    history = torch.randint(0, NUM_ITEMS, (b, width), generator=g)
    history[torch.arange(width) >= lengths.unsqueeze(1)] = PAD
    raw = {m: torch.randn(b, width, d, generator=g) for m, d in DIMS.items()}
    hist_id = torch.randn(b, width, config.hidden, generator=g)
    with torch.no_grad():
        adapted = head.core.adapt(raw)
        y, _, _ = head.encode(history, adapted, hist_id, state.at(history), all_positions=True, times=times)
        for p in range(width):
            rows = lengths > p  # rows that have a position p
            prefix = history[rows, : p + 1]
            u, _, _ = head.encode(prefix, {m: v[rows, : p + 1] for m, v in adapted.items()}, hist_id[rows, : p + 1],
                                  state.at(prefix), times=None if times is None else times[rows, : p + 2])
            torch.testing.assert_close(y[rows, p], u, rtol=1e-5, atol=1e-5)
    # The paper's bidirectional model does not have this property (position 0 sees the future).
    bidir, _ = _causal_head(replace(config, causal=False))
    bidir.load_state_dict(head.state_dict())
    with torch.no_grad():
        y_bidir, _, _ = bidir.encode(history, adapted, hist_id, state.at(history), all_positions=True, times=times)
        alone, _, _ = bidir.encode(history[:1, :1], {m: v[:1, :1] for m, v in adapted.items()}, hist_id[:1, :1],
                                   state.at(history[:1, :1]), times=None if times is None else times[:1, :2])
    assert not torch.allclose(y_bidir[0, 0], alone[0], atol=1e-4)


@pytest.mark.parametrize("loss", ["full_softmax", "sampled_softmax"])
def test_causal_loss_is_the_mean_over_positions_of_prefix_rows(loss):
    """A window row's training loss equals the mean loss of its prefix rows (same causal model)."""
    from missrec_torchrec.model import losses

    config = replace(SMALL, causal=True, use_id=True)
    model = make_model(config, loss=loss)
    values, lengths, target, user = make_rows(5, config.max_len, seed=7)
    cands = torch.randperm(NUM_ITEMS, generator=torch.Generator().manual_seed(2))[:15]
    window = make_batch(model, (values, lengths, target, user), config.max_len, cands if loss == "sampled_softmax" else None)
    _, out = model.train()(window)
    # The implied prefix rows: position p of a row has history seq[:p+1] and target seq[p+1].
    starts = np.cumsum(lengths) - lengths
    seqs = [list(values[s : s + n]) + [target[i]] for i, (s, n) in enumerate(zip(starts, lengths))]
    pre = [(seq[: p + 1], seq[p + 1]) for seq in seqs for p in range(len(seq) - 1)]
    hist = np.concatenate([h for h, _ in pre])
    tgt = torch.tensor([t for _, t in pre])
    with torch.no_grad():
        _, ev = model.eval()(make_batch(model, (hist, np.array([len(h) for h, _ in pre]), tgt.numpy(), tgt.numpy()),
                                    config.max_len))
    scores = ev["scores"]  # every prefix against the whole catalogue
    if loss == "full_softmax":
        expected = losses.full_softmax_ce(scores, tgt, config.temperature)
    else:
        pos = scores[torch.arange(len(tgt)), tgt]
        logq = losses.expected_logq(cands, cands.numel(), NUM_ITEMS)
        expected = losses.sampled_softmax(pos, scores[:, cands], tgt, cands, config.temperature, neg_logq=logq)
    torch.testing.assert_close(out["main"], expected, rtol=1e-5, atol=1e-5)


def test_window_rows_cover_every_training_target_once(synthetic_mm):
    max_len, bs = 4, 16
    users = pq.read_table(synthetic_mm / "users.parquet").to_pylist()
    windows, covered = Counter(), Counter()
    for u in users:
        items = u["items"]
        for k in range(u["train_end"] - 1, 0, -max_len):  # window ends, newest first
            hist = items[max(0, k - max_len) : k]
            windows[(u["user_index"], items[k], tuple(hist))] += 1
            covered.update((u["user_index"], j) for j in range(k - len(hist) + 1, k + 1))
    # The windows' targets (each history position's next item) are every training target, once.
    assert covered == Counter((u["user_index"], k) for u in users for k in range(1, u["train_end"]))
    s = _stream(synthetic_mm, max_len=max_len, windows=True, batch_size=bs)
    rows = [r for b in s for r in _batch_rows(b)]
    assert len(s) == math.ceil(sum(windows.values()) / bs)
    assert set(rows) == set(windows)
    assert sum((Counter(rows) - windows).values()) == len(rows) - sum(windows.values()) < bs  # only the wrap


# ---- 3. ID-only model ----------------------------------------------------------------------------


def test_id_only_core_scores_with_ids_alone():
    config = replace(SMALL, use_id=True)
    model = make_model(config, dims={})
    assert not model.features and model.head.core.fusion_alpha is None
    batch = make_batch(model, make_rows(8, config.max_len), config.max_len)
    model.eval()
    with torch.no_grad():
        _, out = model(batch)
    ids = model.ids["ids"].embeddings["item_id"].weight
    expected = out["user"] @ torch.nn.functional.normalize(ids, dim=-1).T
    torch.testing.assert_close(out["scores"], expected)
    with pytest.raises(ValueError, match="at least one modality or use_id"):
        MISSRecHead(SMALL, {}, NUM_ITEMS)


def _train(dataset, tmp_path, **extra):
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import train

    from tests.test_train import small_overrides

    settings = {"train.epochs": 3, "log.tensorboard": "false", **extra}
    return train(load_config("ml100k", small_overrides(dataset, tmp_path, **settings)))


def test_id_only_training_learns(synthetic_mm, tmp_path):
    result = _train(synthetic_mm, tmp_path, **{"data.modalities": "[]", "model.use_id": "true"})
    losses = [row["train/loss"] for row in result["history"]]
    assert losses[-1] < losses[0], losses
    first = result["history"][0]  # one next-item target per row
    assert first["train/targets_per_s"] == pytest.approx(first["train/samples_per_s"])
    assert result["test"]["count"] == 240
    assert result["test"]["hr@10"] > 10 / 120, result["test"]  # above chance
    assert "idonly" in result["run_dir"]


def test_causal_bucketed_training_learns(synthetic_mm, tmp_path):
    result = _train(synthetic_mm, tmp_path, **{"model.causal": "true", "data.length_buckets": "true"})
    losses = [row["train/loss"] for row in result["history"]]
    assert losses[-1] < losses[0], losses
    # A window trains every real position: between 1 and max_len (20) targets per row, on average.
    first = result["history"][0]
    assert 1 < first["train/targets_per_s"] / first["train/samples_per_s"] <= 20
    assert result["test"]["count"] == 240
    assert result["test"]["hr@10"] > 0.2, result["test"]


def test_softmax_over_training_items_ignores_the_rest():
    # train.softmax_items=training: items outside the training sequences get no logit and no gradient;
    # the loss is the cross-entropy over the remaining columns only.
    head = MISSRecHead(replace(SMALL, use_id=True), {}, NUM_ITEMS)
    rows = item_state.default_rows(NUM_ITEMS, [], NUM_ITEMS)
    item_state.write_columns(rows, [], in_softmax=torch.arange(NUM_ITEMS) < 30)
    state = head.state(rows)
    head.restrict_softmax = True
    scores = (0.05 * torch.randn(4, NUM_ITEMS, generator=torch.Generator().manual_seed(0))).requires_grad_()
    target = torch.tensor([0, 7, 29, 3])
    loss = head.finetune_loss(None, scores, torch.arange(NUM_ITEMS), target, None, None, torch.ones(4), state,
                              state.at(target))
    expected = torch.nn.functional.cross_entropy(scores[:, :30].detach() / SMALL.temperature, target)
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert scores.grad[:, 30:].abs().sum() == 0 and scores.grad[:, :30].abs().sum() > 0
    head.restrict_softmax = False  # the default: the whole catalogue
    everything = head.finetune_loss(None, scores, torch.arange(NUM_ITEMS), target, None, None, torch.ones(4), state,
                                    state.at(target))
    assert everything > loss


def test_softmax_items_must_be_known(synthetic_mm, tmp_path):
    from missrec_torchrec.config import ConfigError

    with pytest.raises(ConfigError, match="config key train.softmax_items: must be one of all, training"):
        _train(synthetic_mm, tmp_path, **{"train.softmax_items": "new"})
