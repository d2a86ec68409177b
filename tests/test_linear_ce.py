"""The blocked full-softmax cross-entropy equals the B x N reference, values and gradients."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from missrec_torchrec.model import MISSRecCore, ModelConfig
from missrec_torchrec.model import linear_ce
from missrec_torchrec.model.linear_ce import linear_cross_entropy

torch.set_num_threads(1)


@pytest.fixture
def small_blocks(monkeypatch):
    # 16-row blocks over 40 items: a batch of 50 rows crosses four blocks, the last one partial.
    monkeypatch.setattr(linear_ce, "BLOCK_ELEMENTS", 16 * 40)


def _grads(loss_fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_cross_entropy_of_the_full_logits(small_blocks, with_bias):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(50, 8, generator=g, dtype=torch.float64)
    items = torch.randn(40, 8, generator=g, dtype=torch.float64)
    target = torch.randint(0, 40, (50,), generator=g)
    bias = None
    if with_bias:  # a constant per item, -inf for items that are no candidate (never a target here)
        bias = torch.randn(40, generator=g, dtype=torch.float64)
        bias[torch.tensor([3, 17])] = float("-inf")
        target = torch.where((target == 3) | (target == 17), 0, target)
    weight = torch.rand(50, generator=g, dtype=torch.float64)
    weight[:5] = 0  # rows padded in

    def reference(u, items):
        logits = u @ items.T + (0 if bias is None else bias)
        return 3 * (F.cross_entropy(logits, target, reduction="none") * weight).sum() / weight.sum()

    def fused(u, items):  # the 3: the backward scales by the loss's incoming gradient
        return 3 * linear_cross_entropy(u, items, target, bias, weight)

    want, want_grads = _grads(reference, u, items)
    got, got_grads = _grads(fused, u, items)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_block_rows_bounded_for_any_catalogue():
    assert linear_ce.block_rows(10) == 4096
    assert linear_ce.block_rows(10**8) == 16
    assert linear_ce.block_rows(3706) * 3706 <= linear_ce.BLOCK_ELEMENTS


def _core(modalities, **kw):
    cfg = replace(ModelConfig(hidden=16, heads=4, ffn=24, max_len=8, dropout=0.0), **kw)
    torch.manual_seed(0)
    return MISSRecCore(cfg, {m: 12 for m in modalities})


@pytest.mark.parametrize(
    "modalities,kw",
    [
        ([], dict(use_id=True)),
        (["text"], {}),
        (["text"], dict(use_id=True, pad_negative=True)),
        (["text"], dict(use_id=True, mask_missing_modality=True)),
    ],
)
def test_core_full_softmax_loss_equals_scoring_the_catalogue(small_blocks, modalities, kw):
    """What training uses (no B x N matrix) against what it replaced: score, pad column, mask, CE."""
    core = _core(modalities, **kw)
    g = torch.Generator().manual_seed(1)
    n = 40
    u = F.normalize(torch.randn(50, 16, generator=g), dim=-1).requires_grad_()
    raw = {m: torch.randn(n, 12, generator=g) for m in modalities}
    item_id = torch.randn(n, 16, generator=g).requires_grad_() if core.config.use_id else None
    present = {m: torch.rand(n, generator=g) > 0.2 for m in modalities}
    keep = torch.rand(n, generator=g) > 0.1
    target = torch.where(keep, torch.arange(n), 0)[torch.randint(0, n, (50,), generator=g)]
    keep[0] = True

    def reference():
        scores = core.score(u, core.adapt(raw), item_id, present=present).masked_fill(~keep, float("-inf"))
        if core.config.pad_negative:
            scores = torch.cat([scores, core.pad_scores(u)], dim=1)
        return F.cross_entropy(scores / core.config.temperature, target)

    def fused():
        return core.full_softmax_loss(u, core.adapt(raw), item_id, present, target, keep)

    leaves = [u] + ([item_id] if item_id is not None else []) + list(core.parameters())
    results = []
    for fn in (reference, fused):
        loss = fn()
        results.append((loss.detach(), torch.autograd.grad(loss, leaves, allow_unused=True)))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_several_modalities_fuse_non_linearly_and_fall_back():
    core = _core(["text", "image"])
    assert not core.linear_score
    items = {m: torch.randn(5, 16) for m in ("text", "image")}
    assert core.full_softmax_loss(torch.randn(3, 16), items, None, None, torch.tensor([0, 1, 2])) is None


def test_head_trains_only_the_softmax_items_on_the_linear_path():
    """train.softmax_items=training through the head: its linear loss equals the score-matrix loss
    with the flagged items only, and no gradient reaches the others' ID rows."""
    from missrec_torchrec import item_state
    from missrec_torchrec.recommender import MISSRecHead

    n = 40
    head = MISSRecHead(replace(ModelConfig(hidden=16, heads=4, ffn=24, max_len=8, dropout=0.0), use_id=True), {}, n)
    assert head.linear_softmax
    rows = item_state.default_rows(n, [], n)
    item_state.write_columns(rows, [], in_softmax=torch.arange(n) < 30)
    state = head.state(rows)
    head.restrict_softmax = True
    g = torch.Generator().manual_seed(2)
    u = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    ids = torch.randn(n, 16, generator=g).requires_grad_()
    target = torch.tensor([0, 7, 29, 3, 12, 5])
    loss = head.linear_loss(u, ({}, ids), state, target, torch.ones(6))
    scores = head.core.score(u, {}, ids)
    torch.testing.assert_close(loss, F.cross_entropy(scores[:, :30] / head.config.temperature, target))
    loss.backward()
    assert ids.grad[30:].abs().sum() == 0 and ids.grad[:30].abs().sum() > 0
