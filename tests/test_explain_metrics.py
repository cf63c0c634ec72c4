"""Explanation metrics: deletion/insertion faithfulness and spoof localization."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xai_lib.explanation.metrics import (
    deletion_insertion,
    localization_metrics,
    random_baseline_importance,
)


class EvidenceDetector:
    """Toy detector: spoof probability = fraction of the 'evidence' frames still present.

    Records every ``keep`` it is called with.
    """

    def __init__(self, evidence: np.ndarray):  # (B, T) bool
        self.evidence = torch.as_tensor(evidence, dtype=torch.float32)
        self.calls: list[torch.Tensor] = []

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B,)
        self.calls.append(keep.clone())
        return (keep * self.evidence).sum(1) / self.evidence.sum(1)


def _evidence(batch: int = 1, n_frames: int = 20, n_evidence: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    evidence = np.zeros((batch, n_frames), dtype=bool)
    for b in range(batch):
        evidence[b, rng.choice(n_frames, n_evidence, replace=False)] = True
    return evidence


def test_perfect_ordering_has_known_auc_and_beats_random():
    # 20 frames, 5 evidence frames, 20 steps: each step removes one frame. Perfect deletion
    # curve 1, .8, .6, .4, .2, 0, ... -> AUC 0.05 * 2.5 = 0.125; insertion = 1 - 0.125.
    evidence = _evidence(batch=4)
    detector = EvidenceDetector(evidence)
    perfect = deletion_insertion(detector, evidence.astype(float), steps=20)
    assert perfect["deletion_auc"] == pytest.approx(0.125)
    assert perfect["insertion_auc"] == pytest.approx(0.875)
    np.testing.assert_allclose(perfect["deletion_curve"][:6], [1, 0.8, 0.6, 0.4, 0.2, 0])
    assert perfect["fractions"][0] == 0.0 and perfect["fractions"][-1] == 1.0

    worst = deletion_insertion(detector, 1.0 - evidence, steps=20)
    assert worst["deletion_auc"] == pytest.approx(0.875)
    assert worst["insertion_auc"] == pytest.approx(0.125)

    random_imp = np.stack(random_baseline_importance([20] * 4, seed=3))
    rand = deletion_insertion(detector, random_imp, steps=20)
    assert perfect["deletion_auc"] < rand["deletion_auc"] < worst["deletion_auc"]
    assert perfect["insertion_auc"] > rand["insertion_auc"] > worst["insertion_auc"]


def test_curve_endpoints_and_per_utterance_outputs():
    evidence = _evidence(batch=3, seed=1)
    res = deletion_insertion(EvidenceDetector(evidence), np.random.default_rng(0).random((3, 20)),
                             steps=10)
    assert res["deletion_curves"].shape == res["insertion_curves"].shape == (3, 11)
    assert res["deletion_auc_per_utt"].shape == (3,)
    np.testing.assert_allclose(res["deletion_curves"][:, 0], 1.0)  # all frames kept
    np.testing.assert_allclose(res["deletion_curves"][:, -1], 0.0)  # none kept
    np.testing.assert_allclose(res["insertion_curves"][:, 0], 0.0)
    np.testing.assert_allclose(res["insertion_curves"][:, -1], 1.0)
    assert res["deletion_auc"] == pytest.approx(res["deletion_auc_per_utt"].mean())


def test_variable_lengths_batched_one_call_per_step_and_padding_never_kept():
    lengths = [20, 12, 7]
    evidence = np.zeros((3, 20), dtype=bool)
    evidence[0, [1, 5]] = evidence[1, [0, 11]] = evidence[2, [6]] = True
    importance = [evidence[b, :n].astype(float) for b, n in enumerate(lengths)]
    detector = EvidenceDetector(evidence)
    res = deletion_insertion(detector, importance, steps=5)
    assert len(detector.calls) == 2 * 6  # deletion + insertion, one batched call per step
    for keep in detector.calls:
        assert keep.shape == (3, 20) and keep.dtype == torch.float32
        assert set(keep.unique().tolist()) <= {0.0, 1.0}
        for b, n in enumerate(lengths):
            assert keep[b, n:].sum() == 0  # padded frames always absent
    # first deletion call keeps every valid frame, last insertion call too
    assert detector.calls[0].sum(1).tolist() == [20, 12, 7]
    assert detector.calls[-1].sum(1).tolist() == [20, 12, 7]
    # evidence ranked first -> deleted within the first steps
    assert np.all(res["deletion_auc_per_utt"] < 0.25)


def test_padded_array_with_lengths_or_mask_gives_the_same_result():
    evidence = _evidence(batch=2, n_frames=16, n_evidence=3, seed=4)
    evidence[1, 10:] = False
    evidence[1, 2] = True
    importance = np.random.default_rng(1).random((2, 16))
    by_len = deletion_insertion(EvidenceDetector(evidence), importance, lengths=[16, 10], steps=8)
    mask = np.arange(16)[None, :] < np.array([[16], [10]])
    by_mask = deletion_insertion(EvidenceDetector(evidence), importance, frame_mask=mask, steps=8)
    np.testing.assert_allclose(by_len["deletion_curves"], by_mask["deletion_curves"])
    np.testing.assert_allclose(by_len["insertion_curves"], by_mask["insertion_curves"])


def test_ties_are_broken_by_frame_order():
    # constant importance: frames go in index order, so evidence at the start is removed first
    evidence = np.zeros((1, 10), dtype=bool)
    evidence[0, :2] = True
    res_a = deletion_insertion(EvidenceDetector(evidence), np.zeros((1, 10)), steps=10)
    res_b = deletion_insertion(EvidenceDetector(evidence), np.zeros((1, 10)), steps=10)
    np.testing.assert_allclose(res_a["deletion_curve"][:3], [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(res_a["deletion_curves"], res_b["deletion_curves"])


def test_deletion_insertion_errors_are_clear():
    evidence = _evidence()
    with pytest.raises(ValueError, match="one spoof probability per utterance"):
        deletion_insertion(lambda keep: torch.zeros(3), evidence.astype(float))
    with pytest.raises(ValueError, match="not both"):
        deletion_insertion(EvidenceDetector(evidence), evidence.astype(float), lengths=[20],
                           frame_mask=np.ones((1, 20), bool))
    with pytest.raises(ValueError, match="lengths"):
        deletion_insertion(EvidenceDetector(evidence), evidence.astype(float), lengths=[25])
    with pytest.raises(ValueError, match="no valid frame"):
        deletion_insertion(EvidenceDetector(evidence), evidence.astype(float), lengths=[0])


def test_random_baseline_importance_is_seeded():
    a = random_baseline_importance([5, 3], seed=7)
    b = random_baseline_importance(np.array([5, 3]), seed=7)
    c = random_baseline_importance([5, 3], seed=8)
    assert [x.shape for x in a] == [(5,), (3,)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


# ----------------------------------------------------------------------------- localization


def _masks():
    m1 = np.zeros(10, bool)
    m1[3:7] = True
    m2 = np.zeros(8, bool)
    m2[:2] = True
    m3 = np.zeros(6, bool)  # fully bona fide: counted in ROC, excluded from pointing
    return [m1, m2, m3]


def test_localization_perfect_and_inverted_importance():
    masks = _masks()
    perfect = localization_metrics([m.astype(float) for m in masks], masks)
    assert perfect["loc_auc"] == 1.0
    assert perfect["loc_eer"] == 0.0
    assert perfect["pointing_game"] == 1.0
    assert perfect["n_pointing_utts"] == 2
    assert perfect["n_frames"] == 24

    inverted = localization_metrics([1.0 - m for m in masks], masks)
    assert inverted["loc_auc"] == 0.0
    assert inverted["loc_eer"] == 1.0
    assert inverted["pointing_game"] == 0.0


def test_localization_constant_importance_is_chance():
    masks = _masks()
    res = localization_metrics([np.full(m.size, 0.3) for m in masks], masks)
    assert res["loc_auc"] == pytest.approx(0.5)
    assert res["loc_eer"] == pytest.approx(0.5)
    # ties in the arg-max go to the first frame: spoofed in utterance 2 only
    assert res["pointing_game"] == pytest.approx(0.5)


def test_localization_hand_computed_case():
    # spoof frames score 3 and 1, bona fide 2 and 0: 3 of 4 pairs ordered -> AUC 0.75;
    # ROC (fpr, tpr): (0,0) (0,.5) (.5,.5) (.5,1) (1,1) crosses FNR = FPR at 0.5.
    res = localization_metrics([np.array([3.0, 2.0, 1.0, 0.0])],
                               [np.array([True, False, True, False])])
    assert res["loc_auc"] == pytest.approx(0.75)
    assert res["loc_eer"] == pytest.approx(0.5)
    assert res["pointing_game"] == 1.0


def test_localization_auc_matches_sklearn_with_ties():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(5)
    masks = [rng.random(n) < 0.3 for n in (50, 61, 40)]
    importance = [np.round(rng.random(m.size) + 0.3 * m, 1) for m in masks]  # many ties
    res = localization_metrics(importance, masks)
    expected = sklearn_metrics.roc_auc_score(np.concatenate(masks), np.concatenate(importance))
    assert res["loc_auc"] == pytest.approx(expected)
    assert 0.5 < res["loc_auc"] < 1.0 and 0.0 < res["loc_eer"] < 0.5


def test_localization_truncates_small_length_mismatch_and_rejects_large():
    masks = _masks()
    importance = [np.r_[m.astype(float), 0.0] for m in masks]  # one extra frame each
    assert localization_metrics(importance, masks)["loc_auc"] == 1.0
    with pytest.raises(ValueError, match="Utterance 0"):
        localization_metrics([np.zeros(20)], [masks[0]])


def test_localization_without_spoof_frames_is_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="one class"):
        res = localization_metrics([np.arange(5.0)], [np.zeros(5, bool)])
    assert np.isnan(res["loc_auc"]) and np.isnan(res["pointing_game"])
