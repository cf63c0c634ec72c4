"""The embedded synthetic corpus: layout, determinism, balance, attacks and partial-spoof labels."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from xai_lib.config import DataConfig
from xai_lib.data.datasets import build_split, load_partial_split
from xai_lib.data.protocols import load_segment_labels, read_protocol
from xai_lib.data.synthetic import (
    BONAFIDE_FRACTION,
    EVAL_ATTACKS,
    SIZES,
    TRAIN_ATTACKS,
    generate_corpus,
    main,
    segment_labels_from_spans,
)

PROTOCOLS = "ASVspoof2019_LA_cm_protocols"


def _all_files(root: Path) -> dict[str, bytes]:
    """Every protocol, label and audio file (not corpus.json, which records the timing)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "corpus.json"
    }


def test_layout_matches_the_data_config_defaults(tiny_corpus):
    cfg = DataConfig(root=str(tiny_corpus))
    size = SIZES["tiny"]
    for split in ("train", "dev", "eval"):
        utts = build_split(cfg, split)  # checks that every file exists
        assert len(utts) == getattr(size, split)
        prefix = {"train": "LA_T_", "dev": "LA_D_", "eval": "LA_E_"}[split]
        assert all(u.utt_id.startswith(prefix) and len(u.utt_id) == len(prefix) + 7 for u in utts)
        assert all(u.path.parent == tiny_corpus / f"ASVspoof2019_LA_{split}" / "flac" for u in utts)
    for split in ("dev", "eval"):
        utts, seglab = load_partial_split(cfg, split)
        assert len(utts) == getattr(size, f"partial_{split}") and set(seglab) == {u.utt_id for u in utts}
    info = sf.info(str(utts[0].path))
    assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
    meta = json.loads((tiny_corpus / "corpus.json").read_text())
    assert meta["complete"] and meta["seed"] == 0 and meta["size"] == "tiny"
    assert meta["splits"]["train"]["utterances"] == size.train and meta["generation_seconds"] > 0


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tiny_corpus, tmp_path):
    again = generate_corpus(tmp_path / "again", seed=0, size="tiny", progress=False)
    assert _all_files(again) == _all_files(tiny_corpus)
    assert main(["--out", str(tmp_path / "other"), "--seed", "1", "--size", "tiny"]) == 0
    other = _all_files(tmp_path / "other")
    flac = [k for k in other if k.endswith(".flac")]
    assert len(flac) == len([k for k in _all_files(tiny_corpus) if k.endswith(".flac")])
    first = tiny_corpus / PROTOCOLS / "ASVspoof2019.LA.cm.train.trn.txt"
    assert other[f"{PROTOCOLS}/ASVspoof2019.LA.cm.train.trn.txt"] != first.read_bytes()
    a = sf.read(str(sorted((tiny_corpus / "ASVspoof2019_LA_train" / "flac").glob("*.flac"))[0]))[0]
    b = sf.read(str(sorted((tmp_path / "other" / "ASVspoof2019_LA_train" / "flac").glob("*.flac"))[0]))[0]
    assert a.shape != b.shape or not np.allclose(a, b)


def test_class_balance_and_attacks(tiny_corpus):
    splits = {}
    for split, name in (("train", "train.trn"), ("dev", "dev.trl"), ("eval", "eval.trl")):
        splits[split] = read_protocol(tiny_corpus / PROTOCOLS / f"ASVspoof2019.LA.cm.{name}.txt", root=tiny_corpus)
    for split, utts in splits.items():
        bona = sum(u.label == 1 for u in utts)
        assert bona == round(BONAFIDE_FRACTION * len(utts))
        attacks = {u.attack for u in utts if u.label == 0}
        assert attacks == set(EVAL_ATTACKS if split == "eval" else TRAIN_ATTACKS)  # every attack present
        assert all(u.attack == "-" for u in utts if u.label == 1)
    unseen = {u.attack for u in splits["eval"]} - {u.attack for u in splits["train"]}
    assert {"A05", "A06"} <= unseen
    speakers = {s: {u.speaker for u in utts} for s, utts in splits.items()}
    assert not (speakers["train"] & speakers["dev"]) and not (speakers["train"] & speakers["eval"])


