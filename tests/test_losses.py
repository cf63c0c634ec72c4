"""The Stage-2 objective: each term on hand-made inputs, collapse-proofness, fidelity, toy training."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from xai_lib.config import XAIConfig
from xai_lib.importance.loss import (
    bonafide_regularization,
    contrastive_loss,
    fidelity_loss,
    fidelity_probabilities,
    frame_cross_entropy,
    keep_weights,
    spoof_sparsity,
    temporal_smoothness,
    xai_loss,
)
from xai_lib.importance.module import XAIModule, XAIOutput, class_means

SEED_CFG = XAIConfig(lambda_fidelity=0.0)  # seed weights: tau 0.07, 0.1, 0.1, 0.01


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- terms by hand


def test_frame_cross_entropy_hand_values():
    sims = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # frame 0 spoof-like, frame 1 bona-like
    ce_spoof = frame_cross_entropy(sims, torch.tensor([0]), temperature=1.0)
    ce_bona = frame_cross_entropy(sims, torch.tensor([1]), temperature=0.5)
    torch.testing.assert_close(ce_spoof, torch.tensor([[_softplus(-1.0), _softplus(1.0)]]))
    torch.testing.assert_close(ce_bona, torch.tensor([[_softplus(2.0), _softplus(-2.0)]]))


def test_contrastive_spoof_uses_normalized_w_bona_uses_uniform_average():
    sims = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]] * 2)  # (2, 3, 2)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    w = torch.tensor([[0.8, 0.0, 0.7], [0.8, 0.0, 0.7]])  # w on the padded frame must not count
    spoof = contrastive_loss(w[:1], sims[:1], torch.tensor([0]), mask[:1], temperature=1.0)
    torch.testing.assert_close(spoof, torch.tensor(_softplus(-1.0)), atol=1e-5, rtol=0)
    # scale-free: w / 10 gives the same loss
    scaled = contrastive_loss(w[:1] / 10, sims[:1], torch.tensor([0]), mask[:1], 1.0)
    torch.testing.assert_close(scaled, spoof, atol=1e-4, rtol=0)
    # bona fide: uniform average over valid frames, whatever w is
    bona = contrastive_loss(w[1:], sims[1:], torch.tensor([1]), mask[1:], temperature=1.0)
    torch.testing.assert_close(bona, torch.tensor((_softplus(1.0) + _softplus(-1.0)) / 2))
    torch.testing.assert_close(contrastive_loss(torch.zeros(1, 3), sims[1:], torch.tensor([1]), mask[1:], 1.0), bona)
    # batch = mean over utterances
    both = contrastive_loss(w, sims, torch.tensor([0, 1]), mask, temperature=1.0)
    torch.testing.assert_close(both, (spoof + bona) / 2)


def test_contrastive_all_zero_w_is_the_uniform_average_not_zero():
    sims = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    loss = contrastive_loss(torch.zeros(1, 2), sims, torch.tensor([0]), None, temperature=1.0)
    torch.testing.assert_close(loss, torch.tensor((_softplus(-1.0) + _softplus(1.0)) / 2))


def test_bonafide_regularization_hand_value():
    w = torch.tensor([[0.2, 0.4, 0.9], [0.6, 0.6, 0.6], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, True]])
    labels = torch.tensor([1, 1, 0])  # the spoof row does not count
    torch.testing.assert_close(bonafide_regularization(w, labels, mask), torch.tensor((0.3 + 0.6) / 2))
    assert float(bonafide_regularization(w, torch.zeros(3, dtype=torch.long), mask)) == 0.0


def test_temporal_smoothness_hand_value():
    w = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.5, 0.9, 0.9]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    # row 0: (1 + 0 + 1) / 3; row 1: only the pair (0, 1) is valid -> 0.5
    torch.testing.assert_close(temporal_smoothness(w, mask), torch.tensor((2 / 3 + 0.5) / 2))
    assert float(temporal_smoothness(torch.full((2, 5), 0.7), None)) == 0.0


def test_spoof_sparsity_hand_value_penalizes_all_zero_and_all_one():
    mask = torch.tensor([[True, True, True, True, False]])
    spoof = torch.tensor([0])
    w = torch.tensor([[0.2, 0.8, 0.4, 0.6, 1.0]])  # mean over valid frames 0.5
    torch.testing.assert_close(spoof_sparsity(w, spoof, mask, 0.3), torch.tensor(0.04))
    torch.testing.assert_close(spoof_sparsity(torch.zeros(1, 5), spoof, mask, 0.3), torch.tensor(0.09))
    torch.testing.assert_close(spoof_sparsity(torch.ones(1, 5), spoof, mask, 0.3), torch.tensor(0.49))
    assert float(spoof_sparsity(torch.full((1, 5), 0.3), spoof, mask, 0.3)) < 1e-12
    assert float(spoof_sparsity(w, torch.tensor([1]), mask, 0.3)) == 0.0  # bona fide ignored


def test_fidelity_loss_hand_values():
    p_keep = torch.tensor([0.45, 0.95, 0.1])
    p_remove = torch.tensor([0.2, 0.5, 0.99])
    p_full = torch.tensor([0.9, 0.9, 0.9])
    labels = torch.tensor([0, 0, 1])  # the bona fide row does not count
    expected = ((math.log(0.9 / 0.45) - math.log(0.8)) + (0.0 - math.log(0.5))) / 2
    torch.testing.assert_close(fidelity_loss(p_keep, p_remove, p_full, labels), torch.tensor(expected))
    # perfect explanation (keep preserves, remove destroys) costs ~0
    assert float(fidelity_loss(torch.tensor([0.9]), torch.tensor([0.0]), torch.tensor([0.9]), torch.tensor([0]))) < 1e-5
    # certain probabilities stay finite
    certain = fidelity_loss(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0]))
    assert math.isfinite(float(certain))


def test_keep_weights_budget_is_scale_free_and_constant_w_keeps_only_the_budget():
    mask = torch.tensor([[True] * 8 + [False] * 2])
    for c in (0.0, 1e-8, 0.5, 1.0):
        k = keep_weights(torch.full((1, 10), c), mask, budget=0.25)
        torch.testing.assert_close(k, torch.tensor([[0.25] * 8 + [0.0] * 2]))
    w = torch.tensor([[0.0, 0.9, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]])  # 2 of 8 valid frames marked
    k = keep_weights(w, mask, budget=0.25)
    torch.testing.assert_close(k, torch.tensor([[0.0, 1.0, 1.0] + [0.0] * 7]), atol=1e-5, rtol=0)
    torch.testing.assert_close(keep_weights(w * 0.1, mask, budget=0.25), k, atol=1e-4, rtol=0)
    w_wide = torch.tensor([[0.0, 0.9, 0.9, 0.9, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0]])  # 4 marked, budget 2
    torch.testing.assert_close(keep_weights(w_wide, mask, 0.25)[0, 1:5], torch.full((4,), 0.5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="target_sparsity"):
        keep_weights(w, mask, budget=0.0)


def test_fidelity_probabilities_keep_and_remove_weights_and_gradient():
    seen = {}

    def backend_fn(h, frame_mask, frame_weights):
        seen["weights"] = frame_weights.detach().clone()
        seen["mask"] = frame_mask.clone()
        spoof_logit = (frame_weights * h[..., 0]).sum(1)
        return torch.stack([spoof_logit, torch.zeros_like(spoof_logit)], dim=1)  # column 1 = bona fide

    h = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    w = torch.tensor([[0.6, 0.2, 0.2, 1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    # a = (0.6, 0.2, 0.2) ; keep = budget * 3 * a with budget 0.5 -> (0.9, 0.3, 0.3)
    p_keep, p_remove = fidelity_probabilities(backend_fn, h, w, mask, budget=0.5)
    expected_weights = torch.tensor([[0.9, 0.3, 0.3, 0.0], [0.1, 0.7, 0.7, 0.0]])
    torch.testing.assert_close(seen["weights"], expected_weights, atol=1e-5, rtol=0)
    assert torch.equal(seen["mask"], torch.cat([mask, mask]))
    torch.testing.assert_close(p_keep, torch.sigmoid(torch.tensor([0.9 + 0.6 + 1.2])), atol=1e-5, rtol=0)
    torch.testing.assert_close(p_remove, torch.sigmoid(torch.tensor([0.1 + 1.4 + 2.8])), atol=1e-5, rtol=0)
    (p_keep - p_remove).sum().backward()
    assert w.grad is not None and bool(torch.isfinite(w.grad).all())
    assert float(w.grad[0, :3].abs().sum()) > 0 and float(w.grad[0, 3]) == 0.0


def test_xai_loss_with_lambda_fidelity_zero_is_exactly_the_seed_weighted_sum():
    torch.manual_seed(0)
    h = torch.randn(4, 10, 8)
    mask = torch.arange(10).unsqueeze(0) < torch.tensor([[10], [7], [9], [4]])
    labels = torch.tensor([0, 1, 0, 1])
    xai = XAIModule(8, XAIConfig(prototype_mode="learnable", importance_hidden_dim=16))
    out = xai(h, mask)
    w, s = out.importance, out.similarities
    expected = (
        contrastive_loss(w, s, labels, mask, 0.07)
        + 0.1 * bonafide_regularization(w, labels, mask)
        + 0.1 * temporal_smoothness(w, mask)
        + 0.01 * spoof_sparsity(w, labels, mask, 0.3)
    )
    total, terms = xai_loss(out, labels, mask, SEED_CFG)
    assert torch.equal(total, expected)
    assert set(terms) == {"contrastive", "bonafide_reg", "temporal_smooth", "sparsity", "fidelity", "frame", "total"}
    assert float(terms["fidelity"]) == 0.0
    # probabilities given but lambda 0: still exactly the seed sum, fidelity only reported
    fid = (torch.full((4,), 0.3), torch.full((4,), 0.6), torch.full((4,), 0.9))
    total_f, terms_f = xai_loss(out, labels, mask, SEED_CFG, fidelity=fid)
    assert torch.equal(total_f, expected) and float(terms_f["fidelity"]) > 0
    # lambda > 0 adds lambda * fidelity
    cfg = dataclasses.replace(SEED_CFG, lambda_fidelity=0.5)
    total_2, terms_2 = xai_loss(out, labels, mask, cfg, fidelity=fid)
    torch.testing.assert_close(total_2, expected + 0.5 * fidelity_loss(*fid, labels))
    with pytest.raises(ValueError, match="lambda_fidelity"):
        xai_loss(out, labels, mask, cfg, fidelity=None)


# ----------------------------------------------------------------------------- collapse-proofness


@pytest.fixture
def single_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


T_COLLAPSE, SPAN = 40, slice(12, 22)  # a spoof utterance whose frames 12..21 look spoof


def _collapse_example():
    """h near p_spoof on the span, near p_bona elsewhere; plus one bona fide utterance."""
    g = torch.Generator().manual_seed(0)
    d = 8
    p_spoof, p_bona = torch.eye(d)[0], torch.eye(d)[1]
    h = p_bona.repeat(2, T_COLLAPSE, 1) + 0.1 * torch.randn(2, T_COLLAPSE, d, generator=g)
    h[0, SPAN] = p_spoof + 0.1 * torch.randn(SPAN.stop - SPAN.start, d, generator=g)
    labels = torch.tensor([0, 1])
    mask = torch.ones(2, T_COLLAPSE, dtype=torch.bool)
    xai = XAIModule(d, XAIConfig(prototype_mode="fixed"))
    xai.prototypes.set_from_class_means(torch.stack([p_spoof, p_bona]))
    return xai, h, mask, labels


def _output_for(xai: XAIModule, h: torch.Tensor, mask: torch.Tensor, w_spoof: torch.Tensor) -> XAIOutput:
    """The module's output with the importance replaced by a hand-chosen w (bona row: 0)."""
    out = xai(h, mask)
    w = torch.stack([w_spoof, torch.zeros(T_COLLAPSE)])
    return dataclasses.replace(out, importance=w)


