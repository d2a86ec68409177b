"""Dynamic fusion (model/fusion.py) and the core's scoring on it: the paper's formula written out by
hand, missing modalities, the in-place inference form, per-row candidates, gradients, and the upper
bound that certifies approximate top-K. Pure torch: no TorchRec, no files."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from missrec_torchrec.model import MISSRecCore, ModelConfig
from missrec_torchrec.model.fusion import fuse, upper_bound

torch.set_num_threads(1)

SMALL = ModelConfig(hidden=16, heads=4, ffn=24, max_len=8, dropout=0.0)


def _fusion_core(fusion, use_id, n_items=7):
    core = MISSRecCore(replace(SMALL, fusion=fusion, use_id=use_id), {"text": 12, "image": 10}, num_items=n_items)
    if core.fusion_alpha is not None:
        with torch.no_grad():
            core.fusion_alpha.copy_(torch.linspace(-2.0, 3.0, core.fusion_alpha.numel()).view_as(core.fusion_alpha))
    return core


@pytest.mark.parametrize("fusion", ["dynamic_shared", "dynamic_instance", "static"])
@pytest.mark.parametrize("use_id", [False, True])
def test_dynamic_fusion_matches_the_formula(fusion, use_id):
    g = torch.Generator().manual_seed(1)
    core = _fusion_core(fusion, use_id)
    u = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    items = {"text": torch.randn(7, 16, generator=g), "image": torch.randn(7, 16, generator=g)}
    ids = torch.randn(7, 16, generator=g)
    got = core.score(u, items, ids if use_id else None).detach()
    for b in range(3):
        for j in range(7):
            st = float(u[b] @ items["text"][j]) / float(items["text"][j].norm())
            sv = float(u[b] @ items["image"][j]) / float(items["image"][j].norm())
            if fusion == "static":
                fused = (st + sv) / 2
            else:
                a = float((core.fusion_alpha if fusion == "dynamic_shared" else core.fusion_alpha[j]).detach())
                wt = math.exp(a * st) / (math.exp(a * st) + math.exp(a * sv))
                fused = wt * st + (1 - wt) * sv
            if use_id:
                fused = (float(u[b] @ ids[j]) / float(ids[j].norm()) + 2 * fused) / 3
            assert abs(float(got[b, j]) - fused) < 1e-5

    # Per-pair scoring agrees with the catalogue scoring on each row's own candidates.
    cand = torch.tensor([[0, 3], [6, 6], [2, 1]])
    pairs = core.score(u, {m: v[cand] for m, v in items.items()}, ids[cand] if use_id else None, item_index=cand)
    assert torch.allclose(pairs, got.gather(1, cand), atol=1e-6)


def test_fusion_skips_missing_modalities_when_masking():
    core = _fusion_core("dynamic_shared", False)
    u = F.normalize(torch.randn(2, 16), dim=-1)
    items = {"text": torch.randn(3, 16), "image": torch.randn(3, 16)}
    present = {"text": torch.tensor([True, True, False]), "image": torch.tensor([True, False, False])}
    got = core.score(u, items, present=present)
    full = core.score(u, items)
    text_only = u @ F.normalize(items["text"], dim=-1).T
    assert torch.allclose(got[:, 0], full[:, 0])
    assert torch.allclose(got[:, 1], text_only[:, 1], atol=1e-6)
    assert torch.equal(got[:, 2], torch.zeros(2))


def test_single_modality_uses_the_reference_dot_product():
    core = MISSRecCore(replace(SMALL, use_id=True), {"text": 12})
    assert core.fusion_alpha is None
    u = F.normalize(torch.randn(2, 16), dim=-1)
    items, ids = {"text": torch.randn(4, 16)}, torch.randn(4, 16)
    assert torch.allclose(core.score(u, items, ids), u @ F.normalize(items["text"] + ids, dim=-1).T)


# Every model with a cosine form: several modalities (+- IDs), one modality, IDs only.
SHAPES = [(("text", "image"), False), (("text", "image"), True), (("text", "image", "audio"), False),
          (("text", "image", "audio"), True), (("text",), False), ((), True)]


@pytest.mark.parametrize("fusion", ["dynamic_shared", "dynamic_instance", "static"])
@pytest.mark.parametrize("modalities,use_id", SHAPES)
@pytest.mark.parametrize("mask_missing", [True, False])
def test_fuse_equals_score(fusion, modalities, use_id, mask_missing):
    """`MISSRecCore.fuse` on cosines = `score` on vectors (catalogue and per-row candidates), every fusion variant,
    missing modalities (items with none too) and a large alpha (the max-shifted branch)."""
    cfg = ModelConfig(hidden=16, heads=2, ffn=32, fusion=fusion, use_id=use_id, mask_missing_modality=mask_missing)
    core = MISSRecCore(cfg, {m: 8 for m in modalities}, num_items=40)
    gen = torch.Generator().manual_seed(1)
    items = {m: torch.randn(40, 16, generator=gen) for m in modalities}
    present = {m: torch.rand(40, generator=gen) > 0.3 for m in modalities}
    for p in present.values():
        p[:3] = False  # items 0-2 have no modality at all
    ids = torch.randn(40, 16, generator=gen) if use_id else None
    u = F.normalize(torch.randn(5, 16, generator=gen), dim=-1)
    unit = lambda v: F.normalize(v, dim=-1)  # noqa: E731
    with torch.no_grad():
        for alpha in (0.7, 120.0):
            if core.fusion_alpha is not None:
                core.fusion_alpha.fill_(alpha)
            sims = {m: u @ unit(v).T for m, v in items.items()}
            id_sim = u @ unit(ids).T if use_id else None
            want = core.score(u, items, ids, present)
            np.testing.assert_allclose(core.fuse(sims, id_sim, present), want, atol=1e-6)
            pick = torch.randint(0, 40, (5, 7), generator=gen)  # per-row candidates
            pairs = core.score(u, {m: v[pick] for m, v in items.items()}, ids[pick] if use_id else None,
                               {m: p[pick] for m, p in present.items()}, item_index=pick)
            got = core.fuse({m: s.gather(1, pick) for m, s in sims.items()},
                            id_sim.gather(1, pick) if use_id else None, {m: p[pick] for m, p in present.items()},
                            item_index=pick)
            np.testing.assert_allclose(got, pairs, atol=1e-6)


def _softmax_fusion(s1, s2, p1, p2, alpha):
    """The paper's formula written out: softmax over modalities of alpha * s, missing ones masked."""
    s = torch.stack([s1, s2], -1)
    p = torch.stack(torch.broadcast_tensors(p1, p2), -1).expand_as(s)
    logits = (s * alpha.unsqueeze(-1)).masked_fill(~p & p.any(-1, keepdim=True), float("-inf"))
    return (F.softmax(logits, -1) * s * p).sum(-1)


