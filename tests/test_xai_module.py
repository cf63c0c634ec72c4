"""The Stage-2 XAI module: importance network, prototypes (ema / fixed / learnable), outputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xai_lib.config import XAIConfig
from xai_lib.importance.loss import xai_loss
from xai_lib.importance.module import (
    BONAFIDE_INDEX,
    SPOOF_INDEX,
    ImportanceNetwork,
    Prototypes,
    XAIModule,
    class_means,
    normalized_importance,
)

D = 12


def _batch(seed: int = 0, b: int = 4, t: int = 9, d: int = D):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g)
    lengths = torch.tensor([t, t - 3, t - 1, 2][:b])
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    labels = torch.tensor([0, 1, 0, 1][:b])
    return h, mask, labels


# ----------------------------------------------------------------------------- importance


def test_index_convention_matches_detector_logits():
    assert SPOOF_INDEX == 0 and BONAFIDE_INDEX == 1


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_importance_in_unit_interval_shape_and_zero_on_padding(arch):
    torch.manual_seed(0)
    net = ImportanceNetwork(D, hidden_dim=16, arch=arch)
    h, mask, _ = _batch()
    h = h * 5.0  # large inputs must still give values in [0, 1]
    w = net(h, mask)
    assert w.shape == mask.shape
    assert bool(((w >= 0) & (w <= 1)).all())
    assert bool((w[~mask] == 0).all())
    assert bool((w[mask] > 0).all())


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_importance_padded_batch_equals_single_utterance(arch):
    """Padding (with garbage) never changes w on real frames, also for the temporal conv."""
    torch.manual_seed(0)
    net = ImportanceNetwork(D, hidden_dim=16, arch=arch).eval()
    h, mask, _ = _batch()
    h_garbage = h.clone()
    h_garbage[~mask] = 100.0
    w = net(h_garbage, mask)
    for i in range(h.shape[0]):
        n = int(mask[i].sum())
        alone = net(h[i : i + 1, :n], None)
        torch.testing.assert_close(w[i, :n], alone[0], atol=1e-6, rtol=1e-5)


def test_importance_conv_variant_uses_context_mlp_does_not():
    torch.manual_seed(0)
    h, _, _ = _batch(b=1)
    h2 = h.clone()
    h2[0, 4] += 3.0  # change frame 4 only
    for arch, neighbour_changes in (("mlp", False), ("conv", True)):
        net = ImportanceNetwork(D, hidden_dim=16, arch=arch).eval()
        w1, w2 = net(h), net(h2)
        assert not torch.allclose(w1[0, 4], w2[0, 4])
        assert (not torch.allclose(w1[0, 3], w2[0, 3])) is neighbour_changes
        assert torch.allclose(w1[0, 0], w2[0, 0])  # outside the kernel of 5 either way


def test_importance_dropout_only_in_training():
    torch.manual_seed(0)
    net = ImportanceNetwork(D, hidden_dim=64, dropout=0.5)
    h, mask, _ = _batch()
    net.eval()
    assert torch.equal(net(h, mask), net(h, mask))
    net.train()
    assert not torch.equal(net(h, mask), net(h, mask))


def test_normalized_importance_is_scale_free_and_uniform_for_zero():
    w = torch.tensor([[0.2, 0.6, 0.2, 0.9]])
    mask = torch.tensor([[True, True, True, False]])
    a = normalized_importance(w, mask)
    torch.testing.assert_close(a, torch.tensor([[0.2, 0.6, 0.2, 0.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalized_importance(w * 0.01, mask), a, atol=1e-4, rtol=0)
    torch.testing.assert_close(normalized_importance(torch.zeros(1, 4), mask), torch.tensor([[1 / 3] * 3 + [0.0]]))


# ----------------------------------------------------------------------------- prototypes


def test_similarities_are_cosine_in_spoof_bona_order():
    protos = Prototypes(3, mode="fixed")
    p_spoof, p_bona = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    protos.set_from_class_means(torch.stack([p_spoof, p_bona]))
    h = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 4.0]]])  # (1, 2, 3)
    sims = protos.similarities(h)
    expected = torch.tensor([[[1.0, 1 / math.sqrt(2)], [0.0, 3 / (5 * math.sqrt(2))]]])
    torch.testing.assert_close(sims, expected)
    torch.testing.assert_close(protos.p_spoof, p_spoof)
    torch.testing.assert_close(protos.p_bona, p_bona)
    torch.testing.assert_close(sims, F.cosine_similarity(h.unsqueeze(2), protos.prototypes.view(1, 1, 2, 3), dim=-1))


def _manual_class_means(h, mask, labels):
    out = []
    for c in (0, 1):
        frames = [h[i][mask[i]] for i in range(len(labels)) if labels[i] == c]  # each (n_i, D)
        out.append(torch.cat(frames).mean(0))
    return torch.stack(out)


def test_fixed_prototypes_equal_hand_computed_class_means_and_have_no_grad():
    h1, m1, y1 = _batch(seed=1)
    h2, m2, y2 = _batch(seed=2, b=3)
    means = class_means([(h1, m1, y1), (h2, m2, y2)], progress=False)
    # frame-weighted: every valid frame of the whole set counts once
    h_all = torch.cat([h1.reshape(-1, D), h2.reshape(-1, D)])
    m_all = torch.cat([m1.reshape(-1), m2.reshape(-1)])
    y_all = torch.cat([y1.repeat_interleave(h1.shape[1]), y2.repeat_interleave(h2.shape[1])])
    for c in (0, 1):
        torch.testing.assert_close(means[c], h_all[m_all & (y_all == c)].mean(0), atol=1e-6, rtol=1e-5)

    xai = XAIModule(D, XAIConfig(prototype_mode="fixed", importance_hidden_dim=16))
    xai.prototypes.set_from_class_means(means)
    assert not xai.prototypes.prototypes.requires_grad
    assert all(p is not xai.prototypes.prototypes for p in xai.parameters())
    before = xai.prototypes.prototypes.clone()
    out = xai(h1, m1)
    loss, _ = xai_loss(out, y1, m1, XAIConfig(lambda_fidelity=0.0))
    loss.backward()
    assert xai.prototypes.prototypes.grad is None
    assert not xai.prototypes.update(h1, out.importance, y1, m1)  # fixed: update is a no-op
    assert torch.equal(xai.prototypes.prototypes, before)


def test_class_means_errors_clearly_when_a_class_is_missing():
    h, mask, _ = _batch()
    with pytest.raises(ValueError, match="no valid frames for class bona fide"):
        class_means([(h, mask, torch.zeros(4, dtype=torch.long))], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        class_means([], progress=False)


def test_ema_prototypes_untouched_in_eval_and_follow_momentum_in_training():
    h1, m1, y1 = _batch(seed=1)
    h2, m2, y2 = _batch(seed=2)
    xai = XAIModule(D, XAIConfig(prototype_mode="ema", ema_momentum=0.9, importance_hidden_dim=16))
    protos = xai.prototypes
    assert not protos.initialized.any()

    # eval mode: forward passes and update() calls change nothing
    xai.eval()
    assert not protos.update(h1, None, y1, m1)
    assert torch.equal(protos.prototypes, torch.zeros(2, D)) and not protos.initialized.any()

    # training: the first batch initialises each class to its mean (plain mean when w is None)
    xai.train()
    assert protos.update(h1, None, y1, m1)
    first = _manual_class_means(h1, m1, y1)
    torch.testing.assert_close(protos.prototypes, first)
    assert protos.initialized.all()

    # a second batch: p <- m p + (1 - m) mean; spoof mean is importance-weighted
    w2 = torch.rand(h2.shape[:2], generator=torch.Generator().manual_seed(3)) * m2
    assert protos.update(h2, w2, y2, m2)
    spoof_rows = y2 == 0
    ws = w2[spoof_rows].unsqueeze(-1)
    spoof_mean = (h2[spoof_rows] * ws).sum((0, 1)) / ws.sum()
    bona_mean = _manual_class_means(h2, m2, y2)[1]
    torch.testing.assert_close(protos.prototypes[0], 0.9 * first[0] + 0.1 * spoof_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(protos.prototypes[1], 0.9 * first[1] + 0.1 * bona_mean, atol=1e-6, rtol=1e-5)

    # an eval pass (forward + update) afterwards leaves them bit-identical
    snapshot = protos.prototypes.clone()
    xai.eval()
    with torch.no_grad():
        xai(h1, m1)
    protos.update(h1, None, y1, m1)
    assert torch.equal(protos.prototypes, snapshot)
    # and a training forward alone does not update them either (only update() does)
    xai.train()
    xai(h1, m1)
    assert torch.equal(protos.prototypes, snapshot)


def test_ema_class_absent_from_batch_is_left_alone():
    h, m, _ = _batch()
    protos = Prototypes(D, mode="ema").train()
    protos.update(h, None, torch.zeros(4, dtype=torch.long), m)  # spoof only
    assert protos.initialized.tolist() == [True, False]
    assert torch.equal(protos.p_bona, torch.zeros(D))


def test_learnable_prototypes_receive_gradients_from_the_loss():
    torch.manual_seed(0)
    h, m, y = _batch()
    xai = XAIModule(D, XAIConfig(prototype_mode="learnable", importance_hidden_dim=16))
    assert any(p is xai.prototypes.prototypes for p in xai.parameters())
    loss, _ = xai_loss(xai(h, m), y, m, XAIConfig(lambda_fidelity=0.0))
    loss.backward()
    grad = xai.prototypes.prototypes.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_eval_with_unset_prototypes_is_a_clear_error():
    h, m, _ = _batch()
    xai = XAIModule(D, XAIConfig(prototype_mode="fixed", importance_hidden_dim=16)).eval()
    with pytest.raises(RuntimeError, match="set_from_class_means"):
        xai(h, m)


# ----------------------------------------------------------------------------- module


def test_xai_module_outputs_documented_shapes_and_values():
    torch.manual_seed(0)
    h, m, y = _batch()
    cfg = XAIConfig(prototype_mode="fixed", importance_hidden_dim=16, temperature=0.5)
    xai = XAIModule(D, cfg)
    xai.prototypes.set_from_class_means(class_means([(h, m, y)], progress=False))
    xai.eval()
    out = xai(h, m)
    b, t = m.shape
    assert out.importance.shape == (b, t)
    assert out.similarities.shape == (b, t, 2)
    assert out.pooled.shape == (b, D)
    assert out.utterance_logits.shape == (b, 2)
    assert out.utterance_score.shape == (b,)
    assert torch.equal(out.frame_mask, m)
    assert bool((out.similarities[~m] == 0).all())
    # pooled = importance-weighted mean of valid frames; logits = cosine / temperature
    a = normalized_importance(out.importance, m)
    torch.testing.assert_close(out.pooled, (a.unsqueeze(-1) * h).sum(1))
    torch.testing.assert_close(out.utterance_logits, xai.prototypes.similarities(out.pooled) / 0.5)
    torch.testing.assert_close(out.utterance_score, out.utterance_logits[:, 1] - out.utterance_logits[:, 0])


def test_xai_module_padded_batch_equals_single_utterances():
    torch.manual_seed(0)
    h, m, y = _batch()
    xai = XAIModule(D, XAIConfig(prototype_mode="learnable", importance_hidden_dim=16, importance_arch="conv")).eval()
    out = xai(h, m)
    for i in range(h.shape[0]):
        n = int(m[i].sum())
        alone = xai(h[i : i + 1, :n])
        torch.testing.assert_close(out.importance[i, :n], alone.importance[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.utterance_logits[i], alone.utterance_logits[0], atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_the_importance_network_but_not_into_a_frozen_input():
    torch.manual_seed(0)
    h, m, y = _batch()
    xai = XAIModule(D, XAIConfig(prototype_mode="learnable", importance_hidden_dim=16))
    loss, _ = xai_loss(xai(h, m), y, m, XAIConfig(lambda_fidelity=0.0))
    loss.backward()
    for name, p in xai.importance.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert sum(float(p.grad.abs().sum()) for p in xai.importance.parameters()) > 0
    assert h.grad is None


def test_state_dict_round_trip_keeps_prototypes_and_mode_keys():
    h, m, y = _batch()
    src = XAIModule(D, XAIConfig(prototype_mode="ema", importance_hidden_dim=16)).train()
    src.prototypes.update(h, None, y, m)
    dst = XAIModule(D, XAIConfig(prototype_mode="ema", importance_hidden_dim=16))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.prototypes.prototypes, src.prototypes.prototypes)
    assert dst.prototypes.is_ready
    keys_fixed = set(XAIModule(D, XAIConfig(prototype_mode="fixed", importance_hidden_dim=16)).state_dict())
    keys_learn = set(XAIModule(D, XAIConfig(prototype_mode="learnable", importance_hidden_dim=16)).state_dict())
    assert keys_fixed == keys_learn == set(src.state_dict())


def test_importance_smoothing_is_a_masked_moving_average():
    from xai_lib.importance.module import smoothing_frames

    assert smoothing_frames(0.0) == 1 and smoothing_frames(0.3) == 15 and smoothing_frames(0.2) == 11
    torch.manual_seed(0)
    plain = ImportanceNetwork(8, hidden_dim=16, dropout=0.0)
    smooth = ImportanceNetwork(8, hidden_dim=16, dropout=0.0, smoothing_frames=5)
    smooth.load_state_dict(plain.state_dict())
    h = torch.randn(2, 12, 8)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    w, ws = plain(h, mask), smooth(h, mask)
    assert float(ws.min()) >= 0.0 and float(ws.max()) <= 1.0
    torch.testing.assert_close(ws[0, 5], w[0, 3:8].mean())  # centred 5-frame mean
    torch.testing.assert_close(ws[0, 0], w[0, :3].mean())  # at the edge: the frames that exist
    torch.testing.assert_close(ws[1, 8], w[1, 6:9].mean())  # padding neither counts nor receives
    assert torch.all(ws[1, 9:] == 0)
    alone = smooth(h[1:, :9], None)
    torch.testing.assert_close(ws[1, :9], alone[0])
    assert XAIModule(8, XAIConfig(importance_smoothing_s=0.1, importance_hidden_dim=16)).importance.smoothing_frames == 5
