"""Stage-3 attribution API: every method on a tiny detector, captum axioms on toy models."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from xai_lib.explanation.methods import (
    METHODS,
    Attributor,
    FrameAttribution,
    attention_rollout,
    attribute,
    pool_to_frames,
)
from xai_lib.config import ModelConfig, config_from_dict
from xai_lib.detector.model import Detector

from conftest import tiny_model_dict

DETERMINISTIC = ("importance", "integrated_gradients", "saliency", "occlusion", "attention_rollout")
FAST_KW = {"integrated_gradients": {"n_steps": 4}, "occlusion": {"perturbations_per_eval": 12}}


class FakeImportance:
    """Stage-2 stand-in: a deterministic function of the detector's SSL features (B, T) in [0, 1]."""

    def frame_importance(self, detector, wave, lengths):
        feats, mask = detector.frontend(wave, lengths)  # (B, T, D), (B, T)
        return torch.sigmoid(feats[..., 0] * 3.0) * mask


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    return Detector(config_from_dict(tiny_model_dict(), ModelConfig)).eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two utterances, 0.5 s and 0.35 s, right-padded with zeros."""
    g = torch.Generator().manual_seed(1)
    wave = 0.1 * torch.randn(2, 8000, generator=g)
    lengths = torch.tensor([8000, 5600])
    wave[1, 5600:] = 0.0
    return wave, lengths


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", METHODS)
def test_method_gives_finite_frame_scores_with_padding_zero(detector, batch, method):
    wave, lengths = batch
    before = _snapshot(detector)
    flags = [p.requires_grad for p in detector.parameters()]
    att = Attributor(detector, FakeImportance()).attribute(wave, lengths, method=method, target=0,
                                                           **FAST_KW.get(method, {}))
    T = int(detector.num_frames(torch.tensor([wave.shape[1]])))
    n = detector.num_frames(lengths)
    assert isinstance(att, FrameAttribution)
    assert att.scores.shape == (2, T) == (2, 24)
    assert torch.equal(att.lengths, n)
    assert torch.isfinite(att.scores).all()
    assert (att.scores[1, int(n[1]):] == 0).all(), "padded frames must be 0"
    assert att.method == method and att.target == 0 and att.frame_hop_s == 0.02
    assert att.seconds > 0
    per = att.per_utterance()
    assert [p.shape[0] for p in per] == n.tolist()
    assert att.scores[0].abs().sum() > 0  # not trivially empty
    # the detector is untouched: same weights and buffers, no .grad, flags and eval mode kept
    assert all(torch.equal(before[k], v) for k, v in detector.state_dict().items()), f"{method} changed the detector"
    assert all(p.grad is None for p in detector.parameters()), f"{method} left .grad on parameters"
    assert [p.requires_grad for p in detector.parameters()] == flags
    assert not detector.training


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_padded_batch_matches_single_utterance(detector, batch, method):
    wave, lengths = batch
    attributor = Attributor(detector, FakeImportance())
    kw = FAST_KW.get(method, {})
    both = attributor.attribute(wave, lengths, method=method, **kw)
    n1 = int(lengths[1])
    alone = attributor.attribute(wave[1:, :n1], None, method=method, **kw)
    t1 = alone.scores.shape[1]
    assert t1 == int(both.lengths[1])
    scale = float(alone.scores.abs().max())
    torch.testing.assert_close(both.scores[1, :t1], alone.scores[0], atol=1e-3 * scale + 1e-7, rtol=1e-3)
    first = attributor.attribute(wave[:1], None, method=method, **kw)
    torch.testing.assert_close(both.scores[0], first.scores[0], atol=1e-3 * float(first.scores.abs().max()) + 1e-7,
                               rtol=1e-3)


def test_detector_in_training_mode_is_attributed_in_eval_and_restored(batch):
    torch.manual_seed(0)
    det = Detector(config_from_dict(tiny_model_dict(), ModelConfig))
    wave, lengths = batch
    reference = Attributor(det.eval()).attribute(wave, lengths, method="saliency")
    det.train()
    before = _snapshot(det)
    att = Attributor(det).attribute(wave, lengths, method="saliency")
    assert det.training, "the caller's mode must be restored"
    assert all(torch.equal(before[k], v) for k, v in det.state_dict().items()), "BatchNorm statistics changed"
    torch.testing.assert_close(att.scores, reference.scores)


# ----------------------------------------------------------------------------- errors and options


def test_unknown_method_lists_the_valid_ones(detector, batch):
    with pytest.raises(ValueError, match="integrated_gradients"):
        attribute(detector, batch[0], method="gradcam")


def test_importance_without_model_is_a_clear_error(detector, batch):
    with pytest.raises(ValueError, match="importance_model"):
        attribute(detector, batch[0], method="importance")


def test_unknown_option_and_bad_target_are_errors(detector, batch):
    with pytest.raises(ValueError, match="n_steps"):
        attribute(detector, batch[0], method="integrated_gradients", steps=3)
    with pytest.raises(ValueError, match="target"):
        attribute(detector, batch[0], method="random", target=2)


def test_random_is_seeded_uniform(detector, batch):
    wave, lengths = batch
    a = attribute(detector, wave, lengths, method="random", seed=3)
    b = attribute(detector, wave, lengths, method="random", seed=3)
    c = attribute(detector, wave, lengths, method="random", seed=4)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)
    valid = a.valid_mask
    assert (a.scores[valid] >= 0).all() and (a.scores[valid] < 1).all()


def test_normalized_is_per_utterance_min_max_over_valid_frames():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0], [-2.0, 2.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    att = FrameAttribution(scores=scores, lengths=torch.tensor([3, 2, 4]), method="x", target=0, seconds=0.1)
    norm = att.normalized().scores
    torch.testing.assert_close(norm, torch.tensor([[0.0, 1.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0] * 4]))
    assert torch.equal(att.scores, scores), "normalized() must not change the original"


# ----------------------------------------------------------------------------- pooling and rollout


def test_pool_to_frames_sums_each_20ms_frame_and_ignores_padding():
    L = 1000
    attr = torch.arange(L, dtype=torch.float64).repeat(2, 1)  # value = sample index
    pooled = pool_to_frames(attr, torch.tensor([3, 2]), hop=320, lengths=torch.tensor([1000, 700]), num_frames=4)

    def s(a: int, b: int) -> float:
        return float(sum(range(a, b)))

    expected = torch.tensor([
        [s(0, 320), s(320, 640), s(640, 1000), 0.0],  # the last frame runs to the valid end
        [s(0, 320), s(320, 700), 0.0, 0.0],  # samples >= 700 are padding
    ], dtype=torch.float64)
    torch.testing.assert_close(pooled, expected)


def test_attention_rollout_of_hand_made_maps():
    # 1 block, 1 head, tokens [cls, f1, f2, ht]: cls attends only to f2
    a = torch.zeros(1, 1, 4, 4)
    a[0, 0, 0, 2] = 1.0
    a[0, 0, 1:, 1:] = torch.eye(3)
    roll = attention_rollout((a,), num_frames=2)
    torch.testing.assert_close(roll, torch.tensor([[0.0, 0.5]]))  # (A + I) / 2, cls row over frames
    # two blocks: block 1 moves f2's content to f1, so the rollout points cls at f1 too
    b = torch.eye(4)[None, None].clone()
    b[0, 0, 2] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    roll2 = attention_rollout((b, a), num_frames=2)
    expected = (((a[0, 0] + torch.eye(4)) / 2) @ ((b[0, 0] + torch.eye(4)) / 2))[0, 1:3]
    torch.testing.assert_close(roll2[0], expected)
    assert roll2[0, 0] > 0


# ----------------------------------------------------------------------------- toy models (known answers)


class ToyDetector(nn.Module):
    """logits = f(wave @ W^T): a "detector" whose attributions are known analytically."""

    frame_hop_s = 0.02

    def __init__(self, length: int, nonlinear: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(2, length, generator=g, dtype=torch.float64))
        self.nonlinear = nonlinear

    def num_frames(self, lengths):
        return torch.as_tensor(lengths, dtype=torch.long) // 320

    def forward(self, wave, lengths=None, output_attentions=False):
        z = wave.to(self.weight.dtype) @ self.weight.T  # (B, 2)
        return SimpleNamespace(logits=torch.tanh(z / 10) * 10 if self.nonlinear else z, attentions=None)


@pytest.mark.parametrize("nonlinear", [False, True])
def test_integrated_gradients_completeness_on_toy_model(nonlinear):
    L = 3200
    toy = ToyDetector(L, nonlinear).eval()
    wave = 0.3 * torch.randn(2, L, generator=torch.Generator().manual_seed(2))
    for target in (0, 1):
        att = attribute(toy, wave, method="integrated_gradients", target=target, n_steps=16)
        with torch.no_grad():
            gap = (toy(wave).logits - toy(torch.zeros_like(wave)).logits)[:, target]  # F(x) - F(0)
        delta = att.extras["convergence_delta"]
        assert delta.abs().max() < 1e-4 * gap.abs().max()
        torch.testing.assert_close(att.scores.sum(dim=1).double(), gap.float().double(), rtol=1e-4, atol=1e-4)
    assert toy.weight.grad is None


def test_occlusion_and_saliency_on_linear_toy_model_are_exact():
    L = 3200
    toy = ToyDetector(L).eval()
    wave = 0.3 * torch.randn(1, L, generator=torch.Generator().manual_seed(3))
    n = toy.num_frames(torch.tensor([L]))
    contrib = pool_to_frames((wave.double() * toy.weight[0].detach())[:, :], n)  # w_s x_s summed per frame
    occ = attribute(toy, wave, method="occlusion", target=0)
    torch.testing.assert_close(occ.scores.double(), contrib, rtol=1e-4, atol=1e-5)
    ig = attribute(toy, wave, method="integrated_gradients", target=0, n_steps=4)
    torch.testing.assert_close(ig.scores.double(), contrib, rtol=1e-4, atol=1e-5)
    sal = attribute(toy, wave, method="saliency", target=0)
    expected = pool_to_frames(toy.weight[:1].detach().abs(), n)
    torch.testing.assert_close(sal.scores.double(), expected, rtol=1e-4, atol=1e-5)
