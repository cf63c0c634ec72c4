"""Label-free calibration, the metrics of a calibrated answer, and the neutral removal of frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model_dict

from xai_lib.config import ModelConfig, config_from_dict
from xai_lib.detector.model import Detector
from xai_lib.detector.removal import BonafideReference
from xai_lib.explanation.calibration import (
    calibrated_metrics,
    calibration_record,
    frame_eer_by_resolution,
    frame_threshold,
    threshold_for,
)
from xai_lib.importance.loss import frame_label_loss, span_frame_labels


def test_threshold_flags_the_requested_share_of_bona_fide_frames():
    rng = np.random.default_rng(0)
    bona = [rng.normal(size=n) for n in (150, 220, 90)]
    for alpha in (0.01, 0.05, 0.2):
        tau = frame_threshold(bona, alpha)
        flagged = np.mean(np.concatenate(bona) > tau)
        assert flagged == pytest.approx(alpha, abs=0.005)
    # scale-free: the same ranking at another scale gives the same flagged frames
    assert np.mean(np.concatenate(bona) * 1e-4 > frame_threshold([b * 1e-4 for b in bona], 0.05)) == pytest.approx(
        np.mean(np.concatenate(bona) > frame_threshold(bona, 0.05)))


def test_calibration_record_keeps_thresholds_for_other_rates():
    bona = [np.linspace(0, 1, 1001)]
    rec = calibration_record(bona, 0.01)
    assert rec["threshold"] == pytest.approx(0.99) and rec["n_frames"] == 1001 and rec["n_utterances"] == 1
    assert threshold_for(rec) == rec["threshold"]
    assert threshold_for(rec, 0.1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="no threshold stored for a false-flag rate of 0.3"):
        threshold_for(rec, 0.3)
    with pytest.raises(ValueError, match="at least one bona fide"):
        frame_threshold([], 0.01)


def test_calibrated_metrics_count_frames_above_the_threshold():
    partial = [np.array([0.9, 0.8, 0.1, 0.1]), np.array([0.2, 0.7, 0.7])]
    masks = [np.array([1, 1, 1, 0], bool), np.array([0, 0, 1], bool)]
    # flagged: [1,1,0,0], [0,1,1] -> tp 3 (f0, f1, g2), fp 1 (g1), fn 1 (f2)
    m = calibrated_metrics(0.5, [np.array([0.6, 0.1, 0.2, 0.3])], partial, masks)
    assert m["false_flag_rate"] == pytest.approx(0.25)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.75) and m["iou"] == pytest.approx(3 / 5)
    nothing = calibrated_metrics(2.0, [np.zeros(3)], partial, masks)
    assert nothing["precision"] is None and nothing["recall"] == 0.0 and nothing["false_flag_rate"] == 0.0


def test_segment_eer_pools_every_utterance_and_max_pools_segments():
    hop = 0.02
    bona = [np.full(32, 0.1)]
    full = [np.full(32, 0.9)]
    partial_mask = np.zeros(32, bool)
    partial_mask[8:12] = True
    partial_scores = np.where(partial_mask, 0.8, 0.2)
    perfect = frame_eer_by_resolution([*bona, *full, partial_scores], [np.zeros(32, bool), np.ones(32, bool), partial_mask], hop)
    assert set(perfect) == {"0.02", "0.04", "0.08", "0.16", "0.32", "0.64"}
    assert all(v == pytest.approx(0.0) for v in perfect.values())
    constant = frame_eer_by_resolution([np.zeros(32)] * 2, [np.zeros(32, bool), np.ones(32, bool)], hop)
    assert constant["0.02"] == pytest.approx(0.5)
    # at 0.32 s (16 frames) the partial utterance's first segment holds the spoofed frames: labelled spoofed,
    # scored by its max (0.8); the second segment is bona fide (0.2)
    one = frame_eer_by_resolution([partial_scores], [partial_mask], hop, resolutions_s=(0.32,))
    assert one["0.32"] == pytest.approx(0.0)


def test_span_frame_labels_mark_frames_whose_centre_is_spoofed():
    spans = torch.tensor([[0, 0], [640, 1280], [0, 10_000]])
    labels = span_frame_labels(spans, num_frames=6, hop_samples=320)  # centres 160, 480, 800, 1120, 1440, 1760
    assert labels.tolist() == [[0] * 6, [0, 0, 1, 1, 0, 0], [1] * 6]


def test_frame_label_loss_is_small_for_right_labels_and_large_for_wrong():
    labels = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    good = frame_label_loss(torch.tensor([[0.01, 0.99, 0.99, 0.01]]), labels, None)
    bad = frame_label_loss(torch.tensor([[0.99, 0.01, 0.01, 0.99]]), labels, None)
    assert good < 0.02 < 4.0 < bad
    masked = frame_label_loss(torch.tensor([[0.01, 0.99, 0.99, 0.99]]), labels, torch.tensor([[1, 1, 1, 0]]).bool())
    assert masked == pytest.approx(float(good), rel=0.05)  # the padded (wrong) frame does not count


@pytest.fixture
def detector() -> Detector:
    torch.manual_seed(0)
    return Detector(config_from_dict(tiny_model_dict(), ModelConfig)).eval()


def test_removing_every_frame_leaves_a_bona_fide_reference_utterance(detector):
    rng = np.random.default_rng(1)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (8000, 6400, 9600)]
    ref = BonafideReference.from_utterances(detector, waves, k=2)
    assert ref.features.shape[0] == 2 and ref.p_spoof.shape == (2,)
    x = torch.as_tensor(0.1 * rng.standard_normal((2, 8000)), dtype=torch.float32)
    with torch.no_grad():
        ssl, mask = detector.frontend(x)
        T = ssl.shape[1]
        kept = ref.remove(ssl, torch.ones(2, T))
        removed = ref.remove(ssl, torch.zeros(2, T))
    torch.testing.assert_close(kept, ssl)
    for b in range(2):  # every frame removed: exactly reference b's frames, tiled to the length
        k = int(ref.lengths[b])
        expected = ref.features[b, :k].repeat(-(-T // k), 1)[:T]
        torch.testing.assert_close(removed[b], expected)
    # a reference utterance with all its frames "removed" is scored as the reference itself
    k = int(ref.lengths[0])
    with torch.no_grad():
        logits = detector.backend(ref.remove(ref.features[:1, :k], torch.zeros(1, k)), None).logits
    assert float(logits.softmax(-1)[0, 0]) == pytest.approx(float(ref.p_spoof[0]), abs=1e-5)
    # stored in a checkpoint and read back without pickled objects
    again = BonafideReference.from_state(ref.to_state())
    torch.testing.assert_close(again.features, ref.features)


def test_stage3_calibrates_grad_cam_and_keeps_the_min_max_variant_at_its_fixed_threshold(detector, tmp_path):
    from xai_lib.explanation.evaluation import attribute_items
    from xai_lib.explanation.report import calibrated_table, run_stage3

    rng = np.random.default_rng(2)

    def item(i: int, n: int, label: int, spoofed: slice | None) -> dict:
        mask = np.zeros(int(detector.num_frames(torch.tensor([n]))), dtype=bool)
        if spoofed is not None:
            mask[spoofed] = True
        return {"utt_id": f"u{i}", "wave": 0.1 * rng.standard_normal(n).astype(np.float32), "spoof_mask": mask,
                "label": label, "attack": "A01" if label == 0 else None}

    items = [item(0, 6400, 0, slice(3, 9)), item(1, 5600, 0, slice(10, 15))]
    calibration = [item(2, 6400, 1, None), item(3, 4800, 1, None)]
    whole = [item(4, 5600, 1, None), item(5, 4800, 0, slice(0, None))]
    methods = ["grad_cam", "grad_cam_minmax05", "random"]
    out = run_stage3(detector, None, items, tmp_path, methods=methods, num_figures=0, progress=False,
                     calibration_items=calibration, whole_items=whole, false_flag_rate=0.05)
    rows = out["methods"]
    assert list(rows) == methods
    cal = attribute_items(detector, None, calibration, ["grad_cam"])["grad_cam"]
    assert rows["grad_cam"]["calibrated"]["threshold"] == pytest.approx(frame_threshold(cal, 0.05))
    assert rows["grad_cam"]["calibrated"]["threshold_source"] == "calibrated"
    fixed = rows["grad_cam_minmax05"]["calibrated"]
    assert fixed["threshold"] == 0.5 and fixed["threshold_source"] == "fixed"
    assert fixed["false_flag_rate"] is not None and fixed["f1"] is not None
    # the same utterances, ranked the same way within each: equal deletion AUC, other answers at the threshold
    assert rows["grad_cam_minmax05"]["deletion_auc"] == pytest.approx(rows["grad_cam"]["deletion_auc"])
    table = calibrated_table(rows)
    assert "| grad_cam | " in table and "| grad_cam_minmax05 | 0.500 (fixed) |" in table
