"""The AASIST back end (model.backend: aasist): the published SSL-AASIST parameter names and
their strict import, padding, per-frame removal, the Grad-CAM tap, Stage 1 -> 2 -> 3 on a tiny
detector, and that TCM detectors are untouched."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import yaml
from conftest import tiny_model_dict

from xai_lib.config import ConfigError, ModelConfig, Stage1Config, Stage2Config, config_from_dict, load_config
from xai_lib.detector import AASISTDetector, Detector, TCMDetector, build_detector, load_detector, save_detector
from xai_lib.detector.aasist import SELU_FLOOR
from xai_lib.detector.checkpoint import guess_aasist_config, hf_to_fairseq_key
from xai_lib.files import CheckpointError

TINY_AASIST = {"emb_size": 24, "encoder_channels": [4, 8], "attention_channels": 8, "gat_dims": [8, 6]}


def tiny_aasist_dict() -> dict:
    """The tiny test front end with a tiny AASIST back end (8 spectral nodes, 8 channels)."""
    data = tiny_model_dict()
    return {"ssl": data["ssl"], "backend": "aasist", "aasist": dict(TINY_AASIST)}


def _tiny_aasist(seed: int = 0) -> AASISTDetector:
    torch.manual_seed(seed)
    model = Detector(config_from_dict(tiny_aasist_dict(), ModelConfig))
    for module in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _wave() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    wave = 0.1 * torch.randn(3, 12000, generator=g)
    lengths = torch.tensor([12000, 9000, 5000])
    for b, n in enumerate(lengths.tolist()):
        wave[b, n:] = 0
    return wave, lengths


def _as_published(model: Detector) -> dict[str, torch.Tensor]:
    """The weights laid out like the SSL_Anti-spoofing LA/DF checkpoints: fairseq SSL names, the
    DataParallel ``module.`` prefix and pretraining-only heads of the fairseq model."""
    out = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("ssl_model."):
            key = "ssl_model.model." + hf_to_fairseq_key(key[len("ssl_model."):], "layer")
        out["module." + key] = tensor.clone()
    g = torch.Generator().manual_seed(3)
    out["module.ssl_model.model.quantizer.vars"] = torch.randn(1, 64, 8, generator=g)
    out["module.ssl_model.model.project_q.weight"] = torch.randn(8, 8, generator=g)
    out["module.ssl_model.model.mask_emb"] = torch.randn(32, generator=g)
    return out


# ----------------------------------------------------------------------------- architecture


def test_backend_config_selects_the_class_and_tcm_stays_the_default():
    tcm = Detector(config_from_dict(tiny_model_dict(), ModelConfig))
    aasist = Detector(config_from_dict(tiny_aasist_dict(), ModelConfig))
    assert type(tcm) is TCMDetector and type(aasist) is AASISTDetector
    assert isinstance(tcm, Detector) and isinstance(aasist, Detector)
    assert ModelConfig().backend == "tcm"
    with pytest.raises(ConfigError, match="model.backend must be one of tcm, aasist"):
        config_from_dict({"backend": "rawnet"}, ModelConfig)
    with pytest.raises(ConfigError, match="model.aasist.gat_dims"):
        config_from_dict({"backend": "aasist", "aasist": {"gat_dims": [8]}}, ModelConfig)


def test_tcm_detector_is_built_exactly_as_before():
    """build_detector and Detector(cfg) give the same TCM module, parameter for parameter, with the
    published key order (front end first, then LL, first_bn, conformer) and no AASIST leftovers."""
    cfg = config_from_dict(tiny_model_dict(), ModelConfig)
    torch.manual_seed(5)
    a = Detector(cfg)
    after_a = torch.rand(1)
    torch.manual_seed(5)
    b = build_detector(cfg)
    assert torch.equal(after_a, torch.rand(1))  # same number of random draws
    keys = list(a.state_dict())
    assert keys == list(b.state_dict())
    tops = list(dict.fromkeys(k.split(".")[0] for k in keys))
    assert tops == ["ssl_model", "LL", "first_bn", "conformer"]
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in keys)


def test_published_parameter_names_and_shapes():
    model = _tiny_aasist()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("ssl_model.")}
    # sizes: SSL 32 -> LL 24 -> 8 spectral nodes; encoder 1 -> 4 -> 8 channels; GAT 8, 6
    expected = {
        "LL.weight": (24, 32), "first_bn.weight": (1,), "first_bn1.weight": (8,), "pos_S": (1, 8, 8),
        "master1": (1, 1, 8), "master2": (1, 1, 8),
        "encoder.0.0.conv1.weight": (4, 1, 2, 3), "encoder.0.0.conv_downsample.weight": (4, 1, 1, 3),
        "encoder.1.0.bn1.weight": (4,), "encoder.1.0.conv2.weight": (8, 8, 2, 3),
        "attention.0.weight": (8, 8, 1, 1), "attention.2.weight": (8,), "attention.3.weight": (8, 8, 1, 1),
        "GAT_layer_S.att_weight": (8, 1), "GAT_layer_T.att_proj.weight": (8, 8),
        "HtrgGAT_layer_ST11.att_weight12": (6, 1), "HtrgGAT_layer_ST11.proj_type1.weight": (8, 8),
        "HtrgGAT_layer_ST22.proj_with_attM.weight": (6, 6), "pool_hT2.proj.weight": (1, 6),
        "out_layer.weight": (2, 30),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "encoder.0.0.bn1.weight" not in shapes  # the first block has none
    assert not any("gradcam" in k for k in model.state_dict())  # the tap holds no tensors
    assert not model.encoder[1][0].bn1.weight.requires_grad  # unused by the recipe's forward: frozen


def test_padded_batch_scores_like_each_utterance_alone():
    model = _tiny_aasist()
    wave, lengths = _wave()
    with torch.no_grad():
        batch = model(wave, lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = model(wave[b : b + 1, :n])
            torch.testing.assert_close(batch.logits[b], alone.logits[0], atol=1e-5, rtol=1e-4)
            t = alone.frame_tokens.shape[1]
            torch.testing.assert_close(batch.frame_tokens[b, :t], alone.frame_tokens[0], atol=1e-5, rtol=1e-4)
    assert batch.attentions is None
    assert batch.frame_tokens.shape[-1] == model.frame_token_dim == 8
    with pytest.raises(ValueError, match="too short for the AASIST back end"):
        model.backend(torch.zeros(1, 2, 32))


def test_frame_weights_remove_frames_before_the_time_max_pool():
    model = _tiny_aasist()
    wave, lengths = _wave()
    feats, mask = model.frontend(wave, lengths)
    with torch.no_grad():
        ref = model.backend(feats, mask)
        ones = model.backend(feats, mask, frame_weights=torch.ones(mask.shape))
        torch.testing.assert_close(ones.logits, ref.logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ones.neck, ref.neck, atol=1e-5, rtol=1e-4)
        # a removed frame sits at SELU's floor, so it never wins the max-pool over its step
        w = torch.ones(mask.shape)
        w[:, 4] = 0.0
        removed = model.backend(feats, mask, frame_weights=w)
        assert torch.allclose(removed.neck[:, 4], torch.full_like(removed.neck[:, 4], SELU_FLOOR))
        kept = torch.maximum(ref.neck[:, 3], ref.neck[:, 5])  # the step of frames 3, 4, 5 is now theirs
        torch.testing.assert_close(removed.neck[:, 3:6].amax(dim=1), kept, atol=1e-5, rtol=1e-4)
    # ...and the weights are differentiable (Stage 2 learns through them)
    w = torch.full(mask.shape, 0.5, requires_grad=True)
    model.backend(feats.detach(), mask, frame_weights=w).logits[:, 0].sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_gradcam_tap_sees_the_temporal_features_with_time_last():
    model = _tiny_aasist()
    wave, lengths = _wave()
    seen = []
    handle = model.gradcam_tap.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        out = model(wave, lengths)
    finally:
        handle.remove()
    T = out.frame_mask.shape[1]
    (tap,) = seen
    assert tap.shape == (3, model.frame_token_dim, T // model.gradcam_frames_per_step)  # (B, C, T')
    assert tap.requires_grad  # on the path to the logits
    frames = model.steps_to_frames(tap.detach().transpose(1, 2), T)  # (B, T, C)
    torch.testing.assert_close(frames[0, :3], tap[0, :, :1].detach().transpose(0, 1).expand(3, -1))
    assert torch.all(frames[:, 3 * (T // 3):] == 0)


# ----------------------------------------------------------------------------- published state dicts


@pytest.mark.parametrize("config_form", ["guessed", "explicit_yaml", "none_but_ssl"])
def test_published_aasist_state_dict_loads_strictly_and_reproduces_logits(tmp_path, config_form):
    source = _tiny_aasist()
    path = tmp_path / "LA_model.pth"
    torch.save(_as_published(source), path)
    ssl_only = {"ssl": tiny_model_dict()["ssl"]}
    if config_form == "explicit_yaml":
        config = tmp_path / "stage1.yaml"
        config.write_text(yaml.safe_dump({"model": tiny_aasist_dict()}))
    elif config_form == "guessed":
        config = {**ssl_only, "backend": "aasist"}
    else:
        config = ssl_only  # the back end recognised from the tensors, its sizes read from their shapes
    loaded = load_detector(path, config=config)
    assert isinstance(loaded, AASISTDetector) and not loaded.training
    wave, lengths = _wave()
    with torch.no_grad():
        torch.testing.assert_close(loaded(wave, lengths).logits, source(wave, lengths).logits, atol=1e-4, rtol=0)
    report = loaded.load_report
    assert report.format == "aasist_state_dict" and report.stripped_prefix == "module."
    assert report.mapped == len(source.state_dict())
    assert len(report.ignored) == 3  # quantizer, project_q, mask_emb
    assert report.guessed == ({} if config_form == "explicit_yaml" else TINY_AASIST)
    assert loaded.cfg.aasist == source.cfg.aasist


@pytest.mark.parametrize("problem", ["missing", "extra", "shape"])
def test_published_aasist_state_dict_problems_name_the_key(tmp_path, problem):
    published = _as_published(_tiny_aasist())
    if problem == "missing":
        del published["module.HtrgGAT_layer_ST21.att_weightM"]
        expect = [r"missing", r"HtrgGAT_layer_ST21\.att_weightM"]
    elif problem == "extra":
        published["module.GAT_layer_T.att_bias"] = torch.zeros(8)
        expect = [r"unexpected", r"GAT_layer_T\.att_bias"]
    else:
        published["module.out_layer.weight"] = torch.zeros(2, 31)
        expect = [r"out_layer\.weight: checkpoint \(2, 31\) vs model \(2, 30\)"]
    path = tmp_path / "DF_model.pth"
    torch.save(published, path)
    with pytest.raises(CheckpointError) as err:
        load_detector(path, config=tiny_aasist_dict())
    for pattern in expect:
        assert re.search(pattern, str(err.value)), (pattern, str(err.value))
    assert "model.aasist" in str(err.value)  # what to check


def test_guessing_the_architecture_names_what_is_missing(tmp_path):
    state = {k[len("module."):]: v for k, v in _as_published(_tiny_aasist()).items()}
    assert guess_aasist_config(state) == TINY_AASIST
    del state["GAT_layer_S.att_proj.weight"]
    path = tmp_path / "LA_model.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"GAT_layer_S\.att_proj\.weight is missing.*config="):
        load_detector(path, config={"ssl": tiny_model_dict()["ssl"]})


def test_a_config_naming_the_other_back_end_is_refused(tmp_path):
    path = tmp_path / "LA_model.pth"
    torch.save(_as_published(_tiny_aasist()), path)
    with pytest.raises(CheckpointError, match="AASIST back end but the config .* says model.backend: tcm"):
        load_detector(path, config=tiny_model_dict() | {"backend": "tcm"})


# ----------------------------------------------------------------------------- Stage 1 -> 2 -> 3


def test_stage1_trains_saves_loads_and_scores_then_stage2_trains(tiny_corpus, tmp_path):
    from xai_lib.data.datasets import build_split
    from xai_lib.detector.training import score_utterances, train_stage1
    from xai_lib.importance import load_xai, train_stage2

    run_dir = tmp_path / "run"
    cfg = config_from_dict(
        {"model": tiny_aasist_dict(),
         "data": {"root": str(tiny_corpus), "format": "asvspoof2019", "crop_samples": 4000, "rawboost_algo": 0},
         "training": {"batch_size": 8, "eval_batch_size": 8, "num_epochs": 2, "max_steps_per_epoch": 2,
                      "optimizer": "adamw", "lr": 3e-3, "keep_best": 1, "seed": 11, "device": "cpu"}},
        Stage1Config,
    )
    result = train_stage1(cfg, run_dir, progress=False)
    raw = torch.load(result.checkpoint, weights_only=True)
    assert raw["model_config"]["backend"] == "aasist"
    detector = load_detector(result.checkpoint)
    assert isinstance(detector, AASISTDetector)
    utts = build_split(cfg.data, "dev")[:6]
    scores = score_utterances(detector, utts, cfg, progress=False)
    assert len(scores) == len(utts) and all(torch.isfinite(torch.tensor(list(scores.values()))))

    stage2_cfg = load_config(
        {"xai": {"importance_hidden_dim": 16},
         "data": {"root": str(tiny_corpus), "crop_samples": 8000, "max_train_utts": 16, "max_eval_utts": 8},
         "training": {"batch_size": 8, "eval_batch_size": 8, "num_epochs": 1, "lr": 1e-3, "seed": 7}},
        Stage2Config,
    )
    for representation in ("ssl", "backend"):
        cfg2 = copy.deepcopy(stage2_cfg)
        cfg2.xai.representation = representation
        res2 = train_stage2(cfg2, run_dir, progress=False, resume=False)
        xai = load_xai(res2.checkpoint, detector=detector)
        assert xai.in_dim == (32 if representation == "ssl" else detector.frame_token_dim)
        wave, lengths = _wave()
        w = xai.frame_importance(detector, wave, lengths)
        assert w.shape == (3, int(detector.num_frames(lengths[:1])))
        assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0


def test_stage3_leaves_out_attention_rollout_with_a_reason():
    from xai_lib.explanation.evaluation import applicable_methods, evaluate_methods, method_not_applicable
    from xai_lib.explanation.sanity import DEFAULT_LEVELS, _available_levels

    model = _tiny_aasist()
    tcm = Detector(config_from_dict(tiny_model_dict(), ModelConfig)).eval()
    assert method_not_applicable(tcm, "attention_rollout") is None
    assert "no attention maps" in method_not_applicable(model, "attention_rollout")
    assert applicable_methods(model, ["saliency", "attention_rollout"]) == ["saliency"]
    wave, lengths = _wave()
    items = [{"wave": wave[0].numpy(), "label": 0}]
    with pytest.raises(ValueError, match="attention_rollout: not applicable"):
        evaluate_methods(model, None, items, methods=["attention_rollout"], steps=2, progress=False, warmup=False)
    results = evaluate_methods(model, None, items, steps=2, progress=False, warmup=False,
                               method_kwargs={"integrated_gradients": {"n_steps": 2}, "occlusion": {}})
    assert "attention_rollout" not in results and "saliency" in results
    levels = dict(_available_levels(model, DEFAULT_LEVELS))
    assert levels["classifier"] == ("out_layer",) and "GAT_layer_T" in levels["backend"]


def test_own_checkpoint_round_trip_keeps_the_backend(tmp_path):
    model = _tiny_aasist()
    path = save_detector(model, tmp_path / "stage1_detector.pth")
    loaded = load_detector(path)
    assert isinstance(loaded, AASISTDetector) and loaded.cfg == model.cfg
    wave, lengths = _wave()
    with torch.no_grad():
        assert torch.equal(loaded(wave, lengths).logits, model(wave, lengths).logits)


def test_grad_cam_on_aasist_is_batch_consistent_and_uses_whole_steps():
    from xai_lib.explanation.methods import attribute

    model = _tiny_aasist()
    wave, lengths = _wave()
    both = attribute(model, wave, lengths, method="grad_cam")
    n = model.num_frames(lengths)
    assert both.scores.shape == (3, int(n.max())) and torch.equal(both.lengths, n)
    for b in range(3):
        alone = attribute(model, wave[b: b + 1, : int(lengths[b])], None, method="grad_cam")
        k = int(n[b])
        scale = float(alone.scores.abs().max())
        assert scale > 0
        torch.testing.assert_close(both.scores[b, :k], alone.scores[0], atol=1e-3 * scale, rtol=1e-3)
        whole = 3 * (k // 3)  # frames of no whole step (unseen by AASIST) and padding: 0
        assert torch.all(both.scores[b, whole:] == 0)
    assert all(p.grad is None for p in model.parameters())
