"""Explanation evaluation runner: faithfulness, localization and cost of every method."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from xai_lib.config import DataConfig, ModelConfig, config_from_dict
from xai_lib.explanation.evaluation import (
    RESULT_KEYS,
    evaluate_methods,
    load_explanation_set,
    representation_score_fn,
)
from xai_lib.explanation.metrics import localization_metrics
from xai_lib.detector.model import Detector

from conftest import tiny_model_dict
from toy_detectors import FrameEnergyDetector

HOP = 320


class EnergyDetector(FrameEnergyDetector):
    """A detector with a known answer: spoof logit ``gain * (2 * sum_t keep_t x_t - 3)`` over the
    frame energies x_t, so an utterance with a few loud frames is spoof because of exactly those."""

    def __init__(self) -> None:
        super().__init__(scale=2.0, offset=3.0)


class EnergyImportance:
    """The perfect explanation of :class:`EnergyDetector`: the frame energy itself."""

    def frame_importance(self, detector, wave, lengths):
        feats, mask = detector.frontend(wave, lengths)
        return feats[..., 0] / feats[..., 0].amax(dim=1, keepdim=True)


def _energy_items() -> list[dict]:
    """Quiet noise with a few loud (spoofed) frames; varied lengths so batches are padded."""
    rng = np.random.default_rng(0)
    items = []
    for i, n_frames in enumerate([40, 33, 40, 27, 36]):
        wave = 0.01 * rng.standard_normal(n_frames * HOP).astype(np.float32)
        loud = rng.choice(n_frames, size=4, replace=False)
        for t in loud:
            wave[t * HOP : (t + 1) * HOP] = np.where(rng.random(HOP) < 0.5, -1.0, 1.0)
        mask = np.zeros(n_frames, dtype=bool)
        mask[loud] = True
        items.append({"utt_id": f"u{i}", "wave": wave, "spoof_mask": mask, "label": 0})
    return items


def test_perfect_explanation_beats_random_through_evaluate_methods():
    det = EnergyDetector().eval()
    items = _energy_items()
    res = evaluate_methods(det, EnergyImportance(), items, methods=["importance", "random", "occlusion"],
                           steps=10, batch_size=2, progress=False)
    assert set(res) == {"importance", "random", "occlusion"}
    for method, r in res.items():
        assert set(r) == set(RESULT_KEYS), method
        assert r["ms_per_utt"] > 0 and r["cost_vs_forward"] > 0
        assert len(r["deletion_curve"]) == len(r["insertion_curve"]) == len(r["fractions"]) == 11
    imp, rnd = res["importance"], res["random"]
    assert imp["deletion_auc"] < rnd["deletion_auc"] - 0.2
    assert imp["insertion_auc"] > rnd["insertion_auc"] + 0.2
    # deleting the loud frames first removes the evidence at once; inserting them restores it
    assert imp["deletion_curve"][0] > 0.99 and imp["deletion_curve"][2] < 0.1
    assert imp["insertion_curve"][2] > 0.99
    # the perfect explanation also localizes the spoofed frames perfectly
    assert imp["loc_auc"] == pytest.approx(1.0) and imp["loc_eer"] == pytest.approx(0.0)
    assert imp["pointing_game"] == 1.0
    # occlusion recovers the same ordering on this model
    assert res["occlusion"]["loc_auc"] == pytest.approx(1.0)
    # every value but the per-item attributions (kept for figures) is metrics.json-ready
    json.dumps({m: {k: v for k, v in r.items() if k != "attributions"} for m, r in res.items()})
    assert [a.shape for a in imp["attributions"]] == [np.asarray(it["spoof_mask"]).shape for it in items]
    assert det.gain.grad is None and det.gain.item() == 1.0


def test_localization_wiring_matches_localization_metrics_on_hand_made_masks():
    det = EnergyDetector().eval()
    items = _energy_items()
    rng = np.random.default_rng(5)
    for it in items[:3]:  # hand-made masks that only partly agree with the loud frames
        it["spoof_mask"] = rng.random(it["spoof_mask"].size) < 0.3
    items[3]["spoof_mask"] = None  # full spoof, no ground truth: faithfulness only
    items[4]["label"] = 1  # bona fide with an (all-false) mask: localization only
    items[4]["spoof_mask"] = np.zeros_like(items[4]["spoof_mask"])
    res = evaluate_methods(det, EnergyImportance(), items, methods=["importance"], steps=4, batch_size=3,
                           progress=False)["importance"]
    with torch.no_grad():
        expected_imp = []
        for it in items:
            w = torch.as_tensor(it["wave"])[None]
            expected_imp.append(EnergyImportance().frame_importance(det, w, None)[0].numpy())
    loc_idx = [0, 1, 2, 4]
    expected = localization_metrics([expected_imp[i] for i in loc_idx], [items[i]["spoof_mask"] for i in loc_idx])
    for key in ("loc_auc", "loc_eer", "pointing_game"):
        assert res[key] == pytest.approx(expected[key], abs=1e-6), key
    assert 0.0 < res["loc_auc"] < 1.0
    assert res["loc_auc_per_attack"] is None  # the items name no attack

    # per attack: the same metric over each attack's utterances
    for it, attack in zip(items, ["A01", "A02", "A01", "A02", "-"]):
        it["attack"] = attack
    res = evaluate_methods(det, EnergyImportance(), items, methods=["importance"], steps=4, batch_size=3,
                           progress=False)["importance"]
    assert set(res["loc_auc_per_attack"]) == {"A01", "A02"}
    a01 = localization_metrics([expected_imp[i] for i in (0, 2)], [items[i]["spoof_mask"] for i in (0, 2)])
    assert res["loc_auc_per_attack"]["A01"] == pytest.approx(a01["loc_auc"], abs=1e-6)


def test_metrics_are_none_when_their_utterances_are_absent():
    det = EnergyDetector().eval()
    items = _energy_items()[:2]
    for it in items:
        it["spoof_mask"] = None
    res = evaluate_methods(det, None, items, methods=["random"], steps=4, progress=False)["random"]
    assert res["loc_auc"] is None and res["pointing_game"] is None
    assert res["deletion_auc"] is not None
    for it in items:
        it["label"] = 1  # nothing to explain as spoof
    res = evaluate_methods(det, None, items, methods=["random"], steps=4, progress=False)["random"]
    assert res["deletion_auc"] is None and res["deletion_curve"] is None


def test_bad_requests_are_clear_errors():
    det = EnergyDetector().eval()
    items = _energy_items()[:1]
    with pytest.raises(ValueError, match="importance_model"):
        evaluate_methods(det, None, items, methods=["importance"], progress=False)
    with pytest.raises(ValueError, match="valid methods"):
        evaluate_methods(det, None, items, methods=["lime"], progress=False)
    with pytest.raises(ValueError, match="wave"):
        evaluate_methods(det, None, [{"utt_id": "x"}], methods=["random"], progress=False)


# ----------------------------------------------------------------------------- the real (tiny) detector


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    return Detector(config_from_dict(tiny_model_dict(), ModelConfig)).eval()


def test_representation_score_fn_keeping_every_frame_is_the_detector_itself(detector):
    g = torch.Generator().manual_seed(0)
    wave = 0.1 * torch.randn(2, 8000, generator=g)
    lengths = torch.tensor([8000, 6000])
    wave[1, 6000:] = 0
    score_fn = representation_score_fn(detector, wave, lengths)
    with torch.no_grad():
        p_spoof = detector(wave, lengths).logits.softmax(-1)[:, 0]
    T = int(detector.num_frames(torch.tensor([8000])))
    keep = torch.ones(2, T)
    torch.testing.assert_close(score_fn(keep), p_spoof, rtol=1e-5, atol=1e-6)
    keep[1, int(detector.num_frames(torch.tensor([6000]))):] = 0  # padded frames are absent anyway
    torch.testing.assert_close(score_fn(keep), p_spoof, rtol=1e-5, atol=1e-6)
    keep[:, :5] = 0
    assert not torch.allclose(score_fn(keep), p_spoof)


class SSLImportance:
    def frame_importance(self, detector, wave, lengths):
        feats, mask = detector.frontend(wave, lengths)
        return torch.sigmoid(feats.mean(-1) * 4) * mask


def test_every_method_on_the_tiny_detector_leaves_it_untouched(detector):
    rng = np.random.default_rng(1)
    items = []
    for i, n in enumerate([6400, 4800, 5600]):
        mask = np.zeros(int(detector.num_frames(torch.tensor([n]))), dtype=bool)
        mask[3:9] = True
        items.append({"utt_id": f"t{i}", "wave": 0.1 * rng.standard_normal(n).astype(np.float32),
                      "spoof_mask": mask, "label": 0})
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    res = evaluate_methods(detector, SSLImportance(), items, steps=4, batch_size=2, progress=False,
                           method_kwargs={"integrated_gradients": {"n_steps": 2},
                                          "occlusion": {"perturbations_per_eval": 16}})
    assert list(res) == ["importance", "integrated_gradients", "saliency", "occlusion", "attention_rollout", "grad_cam",
                         "grad_cam_minmax05", "random"]
    for method, r in res.items():
        for key in ("deletion_auc", "insertion_auc", "loc_auc", "loc_eer", "pointing_game"):
            assert r[key] is not None and math.isfinite(r[key]), (method, key)
            assert 0.0 <= r[key] <= 1.0, (method, key)
        assert r["ms_per_utt"] > 0 and r["cost_vs_forward"] > 0
    assert all(torch.equal(before[k], v) for k, v in detector.state_dict().items())
    assert all(p.grad is None for p in detector.parameters())
    assert not detector.training


def test_load_explanation_set_reads_the_partially_spoofed_subset(tiny_corpus, detector):
    cfg = DataConfig(root=str(tiny_corpus))
    items = load_explanation_set(cfg, "eval", num_utterances=3, seed=0, detector=detector)
    assert len(items) == 3
    again = load_explanation_set(cfg, "eval", num_utterances=3, seed=0, detector=detector)
    assert [it["utt_id"] for it in items] == [it["utt_id"] for it in again]
    for it in items:
        n_frames = int(detector.num_frames(torch.tensor([it["wave"].size])))
        assert it["spoof_mask"].dtype == bool and it["spoof_mask"].shape == (n_frames,)
        assert it["wave"].dtype == np.float32
    assert any(it["spoof_mask"].any() and not it["spoof_mask"].all() for it in items), \
        "partially spoofed utterances have both spoofed and bona fide frames"


def test_stage3_uses_the_runs_thread_setting_unless_told(tmp_path):
    """Notebook 03 runs on the threads the run trained with (say 1, robust on a shared machine),
    or on the ones it is given."""
    from xai_lib.explanation.report import use_run_threads

    before = torch.get_num_threads()
    try:
        (tmp_path / "config_stage2.yaml").write_text("training:\n  num_threads: 1\n")
        assert use_run_threads(tmp_path) == 1 == torch.get_num_threads()
        assert use_run_threads(tmp_path, 2) == 2 == torch.get_num_threads()
        assert use_run_threads(tmp_path / "nothing_here") == 2  # no config: left as it is
    finally:
        torch.set_num_threads(before)