@pytest.mark.parametrize("fusion", ["dynamic_shared", "dynamic_instance"])
def test_pair_fusion_equals_the_softmax_over_modalities_with_gradients(fusion):
    torch.manual_seed(2)
    core = MISSRecCore(replace(SMALL, fusion=fusion), {"text": 12, "image": 8}, num_items=9).double()
    with torch.no_grad():
        core.fusion_alpha.copy_(torch.randn(core.fusion_alpha.shape, dtype=torch.float64))
    u = F.normalize(torch.randn(6, 16, dtype=torch.float64), dim=-1)
    items = {m: torch.randn(9, 16, dtype=torch.float64, requires_grad=True) for m in ("text", "image")}
    present = {"text": torch.tensor([1, 1, 0, 0, 1, 1, 0, 1, 1], dtype=torch.bool),  # item 3: neither
               "image": torch.tensor([1, 0, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)}
    fast = core.score(u, items, present=present)
    alpha = core.fusion_alpha
    cos = {m: u @ F.normalize(v, dim=-1).T for m, v in items.items()}
    ref = _softmax_fusion(cos["text"], cos["image"], present["text"], present["image"], alpha)
    torch.testing.assert_close(fast, ref)
    leaves = (items["text"], items["image"], alpha)
    for a, b in zip(torch.autograd.grad(fast.sum(), leaves), torch.autograd.grad(ref.sum(), leaves)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n_modalities", [1, 2, 3])
@pytest.mark.parametrize("use_id", [False, True])
def test_upper_bound_holds_for_every_item_whose_cosines_are_below_the_bounds(n_modalities, use_id):
    """What the certificate of `topk.approx_topk` relies on: with every cosine at most its bound, no fused score (any
    alpha, any missing modalities) exceeds `upper_bound`; and an item at the bounds can reach it."""
    gen = torch.Generator().manual_seed(n_modalities + 10 * use_id)
    rows, items = 64, 500
    bounds = [torch.rand(rows, 1, generator=gen) * 2 - 1 for _ in range(n_modalities)]
    id_bound = torch.rand(rows, 1, generator=gen) * 2 - 1 if use_id else None
    below = lambda b: b - torch.rand(rows, items, generator=gen) * (b + 1)  # noqa: E731  in [-1, b]
    sims = [below(b) for b in bounds]
    id_sim = below(id_bound) if use_id else None
    present = [torch.rand(items, generator=gen) > 0.3 for _ in range(n_modalities)]
    bound = upper_bound([b.squeeze(1) for b in bounds], None if id_bound is None else id_bound.squeeze(1))
    for alpha in (torch.tensor(0.0), torch.tensor(-7.0), torch.tensor(25.0), torch.randn(items, generator=gen) * 5):
        for pres in (None, present):
            fused = fuse(sims, pres, alpha, id_sim)
            assert bool((fused <= bound.unsqueeze(1) + 1e-6).all())
            planes = fuse(sims, pres, alpha, id_sim, inference=True) if n_modalities > 1 else None
            if planes is not None:
                assert bool((planes <= bound.unsqueeze(1) + 1e-6).all())
    # Tight: every modality at the largest bound (and the ID cosine at its bound) scores the bound.
    top = torch.stack(bounds).amax(0).clamp(min=0)
    at_bound = fuse([top.clone() for _ in bounds], None, torch.tensor(1.0), id_bound)
    torch.testing.assert_close(at_bound.squeeze(1), bound)


def test_fuse_of_three_modalities_matches_a_hand_computation():
    s = [torch.tensor([[0.2, -0.5]]), torch.tensor([[0.9, 0.1]]), torch.tensor([[-0.3, 0.4]])]
    present = [torch.tensor([True, True]), torch.tensor([True, False]), torch.tensor([False, True])]
    alpha, id_sim = torch.tensor(2.0), torch.tensor([[0.5, -1.0]])
    want = []
    for j in range(2):
        real = [(float(x[0, j])) for x, p in zip(s, present) if p[j]]
        weights = [math.exp(2.0 * x) for x in real]
        fused = sum(w * x for w, x in zip(weights, real)) / sum(weights)
        want.append((float(id_sim[0, j]) + 2 * fused) / 3)
    got = fuse(s, present, alpha, id_sim)
    np.testing.assert_allclose(got[0].tolist(), want, rtol=1e-6)
    np.testing.assert_allclose(fuse(s, present, alpha, id_sim, inference=True)[0].tolist(),
                               want, rtol=1e-6)


def test_one_plane_with_ids_is_refused():
    with pytest.raises(ValueError, match="summed vector"):
        fuse([torch.zeros(2, 3)], None, None, torch.zeros(2, 3), inference=True)
