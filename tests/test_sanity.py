"""Sanity checks of the attributions (xai_lib.explanation.sanity): randomisation, counterfactual
restoration, input-domain deletion, and metric parity with reference implementations."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import tiny_model_dict
from toy_detectors import FrameEnergyDetector
from xai_lib.explanation.sanity import (
    DEFAULT_LEVELS,
    WaveformRemover,
    cascade,
    crossfade_weights,
    load_sources,
    noise_floor,
    randomisation_check,
    restoration_check,
    restore_frames,
    run_sanity,
)

SR, HOP = 16000, 320


class LoudFrameDetector(FrameEnergyDetector):
    """The planted toy: spoof logit ``gain * (20 * sum_t x_t - 1)`` over the frame energies x_t:
    quiet noise is bona fide, a few loud (artifact) frames make an utterance spoof."""

    def __init__(self) -> None:
        super().__init__(scale=20.0, offset=1.0)


def _planted_items(n: int = 3) -> tuple[list[dict], list[np.ndarray]]:
    """Quiet noise (the bona fide source) with a loud artifact spliced into one span."""
    rng = np.random.default_rng(0)
    items, sources = [], []
    for i in range(n):
        frames = 40 + 5 * i
        src = (0.01 * rng.standard_normal(frames * HOP)).astype(np.float32)
        wave = src.copy()
        a, b = 10 + i, 16 + i
        wave[a * HOP: b * HOP] += (0.3 * np.sin(2 * np.pi * 3000 * np.arange((b - a) * HOP) / SR)).astype(np.float32)
        mask = np.zeros(frames, bool)
        mask[a:b] = True
        items.append({"utt_id": f"U{i}", "wave": wave, "spoof_mask": mask, "label": 0, "attack": "A01"})
        sources.append(src)
    return items, sources


# ----------------------------------------------------------------------------- randomisation


@pytest.fixture(scope="module")
def tiny_detector():
    from xai_lib.config import ModelConfig, config_from_dict
    from xai_lib.detector.model import Detector

    torch.manual_seed(0)
    return Detector(config_from_dict(tiny_model_dict(), ModelConfig)).eval()


def _speech_items(n: int = 2) -> list[dict]:
    rng = np.random.default_rng(3)
    items = []
    for i in range(n):
        t = np.arange(8000 + 1600 * i) / SR
        x = np.sin(2 * np.pi * (150 + 50 * i) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.1 * rng.standard_normal(t.size)
        items.append({"utt_id": f"S{i}", "wave": (0.1 * x).astype(np.float32), "spoof_mask": None, "label": 0})
    return items


def test_cascade_has_at_least_three_levels_and_randomises_top_down(tiny_detector):
    before = {k: v.clone() for k, v in tiny_detector.state_dict().items()}
    seen = []
    for name, model, info in cascade(tiny_detector, seed=0):
        state = model.state_dict()
        changed = {k for k in state if not torch.equal(state[k], before[k])}
        seen.append((name, changed, info["fraction_of_parameters"]))
    assert [s[0] for s in seen] == [name for name, _ in DEFAULT_LEVELS] and len(seen) >= 3
    assert all(k.startswith("conformer.fc5") for k in seen[0][1]) and seen[0][1]
    assert any(k.startswith("conformer.encoder_blocks") for k in seen[1][1]) and any(k.startswith("LL") for k in seen[1][1])
    assert not any(k.startswith("ssl_model") for k in seen[1][1])
    assert any(k.startswith("ssl_model.encoder") for k in seen[2][1])
    assert any(k.startswith("ssl_model.feature_extractor") for k in seen[3][1])
    assert "conformer.positional_emb" not in seen[-1][1]  # the fixed sinusoid table is not learned
    fractions = [s[2] for s in seen]
    assert fractions == sorted(fractions) and fractions[-1] > 0.9
    # the detector itself is untouched
    assert all(torch.equal(v, before[k]) for k, v in tiny_detector.state_dict().items())


def test_randomisation_changes_a_gradient_map_and_random_stays_uncorrelated(tiny_detector):
    res = randomisation_check(tiny_detector, None, _speech_items(), ["saliency", "random"], seed=0)
    assert len(res["levels"]) >= 3
    sal, rnd = res["randomisation"]["saliency"], res["randomisation"]["random"]
    assert [e["level"] for e in sal] == [name for name, _ in DEFAULT_LEVELS]
    assert sal[-1]["spearman"] < 1.0 - 1e-6
    assert sal[-1]["spearman"] < sal[0]["spearman"] + 1e-9 or sal[0]["spearman"] < 1.0
    assert all(abs(e["spearman"]) < 0.35 for e in rnd)
    assert res["randomisation_summary"]["random"]["flagged"] is False
    assert res["randomisation_summary"]["saliency"]["flagged"] == (sal[-1]["spearman"] >= 0.5)


# ----------------------------------------------------------------------------- restoration


def test_restore_frames_takes_the_source_only_where_asked():
    rng = np.random.default_rng(0)
    wave, src = rng.standard_normal(20 * HOP).astype(np.float32), rng.standard_normal(20 * HOP).astype(np.float32)
    frames = np.zeros(20, bool)
    frames[5:8] = True
    out = restore_frames(wave, src, frames)
    np.testing.assert_array_equal(out[: 4 * HOP], wave[: 4 * HOP])  # far from the edit: untouched
    np.testing.assert_array_equal(out[10 * HOP:], wave[10 * HOP:])
    np.testing.assert_allclose(out[5 * HOP + 60: 8 * HOP - 60], src[5 * HOP + 60: 8 * HOP - 60], atol=1e-6)
    np.testing.assert_array_equal(restore_frames(wave, src, np.zeros(20, bool)), wave)
    w = crossfade_weights(np.r_[np.zeros(500), np.ones(500)], 80)
    assert w.min() == 0.0 and w.max() == 1.0 and np.all(np.diff(w) >= -1e-12)
    assert abs(w[500] - 0.5) < 0.05  # the ramp is centred on the edge
    np.testing.assert_array_equal(crossfade_weights(np.ones(300), 80), np.ones(300))


def test_oracle_restoration_flips_a_planted_artifact_detector():
    det = LoudFrameDetector().eval()
    items, sources = _planted_items()
    energy = [(it["wave"][: len(it["wave"]) // HOP * HOP].reshape(-1, HOP) ** 2).mean(1) for it in items]
    attributions = {"energy": energy, "random": [np.random.default_rng(i).random(e.size) for i, e in enumerate(energy)]}
    res = restoration_check(det, items, sources, attributions, {"energy": 0.01, "random": 0.99}, score_threshold=0.0)
    assert res["n_called_spoof"] == len(items)
    oracle = res["rows"]["oracle"]["true_spans"]
    assert oracle["flip_rate"] == 1.0 and oracle["mean_score_change"] > 0
    assert oracle["spoofed_frames_restored"] == 1.0
    assert res["rows"]["energy"]["calibrated"]["flip_rate"] == 1.0  # the perfect explanation
    assert res["rows"]["energy"]["top_rho"]["flip_rate"] == 1.0
    assert res["rows"]["random"]["calibrated"]["flip_rate"] < 1.0  # 1 % of the frames cannot remove it


def test_missing_sources_skip_restoration_with_a_reason(tmp_path, caplog):
    items, _ = _planted_items(1)
    sources, reason = load_sources(items, tmp_path, "eval")
    assert sources == [None] and "regenerate" in reason
    det = LoudFrameDetector().eval()
    with caplog.at_level("WARNING"):
        out = run_sanity(det, None, items, tmp_path / "run", ["saliency", "random"], {}, SimpleNamespace(root=tmp_path),
                         score_threshold=0.0, levels=[("gain", ("gain",))], retrain=False, steps=2)
    assert "regenerate" in out["sanity"]["restoration"]["skipped"] and out["restoration"] == {}
    assert "restoration skipped" in caplog.text


def test_run_sanity_end_to_end_on_a_toy(tmp_path):
    det = LoudFrameDetector().eval()
    items, sources = _planted_items()
    src_dir = tmp_path / "sources"
    src_dir.mkdir()
    for it, s in zip(items, sources):
        sf.write(src_dir / f"{it['utt_id']}.flac", s, SR, subtype="PCM_24")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"stage1": {"dev_threshold": 0.0}}))
    out = run_sanity(det, None, items, run_dir, ["saliency", "occlusion", "random"], {"saliency": 1e-3},
                     levels=[("gain", ("gain",))], retrain=False, steps=4, sources_dir=src_dir,
                     calibration_items=[{"wave": s} for s in sources])
    sanity = out["sanity"]
    assert set(out["restoration"]) == {"saliency", "occlusion", "random"}
    assert sanity["restoration"]["rows"]["oracle"]["true_spans"]["flip_rate"] == 1.0
    assert out["restoration"]["occlusion"]["calibrated"] is not None  # calibrated on the bona fide items
    dom = sanity["input_domain"]
    assert set(dom["methods"]) == {"saliency", "occlusion", "random"} and dom["n_utterances"] == 3
    # removing the loud frames first kills the spoof evidence; random does not
    assert dom["methods"]["occlusion"]["deletion_auc"] < dom["methods"]["random"]["deletion_auc"]
    assert dom["methods"]["occlusion"]["representation_deletion_auc"] < dom["methods"]["random"]["representation_deletion_auc"]
    assert dom["rank_agreement"]["deletion_spearman"] is not None
    assert [e["level"] for e in sanity["randomisation"]["saliency"]] == ["gain"]
    assert all((run_dir / "figures" / f).is_file() for f in ("stage3_sanity_randomisation.png", "stage3_sanity_domains.png"))
    json.dumps(out)  # merges into metrics.json as it is


# ----------------------------------------------------------------------------- waveform-domain removal


def test_waveform_removal_replaces_removed_frames_by_the_noise_floor():
    det = LoudFrameDetector().eval()
    items, _ = _planted_items(2)
    from xai_lib.data.audio import pad_batch

    wave, lengths = pad_batch([it["wave"] for it in items])
    remover = WaveformRemover(det, wave, lengths, seed=0)
    T = int(det.num_frames(lengths).max())
    keep_all = torch.ones(2, T)
    np.testing.assert_allclose(remover.remove(keep_all).numpy(), wave.numpy(), atol=1e-7)
    keep = keep_all.clone()
    for b, it in enumerate(items):
        keep[b, : it["spoof_mask"].size][torch.from_numpy(it["spoof_mask"])] = 0.0
    out = remover.remove(keep).numpy()
    for b, it in enumerate(items):
        a, e = np.flatnonzero(it["spoof_mask"])[[0, -1]]
        inner = out[b, (a * HOP) + 60: (e + 1) * HOP - 60]
        assert 0.5 * 0.01 < np.sqrt(np.mean(inner**2)) < 2.0 * 0.01  # the floor, not the artifact
        np.testing.assert_array_equal(out[b, : (a - 1) * HOP], wave[b, : (a - 1) * HOP].numpy())  # untouched
        n = int(lengths[b])
        assert np.all(out[b, n:] == 0.0)  # padding stays silent
    p_all, p_removed = remover(keep_all), remover(keep)
    assert bool((p_all > 0.5).all()) and bool((p_removed < 0.5).all())


def test_noise_floor_has_the_level_of_the_quietest_frames():
    rng = np.random.default_rng(0)
    x = np.concatenate([0.001 * rng.standard_normal(20 * HOP), 0.5 * rng.standard_normal(180 * HOP)])
    n = noise_floor(x, rng=np.random.default_rng(1))
    assert n.shape == x.shape
    assert abs(np.sqrt(np.mean(n**2)) / 0.001 - 1.0) < 0.1


# ----------------------------------------------------------------------------- metric parity


def _fixed_localisation_inputs():
    rng = np.random.default_rng(42)
    imps, masks = [], []
    for i in range(12):
        T = 30 + 7 * i
        m = np.zeros(T, bool)
        a = int(rng.integers(0, T - 8))
        m[a: a + int(rng.integers(3, 8))] = True
        imp = rng.random(T) + 0.8 * m * rng.random()  # continuous: no ties at the maximum
        imps.append(imp)
        masks.append(m)
    return imps, masks


def test_pooled_frame_roc_auc_equals_scikit_learn():
    from sklearn.metrics import roc_auc_score

    from xai_lib.explanation.metrics import localization_metrics

    imps, masks = _fixed_localisation_inputs()
    imps[0] = np.round(imps[0], 1)  # ties count 1/2 in both
    ours = localization_metrics(imps, masks)["loc_auc"]
    assert ours == pytest.approx(roc_auc_score(np.concatenate(masks), np.concatenate(imps)), abs=1e-12)


def test_pointing_game_equals_quantus():
    quantus = pytest.importorskip("quantus", reason="quantus is not installed (optional; see the sanity report)")
    from xai_lib.explanation.metrics import localization_metrics

    imps, masks = _fixed_localisation_inputs()
    hits = []
    for imp, m in zip(imps, masks):
        r = quantus.PointingGame(disable_warnings=True)(
            model=None, x_batch=np.zeros((1, 1, imp.size), np.float32), y_batch=np.zeros(1, int),
            a_batch=imp[None, None], s_batch=m[None, None].astype(float))
        hits.append(float(r[0]))
    assert 0 < np.mean(hits) < 1  # the inputs discriminate
    assert localization_metrics(imps, masks)["pointing_game"] == pytest.approx(np.mean(hits), abs=1e-12)


# ----------------------------------------------------------------------------- the corpus's bona fide sources


def test_synthetic_partial_spoofs_keep_their_bona_fide_source(tiny_corpus):
    """The source equals the partially spoofed file outside its spans, sample for sample, and differs inside."""
    from xai_lib.data.synthetic import source_path

    meta = json.loads((tiny_corpus / "corpus.json").read_text())
    assert meta["bonafide_sources"] == "partial_spoof/sources/{dev,eval}"
    for split in ("dev", "eval"):
        spans = json.loads((tiny_corpus / "partial_spoof" / f"spans_{split}.json").read_text())
        assert spans
        for utt, utt_spans in spans.items():
            x, _ = sf.read(tiny_corpus / "partial_spoof" / split / "flac" / f"{utt}.flac", dtype="int16")
            s, _ = sf.read(source_path(tiny_corpus, split, utt), dtype="int16")
            inside = np.zeros(len(x), bool)
            for a, b in utt_spans:
                inside[a:b] = True
            assert len(s) == len(x) and np.array_equal(x[~inside], s[~inside])
            assert not np.array_equal(x[inside], s[inside])


def test_stage2_trains_on_the_randomised_detector_in_a_temporary_run(tiny_detector, tiny_corpus):
    """The stronger check's plumbing: a randomised copy is saved, Stage 2 trains on it with a short
    schedule, and its importance is measured on partially spoofed items; threads are restored."""
    from xai_lib.config import Stage2Config, load_config
    from xai_lib.explanation.evaluation import load_explanation_set
    from xai_lib.explanation.sanity import importance_on_randomised_detector, randomised_copy

    cfg = load_config({"xai": {"importance_hidden_dim": 8}, "data": {"root": str(tiny_corpus), "crop_samples": 8000},
                       "training": {"batch_size": 4, "eval_batch_size": 4, "num_threads": 1, "seed": 3}}, Stage2Config)
    items = load_explanation_set(cfg.data, "eval", detector=tiny_detector)
    torch.set_num_threads(2)
    try:
        res = importance_on_randomised_detector(randomised_copy(tiny_detector), cfg, items,
                                                ["training.num_epochs=1", "training.max_steps_per_epoch=1",
                                                 "data.max_train_utts=8", "data.max_eval_utts=4"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert 0.0 <= res["loc_auc"] <= 1.0 and res["epochs_completed"] == 1 and res["max_steps_per_epoch"] == 1


def test_pointing_game_ties_ours_take_the_first_maximum_quantus_any():
    """The one known difference: on a tie at the maximum ours scores the first arg-max frame
    (documented in localization_metrics), Quantus a hit if any tied maximum is spoofed."""
    quantus = pytest.importorskip("quantus", reason="quantus is not installed (optional; see the sanity report)")
    from xai_lib.explanation.metrics import localization_metrics

    imp, mask = np.array([0.2, 1.0, 0.3, 1.0, 0.1]), np.array([False, False, False, True, False])
    r = quantus.PointingGame(disable_warnings=True)(model=None, x_batch=np.zeros((1, 1, 5), np.float32),
                                                    y_batch=np.zeros(1, int), a_batch=imp[None, None],
                                                    s_batch=mask[None, None].astype(float))
    assert float(r[0]) == 1.0 and localization_metrics([imp], [mask])["pointing_game"] == 0.0
