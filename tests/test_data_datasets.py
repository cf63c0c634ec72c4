"""Datasets, collation, bad-audio handling and split building from a DataConfig."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from xai_lib.config import DataConfig
from xai_lib.data.audio import AudioError
from xai_lib.data.datasets import (
    EvalDataset,
    TrainDataset,
    build_split,
    collate_padded,
    load_partial_split,
    scan_audio,
    subsample_utterances,
)
from xai_lib.data.protocols import MissingAudioError, ProtocolError, Utterance

SR = 16000


def _utts(tmp_path: Path, lengths: list[int]) -> list[Utterance]:
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(lengths):
        path = tmp_path / f"u{i}.flac"
        sf.write(str(path), (0.1 * rng.standard_normal(n)).astype(np.float32), SR)
        out.append(Utterance(f"u{i}", path, i % 2, "-" if i % 2 else "A01"))
    return out


def _corrupt(tmp_path: Path, name: str = "bad.flac") -> Utterance:
    path = tmp_path / name
    path.write_bytes(b"not audio at all" * 10)
    return Utterance("bad", path, 0, "A02")


def test_train_dataset_crops_are_fixed_length_and_epoch_seeded(tmp_path):
    utts = _utts(tmp_path, [5000, 1200])
    ds = TrainDataset(utts, crop_samples=2000, seed=3)
    a, b = ds[0], ds[1]
    assert a["wave"].shape == (2000,) and a["wave"].dtype == torch.float32
    assert b["wave"].shape == (2000,)  # repeat-padded
    assert (a["label"], a["utt_id"], a["attack"]) == (0, "u0", "A01")
    assert torch.equal(ds[0]["wave"], a["wave"])  # same (seed, epoch, index): same crop
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["wave"], a["wave"])  # a new epoch draws a new crop
    boosted = TrainDataset(utts, crop_samples=2000, seed=3, rawboost_algo=5)
    y = boosted[0]["wave"]
    assert y.shape == (2000,) and torch.isfinite(y).all() and not torch.equal(y, a["wave"])


def test_eval_dataset_full_length_or_first_crop(tmp_path):
    utts = _utts(tmp_path, [5000, 1200])
    full = EvalDataset(utts)
    assert full[0]["wave"].shape == (5000,) and full[1]["wave"].shape == (1200,)
    cropped = EvalDataset(utts, crop_samples=3000)
    assert cropped[0]["wave"].shape == (3000,) and torch.equal(cropped[0]["wave"], full[0]["wave"][:3000])
    assert cropped[1]["wave"].shape == (3000,)
    batch = collate_padded([full[0], None, full[1]])
    assert batch["wave"].shape == (2, 5000)
    assert batch["lengths"].tolist() == [5000, 1200] and batch["labels"].tolist() == [0, 1]
    assert batch["utt_ids"] == ["u0", "u1"] and batch["attacks"] == ["A01", "-"]
    assert batch["wave"][1, 1200:].abs().sum() == 0


def test_unknown_labels_collate_to_minus_one(tmp_path):
    utts = _utts(tmp_path, [800])
    utts[0].label = None
    assert collate_padded([EvalDataset(utts)[0]])["labels"].tolist() == [-1]


def test_bad_audio_error_or_skip_with_report(tmp_path):
    utts = _utts(tmp_path, [3000, 3000]) + [_corrupt(tmp_path)]
    with pytest.raises(AudioError, match="bad.flac"):
        EvalDataset(utts)[2]
    ds = TrainDataset(utts, crop_samples=1000, on_bad_audio="skip")
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_padded)
    batch = next(iter(loader))
    assert batch["utt_ids"] == ["u0", "u1"] and batch["wave"].shape == (2, 1000)
    assert len(ds.skipped) == 1 and ds.skipped[0][0] == "bad"
    report = ds.bad_audio_report()
    assert "1 of 3 utterances skipped" in report and "bad.flac" in report and "corrupt" in report
    next(iter(loader))  # a second epoch does not record it twice
    assert len(ds.skipped) == 1
    empty = collate_padded([None, None])
    assert empty["wave"].shape[0] == 0 and empty["utt_ids"] == []


def test_scan_audio_filters_unusable_files_cheaply(tmp_path):
    utts = _utts(tmp_path, [3000]) + [_corrupt(tmp_path)]
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), SR)
    utts += [Utterance("empty", empty, 1), Utterance("gone", tmp_path / "gone.flac", 1)]
    good, skipped = scan_audio(utts, SR, on_bad_audio="skip")
    assert [u.utt_id for u in good] == ["u0"]
    reasons = {u: r for u, _, r in skipped}
    assert set(reasons) == {"bad", "empty", "gone"}
    assert "zero length" in reasons["empty"] and "does not exist" in reasons["gone"]
    with pytest.raises(AudioError, match="3 of 4 audio files are unusable"):
        scan_audio(utts, SR, on_bad_audio="error")


def test_subsampling_is_stratified_and_fixed():
    utts = [Utterance(f"u{i}", Path(f"u{i}.flac"), 1 if i < 3 else 0) for i in range(30)]
    sub = subsample_utterances(utts, 8)
    assert len(sub) == 8 and {u.label for u in sub} == {0, 1}
    assert [u.utt_id for u in sub] == [u.utt_id for u in subsample_utterances(utts, 8)]
    assert [u.utt_id for u in sub] == sorted((u.utt_id for u in sub), key=lambda s: int(s[1:]))  # protocol order


def test_build_split_from_the_default_layout(tiny_corpus):
    cfg = DataConfig(root=str(tiny_corpus))
    train = build_split(cfg, "train")
    assert len(train) == 24 and all(u.path.is_file() for u in train)
    assert {u.label for u in train} == {0, 1}
    small = build_split(DataConfig(root=str(tiny_corpus), max_eval_utts=5), "eval")
    assert len(small) == 5 and {u.label for u in small} == {0, 1}
    utts, seglab = load_partial_split(cfg, "eval")
    assert len(utts) == 6 and set(seglab) == {u.utt_id for u in utts}
    assert all(u.label == 0 for u in utts)


def test_build_split_reports_missing_audio_and_missing_protocol(tiny_corpus, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_corpus / "ASVspoof2019_LA_cm_protocols", root / "ASVspoof2019_LA_cm_protocols")
    shutil.copytree(tiny_corpus / "ASVspoof2019_LA_dev", root / "ASVspoof2019_LA_dev")
    victims = sorted((root / "ASVspoof2019_LA_dev" / "flac").glob("*.flac"))[:2]
    for v in victims:
        v.unlink()
    with pytest.raises(MissingAudioError, match="2 of 16 audio files"):
        build_split(DataConfig(root=str(root)), "dev")
    with pytest.raises(ProtocolError, match="data.train_protocol is not set"):
        build_split(DataConfig(root=str(root), train_protocol=None), "train")


def test_splice_replaces_only_the_span_level_matched():
    from xai_lib.data.audio import splice

    rng = np.random.default_rng(0)
    orig, other = 0.1 * rng.standard_normal(4000), 2.0 * rng.standard_normal(4000)
    y = splice(orig, other, [(1000, 2000)], fade=80)
    assert np.array_equal(y[:1000], orig[:1000]) and np.array_equal(y[2000:], orig[2000:])
    inner = slice(1080, 1920)  # past the fades: the other signal, scaled to orig's level over the span
    g = np.sqrt(np.mean(orig[1000:2000] ** 2) / np.mean(other[1000:2000] ** 2))
    np.testing.assert_allclose(y[inner], g * other[inner])
    with pytest.raises(ValueError, match="outside"):
        splice(orig, other, [(3900, 4100)])


def test_train_dataset_splice_augmentation_keeps_labels_and_inserts_one_span(tmp_path):
    rng = np.random.default_rng(1)
    utts = []
    for i, label in enumerate([0, 1, 1, 0]):  # spoof, bona fide, bona fide, spoof
        path = tmp_path / f"s{i}.wav"
        # each utterance a pure tone of its own frequency: where a crop came from is measurable
        sf.write(str(path), (0.3 * np.sin(2 * np.pi * (300 + 400 * i) * np.arange(8000) / SR)).astype(np.float32), SR)
        utts.append(Utterance(f"s{i}", path, label, "A01" if label == 0 else "-"))
    plain = TrainDataset(utts, crop_samples=4000, seed=0)
    spliced = TrainDataset(utts, crop_samples=4000, seed=0, splice_prob=1.0, splice_min_samples=800,
                           splice_max_fraction=0.5)

    def energy_at(x, f):  # (frames of 400,) energy of x at frequency f per 25 ms frame
        frames = x.numpy().reshape(-1, 400)
        return np.abs(frames @ np.exp(-2j * np.pi * f * np.arange(400) / SR))

    for index, utt in enumerate(utts):
        item = spliced[index]
        assert item["label"] == utt.label and item["utt_id"] == utt.utt_id and item["wave"].shape == (4000,)
        own = energy_at(item["wave"], 300 + 400 * index) > 10
        if utt.label == 0:  # a bona fide crop with one span of this spoof: 800-2000 samples of its own tone
            assert 1 <= own.sum() <= 6 and not own.all()
        else:  # its own crop with one span of another bona fide utterance
            assert 4 <= own.sum() <= 9 and not own.all()
        assert torch.equal(spliced[index]["wave"], item["wave"])  # seeded by (seed, epoch, index)
    assert torch.equal(TrainDataset(utts, crop_samples=4000, seed=0, splice_prob=0.0)[0]["wave"], plain[0]["wave"])
    with pytest.raises(ValueError, match="splice_prob"):
        TrainDataset(utts, crop_samples=4000, splice_prob=1.5)


def test_splice_config_is_validated():
    from xai_lib.config import ConfigError

    with pytest.raises(ConfigError, match="splice_prob"):
        DataConfig(splice_prob=-0.1)
    with pytest.raises(ConfigError, match="splice_min_s"):
        DataConfig(splice_prob=0.5, crop_samples=16000, splice_min_s=0.6, splice_max_fraction=0.5)


def test_audio_cache_gives_the_same_items_reading_each_file_once(tmp_path, monkeypatch):
    import xai_lib.data.datasets as datasets

    utts = _utts(tmp_path, [12000, 20000, 30000, 8000])
    reads: list[str] = []
    real_load = datasets.load_audio
    monkeypatch.setattr(datasets, "load_audio", lambda path, sr: reads.append(str(path)) or real_load(path, sr))

    def three_epochs(ds):
        reads.clear()
        items = []
        for epoch in range(3):
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)
            for i in range(len(utts)):
                item = ds[i]
                items.append((item["wave"].clone(), item["spoof_span"]))
                item["wave"].mul_(0)  # a caller's in-place change must not reach the next epoch
        return items, list(reads)

    kwargs = dict(crop_samples=16000, sample_rate=SR, rawboost_algo=3, seed=5, splice_prob=0.5)
    for make in (lambda **kw: TrainDataset(utts, **kwargs, **kw), lambda **kw: EvalDataset(utts, sample_rate=SR, **kw)):
        plain_items, plain_reads = three_epochs(make())
        cached = make(cache_mb=1)
        cached_items, cached_reads = three_epochs(cached)
        assert len(plain_items) == len(cached_items) == 3 * len(utts)
        for (a, span_a), (b, span_b) in zip(plain_items, cached_items):
            assert torch.equal(a, b) and span_a == span_b
        assert len(plain_reads) >= 3 * len(utts)
        assert sorted(cached_reads) == sorted(set(cached_reads))  # every file decoded once
        assert cached.cache_bytes == 4 * sum((12000, 20000, 30000, 8000))


def test_audio_cache_stops_at_its_limit(tmp_path):
    utts = _utts(tmp_path, [100000, 100000, 100000])  # 400 kB each as float32
    ds = EvalDataset(utts, sample_rate=SR, cache_mb=0.8)  # room for two
    for i in range(3):
        ds[i]
    assert ds.cache_bytes == 2 * 400000 and len(ds._cache) == 2
    assert EvalDataset(utts, sample_rate=SR).cache_bytes == 0
    with pytest.raises(ValueError, match="cache_mb"):
        EvalDataset(utts, sample_rate=SR, cache_mb=-1)
