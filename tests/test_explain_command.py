"""``python -m xai_lib.explain`` and ``xai_lib.explain(...)`` on a tiny run directory: the five files per
input and their agreement, directories, bad inputs, missing models or calibrations, long files in
chunks, and the verdict threshold stored by ``stage1_report``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_model_dict

import xai_lib
from xai_lib.config import ModelConfig, XAIConfig, config_from_dict
from xai_lib.detector.checkpoint import LoadReport, load_detector, save_detector
from xai_lib.detector.model import Detector
from xai_lib.explain import JSON_KEYS, OUTPUT_SUFFIXES, Explainer, ExplainError, InputError, main
from xai_lib.files import file_sha256
from xai_lib.importance.checkpoint import load_xai, save_xai
from xai_lib.importance.module import XAIModule

ROOT = Path(__file__).resolve().parent.parent
SR = 16000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCORE_THRESHOLD = 0.05


def _tone(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    x[t > seconds / 2] += 0.3 * rng.standard_normal(int(np.sum(t > seconds / 2)))  # a different second half
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A run directory with a tiny detector (verdict threshold stored), a Stage-2 module whose
    calibration is tau = the 60th percentile of its importance on ``good.wav``, and a Stage-3
    calibration of the ``random`` baseline; plus an input folder."""
    base = tmp_path_factory.mktemp("explain")
    run_dir, audio = base / "run", base / "audio"
    run_dir.mkdir()
    audio.mkdir()
    torch.manual_seed(0)
    det = Detector(config_from_dict(tiny_model_dict(), ModelConfig)).eval()
    det_path = save_detector(det, run_dir / "stage1_detector.pth",
                             extra={"score_threshold": SCORE_THRESHOLD, "score_threshold_source": "dev EER"})
    cfg = XAIConfig(importance_hidden_dim=16)
    module = XAIModule(det.ssl_dim, cfg)
    module.prototypes.set_from_class_means(torch.randn(2, det.ssl_dim))
    module.eval()
    sf.write(audio / "good.wav", _tone(1.5), SR)
    good = sf.read(audio / "good.wav", dtype="float32")[0]  # as the command reads it (16-bit PCM)
    with torch.no_grad():
        w = module(det.frontend(torch.from_numpy(good)[None])[0]).importance[0].numpy()
    tau = float(np.quantile(w, 0.6))
    save_xai(module, run_dir / "stage2_xai.pth", cfg, det_path, file_sha256(det_path),
             extra={"calibration": {"threshold": tau, "false_flag_rate": 0.01, "bonafide_quantiles": {"0.05": 0.0}}})
    (run_dir / "metrics.json").write_text(json.dumps({"stage3": {"methods": {"random": {
        "calibrated": {"threshold": 0.5, "false_flag_rate": 0.01, "bonafide_quantiles": {"0.05": 0.9}}}}}}))
    return {"run": run_dir, "audio": audio, "good": audio / "good.wav", "tau": tau, "importance": w}


def _listing(*dirs: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for d in dirs for p in d.rglob("*")}


