"""Checkpoints: the published TCM state dict, our own format, averaging, safety, atomic writes."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model_dict

from xai_lib.config import ModelConfig, config_from_dict
from xai_lib.detector import Detector, average_state_dicts, build_ssl, load_detector, save_detector
from xai_lib.detector.checkpoint import fairseq_to_hf_key, hf_to_fairseq_key
from xai_lib.files import CheckpointError


def _tiny_detector(seed: int = 0) -> Detector:
    torch.manual_seed(seed)
    model = Detector(config_from_dict(tiny_model_dict(), ModelConfig))
    for module in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(seed + 3)
    return model.eval()


def _wave() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    wave = 0.1 * torch.randn(2, 8000, generator=g)
    wave[1, 6000:] = 0
    return wave, torch.tensor([8000, 6000])


def _logits(model: Detector) -> torch.Tensor:
    wave, lengths = _wave()
    with torch.no_grad():
        return model(wave, lengths).logits


def _as_published(model: Detector) -> dict[str, torch.Tensor]:
    """The model's weights laid out like the published avg_5_best.pth (fairseq SSL names)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("ssl_model."):
            fairseq = hf_to_fairseq_key(key[len("ssl_model."):], "layer")
            assert fairseq is not None, key
            out["ssl_model.model." + fairseq] = tensor.clone()
        else:  # back end names are the published ones (see test_detector)
            out[key] = tensor.clone()
    hidden = model.ssl_model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    # pretraining-only heads present in a real XLS-R checkpoint
    out["ssl_model.model.quantizer.vars"] = torch.randn(1, 640, 8, generator=g)
    out["ssl_model.model.quantizer.weight_proj.weight"] = torch.randn(640, 16, generator=g)
    out["ssl_model.model.quantizer.weight_proj.bias"] = torch.randn(640, generator=g)
    out["ssl_model.model.project_q.weight"] = torch.randn(8, 8, generator=g)
    out["ssl_model.model.project_q.bias"] = torch.randn(8, generator=g)
    out["ssl_model.model.final_proj.weight"] = torch.randn(8, hidden, generator=g)
    out["ssl_model.model.final_proj.bias"] = torch.randn(8, generator=g)
    out["ssl_model.model.mask_emb"] = torch.randn(hidden, generator=g)
    return out


def test_fairseq_names_map_to_transformers_and_back():
    examples = {
        "feature_extractor.conv_layers.0.0.weight": "feature_extractor.conv_layers.0.conv.weight",
        "feature_extractor.conv_layers.6.2.1.bias": "feature_extractor.conv_layers.6.layer_norm.bias",
        "layer_norm.weight": "feature_projection.layer_norm.weight",
        "post_extract_proj.bias": "feature_projection.projection.bias",
        "encoder.pos_conv.0.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
        "encoder.pos_conv.0.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
        "encoder.layers.23.self_attn.out_proj.weight": "encoder.layers.23.attention.out_proj.weight",
        "encoder.layers.5.self_attn_layer_norm.bias": "encoder.layers.5.layer_norm.bias",
        "encoder.layers.5.fc1.weight": "encoder.layers.5.feed_forward.intermediate_dense.weight",
        "encoder.layers.5.fc2.bias": "encoder.layers.5.feed_forward.output_dense.bias",
        "encoder.layers.5.final_layer_norm.weight": "encoder.layers.5.final_layer_norm.weight",
        "encoder.layer_norm.bias": "encoder.layer_norm.bias",
        "mask_emb": "masked_spec_embed",
    }
    for fairseq, hf in examples.items():
        assert fairseq_to_hf_key(fairseq) == hf
        assert hf_to_fairseq_key(hf) == fairseq
    assert fairseq_to_hf_key("quantizer.vars") is None
    # every tensor of a transformers model survives the round trip
    ssl = build_ssl(config_from_dict(tiny_model_dict(), ModelConfig).ssl)
    for key in ssl.state_dict():
        assert fairseq_to_hf_key(hf_to_fairseq_key(key)) == key


@pytest.mark.parametrize("config_form", ["bare_dict", "stage1_yaml", "module_prefix"])
def test_published_checkpoint_loads_strictly_and_reproduces_logits(tmp_path, config_form):
    source = _tiny_detector()
    published = _as_published(source)
    assert "ssl_model.model.encoder.pos_conv.0.weight_g" in published
    assert "ssl_model.model.encoder.pos_conv.0.weight_v" in published
    config: object = tiny_model_dict()
    if config_form == "stage1_yaml":
        config = tmp_path / "stage1.yaml"
        config.write_text(yaml.safe_dump({"model": tiny_model_dict(), "training": {"batch_size": 4}}))
    if config_form == "module_prefix":
        published = {"module." + k: v for k, v in published.items()}
    path = tmp_path / "avg_5_best.pth"
    torch.save(published, path)

    loaded = load_detector(path, config=config)
    assert not loaded.training
    torch.testing.assert_close(_logits(loaded), _logits(source), atol=1e-6, rtol=0)
    report = loaded.load_report
    assert report.format == "tcm_state_dict"
    assert report.mapped == len(source.state_dict())
    assert {k.split("ssl_model.model.")[-1].split(".")[0] for k in report.ignored} == {
        "quantizer", "project_q", "final_proj", "mask_emb"}
    assert report.stripped_prefix == ("module." if config_form == "module_prefix" else None)


