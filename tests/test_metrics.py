"""Stage-1 detection metrics: EER, DET curve, min t-DCF, per-attack EER, score files."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from xai_lib.detector.metrics import (
    ScoreFileError,
    TDCFCostModel,
    compute_det_curve,
    utterance_eer,
    compute_min_tdcf,
    eer_per_attack,
    read_score_file,
    write_score_file,
)

# ----------------------------------------------------------------------------- EER


def test_eer_perfect_separation_is_zero_with_threshold_between_classes():
    bona = np.array([2.0, 3.5, 1.2])
    spoof = np.array([-1.0, 0.3, -4.0, 0.9])
    eer, threshold = utterance_eer(bona, spoof)
    assert eer == 0.0
    # everything at or below the threshold is rejected: all spoofs, no bona fide
    assert spoof.max() <= threshold < bona.min()


def test_eer_identical_distributions_is_half():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    assert utterance_eer(values, values)[0] == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    eer, _ = utterance_eer(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(eer - 0.5) < 0.03


def test_eer_hand_computed_case():
    # sorted: 0.1 s, 0.2 s, 0.3 b, 0.7 s, 0.8 b, 0.9 b. Rejecting the 3 lowest scores
    # rejects 1/3 of bona fide and accepts 1/3 of spoofs (0.7): FRR = FAR = 1/3.
    eer, threshold = utterance_eer([0.9, 0.8, 0.3], [0.7, 0.2, 0.1])
    assert eer == pytest.approx(1 / 3)
    assert threshold == pytest.approx(0.3)


def test_eer_unequal_rates_takes_mean_at_closest_point():
    # sorted: .1s .2s .3s .5b .6s .9b; |FRR-FAR| is smallest (0.25) first after the
    # three lowest scores: FRR 0, FAR 1/4 -> EER = 0.125 (as the ASVspoof package).
    eer, _ = utterance_eer([0.5, 0.9], [0.1, 0.6, 0.2, 0.3])
    assert eer == pytest.approx(0.125)


def test_eer_accepts_torch_and_rejects_nan():
    eer, _ = utterance_eer(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.0]))
    assert eer == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        utterance_eer([1.0, float("nan")], [0.0])
    with pytest.raises(ValueError, match="empty"):
        utterance_eer([], [0.0])


def test_det_curve_is_monotonic_from_accept_all_to_reject_all():
    rng = np.random.default_rng(1)
    frr, far, thresholds = compute_det_curve(rng.normal(1, 1, 50), rng.normal(-1, 1, 70))
    assert frr.shape == far.shape == thresholds.shape == (121,)
    assert (frr[0], far[0], frr[-1], far[-1]) == (0.0, 1.0, 1.0, 0.0)
    assert np.all(np.diff(frr) >= 0) and np.all(np.diff(far) <= 0)


# ----------------------------------------------------------------------------- t-DCF

# ASV scores (higher = target). EER threshold = -1 (highest rejected score, as the
# package); rates use `>= threshold` for acceptance: Pfa_asv = 1/4, Pmiss_asv = 0,
# Pmiss_spoof_asv = 1/4.
ASV_TAR = np.array([1.0, 2.0, 3.0, 4.0])
ASV_NON = np.array([-4.0, -3.0, -2.0, -1.0])
ASV_SPOOF = np.array([-1.5, 0.5, 2.5, 3.5])


def _hand_constants():
    cost = TDCFCostModel()
    c0 = cost.p_non * cost.c_fa_asv * 0.25
    c1 = cost.p_tar * cost.c_miss_cm - c0
    c2 = cost.c_fa_cm * cost.p_spoof * 0.75
    return c0, c1, c2


def test_min_tdcf_perfect_cm_hits_the_floor():
    bona_cm, spoof_cm = np.array([2.0, 3.0, 4.0]), np.array([-2.0, -1.0])
    # 2019 formulation: the ASV-only cost C0 is omitted -> a perfect CM costs 0
    assert compute_min_tdcf(bona_cm, spoof_cm, ASV_TAR, ASV_NON, ASV_SPOOF) == 0.0
    # 2021 formulation: the floor is the ASV-only cost C0 / (C0 + min(C1, C2))
    c0, c1, c2 = _hand_constants()
    floor = compute_min_tdcf(bona_cm, spoof_cm, ASV_TAR, ASV_NON, ASV_SPOOF, formulation="2021")
    assert floor == pytest.approx(c0 / (c0 + min(c1, c2)))
    assert 0.0 < floor < 0.1


@pytest.mark.parametrize("formulation", ["2019", "2021"])
def test_min_tdcf_grows_as_the_cm_gets_worse(formulation):
    rng = np.random.default_rng(2)
    bona = rng.normal(0, 1, 500)
    values = []
    for gap in (6.0, 1.5, 0.0):
        spoof = rng.normal(-gap, 1, 500)
        values.append(compute_min_tdcf(bona, spoof, ASV_TAR, ASV_NON, ASV_SPOOF,
                                       formulation=formulation))
    assert values[0] < values[1] < values[2] <= 1.0 + 1e-12
    assert values[2] > 0.8  # an uninformative CM is close to the default cost 1


def test_min_tdcf_hand_computed_single_operating_point():
    # CM: one bona fide below one spoof. Best point rejects nothing but spoof -2:
    # operating points (Pmiss, Pfa): (0,1), (0,.5), (.5,.5), (.5,0), (1,0)
    c0, c1, c2 = _hand_constants()
    value = compute_min_tdcf([0.0, 3.0], [-2.0, 1.0], ASV_TAR, ASV_NON, ASV_SPOOF)
    expected = min(c2, 0.5 * c2, 0.5 * c1 + 0.5 * c2, 0.5 * c1, c1) / min(c1, c2)
    assert value == pytest.approx(expected)


def test_tdcf_cost_model_accepts_package_keys_and_rejects_unknown():
    cost = TDCFCostModel.from_mapping({"Pspoof": 0.05, "Cfa_cm": 10})
    assert cost == TDCFCostModel()
    with pytest.raises(ValueError, match="Pfoo"):
        TDCFCostModel.from_mapping({"Pfoo": 1.0})


def test_min_tdcf_rejects_asv_that_never_accepts_spoofs():
    with pytest.raises(ValueError, match="C2"):
        compute_min_tdcf([1.0], [0.0], ASV_TAR, ASV_NON, np.array([-10.0, -9.0]))


# ----------------------------------------------------------------------------- per attack


def test_eer_per_attack_and_pooled():
    scores = {"b1": 2.0, "b2": 3.0, "b3": 4.0, "s1": -1.0, "s2": -2.0, "s3": 3.5, "s4": 2.5}
    labels = {"b1": 1, "b2": 1, "b3": 1, "s1": 0, "s2": 0, "s3": 0, "s4": 0, "unscored": 0}
    attacks = {"b1": "-", "s1": "A01", "s2": "A01", "s3": "A02", "s4": "A02"}
    result = eer_per_attack(scores, labels, attacks)
    assert list(result) == ["A01", "A02", "pooled"]
    bona = [2.0, 3.0, 4.0]
    assert result["A01"] == 0.0  # A01 is perfectly separated
    assert result["A02"] == pytest.approx(utterance_eer(bona, [3.5, 2.5])[0])
    assert result["A02"] > 0.3
    assert result["pooled"] == pytest.approx(utterance_eer(bona, [-1.0, -2.0, 3.5, 2.5])[0])


def test_eer_per_attack_names_the_unlabelled_utterance():
    with pytest.raises(KeyError, match="s9"):
        eer_per_attack({"b": 1.0, "s9": 0.0}, {"b": 1}, {"s9": "A01"})
    with pytest.raises(KeyError, match="s1"):
        eer_per_attack({"b": 1.0, "s1": 0.0}, {"b": 1, "s1": 0}, {})


# ----------------------------------------------------------------------------- score files


def test_score_file_round_trip(tmp_path):
    ids = ["LA_E_1", "LA_E_2", "LA_E_3"]
    scores = np.array([1.23456789, -0.5, 7.0])
    path = write_score_file(tmp_path / "sub" / "scores.txt", ids, scores)
    lines = path.read_text().splitlines()
    assert lines[0] == "LA_E_1 1.234568"
    assert all(re.fullmatch(r"\S+ -?\d+\.\d{6}", line) for line in lines)
    back = read_score_file(path)
    assert list(back) == ids
    np.testing.assert_allclose(list(back.values()), scores, atol=1e-6)


@pytest.mark.parametrize(
    "bad_line, message",
    [("LA_E_3 0.1 extra", "expected 2 columns"), ("LA_E_3 abc", "not a number"),
     ("LA_E_1 0.5", "already scored on line 1")],
)
def test_read_score_file_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "scores.txt"
    path.write_text(f"LA_E_1 0.1\n\nLA_E_2 0.2\n{bad_line}\n")
    with pytest.raises(ScoreFileError) as info:
        read_score_file(path)
    assert f"{path}:4" in str(info.value)
    assert message in str(info.value)


def test_write_score_file_rejects_mismatch_and_whitespace_ids(tmp_path):
    with pytest.raises(ValueError, match="2 utterance ids but 1 scores"):
        write_score_file(tmp_path / "s.txt", ["a", "b"], [1.0])
    with pytest.raises(ValueError, match="whitespace"):
        write_score_file(tmp_path / "s.txt", ["a b"], [1.0])
