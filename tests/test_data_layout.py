"""A corpus in a non-default layout reaches every stage through ``data.*`` overrides alone.

The tiny synthetic corpus is copied and every part of it moved where discovery does not look:
the protocols, the partial-spoof protocols, the segment labels and each split's audio folder
(one of them outside the database root, given as an absolute path).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from xai_lib.config import ConfigError, DataConfig, Stage1Config, load_config
from xai_lib.data.datasets import build_split, load_partial_split
from xai_lib.data.protocols import MissingAudioError, ProtocolError
from xai_lib.pipeline import main as pipeline_main

pytestmark = pytest.mark.timeout(900)

_PROTOCOLS = "ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.{}.txt"
_SPLIT_FILE = {"train": "train.trn", "dev": "dev.trl", "eval": "eval.trl"}


@pytest.fixture(scope="module")
def relocated(tiny_corpus, tmp_path_factory) -> tuple[Path, list[str]]:
    """The tiny corpus moved into a non-default layout, and the overrides that describe it."""
    base = tmp_path_factory.mktemp("layout")
    root, outside = base / "db", base / "elsewhere"
    shutil.copytree(tiny_corpus, root)

    def move(src: str, dst: str | Path) -> None:
        target = dst if isinstance(dst, Path) else root / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(root / src), str(target))

    for split, name in _SPLIT_FILE.items():
        move(_PROTOCOLS.format(name), f"lists/cm/{split}_list.txt")
    move("ASVspoof2019_LA_train/flac", "audio_train")  # a flat folder at the root
    move("ASVspoof2019_LA_dev/flac", "wavs/dev")
    move("ASVspoof2019_LA_eval/flac", "wavs/eval")
    for split in ("dev", "eval"):
        move(f"partial_spoof/protocols/PartialSpoof.LA.cm.{split}.trl.txt", f"PartialSpoof/protocols/ps_{split}.lst")
        move(f"partial_spoof/segment_labels/{split}_seglab_0.02.npy", f"labels/ps_{split}_0.02.npy")
    move("partial_spoof/dev/flac", "wavs/partial_dev")
    move("partial_spoof/eval/flac", outside / "ps_eval")  # outside the root: an absolute key
    for leftover in ("ASVspoof2019_LA_cm_protocols", "ASVspoof2019_LA_train", "ASVspoof2019_LA_dev",
                     "ASVspoof2019_LA_eval", "partial_spoof"):
        shutil.rmtree(root / leftover)
    overrides = [
        "data.train_protocol=lists/cm/train_list.txt",
        "data.dev_protocol=lists/cm/dev_list.txt",
        "data.eval_protocol=lists/cm/eval_list.txt",
        "data.partial_dev_protocol=PartialSpoof/protocols/ps_dev.lst",
        "data.partial_eval_protocol=PartialSpoof/protocols/ps_eval.lst",
        "data.partial_dev_segment_labels=labels/ps_dev_0.02.npy",
        "data.partial_eval_segment_labels=labels/ps_eval_0.02.npy",
        "data.train_audio_dir=audio_train",
        "data.dev_audio_dir=wavs/dev",
        "data.eval_audio_dir=wavs/eval",
        "data.partial_dev_audio_dir=wavs/partial_dev",
        f"data.partial_eval_audio_dir={outside / 'ps_eval'}",
    ]
    return root, overrides


def _data(root: Path, overrides: list[str]) -> DataConfig:
    return load_config(None, Stage1Config, [f"data.root={root}", *overrides]).data


def test_the_audio_folder_keys_default_to_discovery():
    cfg = DataConfig()
    assert [cfg.train_audio_dir, cfg.dev_audio_dir, cfg.eval_audio_dir, cfg.partial_dev_audio_dir,
            cfg.partial_eval_audio_dir] == [None] * 5
    with pytest.raises(ConfigError, match=r"data\.dev_audio_dir must be null .* or a folder path"):
        DataConfig(dev_audio_dir=" ")


def test_every_split_is_read_from_the_configured_folders(relocated):
    root, overrides = relocated
    cfg = _data(root, overrides)
    for split, folder in (("train", root / "audio_train"), ("dev", root / "wavs/dev"), ("eval", root / "wavs/eval")):
        utts = build_split(cfg, split)
        assert utts and all(u.path.parent == folder and u.path.is_file() for u in utts), split
    for split, folder in (("dev", root / "wavs/partial_dev"), ("eval", Path(cfg.partial_eval_audio_dir))):
        utts, seglab = load_partial_split(cfg, split)
        assert utts and all(u.path.parent == folder for u in utts) and set(seglab) == {u.utt_id for u in utts}


def test_without_the_folder_keys_the_audio_is_not_found(relocated):
    root, overrides = relocated
    cfg = _data(root, [ov for ov in overrides if "_audio_dir=" not in ov])
    with pytest.raises(MissingAudioError, match=r"data\.train_audio_dir"):
        build_split(cfg, "train")
    with pytest.raises(MissingAudioError):
        load_partial_split(cfg, "eval")


@pytest.mark.parametrize("key, call", [
    ("eval_audio_dir", lambda cfg: build_split(cfg, "eval")),
    ("partial_dev_audio_dir", lambda cfg: load_partial_split(cfg, "dev")),
])
def test_a_configured_folder_that_does_not_exist_is_named(relocated, key, call):
    root, overrides = relocated
    cfg = _data(root, [*overrides, f"data.{key}=wavs/nowhere"])
    with pytest.raises(ProtocolError, match=rf"data\.{key} = 'wavs/nowhere': no such folder \({root / 'wavs/nowhere'}\)"):
        call(cfg)


def test_the_pipeline_and_train_run_a_relocated_corpus_by_overrides_alone(relocated, tmp_path, capsys):
    root, overrides = relocated
    # default discovery does not find it: Stage 1 stops at once, naming the protocol it looked for
    code = pipeline_main(["--smoke", "--run-dir", str(tmp_path / "default"), "--data-root", str(root), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "STAGE 1 FAILED" in err
    assert "protocol file not found" in err and str(root / _PROTOCOLS.format("train.trn")) in err
    record = json.loads((tmp_path / "default" / "run.json").read_text())
    assert [record["stages"][f"stage{n}"]["status"] for n in (1, 2, 3)] == ["failed", "not run", "not run"]

    run_dir = tmp_path / "run"
    # two cheap methods: what is checked is the data reaching Stage 3, not the methods
    argv = ["--smoke", "--run-dir", str(run_dir), "--data-root", str(root), "--no-progress",
            "-p", "methods", "[importance, random]"]
    for ov in overrides:
        argv += ["--override", ov]
    code = pipeline_main(argv)
    assert code == 0, capsys.readouterr().err[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert [record["stages"][f"stage{n}"]["status"] for n in (1, 2, 3)] == ["ok", "ok", "ok"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"stage1", "stage2", "stage3"}
    assert metrics["stage1"]["eval_num_utts"] > 0  # Stage 1 scored the relocated eval split
    assert "loc_auc" in json.dumps(metrics["stage2"])  # Stage 2 localised on the relocated partial dev subset
    assert metrics["stage3"]["num_utterances"] > 0  # Stage 3 explained the relocated partial eval subset
    for nb in ("01_detector_training", "02_xai_training", "03_attribution_visualization"):  # the real notebooks ran
        executed = json.loads((tmp_path / "run" / "notebooks" / f"{nb}.ipynb").read_text())
        assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code"), nb
    expected = dict(ov.removeprefix("data.").split("=", 1) for ov in overrides)
    for name in ("config_stage1.yaml", "config_stage2.yaml"):
        data = yaml.safe_load((run_dir / name).read_text())["data"]
        assert {k: data[k] for k in expected} == expected, name
        assert Path(data["root"]) == root

    # python -m xai_lib.train takes the same overrides (on a config that knows nothing of them)
    from xai_lib.train import main as train_main

    out = tmp_path / "eval_scores.txt"
    code = train_main(["score", "--checkpoint", str(run_dir / "stage1_detector.pth"), "--config", "configs/demo.yaml",
                       "--split", "eval", "--out", str(out), "-o", f"data.root={root}", *(
                           a for ov in overrides for a in ("-o", ov))])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert len(out.read_text().splitlines()) == len(build_split(_data(root, overrides), "eval"))
