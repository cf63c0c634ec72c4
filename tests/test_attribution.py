"""Stage-3 attribution API: every method on a tiny detector, captum axioms on toy models."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from xai_lib.explanation.methods import (
    METHOD_REGISTRY,
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

DETERMINISTIC = ("importance", "integrated_gradients", "saliency", "occlusion", "attention_rollout", "grad_cam",
                 "grad_cam_minmax05")
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


# ----------------------------------------------------------------------------- Grad-CAM


def test_method_list_has_grad_cam_and_its_min_max_variant():
    assert METHODS == ("importance", "integrated_gradients", "saliency", "occlusion", "attention_rollout", "grad_cam",
                       "grad_cam_minmax05", "random")
    assert METHOD_REGISTRY["grad_cam"].gradient and METHOD_REGISTRY["grad_cam"].fixed_threshold is None
    assert METHOD_REGISTRY["grad_cam_minmax05"].fixed_threshold == 0.5
    assert all(METHOD_REGISTRY[m].fixed_threshold is None for m in METHODS if m != "grad_cam_minmax05")


def test_tcm_tap_adds_no_state_and_sits_on_the_path_to_the_logits(detector, batch):
    wave, lengths = batch
    assert isinstance(detector.gradcam_tap, nn.Identity) and detector.gradcam_frames_per_step == 1
    assert not any("gradcam" in k for k in detector.state_dict()), "the tap must not add checkpoint keys"
    seen = []
    handle = detector.gradcam_tap.register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        out = detector(wave, lengths)
    finally:
        handle.remove()
    T = int(detector.num_frames(torch.tensor([wave.shape[1]])))
    assert len(seen) == 1 and seen[0].shape == (2, detector.emb_size, T)  # (B, E, T): channels on dim 1
    logit = out.logits[:, 0].sum()
    g_tap, g_last = torch.autograd.grad(logit, [seen[0], out.frame_tokens], allow_unused=True)
    assert g_tap is not None and g_tap.abs().sum() > 0, "the tapped features must reach the logits"
    # why the tap is not on the last block's output: fc5 reads the class token only
    assert g_last is None or g_last.abs().sum() == 0


def _hand_grad_cam(detector, wave, lengths, target):
    """Grad-CAM by hand from a hook on the tap: ReLU(sum_c mean_valid_t(dy/dA_c) * A_c(t))."""
    seen = []
    handle = detector.gradcam_tap.register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        with torch.enable_grad():
            logits = detector(wave, lengths).logits
            (grad,) = torch.autograd.grad(logits[:, target].sum(), seen[0])  # (B, E, T)
    finally:
        handle.remove()
    act = seen[0].detach()
    n = detector.num_frames(lengths)
    valid = (torch.arange(act.shape[-1])[None, :] < n[:, None]).float()  # (B, T)
    weights = (grad * valid[:, None]).sum(-1) / n[:, None]  # (B, E): mean over the valid frames
    return torch.relu((weights[:, :, None] * act).sum(1)) * valid  # (B, T)


@pytest.mark.parametrize("target", [0, 1])
def test_grad_cam_equals_weights_times_activations_from_hooks(detector, batch, target):
    wave, lengths = batch
    expected = _hand_grad_cam(detector, wave, lengths, target)  # autograd.grad: no .grad left on parameters
    att = attribute(detector, wave, lengths, method="grad_cam", target=target)
    torch.testing.assert_close(att.scores, expected, rtol=1e-4, atol=1e-6)
    assert (att.scores[att.valid_mask] > 0).any() and (att.scores >= 0).all()
    signed = attribute(detector, wave, lengths, method="grad_cam", target=target, relu=False)
    assert (signed.scores < 0).any() and torch.equal(signed.scores.clamp_min(0), att.scores)


def test_grad_cam_minmax05_is_per_utterance_min_max_with_the_fixed_threshold(detector, batch):
    wave, lengths = batch
    raw = attribute(detector, wave, lengths, method="grad_cam")
    mm = attribute(detector, wave, lengths, method="grad_cam_minmax05")
    assert mm.extras["fixed_threshold"] == 0.5
    for b, n in enumerate(mm.lengths.tolist()):
        s = mm.scores[b, :n]
        assert float(s.min()) == 0.0 and float(s.max()) == pytest.approx(1.0)
        assert (mm.scores[b, n:] == 0).all()
    torch.testing.assert_close(mm.scores, raw.normalized().scores)


class TapToy(nn.Module):
    """A "detector" with a tap on (B, 2, T') features, T' = T // 2 (2 frames per step, an odd last
    frame unseen, as AASIST's pool by 3): logits = W @ mean_t'(A), so Grad-CAM is
    ReLU(sum_c W[target, c] / T' * A_c(t')) exactly."""

    frame_hop_s = 0.02
    gradcam_frames_per_step = 2

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[1.0, -2.0], [-0.5, 1.5]]))
        self.gradcam_tap = nn.Identity()

    def num_frames(self, lengths):
        return torch.as_tensor(lengths, dtype=torch.long) // 320

    def features(self, wave):
        T = wave.shape[1] // 320
        frames = wave[:, : T * 320].reshape(wave.shape[0], T, 320).mean(-1)  # (B, T)
        steps = frames[:, : 2 * (T // 2)].reshape(wave.shape[0], -1, 2).mean(-1)  # (B, T')
        return torch.stack([steps, steps ** 2], dim=1)  # (B, 2, T')

    def forward(self, wave, lengths=None, output_attentions=False):
        a = self.gradcam_tap(self.features(wave))
        return SimpleNamespace(logits=a.mean(-1) @ self.weight.T, attentions=None)


def test_grad_cam_steps_cover_their_frames_on_a_toy_with_a_known_answer():
    toy = TapToy().eval()
    wave = 0.5 + 0.3 * torch.randn(1, 7 * 320, generator=torch.Generator().manual_seed(4))  # T = 7, T' = 3
    att = attribute(toy, wave, method="grad_cam", target=1)
    a = toy.features(wave)  # (1, 2, 3)
    expected_steps = torch.relu((toy.weight[1].detach()[None, :, None] / 3 * a).sum(1))  # (1, 3)
    expected = torch.cat([expected_steps.repeat_interleave(2, dim=1), torch.zeros(1, 1)], dim=1)  # frame 6: no step
    assert att.scores.shape == (1, 7) and att.extras["gradcam_steps"] == 3
    torch.testing.assert_close(att.scores, expected.detach())
    assert toy.weight.grad is None


def test_grad_cam_without_a_tap_is_a_clear_error():
    toy = ToyDetector(3200).eval()
    with pytest.raises(ValueError, match="gradcam_tap"):
        attribute(toy, torch.zeros(1, 3200), method="grad_cam")


# ----------------------------------------------------------------------------- local occlusion


@pytest.mark.parametrize("norm,context_s,per_eval", [("layer", None, 5), ("group", 0.1, 1), ("group", 0.3, 5)])
def test_local_occlusion_equals_captum_feature_ablation(norm, context_s, per_eval):
    """Recomputing only the conv frames a silenced frame reaches gives FeatureAblation's scores:
    layer-normalised convs (XLS-R) and first-layer statistics over 0.1 s / 0.3 s around each frame
    (the demo's), on a padded batch holding utterances shorter than the statistics window, just
    longer, and long enough for silenced frames whose neighbourhood touches neither end."""
    cfg = tiny_model_dict()
    cfg["ssl"].update(feat_extract_norm=norm, group_norm_context_s=context_s)
    torch.manual_seed(0)
    det = Detector(config_from_dict(cfg, ModelConfig)).eval()
    lengths = torch.tensor([20000, 1700, 5130, 12321])  # 62 frames, 5, 16, 38
    g = torch.Generator().manual_seed(2)
    wave = 0.1 * torch.randn(4, 20000, generator=g)
    for r, n in enumerate(lengths.tolist()):
        wave[r, n:] = 0.0
    att = Attributor(det)
    local = att.attribute(wave, lengths, method="occlusion", target=0, perturbations_per_eval=per_eval)
    ref = att.attribute(wave, lengths, method="occlusion", target=0, local=False)
    assert local.extras["occlusion"] == "local" and ref.extras["occlusion"] == "captum"
    assert det.occlusion_reach()[0] < 0.5 * int(det.num_frames(lengths[:1]))  # a real neighbourhood
    torch.testing.assert_close(local.scores, ref.scores, rtol=1e-4, atol=1e-5 * float(ref.scores.abs().max()))
    assert float(ref.scores.abs().max()) > 0


def test_occlusion_with_whole_utterance_statistics_falls_back_to_captum(batch):
    """A group-normalised first layer over the whole utterance: silencing a frame changes every
    conv frame, so nothing is local and captum's FeatureAblation runs."""
    cfg = tiny_model_dict()
    cfg["ssl"].update(feat_extract_norm="group")
    torch.manual_seed(0)
    det = Detector(config_from_dict(cfg, ModelConfig)).eval()
    assert det.occlusion_reach() is None
    att = Attributor(det).attribute(*batch, method="occlusion", target=0)
    assert att.extras["occlusion"] == "captum"