def _toy_backend(h: torch.Tensor, frame_mask: torch.Tensor, frame_weights: torch.Tensor) -> torch.Tensor:
    """Spoof logit rises with the kept weight on spoof-like frames (h . e_0 > 0.5)."""
    evidence = (frame_weights * (h[..., 0] > 0.5).float()).sum(1)  # (N,)
    spoof_logit = evidence - 5.0
    return torch.stack([spoof_logit, torch.zeros_like(spoof_logit)], dim=1)


def _constant_and_concentrated():
    on_span = torch.zeros(T_COLLAPSE)
    on_span[SPAN] = 1.0
    soft_span = 0.05 + 0.9 * on_span
    constants = {c: torch.full((T_COLLAPSE,), c) for c in (0.0, 1e-8, 0.3, 0.5, 1.0)}
    return constants, {"on_span": on_span, "soft_span": soft_span}


@pytest.mark.parametrize("with_fidelity", [False, True])
def test_constant_importance_costs_strictly_more_than_importance_on_the_spoof_span(with_fidelity, single_thread):
    xai, h, mask, labels = _collapse_example()
    cfg = XAIConfig(lambda_fidelity=1.0 if with_fidelity else 0.0)
    constants, concentrated = _constant_and_concentrated()

    def total(w_spoof):
        out = _output_for(xai, h, mask, w_spoof)
        fid = None
        if with_fidelity:
            p_full = F.softmax(_toy_backend(h, mask, mask.float()), -1)[:, 0]
            fid = (*fidelity_probabilities(_toy_backend, h, out.importance, mask, cfg.target_sparsity), p_full)
        return xai_loss(out, labels, mask, cfg, fidelity=fid)

    for name, w_good in concentrated.items():
        good, good_terms = total(w_good)
        for c, w_const in constants.items():
            bad, bad_terms = total(w_const)
            assert float(bad) > float(good), f"constant w={c} beats w {name}: {float(bad)} <= {float(good)}"
            assert float(bad_terms["contrastive"]) > float(good_terms["contrastive"])
            if with_fidelity:
                assert float(bad_terms["fidelity"]) > float(good_terms["fidelity"])


