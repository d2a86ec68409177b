"""The fast paths of issue 10 against their reference paths: fast dropout, history tokens gathered from
the adapted catalogue, the catalogue evaluation engine, bf16 autocast (pairwise fusion: test_fusion.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from datapipes.candidates import Candidates
from datapipes.stream import SequenceStream
from missrec_torchrec import precision
from missrec_torchrec.catalogue import ChunkedBank, HeldCatalogue
from missrec_torchrec.evaluate import evaluate
from missrec_torchrec.model import ModelConfig
from missrec_torchrec.model.attention import Attention
from missrec_torchrec.model.dropout import fast_dropout, quantised
from missrec_torchrec.recommender import ID_TABLE
from test_fast_modes import SMALL, make_batch, make_model, make_rows, randomise_biases
from test_train import small_overrides

# ---- fast dropout --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.5, 0.1, 0.3, 0.25])
def test_fast_dropout_keeps_one_minus_p_and_scales_by_its_inverse(p):
    bits, threshold, keep = quantised(p)
    assert abs(keep - (1 - p)) <= 2**-16
    torch.manual_seed(0)
    x = torch.ones(1_000_003)
    y = fast_dropout(x, p)
    kept = y != 0
    n = x.numel()
    sigma = (keep * (1 - keep) / n) ** 0.5
    assert abs(kept.float().mean().item() - keep) < 5 * sigma
    assert torch.all(y[kept] == torch.tensor(1 / keep))  # every kept element scaled exactly
    assert abs(y.mean().item() - 1.0) < 5 * sigma / keep  # E[output] = input


def test_fast_dropout_is_exact_for_multiples_of_a_256th():
    assert quantised(0.5) == (8, 128, 0.5)
    assert quantised(0.25) == (8, 64, 0.75)
    assert quantised(0.1) == (16, 6554, 1 - 6554 / 65536)


def test_fast_dropout_backward_uses_the_forward_mask():
    torch.manual_seed(1)
    x = torch.randn(64, 7, 30, requires_grad=True)
    y = fast_dropout(x, 0.5)
    g = torch.randn_like(y)
    y.backward(g)
    mask = (y != 0) | (x == 0)
    torch.testing.assert_close(x.grad, g * mask * 2.0)
    torch.testing.assert_close(y, x.detach() * mask * 2.0)


def test_fast_dropout_is_seeded_and_off_outside_training():
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = fast_dropout(x, 0.5)
    torch.manual_seed(3)
    b = fast_dropout(x, 0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, fast_dropout(x, 0.5))  # the generator advanced
    assert fast_dropout(x, 0.5, training=False) is x
    assert fast_dropout(x, 0.0) is x
    assert torch.equal(fast_dropout(x, 1.0), torch.zeros_like(x))


# ---- history tokens gathered from the adapted catalogue ------------------------------------------

CONFIGS = [SMALL, replace(SMALL, use_id=True),
           ModelConfig.paper("transductive_ft", **{k: getattr(SMALL, k) for k in
                                                   ("hidden", "heads", "ffn", "max_len", "dropout", "interest_ratio")})]


@pytest.mark.parametrize("config", CONFIGS, ids=["inductive", "transductive", "paper"])
def test_gathered_history_gives_the_adapted_history_loss_gradients_and_scores(config):
    model = make_model(config)
    rows = make_rows(24, config.max_len)
    padded, trimmed = make_batch(model, rows, config.max_len), make_batch(model, rows, int(rows[1].max()))
    model.train()  # dropout 0: deterministic

    def loss_and_grads(batch, gather):
        model.head.gather_history = gather
        model.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.head.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads(padded, False)
    fast_loss, fast_grads = loss_and_grads(trimmed, True)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert set(fast_grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.eval()
    with torch.no_grad():
        model.head.gather_history = False
        ref = model(padded)[1]
        model.head.gather_history = True
        fast = model(trimmed)[1]
    torch.testing.assert_close(fast["user"], ref["user"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast["scores"], ref["scores"], rtol=1e-5, atol=1e-5)


# ---- the catalogue engine on a real batch, and bf16 ----------------------------------------------


@pytest.fixture(scope="module")
def session(synthetic_mm, tmp_path_factory):
    """A small paper-like transductive model on real (synthetic) data, fp32, dropout off."""
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import Trainer

    out = tmp_path_factory.mktemp("speed")
    cfg = load_config("paper", small_overrides(synthetic_mm, out, **{
        "model.dropout": 0.0, "train.precision": "fp32", "log.tensorboard": "false", "model.max_len": 20,
        "data.eval_batch_size": 64}))
    t = Trainer(cfg)
    t.recluster(0)
    t.dmp.eval()
    return t.session


def _padded_batch(session, split="valid"):
    """The split's first batch, every history padded to max_len, scored against the whole catalogue."""
    stream = SequenceStream(session.info.root, split=split, batch_size=64, max_len=20, kjt_groups=session.kjt_groups,
                            length_buckets=False, with_seen=True, candidates=Candidates("catalogue", session.num_items))
    return next(iter(stream))