def test_audio_is_finite_within_duration_and_level_is_no_cue(tiny_corpus):
    utts = build_split(DataConfig(root=str(tiny_corpus)), "train")
    size = SIZES["tiny"]
    levels = {0: [], 1: []}
    for u in utts:
        x, sr = sf.read(str(u.path))
        assert sr == 16000 and np.isfinite(x).all() and np.abs(x).max() < 1.0
        assert size.min_s - 0.01 <= len(x) / sr <= size.max_s + 0.01
        frames = x[: len(x) // 320 * 320].reshape(-1, 320)
        energy = (frames**2).mean(axis=1)
        active = energy >= energy.max() * 10 ** -3.5
        levels[u.label].append(10 * np.log10(energy[active].mean()))
    for label in (0, 1):  # each utterance is normalised to a level drawn from the same range, whatever its class
        assert -26.3 <= min(levels[label]) and max(levels[label]) <= -19.7, levels[label]


@pytest.mark.parametrize("split", ["dev", "eval"])
def test_partial_segment_labels_agree_with_spans(tiny_corpus, split):
    root = tiny_corpus / "partial_spoof"
    spans = json.loads((root / f"spans_{split}.json").read_text())
    seglab = load_segment_labels(root / "segment_labels" / f"{split}_seglab_0.02.npy")
    utts = read_protocol(root / "protocols" / f"PartialSpoof.LA.cm.{split}.trl.txt", root=tiny_corpus)
    allowed = set(TRAIN_ATTACKS if split == "dev" else EVAL_ATTACKS)
    assert {u.utt_id for u in utts} == set(spans) == set(seglab)
    for u in utts:
        assert u.label == 0 and u.attack in allowed
        n = sf.info(str(u.path)).frames
        sp = spans[u.utt_id]
        assert 1 <= len(sp) <= 3
        for (s, e), nxt in zip(sp, sp[1:] + [[n, n]]):
            assert 0 <= s < e <= n and e <= nxt[0]
            assert 0.2 * 16000 - 1 <= e - s <= 1.5 * 16000 + 1
        labels = seglab[u.utt_id]
        assert len(labels) == math.ceil(n / 320)
        for k, lab in enumerate(labels):  # a 20 ms segment is spoof iff it overlaps a span
            overlaps = any(s < (k + 1) * 320 and e > k * 320 for s, e in sp)
            assert lab == (0 if overlaps else 1)
        assert (labels == 0).any() and (labels == 1).any()


def test_segment_labels_from_spans_edges():
    labels = segment_labels_from_spans(1000, [[320, 641]])
    assert labels.tolist() == ["1", "0", "0", "1"]  # 641 reaches into segment 2; 4 segments for 1000 samples


def test_existing_corpus_is_reused_and_real_data_is_never_overwritten(tiny_corpus, tmp_path):
    stamp = {p: p.stat().st_mtime_ns for p in (tiny_corpus / PROTOCOLS).iterdir()}
    assert generate_corpus(tiny_corpus, seed=0, size="tiny", progress=False) == tiny_corpus
    assert stamp == {p: p.stat().st_mtime_ns for p in (tiny_corpus / PROTOCOLS).iterdir()}
    real = tmp_path / "LA"
    (real / "ASVspoof2019_LA_train" / "flac").mkdir(parents=True)
    (real / "ASVspoof2019_LA_train" / "flac" / "LA_T_1.flac").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="may be a real database"):
        generate_corpus(real, size="tiny", progress=False)
    assert (real / "ASVspoof2019_LA_train" / "flac" / "LA_T_1.flac").read_bytes() == b"precious"
    with pytest.raises(ValueError, match="unknown corpus size"):
        generate_corpus(tmp_path / "x", size="huge")
