"""MISSRec core: parameter counts, parity with nn.Transformer, regulariser, losses, augmentations (fusion: test_fusion.py)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loss_check import loss_before_and_after
from missrec_torchrec.model import (
    MISSRecCore,
    ModelConfig,
    discover_interests,
    expected_logq,
    feature_swap,
    from_reference_state_dict,
    full_softmax_ce,
    interest_regulariser,
    interest_tokens,
    item_drop,
    peft_trainable,
    sampled_softmax,
    seq_item_infonce,
    seq_seq_infonce,
)

torch.set_num_threads(1)

SMALL = ModelConfig(hidden=16, heads=4, ffn=24, max_len=8, dropout=0.0)


def _count(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def test_parameter_counts_match_the_reference_logs():
    core = MISSRecCore(ModelConfig.paper("inductive_ft"), {"text": 512, "image": 512})
    assert _count(core) == 1_719_513  # from scratch, inductive (docs/model.md §10)
    assert peft_trainable(core) == 308_401  # adapters + input LayerNorm + alpha
    assert _count(core, trainable_only=True) == 308_401
    assert not any(p.requires_grad for p in core.encoder.parameters())
    assert not any(p.requires_grad for p in core.decoder.parameters())
    assert not core.positions.weight.requires_grad


def test_config_paper_reproduces_and_defaults_fix():
    paper = ModelConfig.paper("pretrain")
    assert paper.interest_ratio == 0.02 and not paper.use_id
    assert paper.kmeans_single_pass and paper.regulariser_reference and not paper.mask_missing_modality
    assert ModelConfig.paper().use_id and ModelConfig.paper(interest_ratio=0.3).interest_ratio == 0.3
    fixed = ModelConfig()
    assert fixed.mask_missing_modality and fixed.mask_duplicate_targets and not fixed.kmeans_single_pass
    assert ModelConfig.from_dict(paper.to_dict()) == paper
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({"hiden": 3})
    with pytest.raises(ValueError, match="fusion"):
        ModelConfig(fusion="sum")


def make_batch(b=5, length=6, m=7, k=9, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length, 1, 3, length - 1, 2][:b])
    hist_mask = torch.arange(length) < lengths[:, None]
    raw = {"text": torch.randn(b, length, 12, generator=g), "image": torch.randn(b, length, 10, generator=g)}
    tokens = torch.randint(1, k + 1, (b, m), generator=g)
    tokens[1, 2:] = 0
    tokens[2, 5:] = 0
    centroids = torch.cat([torch.zeros(1, dim), torch.randn(k, dim, generator=g)])
    return raw, hist_mask, tokens, centroids


def test_encode_matches_nn_transformer_with_the_reference_forward():
    torch.manual_seed(0)
    trm = nn.Transformer(
        d_model=16, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=24,
        dropout=0.0, activation="gelu", layer_norm_eps=1e-12, batch_first=True,
    )
    with torch.no_grad():  # at init LayerNorms are (1, 0) and a final LN after a post-LN layer is a no-op
        for p in trm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    core = MISSRecCore(SMALL, {"text": 12, "image": 10})
    mine, rest = from_reference_state_dict({f"trm_model.{k}": v for k, v in trm.state_dict().items()})
    assert rest == {}
    missing, unexpected = core.load_state_dict(mine, strict=False)
    assert unexpected == [] and all(not k.startswith(("encoder.", "decoder.")) for k in missing)

    raw, hist_mask, tokens, centroids = make_batch()
    adapted = core.adapt(raw)
    u, memory, memory_mask = core.encode(adapted, hist_mask, tokens, centroids)

    # The reference forward (missrec.py), on torch's own Transformer; train mode avoids its
    # inference fast path, dropout is 0.
    trm.train()
    x = adapted["text"] + adapted["image"] + core.positions.weight[: hist_mask.shape[1]]
    h = core.input_norm(x)
    ref_memory = trm.encoder(centroids[tokens], src_key_padding_mask=tokens == 0)
    y = trm.decoder(h, ref_memory, tgt_key_padding_mask=~hist_mask, memory_key_padding_mask=tokens == 0)
    ref_u = F.normalize(y[torch.arange(5), hist_mask.sum(1) - 1], dim=-1)
    assert torch.allclose(memory, ref_memory, atol=1e-5)
    assert torch.allclose(u, ref_u, atol=1e-5)
    assert torch.equal(memory_mask, tokens != 0)


def test_user_vector_ignores_padding_and_interest_order():
    core = MISSRecCore(SMALL, {"text": 12, "image": 10}).eval()
    raw, hist_mask, tokens, centroids = make_batch()
    u, _, _ = core.encode(core.adapt(raw), hist_mask, tokens, centroids)
    assert torch.allclose(u.norm(dim=-1), torch.ones(5))
    # Garbage in pad positions, more pad columns, shuffled interest tokens: same user vectors.
    noisy = {m: torch.where(hist_mask[..., None], x, torch.randn_like(x) * 9) for m, x in raw.items()}
    wider = {m: torch.cat([x, torch.randn(5, 2, x.shape[-1])], 1) for m, x in noisy.items()}
    wider_mask = torch.cat([hist_mask, torch.zeros(5, 2, dtype=torch.bool)], 1)
    shuffled = tokens[:, torch.randperm(tokens.shape[1])]
    u2, _, _ = core.encode(core.adapt(wider), wider_mask, shuffled, centroids)
    assert torch.allclose(u, u2, atol=1e-5)
    # The last real item matters.
    changed = {m: x.clone() for m, x in raw.items()}
    changed["text"][2, 2] += 1.0
    u3, _, _ = core.encode(core.adapt(changed), hist_mask, tokens, centroids)
    assert not torch.allclose(u[2], u3[2]) and torch.allclose(u[0], u3[0])
    # A row without interest tokens stays finite.
    empty = tokens.clone()
    empty[3] = 0
    u4, _, _ = core.encode(core.adapt(raw), hist_mask, empty, centroids)
    assert torch.isfinite(u4).all()


@pytest.mark.parametrize("mask_missing", [True, False])
def test_missing_modality_masking_in_tokens(mask_missing):
    core = MISSRecCore(replace(SMALL, mask_missing_modality=mask_missing), {"text": 12, "image": 10}).eval()
    raw, hist_mask, tokens, centroids = make_batch()
    present = {"text": torch.ones_like(hist_mask), "image": torch.rand(hist_mask.shape) < 0.5}
    u, _, _ = core.encode(core.adapt(raw), hist_mask, tokens, centroids, present=present)
    other = dict(raw, image=torch.where(present["image"][..., None], raw["image"], raw["image"] + 3))
    u2, _, _ = core.encode(core.adapt(other), hist_mask, tokens, centroids, present=present)
    assert torch.allclose(u, u2, atol=1e-6) == mask_missing


@pytest.mark.parametrize("reference", [True, False])
def test_regulariser_matches_the_formula(reference):
    g = torch.Generator().manual_seed(2)
    memory = torch.randn(4, 5, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    total = 0.0
    for b in range(4):
        real = [m for m in range(5) if mask[b, m]]
        if reference:
            pooled = (len(real) / 5) * sum(memory[b, m] for m in range(5))
        else:
            pooled = sum(memory[b, m] for m in real) / len(real)
        total += float(pooled @ pooled) / 6
    expected = total if reference else total / 4
    assert abs(float(interest_regulariser(memory, mask, reference)) - expected) < 1e-5


def test_sampled_softmax_with_all_items_equals_full_softmax():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 11, generator=g)
    target = torch.tensor([0, 4, 4, 10, 7, 2])
    full = full_softmax_ce(scores, target, 0.07)
    all_items = torch.arange(11)
    # Every item is a candidate once: uniform log-Q (any number of draws) changes nothing.
    logq = expected_logq(all_items, draws=5, num_items=11)
    pos = scores.gather(1, target[:, None]).squeeze(1)
    pos_logq = expected_logq(target, draws=5, num_items=11)
    got = sampled_softmax(pos, scores, target, all_items, 0.07, pos_logq, logq)
    assert torch.allclose(got, full, atol=1e-6)
    # Popularity log-Q is subtracted from every logit, positives included.
    probs = torch.rand(11, generator=g) + 0.1
    probs /= probs.sum()
    corrected = F.cross_entropy(scores / 0.07 - torch.log(5 * probs), target)
    got = sampled_softmax(pos, scores, target, all_items, 0.07,
                          expected_logq(target, 5, 11, probs), expected_logq(all_items, 5, 11, probs))
    assert torch.allclose(got, corrected, atol=1e-5)


def test_in_batch_infonce_masks_duplicate_targets_and_dead_rows():
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(4, 4, generator=g)
    target = torch.tensor([3, 5, 3, 7])
    plain = seq_item_infonce(scores, 0.5)
    assert torch.allclose(plain, F.cross_entropy(scores / 0.5, torch.arange(4)))
    masked = seq_item_infonce(scores, 0.5, target)
    expected = 0.0
    for a in range(4):
        negatives = [b for b in range(4) if b == a or target[b] != target[a]]
        logits = scores[a, negatives] / 0.5
        expected += float(torch.logsumexp(logits, 0) - scores[a, a] / 0.5) / 4
    assert abs(float(masked) - expected) < 1e-5 and float(masked) < float(plain)
    # A zero-weight row is neither a row of the loss nor anyone's negative.
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0])
    keep = torch.tensor([0, 1, 3])
    assert torch.allclose(seq_item_infonce(scores, 0.5, weight=weight), seq_item_infonce(scores[keep][:, keep], 0.5))
    u, v = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    assert torch.allclose(seq_seq_infonce(u, v, 0.07), F.cross_entropy(u @ v.T / 0.07, torch.arange(4)))


def test_item_drop_keeps_first_item_and_order_and_moves_modalities_together():
    g = torch.Generator().manual_seed(5)
    b, length = 2000, 50
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    valid = torch.arange(length) < lengths[:, None]
    history = torch.where(valid, torch.randint(0, 1000, (b, length), generator=g), -1)
    drop = item_drop(valid, 0.2, torch.Generator().manual_seed(9))
    again = item_drop(valid, 0.2, torch.Generator().manual_seed(9))
    assert torch.equal(drop.index, again.index) and torch.equal(drop.valid, again.valid)
    new_history = drop.apply(history, fill=-1)
    assert torch.equal(new_history[:, 0], history[:, 0])
    assert torch.equal(new_history >= 0, drop.valid) and (drop.lengths >= 1).all()
    dropped = 1 - (drop.lengths - 1).sum() / (lengths - 1).sum()  # position 0 is never dropped
    assert abs(float(dropped) - 0.2) < 0.01
    for row in range(0, b, 97):  # kept items are a subsequence of the original, in order
        old, new = history[row][history[row] >= 0].tolist(), new_history[row][new_history[row] >= 0].tolist()
        it = iter(old)
        assert all(x in it for x in new)
    # Every modality and flag moves with the ids (quirk 2 fixed).
    text = history.clamp(min=0).float()[..., None] * torch.tensor([1.0, 2.0])
    image = history.clamp(min=0).float()[..., None] * -3.0
    new_text, new_image = drop.apply(text), drop.apply(image)
    ids = new_history.clamp(min=0).float()
    assert torch.equal(new_text[..., 1], 2 * ids) and torch.equal(new_image[..., 0], -3 * ids)


def test_feature_swap_takes_the_alternative_where_present():
    g = torch.Generator().manual_seed(6)
    base, alt = torch.zeros(400, 50, 3), torch.ones(400, 50, 3)
    present = torch.rand(400, 50, generator=g) < 0.5
    out = feature_swap(base, alt, 0.2, torch.Generator().manual_seed(1), present)
    swapped = out[..., 0] == 1
    assert not (swapped & ~present).any()
    assert abs(float(swapped[present].float().mean()) - 0.2) < 0.01
    assert torch.equal(out, feature_swap(base, alt, 0.2, torch.Generator().manual_seed(1), present))


def test_training_reduces_the_loss_on_planted_structure():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n_items, groups, dim = 48, 4, 8
    group = torch.arange(n_items) % groups
    centres = {m: torch.randn(groups, dim, generator=g) * 2 for m in ("text", "image")}
    features = {m: c[group] + 0.5 * torch.randn(n_items, dim, generator=g) for m, c in centres.items()}
    # Each user stays in one group; the target is another item of that group.
    b, length = 64, 6
    user_group = torch.arange(b) % groups
    members = torch.stack([torch.nonzero(group == k).squeeze(1) for k in range(groups)])  # groups x 12
    picks = torch.randint(0, members.shape[1], (b, length + 1), generator=g)
    seqs = members[user_group[:, None], picks]
    history, target = seqs[:, :length], seqs[:, length]
    hist_mask = torch.ones(b, length, dtype=torch.bool)

    config = replace(SMALL, dropout=0.1, interest_ratio=0.25)
    core = MISSRecCore(config, {"text": dim, "image": dim})
    opt = torch.optim.Adam(core.parameters(), lr=1e-2)

    def loss_fn():
        items = core.adapt(features)
        with torch.no_grad():
            table, ids = discover_interests({m: v.detach() for m, v in items.items()}, config, generator=torch.Generator().manual_seed(1))
        tokens = interest_tokens(history, ids)
        u, memory, memory_mask = core.encode({m: v[history] for m, v in items.items()}, hist_mask, tokens, table)
        ce = full_softmax_ce(core.score(u, items), target, config.temperature)
        return ce + config.gamma * core.regulariser(memory, memory_mask)

    before, after = loss_before_and_after(core, opt, loss_fn, steps=40)
    assert after < 0.8 * before, (before, after)