def test_the_seed_unnormalized_weighting_would_prefer_collapse_on_this_example():
    """Guards the test above: the original ``mean(w * l)`` + ``mean w`` objective picks w = 0 here."""
    xai, h, mask, labels = _collapse_example()
    constants, concentrated = _constant_and_concentrated()

    def seed_total(w_spoof):
        out = _output_for(xai, h, mask, w_spoof)
        ce = frame_cross_entropy(out.similarities, labels, 0.07)
        w = out.importance
        is_spoof = (labels == 0).float()
        weighted_ce = (w * ce).mean(1).mean()
        return weighted_ce + 0.1 * temporal_smoothness(w, mask) + 0.01 * (w.mean(1) * is_spoof).sum()

    assert float(seed_total(constants[0.0])) < float(seed_total(concentrated["on_span"]))


# ----------------------------------------------------------------------------- toy training


def _synthetic_batch(g: torch.Generator, b: int = 16, t: int = 40, d: int = 16):
    """Bona-like frames everywhere; spoof utterances (even rows) get one spoof-like span."""
    dirs = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(99)))[0]
    mu_bona, mu_spoof = 3.0 * dirs[0], 3.0 * dirs[1]
    h = mu_bona + torch.randn(b, t, d, generator=g)
    span = torch.zeros(b, t, dtype=torch.bool)
    labels = torch.tensor([0, 1] * (b // 2))
    for i in range(0, b, 2):
        length = int(torch.randint(5, 15, (1,), generator=g))
        start = int(torch.randint(0, t - length, (1,), generator=g))
        span[i, start : start + length] = True
    h[span] = mu_spoof + torch.randn(int(span.sum()), d, generator=g)
    lengths = torch.randint(t - 10, t + 1, (b,), generator=g)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    span &= mask
    return h, mask, labels, span, mu_spoof


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """ROC-AUC = P(score of a positive > score of a negative), ties count half."""
    diff = pos.view(-1, 1) - neg.view(1, -1)
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


@pytest.mark.parametrize(
    "prototype_mode,arch,lambda_fidelity",
    [("ema", "mlp", 1.0), ("ema", "mlp", 0.0), ("fixed", "conv", 1.0), ("learnable", "mlp", 1.0)],
)
def test_toy_training_puts_importance_on_spoof_spans_without_collapse(
    prototype_mode, arch, lambda_fidelity, single_thread
):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = XAIConfig(
        prototype_mode=prototype_mode, importance_arch=arch, importance_hidden_dim=32, lambda_fidelity=lambda_fidelity
    )
    d = 16
    xai = XAIModule(d, cfg)
    _, _, _, _, mu_spoof = _synthetic_batch(g)

    def backend_fn(h, frame_mask, frame_weights):  # toy frozen detector: spoof evidence = kept weight on spoof-like frames
        evidence = (frame_weights * F.relu(h @ mu_spoof / mu_spoof.norm() - 1.5)).sum(1)
        spoof_logit = evidence - 3.0
        return torch.stack([spoof_logit, torch.zeros_like(spoof_logit)], dim=1)

    if prototype_mode == "fixed":
        xai.prototypes.set_from_class_means(class_means([_synthetic_batch(g)[:3] for _ in range(4)], progress=False))
    optimizer = torch.optim.Adam(xai.parameters(), lr=1e-3, weight_decay=1e-4)
    xai.train()
    for _ in range(200):
        h, mask, labels, _, _ = _synthetic_batch(g)
        out = xai(h, mask)
        fid = None
        if lambda_fidelity > 0:
            p_full = F.softmax(backend_fn(h, mask, mask.float()), -1)[:, 0]
            fid = (*fidelity_probabilities(backend_fn, h, out.importance, mask, cfg.target_sparsity), p_full)
        loss, _ = xai_loss(out, labels, mask, cfg, fidelity=fid)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        xai.prototypes.update(h, out.importance, labels, mask)

    xai.eval()
    h, mask, labels, span, _ = _synthetic_batch(torch.Generator().manual_seed(1234), b=32)
    with torch.no_grad():
        w = xai(h, mask).importance
    auc = _auc(w[span], w[mask & ~span])
    assert auc > 0.9, f"AUC of w inside vs outside spoof spans = {auc:.3f}"
    assert float(w[mask].std()) > 0.1, "importance collapsed to a constant"
    assert float(w[span].mean()) > float(w[mask & ~span].mean()) + 0.2
    assert float(w[(labels == 1).unsqueeze(1) & mask].mean()) < 0.2, "bona fide utterances should get low importance"