def test_published_checkpoint_does_not_need_the_pretrained_directory(tmp_path):
    source = _tiny_detector()
    path = tmp_path / "avg_5_best.pth"
    torch.save(_as_published(source), path)
    data = tiny_model_dict()
    data["ssl"] = {**data["ssl"], "pretrained_path": str(tmp_path / "not_downloaded")}
    loaded = load_detector(path, config=data)
    torch.testing.assert_close(_logits(loaded), _logits(source), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "old, new",
    [
        ("ssl_model.model.encoder.layers.1.fc1.weight", "ssl_model.model.encoder.layers.1.fc_one.weight"),
        ("conformer.encoder_blocks.0.attn.fn.ht_proj.weight", "conformer.encoder_blocks.0.attn.fn.head_proj.weight"),
    ],
)
def test_published_checkpoint_with_a_renamed_key_names_it(tmp_path, old, new):
    published = _as_published(_tiny_detector())
    published[new] = published.pop(old)
    path = tmp_path / "avg_5_best.pth"
    torch.save(published, path)
    with pytest.raises(CheckpointError) as err:
        load_detector(path, config=tiny_model_dict())
    message = str(err.value)
    assert new in message and "unexpected" in message
    assert old in message and "missing" in message  # the key the model expected, in checkpoint naming


def test_published_checkpoint_with_a_wrong_shape_names_key_and_shapes(tmp_path):
    published = _as_published(_tiny_detector())
    published["conformer.fc5.weight"] = torch.zeros(3, 16)
    path = tmp_path / "avg_5_best.pth"
    torch.save(published, path)
    with pytest.raises(CheckpointError, match=r"conformer\.fc5\.weight: checkpoint \(3, 16\) vs model \(2, 16\)"):
        load_detector(path, config=tiny_model_dict())


def test_own_format_round_trip_without_the_pretrained_directory(tmp_path):
    # a detector whose front end came from a local pretrained directory ...
    pretrained = tmp_path / "tiny_w2v"
    torch.manual_seed(5)
    build_ssl(config_from_dict(tiny_model_dict(), ModelConfig).ssl).save_pretrained(pretrained)
    cfg = config_from_dict(tiny_model_dict(), ModelConfig)
    cfg.ssl = dataclasses.replace(cfg.ssl, pretrained_path=str(pretrained))
    torch.manual_seed(0)
    model = Detector(cfg).eval()
    path = save_detector(model, tmp_path / "run" / "stage1_detector.pth", extra={"epoch": 3, "dev_eer": 0.125})
    # ... reloads after the directory is gone
    shutil.rmtree(pretrained)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "xai_lib.stage1" and raw["version"] == 1
    assert raw["model_config"]["emb_size"] == 16
    loaded = load_detector(path)
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.load_report.extra == {"epoch": 3, "dev_eer": 0.125}
    assert loaded.cfg == cfg


def test_average_state_dicts_is_the_elementwise_mean():
    states = [_tiny_detector(seed).state_dict() for seed in range(3)]
    avg = average_state_dicts(states)
    assert list(avg) == list(states[0])
    for key, value in avg.items():
        if value.is_floating_point():
            expected = torch.stack([s[key] for s in states]).mean(dim=0)
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6, msg=key)
        else:
            assert torch.equal(value, states[-1][key]), key  # e.g. num_batches_tracked
    model = _tiny_detector()
    model.load_state_dict(avg)  # a loadable state dict of the same architecture
    with pytest.raises(ValueError, match="different keys"):
        average_state_dicts([states[0], {k: v for k, v in states[1].items() if "fc5" not in k}])


class _CodeExecutingPayload:
    """Unpickling this (with weights_only=False) would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_refuses_a_checkpoint_that_would_execute_code(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    state = _as_published(_tiny_detector())
    state["conformer.fc5.bias"] = _CodeExecutingPayload(marker)  # type: ignore[assignment]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint") as err:
        load_detector(path, config=tiny_model_dict())
    assert "NOT executed" in str(err.value)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        load_detector(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_detector(bad)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = _tiny_detector()
    path = save_detector(model, tmp_path / "stage1_detector.pth", extra={"epoch": 1})
    before = path.read_bytes()

    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(3)}, f)  # some bytes reach the temporary file
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_detector(_tiny_detector(seed=1), path, extra={"epoch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1_detector.pth"]  # no temporary left behind
    assert load_detector(path).load_report.extra == {"epoch": 1}
