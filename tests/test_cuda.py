"""The dense model, dropout, precision and ranking on a CUDA GPU, against their CPU results.

Skipped without a GPU (CI has none). On a GPU machine:
    python -m pytest -q -p no:cacheprovider tests/test_cuda.py
These modules import only torch, so they run where TorchRec's GPU build is not installed.
MISSREC_TEST_DEVICE=cpu runs the same checks on the CPU against itself (to check the tests).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from missrec_torchrec import precision
from missrec_torchrec.metrics import RankCounter, target_ranks
from loss_check import loss_before_and_after
from missrec_torchrec.model import MISSRecCore, ModelConfig, discover_interests, full_softmax_ce, interest_tokens
from missrec_torchrec.model.attention import Attention
from missrec_torchrec.model.dropout import fast_dropout

DEVICE = torch.device(os.environ.get("MISSREC_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
)
CONFIG = ModelConfig(hidden=64, heads=4, ffn=48, max_len=12, dropout=0.0, use_id=True)


def _inputs(b=16, length=10, m=9, k=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    lengths[0] = length
    hist_mask = torch.arange(length) < lengths[:, None]
    raw = {"text": torch.randn(b, length, 24, generator=g), "image": torch.randn(b, length, 20, generator=g)}
    tokens = torch.randint(1, k + 1, (b, m), generator=g) * (torch.arange(m) < (lengths[:, None] + 1) // 2)
    centroids = torch.cat([torch.zeros(1, CONFIG.hidden), torch.randn(k, CONFIG.hidden, generator=g)])
    id_emb = torch.randn(b, length, CONFIG.hidden, generator=g) * 0.1
    return raw, hist_mask, tokens, centroids, id_emb


def _moved(x, device):
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def _encode(core, inputs, device, config=CONFIG):
    raw, hist_mask, tokens, centroids, id_emb = (_moved(x, device) for x in inputs)
    u, memory, _ = core.encode(core.adapt(raw), hist_mask, tokens, centroids, id_emb=id_emb)
    return u, memory


def _core(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    return MISSRecCore(config, {"text": 24, "image": 20})


@pytest.mark.parametrize("last_query_only", [False, True])
def test_fp32_user_vectors_and_gradients_equal_the_cpu(last_query_only):
    config = replace(CONFIG, last_query_only=last_query_only)
    cpu = _core(config)
    gpu = _core(config).to(DEVICE)
    inputs = _inputs()
    outs = []
    for core, device in ((cpu, torch.device("cpu")), (gpu, DEVICE)):
        u, memory = _encode(core, inputs, device, config)
        (u.square().sum() + memory.sum()).backward()
        outs.append((u.cpu(), {n: p.grad.cpu() for n, p in core.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-4)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_bf16_autocast_stays_within_the_stated_tolerance_of_fp32():
    core = _core().to(DEVICE).eval()
    inputs = _inputs(b=64)
    with torch.no_grad():
        u32, _ = _encode(core, inputs, DEVICE)
        with precision.autocast("bf16", DEVICE):
            u16, _ = _encode(core, inputs, DEVICE)
    assert u16.dtype == torch.float32  # user vectors leave the model in fp32 whatever the autocast
    assert float((u16 - u32).abs().max()) < 0.02  # the tolerance README and test_speed_paths state
    assert float(F.cosine_similarity(u16, u32).min()) > 0.99


@pytest.mark.parametrize("training", [False, True])
def test_attention_kernels_agree_including_rows_with_no_key(training):
    torch.manual_seed(0)
    b, t, s, d = 8, 5, 7, 64
    query, memory = torch.randn(b, t, d, device=DEVICE), torch.randn(b, s, d, device=DEVICE)
    key_mask = torch.rand(b, s, device=DEVICE) > 0.3
    key_mask[0] = False  # a row with no key at all: its output must be exactly 0
    allowed = torch.rand(t, s, device=DEVICE) > 0.5
    outs = {}
    for kernel in ("math", "sdpa"):
        torch.manual_seed(1)
        attn = Attention(d, 4, dropout=0.0, kernel=kernel).to(DEVICE).train(training)
        outs[kernel] = attn(query, memory, key_mask, allowed)
    torch.testing.assert_close(outs["sdpa"], outs["math"], atol=1e-5, rtol=1e-4)
    assert float(outs["sdpa"][0].detach().abs().max()) == 0.0


@pytest.mark.parametrize("p", [0.5, 0.1])
def test_fast_dropout_keep_rate_scaling_seed_and_backward(p):
    x = torch.ones(1_000_000, device=DEVICE, requires_grad=True)
    torch.manual_seed(3)
    y = fast_dropout(x, p)
    kept = y != 0
    assert abs(float(kept.float().mean()) - (1 - p)) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)), rtol=1e-3, atol=0)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the backward reuses the forward's mask
    torch.manual_seed(3)
    assert torch.equal(fast_dropout(x.detach(), p), y.detach())


def test_rank_counter_in_chunks_equals_the_cpu_with_exclusions():
    g = torch.Generator().manual_seed(0)
    b, n = 32, 500
    scores = torch.randn(b, n, generator=g).round(decimals=1)  # rounded: ties must count the same way
    target = torch.randint(0, n, (b,), generator=g)
    lengths = torch.randint(0, 6, (b,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = torch.randint(0, n, (int(offsets[-1]),), generator=g)
    expected = target_ranks(scores, target, offsets, values)
    s, tgt = scores.to(DEVICE), target.to(DEVICE)
    counter = RankCounter(tgt, s.gather(1, tgt[:, None]).squeeze(1), offsets.to(DEVICE), values.to(DEVICE))
    for lo in range(0, n, 128):
        counter.update(s[:, lo : lo + 128], lo)
    assert torch.equal(counter.ranks().cpu(), expected)


def test_bf16_training_lowers_the_loss_on_planted_groups():
    g = torch.Generator().manual_seed(0)
    n_items, groups, b, length = 64, 4, 128, 8
    group = torch.arange(n_items) % groups
    feats = {m: (torch.randn(groups, d, generator=g) * 2)[group] + 0.5 * torch.randn(n_items, d, generator=g)
             for m, d in (("text", 24), ("image", 20))}
    members = torch.stack([torch.nonzero(group == k).squeeze(1) for k in range(groups)])
    seqs = members[(torch.arange(b) % groups)[:, None], torch.randint(0, members.shape[1], (b, length + 1), generator=g)]
    history, target = seqs[:, :length].to(DEVICE), seqs[:, length].to(DEVICE)
    feats = _moved(feats, DEVICE)
    config = replace(CONFIG, dropout=0.1, interest_ratio=0.25, use_id=False)
    core = _core(config).to(DEVICE)
    opt = torch.optim.Adam(core.parameters(), lr=1e-2)

    def loss_fn():
        with precision.autocast("bf16", DEVICE):
            items = core.adapt(feats)
            with torch.no_grad():
                table, ids = discover_interests({m: v.detach().float() for m, v in items.items()}, config,
                                                generator=torch.Generator().manual_seed(1))  # CPU, as the trainer
            tokens = interest_tokens(history, ids)
            mask = torch.ones_like(history, dtype=torch.bool)
            u, memory, memory_mask = core.encode({m: v[history] for m, v in items.items()}, mask, tokens, table)
            scores = core.score(u.float(), {m: v.float() for m, v in items.items()})
        return full_softmax_ce(scores, target, config.temperature) + config.gamma * core.regulariser(memory, memory_mask)

    before, after = loss_before_and_after(core, opt, loss_fn, steps=30)
    assert after < 0.7 * before, (before, after)