def test_fast_users_and_scores_equal_the_padded_forward_on_a_real_batch(session):
    batch = _padded_batch(session)
    assert batch.history.shape[1] == 20 and int(batch.lengths.min()) < 20
    session.head.gather_history = False
    with torch.no_grad():
        _, ref = session.dmp(batch)
    session.head.gather_history = True
    bank = ChunkedBank(session, "fp32")
    u = bank.encode(batch.history, slots=16 * 20)  # cost-sorted sub-batches, each trimmed
    torch.testing.assert_close(u, ref["user"], rtol=1e-5, atol=1e-5)
    everything = bank.chunk(0, session.num_items)
    torch.testing.assert_close(bank.chunk_scores(u, everything), ref["scores"], rtol=1e-5, atol=1e-5)


def test_gathering_models_skip_the_history_lookups_with_the_same_loss_and_gradients(session):
    def first_batch(rows):
        policy = Candidates("catalogue", session.num_items, sequence_rows=rows)
        return next(iter(SequenceStream(session.info.root, split="train", batch_size=64, max_len=20,
                                        kjt_groups=session.kjt_groups, candidates=policy)))

    assert session.head.gathers_rows(session.num_items)
    # The ID table's fused optimizer steps inside backward: both runs start from the same rows.
    state = session.dmp.state_dict()
    ids = state[next(k for k in state if k.endswith("embeddings.item_id.weight"))]
    ids = ids.local_shards()[0].tensor if hasattr(ids, "local_shards") else ids
    start = ids.detach().clone()
    results = []
    session.dmp.train()
    try:
        for rows in (True, False):
            ids.detach().copy_(start)
            full = first_batch(rows)
            history = full.sparse[next(iter(session.kjt_groups))].to_dict()
            assert (history[next(k for k in history if k.endswith(".history"))].values().numel() > 0) == rows
            session.dmp.zero_grad(set_to_none=True)
            loss, _ = session.dmp(full)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in session.dmp.named_parameters() if p.grad is not None}
            results.append((loss.detach(), grads))
    finally:
        session.dmp.eval()
        session.dmp.zero_grad(set_to_none=True)
        ids.detach().copy_(start)
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("self_attention", [True, False])
def test_folded_single_query_attention_equals_the_projected_one_with_gradients(self_attention):
    torch.manual_seed(0)
    b, s, d = 6, 9, 32
    memory = torch.randn(b, s, d, requires_grad=True)
    query = memory[:, 4:5] if self_attention else torch.randn(b, 1, d, requires_grad=True)
    key_mask = torch.rand(b, s) > 0.4
    key_mask[0] = False  # no key at all: the output is exactly 0 either way
    results = []
    for fold in (False, True):
        torch.manual_seed(1)
        attn = Attention(d, 4, dropout=0.0, kernel="sdpa", fold=fold)
        with torch.no_grad():
            attn.in_proj_bias.normal_()  # the key bias must cancel, the value bias must not
        out = attn(query, memory, key_mask)
        grads = torch.autograd.grad(out.square().sum(), [memory, attn.in_proj_weight, attn.in_proj_bias])
        results.append((out, grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert float(results[1][0][0].detach().abs().max()) == 0.0
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_auto_attention_takes_the_faster_cpu_kernel_and_both_kernels_agree():
    cpu, bf16, fp32 = torch.device("cpu"), torch.bfloat16, torch.float32
    with_dropout, without = Attention(32, 4, 0.2, kernel="auto"), Attention(32, 4, 0.0, kernel="auto")
    # bench/attention.py: math when training with dropout or in bf16, SDPA in fp32 without dropout
    assert with_dropout.uses_math(fp32, cpu) and without.uses_math(bf16, cpu)
    assert not without.uses_math(fp32, cpu) and not with_dropout.eval().uses_math(bf16, cpu)
    assert not Attention(32, 4, 0.2, kernel="auto").uses_math(bf16, torch.device("cuda"))
    torch.manual_seed(0)
    x = torch.randn(5, 7, 32, requires_grad=True)
    key_mask = torch.arange(7)[None] >= torch.tensor([0, 2, 4, 6, 7])[:, None]  # the last row has no key
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    results = []
    for kernel in ("math", "sdpa"):
        torch.manual_seed(1)
        attn = Attention(32, 4, 0.0, kernel=kernel)
        out = attn(x, x, key_mask, causal)
        results.append((out, torch.autograd.grad(out.square().sum(), [x, attn.in_proj_weight])))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert float(results[0][0][4].detach().abs().max()) == 0.0
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["math", "single query"])
def test_an_attention_bias_gives_sdpa_s_outputs_and_gradients_on_every_path(path):
    torch.manual_seed(0)
    b, s, d, h = 5, 7, 32, 4
    x = torch.randn(b, s, d, requires_grad=True)
    key_mask = torch.arange(s)[None] >= torch.tensor([0, 2, 4, 6, 7])[:, None]  # the last row has no key
    last = torch.tensor([6, 6, 5, 6, 3])
    t = 1 if path == "single query" else s
    # Two terms that broadcast differently, as the position (per head) and time (per row) biases.
    biases = [torch.randn(h, t, s, requires_grad=True), torch.randn(b, 1, t, s, requires_grad=True)]
    results = []
    for kernel in ("sdpa", "math"):
        torch.manual_seed(1)
        attn = Attention(d, h, 0.0, kernel=kernel, fold=path == "single query" and kernel == "math")
        query = x[torch.arange(b), last].unsqueeze(1) if path == "single query" else x
        out = attn(query, x, key_mask, biases=biases)
        results.append((out, torch.autograd.grad(out.square().sum(), [x, attn.in_proj_weight, *biases])))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert float(results[1][0][4].detach().abs().max()) == 0.0
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.manual_seed(1)  # and the bias is not a no-op
    assert not torch.allclose(Attention(d, h, 0.0)(query, x, key_mask)[:4], results[0][0][:4], atol=1e-3)


@pytest.mark.parametrize("key, name", [("relative_position_bias", "position_bias"), ("relative_time_bias", "time_bias")])
def test_a_relative_bias_starts_at_zero_trains_and_moves_the_user_vectors(key, name):
    config = replace(SMALL, causal=True, use_id=True, **{key: True})
    model = make_model(config)
    plain = make_model(replace(config, **{key: False}))
    assert plain.load_state_dict(model.state_dict(), strict=False).unexpected_keys == [
        f"head.core.decoder.layers.0.{name}"]
    batch = make_batch(model, make_rows(12, config.max_len), config.max_len)
    model.train(), plain.train()  # dropout 0
    loss, out = model(batch)
    # A zero bias is none (SDPA's kernel for a float mask may round differently from a boolean one's)
    torch.testing.assert_close(out["user"], plain(batch)[1]["user"], rtol=1e-6, atol=1e-6)
    loss.backward()
    grad = getattr(model.head.core.decoder.layers[0], name).grad
    assert grad is not None and float(grad.abs().sum()) > 0
    randomise_biases(model.head)
    assert not torch.allclose(model(batch)[1]["user"], out["user"], atol=1e-3)


def test_attention_dropout_applies_to_the_attention_probabilities_alone():
    from missrec_torchrec.model.layers import DecoderLayer

    layer = DecoderLayer(ModelConfig(hidden=32, heads=4, dropout=0.5, attention_dropout=0.0))
    assert (layer.self_attn.dropout, layer.multihead_attn.dropout, layer.drop.p) == (0.0, 0.0, 0.5)
    default = DecoderLayer(ModelConfig(hidden=32, heads=4, dropout=0.3))
    assert (default.self_attn.drop.p, default.multihead_attn.drop.p) == (0.3, 0.3)  # null = model.dropout
    torch.manual_seed(0)
    x = torch.randn(3, 6, 32)
    key_mask = torch.ones(3, 6, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the math path (uses_math) in training
        for attn in (default.self_attn.train(), layer.self_attn.train()):
            draws = attn(x, x, key_mask), attn(x, x, key_mask)
            assert torch.equal(*draws) == (attn is layer.self_attn)  # no draw at attention_dropout 0
        torch.testing.assert_close(draws[0], layer.self_attn.eval()(x, x, key_mask), rtol=2e-2, atol=2e-2)


def test_projected_centroids_give_the_same_user_vectors_and_gradients(session):
    batch = _padded_batch(session)
    head, core = session.head, session.head.core
    bank = ChunkedBank(session, "fp32")
    rows = bank.rows(torch.arange(session.num_items))
    state = bank.state(torch.arange(session.num_items)).at(batch.history)
    safe = batch.history.clamp(min=0)
    results = []
    for project in (False, True):
        core.config = replace(core.config, project_centroids=project)
        users = bank.encode(batch.history)
        core.train()  # dropout is 0 here: training mode only turns the gradients' path on
        core.zero_grad(set_to_none=True)
        adapted = {m: F.embedding(safe, rows[m]) for m in bank.modalities}
        u, _, _ = head.encode(batch.history, adapted, F.embedding(safe, rows[ID_TABLE]), state)
        u.square().sum().backward()
        core.eval()
        results.append((users, u.detach(), {n: p.grad for n, p in core.named_parameters() if p.grad is not None}))
    assert core.config.project_centroids and head.centroids.shape[0] < batch.history.numel()
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-6)
    assert any("encoder" in name for name in results[0][2]) and results[0][2].keys() == results[1][2].keys()
    for name, grad in results[0][2].items():
        torch.testing.assert_close(results[1][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    core.zero_grad(set_to_none=True)


@pytest.mark.parametrize("masked", [False, True])
def test_catalogue_engine_metrics_equal_the_forward_engine_and_do_not_depend_on_chunks(session, masked):
    ev = session.cfg.eval
    ev.mask_history = masked
    results = {}
    for engine, chunk, held in [("dmp", 8192, "auto"), ("catalogue", 8192, "held"), ("catalogue", 7, "held"),
                                ("catalogue", 8192, "rank_local"), ("catalogue", 7, "rank_local")]:
        ev.engine, ev.chunk_items, ev.catalogue = engine, chunk, held
        results[engine, chunk, held] = evaluate(session, "valid")
    ev.engine, ev.chunk_items, ev.mask_history, ev.catalogue = "catalogue", 8192, False, "auto"
    for held in ("held", "rank_local"):  # chunking changes nothing, nor holding the catalogue
        assert results["catalogue", 7, held] == results["catalogue", 8192, held] == results["catalogue", 8192, "held"]
    ref = results["dmp", 8192, "auto"]
    assert ref["count"] == 240
    for key, value in results["catalogue", 8192, "held"].items():
        assert value == pytest.approx(ref[key], abs=1e-9), key


# bf16 tolerance (stated in README): unit user vectors within 0.02 per coordinate and 0.99 cosine of
# fp32's, fused scores within 0.02 (cosines in [-1, 1]).
BF16_ATOL = 0.02


def test_bf16_stays_within_the_stated_tolerance_of_fp32(session):
    batch = _padded_batch(session)
    fp32 = ChunkedBank(session, "fp32")
    bf16 = ChunkedBank(session, "bf16")
    u32, u16 = fp32.encode(batch.history), bf16.encode(batch.history)
    assert u16.dtype == torch.float32
    assert not torch.equal(u16, u32)  # autocast really ran in bf16
    torch.testing.assert_close(u16, u32, rtol=0, atol=BF16_ATOL)
    assert float((u16 * u32).sum(-1).min()) > 0.99
    n = session.num_items
    s32, s16 = fp32.chunk_scores(u32, fp32.chunk(0, n)), bf16.chunk_scores(u16, bf16.chunk(0, n))
    torch.testing.assert_close(s16, s32, rtol=0, atol=BF16_ATOL)


@pytest.mark.parametrize("precision_", ["fp32", "bf16"])
def test_held_catalogue_encodes_and_scores_targets_as_the_looked_up_rows(session, precision_):
    batch = _padded_batch(session)
    bank = ChunkedBank(session, precision_)
    held = HeldCatalogue.of(bank, 7, users=True)  # adapted 7 items at a time, not a batch's distinct ids
    u, target_scores = bank.encode_with_targets(batch.history, batch.target)
    held_u, held_scores = held.encode_with_targets(batch.history, batch.target)
    # The same rows up to the adapter matmul's rounding, which in fp32 depends on its row count (~1e-7).
    torch.testing.assert_close(held_u, u, rtol=0, atol=1e-6)
    torch.testing.assert_close(held_scores, target_scores, rtol=0, atol=1e-6)
    assert torch.equal(held.encode(batch.history), held_u)


def test_precision_auto_follows_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert precision.resolve("auto", cpu) == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx2"})
    assert precision.resolve("auto", cpu) == "fp32"
    assert precision.resolve("bf16", cpu) == "bf16" and precision.resolve("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="train.precision"):
        precision.resolve("fp16", cpu)


@pytest.mark.parametrize("layers, position_bias, time_bias", [(1, False, False), (2, False, False), (2, True, False),
                                                             (2, True, True)])
def test_last_query_only_gives_every_position_s_user_vectors_and_gradients(layers, position_bias, time_bias):
    config = replace(CONFIGS[2], n_dec_layers=layers, relative_position_bias=position_bias, relative_time_bias=time_bias)
    model = make_model(config)
    # The last layer's single query then reads its own column of offsets and time buckets.
    randomise_biases(model.head)
    batch = make_batch(model, make_rows(24, config.max_len), config.max_len)
    model.train()  # dropout 0

    def run(last_only):
        model.head.core.config = replace(config, last_query_only=last_only)
        model.zero_grad()
        loss, out = model(batch)
        loss.backward()
        return out["user"].detach(), {n: p.grad.clone() for n, p in model.head.named_parameters() if p.grad is not None}

    (u_ref, g_ref), (u_fast, g_fast) = run(False), run(True)
    torch.testing.assert_close(u_fast, u_ref, rtol=1e-5, atol=1e-6)
    for name, grad in g_ref.items():
        torch.testing.assert_close(g_fast[name], grad, rtol=1e-4, atol=1e-6, msg=name)