def _read_outputs(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    labels = [line.split("\t") for line in (out / f"{name}.txt").read_text().splitlines()]
    rttm = [line.split() for line in (out / f"{name}.rttm").read_text().splitlines()]
    csv = (out / f"{name}.csv").read_text().splitlines()
    return {"json": data, "labels": labels, "rttm": rttm, "csv": csv}


# ----------------------------------------------------------------------------- the command


def test_command_writes_five_agreeing_files_and_nothing_elsewhere(run, tmp_path, capsys):
    out = tmp_path / "out"
    before = _listing(run["run"], run["audio"])
    assert main([str(run["good"]), "--run", str(run["run"]), "--out", str(out)]) == 0
    assert _listing(run["run"], run["audio"]) == before  # nothing written outside --out
    assert sorted(p.name for p in out.iterdir()) == sorted(f"good{s}" for s in OUTPUT_SUFFIXES)

    o = _read_outputs(out, "good")
    data = o["json"]
    assert tuple(data) == JSON_KEYS
    assert data["method"] == "importance" and data["threshold"] == pytest.approx(run["tau"])
    assert data["score_threshold"] == SCORE_THRESHOLD and data["frame_hop_s"] == 0.02
    assert data["duration_s"] == pytest.approx(1.5)
    assert data["verdict"] == ("spoof" if data["score"] < SCORE_THRESHOLD else "bonafide")
    # the spans are the runs of frames whose absolute importance exceeds tau
    w, tau = run["importance"], run["tau"]
    spans = data["spans"]
    assert spans and sum(round((s["end_s"] - s["start_s"]) / 0.02) for s in spans) == int(np.sum(w > tau))
    for s in spans:
        inside = w[round(s["start_s"] / 0.02) : round(s["end_s"] / 0.02)]
        assert np.all(inside > tau) and s["peak"] == pytest.approx(inside.max(), abs=1e-6)
        assert s["mean"] == pytest.approx(inside.mean(), abs=1e-6)
    # ... and the same spans in the Audacity labels and the RTTM
    assert len(o["labels"]) == len(o["rttm"]) == len(spans)
    for s, (start, end, label), r in zip(spans, o["labels"], o["rttm"]):
        assert float(start) == pytest.approx(s["start_s"], abs=1e-3) and float(end) == pytest.approx(s["end_s"], abs=1e-3)
        assert label == f"spoof (peak {s['peak']:.2f})"
        assert r[0] == "SPEAKER" and r[1] == "good" and r[7] == "spoof" and len(r) == 10
        assert float(r[3]) == pytest.approx(s["start_s"], abs=1e-3)
        assert float(r[4]) == pytest.approx(s["end_s"] - s["start_s"], abs=2e-3)
    # one CSV row per frame: absolute scores, frame start times
    assert o["csv"][0] == "time_s,score" and len(o["csv"]) == 1 + w.size
    rows = np.array([[float(v) for v in line.split(",")] for line in o["csv"][1:]])
    np.testing.assert_allclose(rows[:, 0], np.arange(w.size) * 0.02, atol=1e-6)
    np.testing.assert_allclose(rows[:, 1], w, rtol=1e-4, atol=1e-6)
    assert (out / "good.png").read_bytes()[:8] == PNG_MAGIC
    stdout = capsys.readouterr().out
    assert f"good.wav: {data['verdict']} (score" in stdout and f"{len(spans)} span" in stdout


def test_directory_recurses_with_unique_names(run, tmp_path, capsys):
    src = tmp_path / "in"
    for rel in ("a/x.wav", "b/x.wav", "c.flac"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(src / rel, _tone(0.5, seed=len(rel)), SR)
    (src / "notes.txt").write_text("not audio, not an input")
    out = tmp_path / "out"
    assert main([str(src), str(run["good"]), "--run", str(run["run"]), "--out", str(out)]) == 0
    names = {p.stem for p in out.iterdir()}
    assert names == {"a__x", "b__x", "c", "good"}
    assert len(list(out.iterdir())) == 4 * len(OUTPUT_SUFFIXES)
    assert json.loads((out / "b__x.json").read_text())["file"] == str(src / "b" / "x.wav")
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def test_bad_inputs_are_reported_and_the_good_file_still_runs(run, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.wav").write_text("this is not audio")
    (bad / "empty.flac").write_bytes(b"")
    sf.write(bad / "short.wav", np.zeros(100, np.float32), SR)
    nan = np.zeros(SR // 2, np.float32)
    nan[10] = np.nan
    sf.write(bad / "nan.wav", nan, SR, subtype="FLOAT")
    out = tmp_path / "out"
    code = main([str(bad / "text.wav"), str(bad / "empty.flac"), str(bad / "short.wav"), str(bad / "nan.wav"),
                 str(tmp_path / "missing.wav"), str(run["good"]), "--run", str(run["run"]), "--out", str(out)])
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(f"good{s}" for s in OUTPUT_SUFFIXES)
    err = capsys.readouterr().err.splitlines()
    for name, reason in (("text.wav", "unreadable"), ("empty.flac", "empty"), ("short.wav", "too short"),
                         ("nan.wav", "NaN"), ("missing.wav", "no such file")):
        lines = [line for line in err if name in line]
        assert len(lines) == 1 and reason in lines[0], (name, err)


def test_usage_errors_exit_2_with_one_clear_message(run, tmp_path, capsys):
    no_stage2 = tmp_path / "run1"
    no_stage2.mkdir()
    shutil.copy(run["run"] / "stage1_detector.pth", no_stage2)
    out = tmp_path / "out"
    assert main([str(run["good"]), "--run", str(no_stage2), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No Stage 2 model in" in err and "stage2_xai.pth" in err and "pick a baseline --method" in err
    # a baseline without a Stage-3 calibration names what to run
    assert main([str(run["good"]), "--run", str(no_stage2), "--method", "saliency", "--out", str(out)]) == 2
    assert "run Stage 3" in capsys.readouterr().err
    assert main([str(run["good"]), "--run", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "run directory not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--run", str(run["run"]), "--out", str(out)]) == 2
    assert "no audio files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([str(run["good"]), "--run", str(run["run"]), "--method", "gradcam"])
    assert exc.value.code == 2
    assert not out.exists()


def test_false_flag_rate_picks_a_stored_quantile_or_says_which_exist(run, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(run["good"]), "--run", str(run["run"]), "--out", str(out), "--method", "random"]
    assert main(args) == 0
    assert json.loads((out / "good.json").read_text())["threshold"] == 0.5  # the stored alpha
    assert main(args + ["--false-flag-rate", "0.05"]) == 0
    data = json.loads((out / "good.json").read_text())
    assert data["threshold"] == 0.9 and data["method"] == "random"
    assert all(s["peak"] > 0.9 for s in data["spans"])
    assert main(args + ["--false-flag-rate", "0.2"]) == 2
    assert "no threshold for false-flag rate 0.2; available: 0.01, 0.05" in capsys.readouterr().err


def test_python_dash_m_runs_the_command(run, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "xai_lib.explain", str(run["good"]), "--run", str(run["run"]),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{run['good']}: ") and "span" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(f"good{s}" for s in OUTPUT_SUFFIXES)


# ----------------------------------------------------------------------------- the API


def test_api_module_is_callable_and_returns_an_explanation(run, tmp_path):
    from matplotlib.figure import Figure

    from xai_lib.explain import explain

    e = xai_lib.explain(run["good"], run_dir=run["run"])
    assert e.verdict in ("spoof", "bonafide") and e.method == "importance"
    assert e.spans == json.loads(json.dumps(e.spans)) and e.spans
    np.testing.assert_allclose(e.frame_scores, run["importance"], rtol=1e-5, atol=1e-6)
    fig = e.plot()
    assert isinstance(fig, Figure) and e.verdict.upper() in fig.axes[0].get_title()
    paths = e.save(tmp_path / "api")
    assert [p.suffix for p in paths] == list(OUTPUT_SUFFIXES) and all(p.stat().st_size > 0 for p in paths[:1])
    # the function and the callable module agree; a waveform at another rate is resampled
    same = explain(str(run["good"]), run["run"])
    assert same.score == pytest.approx(e.score) and same.spans == e.spans
    wave = sf.read(run["good"], dtype="float32")[0]
    w8k = explain(torch.from_numpy(wave[::2].copy()), run["run"], sample_rate=8000)
    assert w8k.file == "<waveform>" and w8k.frame_scores.size == e.frame_scores.size
    with pytest.raises(ExplainError, match="sample_rate"):
        explain(wave, run["run"])
    with pytest.raises(InputError, match="too short"):
        explain(np.zeros(200, np.float32), run["run"], sample_rate=SR)


def test_long_file_is_explained_in_chunks_with_one_score_per_frame(run):
    det = load_detector(run["run"] / "stage1_detector.pth")
    xai = load_xai(run["run"] / "stage2_xai.pth", detector=det)
    explainer = Explainer(det, "importance", threshold=run["tau"], importance_model=xai)
    calls = []
    original = explainer._importance_chunk
    explainer._importance_chunk = lambda x: calls.append(x.shape[1]) or original(x)  # type: ignore[method-assign]
    wave = np.tile(_tone(1.0), 70)  # 70 s
    e = explainer(wave, sample_rate=SR)
    assert len(calls) == 3 and max(calls) <= 30 * SR + 80  # 30 s chunks, each with its last frame's 80 samples
    assert e.frame_scores.size == int(det.num_frames(torch.tensor([wave.size]))[0]) == 3499
    assert np.all(np.isfinite(e.frame_scores)) and e.duration_s == pytest.approx(70.0)
    # a file no longer than a chunk is one detector pass: its score is the detector's own
    short = Explainer(det, "importance", threshold=run["tau"], importance_model=xai)(run["good"])
    with torch.no_grad():
        expected = float(det(torch.from_numpy(sf.read(run["good"], dtype="float32")[0])[None]).scores[0])
    assert short.score == pytest.approx(expected, abs=1e-5)
    assert short.verdict == ("spoof" if expected < SCORE_THRESHOLD else "bonafide")


# ----------------------------------------------------------------------------- the verdict threshold


def test_stage1_report_stores_the_dev_threshold_read_back_by_explain(tiny_corpus, tmp_path):
    from xai_lib.config import Stage1Config, load_config
    from xai_lib.detector.training import stage1_report, store_score_threshold
    from xai_lib.explain import score_threshold_of

    torch.manual_seed(0)
    path = save_detector(Detector(config_from_dict(tiny_model_dict(), ModelConfig)), tmp_path / "stage1_detector.pth",
                         extra={"epoch": 3})
    cfg = load_config({"model": tiny_model_dict(), "data": {"root": str(tiny_corpus), "max_eval_utts": 8}}, Stage1Config)
    det = load_detector(path)
    assert score_threshold_of(det) == (0.0, "default 0 (no dev threshold stored)")
    metrics = stage1_report(det, cfg, tmp_path, splits=("dev",), progress=False)
    reloaded = load_detector(path)
    assert reloaded.load_report.extra == {"epoch": 3, "score_threshold": metrics["dev_threshold"],
                                          "score_threshold_source": "dev EER"}
    assert score_threshold_of(reloaded) == (metrics["dev_threshold"], "dev EER") == score_threshold_of(det)
    # an unchanged threshold leaves the file (and the SHA-256 Stage 2 records) alone
    digest = file_sha256(path)
    store_score_threshold(reloaded, metrics["dev_threshold"])
    assert file_sha256(path) == digest
    # a detector from a published plain state dict has none: nothing is written, the verdict uses 0
    det.load_report = LoadReport(str(path), "tcm_state_dict", mapped=0)
    assert store_score_threshold(det, 1.0) is None and file_sha256(path) == digest
    assert score_threshold_of(det) == (0.0, "default 0 (no dev threshold stored)")
