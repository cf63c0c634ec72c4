"""Protocol readers, audio path resolution, missing files and PartialSpoof segment labels."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from xai_lib.data.protocols import (
    MissingAudioError,
    ProtocolError,
    UnsafePickleError,
    check_files_exist,
    detect_format,
    load_segment_labels,
    read_protocol,
    spoof_frame_mask,
)


def _touch_audio(path: Path, n: int = 1600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.zeros(n, dtype=np.float32), 16000, format="WAV" if path.suffix == ".wav" else "FLAC")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- formats


def test_asvspoof2019_protocol_resolves_the_standard_layout(tmp_path):
    root = tmp_path / "LA"
    proto = _write(
        root / "ASVspoof2019_LA_cm_protocols" / "ASVspoof2019.LA.cm.train.trn.txt",
        "LA_0079 LA_T_1138215 - - bonafide\nLA_0079 LA_T_1000137 - A04 spoof\n\nLA_0080 LA_T_2000001 - A01 spoof\n",
    )
    for utt in ("LA_T_1138215", "LA_T_1000137", "LA_T_2000001"):
        _touch_audio(root / "ASVspoof2019_LA_train" / "flac" / f"{utt}.flac")
    assert detect_format(proto) == "asvspoof2019"
    utts = read_protocol(proto, root=root)
    assert [u.utt_id for u in utts] == ["LA_T_1138215", "LA_T_1000137", "LA_T_2000001"]
    assert [u.label for u in utts] == [1, 0, 0]
    assert [u.attack for u in utts] == ["-", "A04", "A01"]
    assert utts[0].speaker == "LA_0079"
    assert utts[1].path == root / "ASVspoof2019_LA_train" / "flac" / "LA_T_1000137.flac"
    check_files_exist(utts, proto)  # all present: no error


def test_three_column_protocol(tmp_path):
    proto = _write(tmp_path / "protocol.txt", "LA_T_1138215.flac train bonafide\nLA_D_1000001.flac dev spoof\n")
    _touch_audio(tmp_path / "ASVspoof2019_LA_train" / "flac" / "LA_T_1138215.flac")
    _touch_audio(tmp_path / "ASVspoof2019_LA_dev" / "flac" / "LA_D_1000001.flac")
    assert detect_format(proto) == "3col"
    utts = read_protocol(proto, root=tmp_path)
    assert [(u.utt_id, u.label) for u in utts] == [("LA_T_1138215", 1), ("LA_D_1000001", 0)]
    assert all(u.path.is_file() for u in utts)


def test_asvspoof2021_trial_list_labelled_from_keys(tmp_path):
    eval_dir = tmp_path / "ASVspoof2021_LA_eval"
    proto = _write(eval_dir / "ASVspoof2021.LA.cm.eval.trl.txt", "LA_E_9332881\nLA_E_5013670\nLA_E_1111111\n")
    _write(
        eval_dir / "trial_metadata.txt",
        "LA_0009 LA_E_9332881 alaw ita_tx A07 spoof notrim eval\n"
        "LA_0007 LA_E_5013670 none ita_tx bonafide bonafide notrim eval\n",
    )
    for utt in ("LA_E_9332881", "LA_E_5013670", "LA_E_1111111"):
        _touch_audio(eval_dir / "flac" / f"{utt}.flac")
    assert detect_format(proto) == "asvspoof2021"
    utts = read_protocol(proto, root=tmp_path)
    by_id = {u.utt_id: u for u in utts}
    assert (by_id["LA_E_9332881"].label, by_id["LA_E_9332881"].attack) == (0, "A07")
    assert (by_id["LA_E_5013670"].label, by_id["LA_E_5013670"].attack) == (1, "-")
    assert by_id["LA_E_1111111"].label is None  # not in the keys: unknown, not guessed
    assert by_id["LA_E_9332881"].path == eval_dir / "flac" / "LA_E_9332881.flac"


def test_asvspoof2021_unlabelled_trial_list_and_df_keys_as_protocol(tmp_path):
    proto = _write(tmp_path / "trials.txt", "DF_E_2000011\nDF_E_2000026\n")
    utts = read_protocol(proto, root=tmp_path)
    assert [u.label for u in utts] == [None, None]
    keys = _write(
        tmp_path / "keys" / "trial_metadata.txt",
        "LA_0023 DF_E_2000011 nocodec asvspoof A14 spoof notrim progress traditional_vocoder - - - -\n"
        "LA_0043 DF_E_2000026 mp3m4a vcc2020 bonafide bonafide notrim eval bonafide - - - -\n",
    )
    assert detect_format(keys) == "asvspoof2021"
    utts = read_protocol(keys, root=tmp_path)
    assert [(u.utt_id, u.label, u.attack, u.speaker) for u in utts] == [
        ("DF_E_2000011", 0, "A14", "LA_0023"),
        ("DF_E_2000026", 1, "-", "LA_0043"),
    ]


@pytest.mark.parametrize("header", ["file,speaker,label", "file,label"])
def test_in_the_wild_meta_csv(tmp_path, header):
    rows = ["0.wav,Alec Guinness,spoof", "1.wav,Alec Guinness,bona-fide"]
    if header == "file,label":
        rows = [",".join([r.split(",")[0], r.split(",")[2]]) for r in rows]
    proto = _write(tmp_path / "release_in_the_wild" / "meta.csv", header + "\n" + "\n".join(rows) + "\n")
    for name in ("0.wav", "1.wav"):
        _touch_audio(tmp_path / "release_in_the_wild" / name)
    assert detect_format(proto) == "in_the_wild"
    utts = read_protocol(proto, root=tmp_path)
    assert [(u.utt_id, u.label) for u in utts] == [("0", 0), ("1", 1)]
    assert utts[1].path == tmp_path / "release_in_the_wild" / "1.wav"
    assert utts[0].speaker == ("Alec Guinness" if "speaker" in header else None)


def test_partialspoof_protocol_and_audio_dir_override(tmp_path):
    proto = _write(
        tmp_path / "protocols" / "PartialSpoof.LA.cm.dev.trl.txt",
        "LA_0079 CON_D_0000029 - CON spoof\nLA_0080 LA_D_0000030 - - bonafide\n",
    )
    _touch_audio(tmp_path / "dev" / "con_wav" / "CON_D_0000029.wav")
    _touch_audio(tmp_path / "dev" / "con_wav" / "LA_D_0000030.wav")
    assert detect_format(proto) == "partialspoof"
    utts = read_protocol(proto, root=tmp_path)
    assert [u.path for u in utts] == [tmp_path / "dev" / "con_wav" / f"{u}.wav" for u in ("CON_D_0000029", "LA_D_0000030")]
    other = tmp_path / "elsewhere"
    _touch_audio(other / "CON_D_0000029.flac")
    utts = read_protocol(proto, root=tmp_path, format="partialspoof", audio_dir=other)
    assert utts[0].path == other / "CON_D_0000029.flac"


# ----------------------------------------------------------------------------- bad input


def test_malformed_line_names_file_and_line(tmp_path):
    proto = _write(tmp_path / "p.txt", "LA_0079 LA_T_1 - - bonafide\nLA_0079 LA_T_2 - spoof\n")
    with pytest.raises(ProtocolError) as err:
        read_protocol(proto, root=tmp_path)
    msg = str(err.value)
    assert f"{proto}:2" in msg and "LA_0079 LA_T_2 - spoof" in msg and "5 columns" in msg


def test_bad_label_names_file_and_line(tmp_path):
    proto = _write(tmp_path / "p.txt", "LA_0079 LA_T_1 - - bonafide\nLA_0079 LA_T_2 - A01 fake\n")
    with pytest.raises(ProtocolError, match=r"p\.txt:2: unknown label 'fake'"):
        read_protocol(proto, root=tmp_path)
    csv = _write(tmp_path / "meta.csv", "file,label\n0.wav,real\n")
    with pytest.raises(ProtocolError, match=r"meta\.csv:2: unknown label 'real'.*bona-fide"):
        read_protocol(csv, root=tmp_path)


def test_duplicate_utterance_names_both_lines(tmp_path):
    proto = _write(
        tmp_path / "p.txt", "LA_0079 LA_T_1 - - bonafide\nLA_0079 LA_T_2 - A01 spoof\nLA_0080 LA_T_1 - A02 spoof\n"
    )
    with pytest.raises(ProtocolError) as err:
        read_protocol(proto, root=tmp_path)
    assert "'LA_T_1'" in str(err.value) and "lines 1 and 3" in str(err.value) and str(proto) in str(err.value)


def test_unrecognised_and_empty_protocols(tmp_path):
    with pytest.raises(ProtocolError, match="cannot tell the protocol format"):
        read_protocol(_write(tmp_path / "odd.txt", "a b c d\n"))
    with pytest.raises(ProtocolError, match="empty"):
        read_protocol(_write(tmp_path / "empty.txt", "\n# only a comment\n"))
    with pytest.raises(ProtocolError, match="not found"):
        read_protocol(tmp_path / "nope.txt")


def test_missing_audio_reports_count_and_first_paths(tmp_path):
    lines = [f"LA_0001 LA_T_{i:07d} - A01 spoof" for i in range(7)]
    proto = _write(tmp_path / "ASVspoof2019.LA.cm.train.trn.txt", "\n".join(lines) + "\n")
    _touch_audio(tmp_path / "ASVspoof2019_LA_train" / "flac" / "LA_T_0000003.flac")
    utts = read_protocol(proto, root=tmp_path)
    with pytest.raises(MissingAudioError) as err:
        check_files_exist(utts, proto)
    msg = str(err.value)
    assert "6 of 7 audio files" in msg
    assert "LA_T_0000000.flac" in msg and "LA_T_0000005.flac" in msg  # the first five missing
    assert "LA_T_0000006.flac" not in msg and "LA_T_0000003.flac" not in msg
    assert "data.root" in msg


# ----------------------------------------------------------------------------- segment labels


def test_segment_labels_npy_and_json(tmp_path):
    seglab = {"CON_D_1": np.array(["1", "1", "0", "0", "1"]), "CON_D_2": np.array(["0"])}
    np.save(tmp_path / "dev_seglab_0.02.npy", seglab, allow_pickle=True)
    loaded = load_segment_labels(tmp_path / "dev_seglab_0.02.npy")
    assert set(loaded) == {"CON_D_1", "CON_D_2"}
    np.testing.assert_array_equal(loaded["CON_D_1"], [1, 1, 0, 0, 1])  # 1 = bona fide, 0 = spoof
    (tmp_path / "s.json").write_text(json.dumps({"u": [1, 0, 1]}))
    np.testing.assert_array_equal(load_segment_labels(tmp_path / "s.json")["u"], [1, 0, 1])
    np.save(tmp_path / "numbers.npy", np.arange(4))
    with pytest.raises(ProtocolError, match="expected an np.save'd dict"):
        load_segment_labels(tmp_path / "numbers.npy")


class _Evil:
    """Pickles into a call of os.mkdir: loading it with np.load(allow_pickle=True) runs it."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_restricted_unpickler_refuses_code_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_seglab_0.02.npy"
    np.save(path, np.array({"u": _Evil(str(marker))}, dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError, match="refusing to unpickle .*mkdir"):
        load_segment_labels(path)
    assert not marker.exists()  # the payload did not run


def test_spoof_frame_mask_resolutions():
    seglab = np.array(["1", "0", "0", "1"])  # 20 ms segments
    np.testing.assert_array_equal(spoof_frame_mask(seglab, 6), [False, True, True, False, False, False])
    np.testing.assert_array_equal(spoof_frame_mask(seglab, 2), [False, True])  # truncated
    coarse = np.array([1, 0])  # 160 ms segments (ints accepted)
    mask = spoof_frame_mask(coarse, 12, resolution_s=0.16)
    assert mask[:8].sum() == 0 and mask[8:].all()
    fine = np.array(["1", "1", "1", "0", "1", "1"])  # 10 ms: frame 1 covers segments 2 and 3
    np.testing.assert_array_equal(spoof_frame_mask(fine, 3, resolution_s=0.01), [False, True, False])
