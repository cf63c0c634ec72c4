"""The Stage-1 detector: shapes, padding invariance, attention maps, frame weights, key layout."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_dict

from xai_lib.config import ConfigError, ModelConfig, config_from_dict
from xai_lib.detector.model import Detector, DetectorBackEnd, DetectorOutput, PretrainedNotFoundError, build_ssl
from xai_lib.detector.model import sinusoidal_positions

# reference/tcm_backend_keys.tsv (published avg_5_best.pth, emb 144, heads 4, kernel 31,
# 4 encoders), written out here so the test runs without the reference folder; when the
# TSV is available the test also checks this copy against it.
_TSV_CANDIDATES = [
    Path(__file__).resolve().parents[1] / "shared" / "reference" / "tcm_backend_keys.tsv",
    Path("/work/shared/reference/tcm_backend_keys.tsv"),
]
_HEAD = [
    ("LL.weight", "(144, 1024)"),
    ("LL.bias", "(144,)"),
    ("first_bn.weight", "(1,)"),
    ("first_bn.bias", "(1,)"),
    ("first_bn.running_mean", "(1,)"),
    ("first_bn.running_var", "(1,)"),
    ("first_bn.num_batches_tracked", "()"),
    ("conformer.positional_emb", "(1, 10000, 144)"),
    ("conformer.class_token", "(1, 144)"),
]
_BLOCK = [
    ("ff1.fn.fn.net.0.weight", "(576, 144)"),
    ("ff1.fn.fn.net.0.bias", "(576,)"),
    ("ff1.fn.fn.net.3.weight", "(144, 576)"),
    ("ff1.fn.fn.net.3.bias", "(144,)"),
    ("ff1.fn.norm.weight", "(144,)"),
    ("ff1.fn.norm.bias", "(144,)"),
    ("attn.fn.pos_embed", "(1, 4, 144)"),
    ("attn.fn.qkv.weight", "(432, 144)"),
    ("attn.fn.proj.weight", "(144, 144)"),
    ("attn.fn.proj.bias", "(144,)"),
    ("attn.fn.ht_proj.weight", "(144, 36)"),
    ("attn.fn.ht_proj.bias", "(144,)"),
    ("attn.fn.ht_norm.weight", "(36,)"),
    ("attn.fn.ht_norm.bias", "(36,)"),
    ("attn.norm.weight", "(144,)"),
    ("attn.norm.bias", "(144,)"),
    ("conv.net.0.weight", "(144,)"),
    ("conv.net.0.bias", "(144,)"),
    ("conv.net.2.weight", "(576, 144, 1)"),
    ("conv.net.2.bias", "(576,)"),
    ("conv.net.4.conv.weight", "(288, 1, 31)"),
    ("conv.net.4.conv.bias", "(288,)"),
    ("conv.net.5.weight", "(288,)"),
    ("conv.net.5.bias", "(288,)"),
    ("conv.net.5.running_mean", "(288,)"),
    ("conv.net.5.running_var", "(288,)"),
    ("conv.net.5.num_batches_tracked", "()"),
    ("conv.net.7.weight", "(144, 288, 1)"),
    ("conv.net.7.bias", "(144,)"),
    ("ff2.fn.fn.net.0.weight", "(576, 144)"),
    ("ff2.fn.fn.net.0.bias", "(576,)"),
    ("ff2.fn.fn.net.3.weight", "(144, 576)"),
    ("ff2.fn.fn.net.3.bias", "(144,)"),
    ("ff2.fn.norm.weight", "(144,)"),
    ("ff2.fn.norm.bias", "(144,)"),
    ("post_norm.weight", "(144,)"),
    ("post_norm.bias", "(144,)"),
]
_TAIL = [("conformer.fc5.weight", "(2, 144)"), ("conformer.fc5.bias", "(2,)")]
PUBLISHED_BACKEND = (
    _HEAD + [(f"conformer.encoder_blocks.{k}.{name}", shape) for k in range(4) for name, shape in _BLOCK] + _TAIL
)


def _tiny_detector(seed: int = 0, **overrides) -> Detector:
    torch.manual_seed(seed)
    data = tiny_model_dict()
    data.update(overrides)
    model = Detector(config_from_dict(data, ModelConfig))
    # non-trivial BatchNorm statistics so that eval-mode BN is not an identity
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _waves(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    wave = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wave[i, :n] = 0.1 * torch.randn(n, generator=g)
    return wave, torch.tensor(lengths)


def test_forward_shapes_and_score_convention():
    model = _tiny_detector()
    wave, _ = _waves([16000, 16000])
    with torch.no_grad():
        out = model(wave)
    assert isinstance(out, DetectorOutput)
    T = int(model.num_frames(torch.tensor([16000]))[0])
    assert T == 49  # about L / 320, 20 ms frames
    assert model.frame_hop_s == 0.02
    assert out.logits.shape == (2, 2)
    assert torch.equal(out.scores, out.logits[:, 1])  # bona fide logit: higher = more bona fide
    assert out.ssl_features.shape == (2, T, 32)
    assert out.neck.shape == (2, T, 16)
    assert out.frame_tokens.shape == (2, T, 16)
    assert out.cls_token.shape == (2, 16)
    assert out.frame_mask.shape == (2, T) and bool(out.frame_mask.all())
    assert out.frame_lengths.tolist() == [T, T]
    assert out.attentions is None
    assert model.min_input_samples == 400
    assert torch.isfinite(out.logits).all()


def test_padded_batch_equals_single_utterances():
    model = _tiny_detector()
    lengths = [16000, 11111, 5003]
    wave, lens = _waves(lengths)
    with torch.no_grad():
        batched = model(wave, lens)
        assert batched.frame_lengths.tolist() == model.num_frames(lens).tolist()
        for i, n in enumerate(lengths):
            single = model(wave[i : i + 1, :n])
            T = single.frame_tokens.shape[1]
            assert T == int(batched.frame_lengths[i])
            torch.testing.assert_close(batched.logits[i], single.logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched.ssl_features[i, :T], single.ssl_features[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched.frame_tokens[i, :T], single.frame_tokens[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched.cls_token[i], single.cls_token[0], atol=1e-5, rtol=0)
            # padded frames carry nothing
            assert not batched.frame_mask[i, T:].any()
            assert batched.frame_tokens[i, T:].abs().sum() == 0
            assert batched.ssl_features[i, T:].abs().sum() == 0


def test_attention_maps_per_block():
    model = _tiny_detector()
    lengths = [8000, 6000]
    wave, lens = _waves(lengths)
    with torch.no_grad():
        out = model(wave, lens, output_attentions=True)
        plain = model(wave, lens)
    T = out.frame_tokens.shape[1]
    H = 2
    assert len(out.attentions) == 2  # one per encoder block
    for attn in out.attentions:
        assert attn.shape == (2, H, 1 + T + H, 1 + T + H)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, H, 1 + T + H))
        # padded frames of utterance 1 are never attended to
        t1 = int(out.frame_lengths[1])
        assert attn[1, :, :, 1 + t1 : 1 + T].abs().max() == 0
    # the explicit-attention path computes the same function as the fused one
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=0)


def test_frame_weights_all_ones_equal_no_weights_and_are_differentiable():
    model = _tiny_detector()
    wave, lens = _waves([9000, 7000])
    with torch.no_grad():
        feats, mask = model.frontend(wave, lens)
        ref = model.backend(feats, mask)
        ones = model.backend(feats, mask, frame_weights=torch.ones(mask.shape))
    assert torch.equal(ref.logits, ones.logits)
    assert torch.equal(ref.frame_tokens, ones.frame_tokens)

    weights = torch.full(mask.shape, 0.5, requires_grad=True)
    out = model.backend(feats, mask, frame_weights=weights)
    out.logits[:, 1].sum().backward()
    assert weights.grad is not None and weights.grad[mask].abs().sum() > 0
    assert not torch.allclose(out.logits, ref.logits)  # removing half of each frame changes the decision
    # zeroing a frame removes its neck contribution entirely
    zero_first = torch.ones(mask.shape)
    zero_first[:, 0] = 0
    with torch.no_grad():
        removed = model.backend(feats, mask, frame_weights=zero_first)
    assert removed.neck[:, 0].abs().max() == 0


def test_backend_keys_and_shapes_match_published_checkpoint():
    """Names, shapes and order of the back end for emb 144, heads 4, kernel 31, 4 encoders."""
    published = PUBLISHED_BACKEND
    for tsv in _TSV_CANDIDATES:
        if tsv.is_file():  # the copy above is faithful to the reference file
            rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
            assert [(key, shape) for key, shape in rows] == published
    backend = DetectorBackEnd(ModelConfig(emb_size=144, heads=4, kernel_size=31, num_encoders=4), ssl_dim=1024)
    ours = [(key, str(tuple(t.shape))) for key, t in backend.state_dict().items()]
    assert ours == published
    assert len(published) == 159
    # the sinusoid table is fixed, never trained
    assert not backend.conformer.positional_emb.requires_grad
    pe = backend.conformer.positional_emb[0]
    p, i, E = 7, 5, 144
    assert torch.isclose(pe[p, i], torch.cos(torch.tensor(p / 10000 ** (2 * (i // 2) / E))), atol=1e-6)
    assert torch.equal(pe[:20], sinusoidal_positions(20, E)[0])


def test_padding_is_excluded_from_batchnorm_statistics_in_training():
    torch.manual_seed(0)
    cfg = config_from_dict(tiny_model_dict(), ModelConfig)
    backend_a = DetectorBackEnd(cfg, ssl_dim=32).train()
    backend_b = DetectorBackEnd(cfg, ssl_dim=32).train()
    backend_b.load_state_dict(backend_a.state_dict())
    feats = torch.randn(2, 20, 32)
    padded = torch.cat([feats, 5 + 10 * torch.randn(2, 7, 32)], dim=1)  # garbage padding
    mask = torch.zeros(2, 27, dtype=torch.bool)
    mask[:, :20] = True
    out_a = backend_a.backend(feats)
    out_b = backend_b.backend(padded, mask)
    torch.testing.assert_close(out_a.logits, out_b.logits, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(backend_a.state_dict().items(), backend_b.state_dict().values()):
        if "running" in name:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_frozen_ssl_still_trains_the_back_end():
    data = tiny_model_dict()
    data["ssl"] = {**data["ssl"], "freeze": True}
    torch.manual_seed(0)
    model = Detector(config_from_dict(data, ModelConfig)).train()
    wave, lens = _waves([6000, 6000])
    model(wave, lens).logits.sum().backward()
    assert all(p.grad is None for p in model.ssl_model.parameters())
    assert model.LL.weight.grad is not None and model.conformer.fc5.weight.grad.abs().sum() > 0


def test_pretrained_ssl_from_local_directory(tmp_path):
    source = build_ssl(config_from_dict(tiny_model_dict(), ModelConfig).ssl)
    source.save_pretrained(tmp_path / "tiny_w2v")
    cfg = config_from_dict(tiny_model_dict(), ModelConfig)
    cfg.ssl = dataclasses.replace(cfg.ssl, pretrained_path=str(tmp_path / "tiny_w2v"))
    loaded = build_ssl(cfg.ssl)
    assert loaded.config.mask_time_prob == 0  # no SpecAugment masking
    for (key, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key


def test_missing_pretrained_directory_says_how_to_get_xlsr(tmp_path):
    cfg = config_from_dict(tiny_model_dict(), ModelConfig)
    with pytest.raises(PretrainedNotFoundError, match="huggingface-cli download facebook/wav2vec2-xls-r-300m") as err:
        build_ssl(dataclasses.replace(cfg.ssl, pretrained_path=str(tmp_path / "nowhere")))
    assert "model.ssl.pretrained_path" in str(err.value) and "nowhere" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedNotFoundError, match="config.json"):
        build_ssl(dataclasses.replace(cfg.ssl, pretrained_path=str(tmp_path / "empty")))


def test_too_short_audio_is_a_clear_error():
    model = _tiny_detector()
    with pytest.raises(ValueError, match="at least 400"):
        model(torch.zeros(1, 399))
    wave, _ = _waves([1000, 1000])
    with pytest.raises(ValueError, match="at least 400"):
        model(wave, torch.tensor([1000, 300]))


def test_windowed_frontend_is_local_and_on_the_detector_frame_grid():
    model = _tiny_detector()
    wave, lens = _waves([24000, 9000])
    with torch.no_grad():
        full, mask = model.frontend(wave, lens)
        local, lmask = model.windowed_frontend(wave, lens, context_s=0.3)
        assert local.shape == full.shape and torch.equal(lmask, mask)
        assert local[1, int(mask[1].sum()):].abs().sum() == 0  # padding stays 0
        # a window longer than the utterance is the utterance itself: exactly frontend()
        whole, _ = model.windowed_frontend(wave[1:, :9000], None, context_s=5.0)
        torch.testing.assert_close(whole, model.frontend(wave[1:, :9000])[0], atol=1e-6, rtol=0)
        # 0.3 s = 15-frame windows starting every 7 frames (centres 7.5, 14.5, 21.5, 28.5, ...):
        # frame 30 (centre 30.5) comes from the window starting at frame 21, as its 10th frame
        win = model.windowed_frontend(wave[:1, :24000], None, context_s=0.3)[0]
        hop, span = model.frame_hop_samples, model.min_input_samples
        assert hop == 320
        window = model.frontend(wave[:1, 21 * hop : 21 * hop + 14 * hop + span])[0]  # (1, 15, D)
        torch.testing.assert_close(win[0, 30], window[0, 9], atol=1e-5, rtol=0)
        # locality: changing audio far from frame 10 leaves its local feature, not its full-context one
        changed = wave[:1, :24000].clone()
        changed[0, 16000:] = 0.5 * torch.randn(8000, generator=torch.Generator().manual_seed(1))
        local2 = model.windowed_frontend(changed, None, context_s=0.3)[0]
        full2 = model.frontend(changed)[0]
    torch.testing.assert_close(local2[0, 10], win[0, 10], atol=1e-6, rtol=0)
    assert not torch.allclose(full2[0, 10], full[0, 10], atol=1e-4)
    # a batch mixing an utterance shorter than one window (9 frames < 15) with a long one
    mixed, mixed_lens = _waves([24000, 3000])
    with torch.no_grad():
        both, both_mask = model.windowed_frontend(mixed, mixed_lens, context_s=0.3)
        short_alone = model.frontend(mixed[1:, :3000])[0]
        long_alone = model.windowed_frontend(mixed[:1], None, context_s=0.3)[0]
    assert both_mask.sum(1).tolist() == [74, 9]
    torch.testing.assert_close(both[1, :9], short_alone[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(both[0], long_alone[0], atol=1e-6, rtol=0)


def _group_norm_detector(group_norm_context_s: float | None = None) -> Detector:
    """The tiny detector with the demo's conv encoder normalisation (wav2vec 2.0 base style);
    with ``group_norm_context_s``, its statistics over that many seconds around each frame."""
    ssl = dict(tiny_model_dict()["ssl"], feat_extract_norm="group", do_stable_layer_norm=False,
               group_norm_context_s=group_norm_context_s)
    return _tiny_detector(ssl=ssl)


_VARIANTS = [
    {"mode": "windows"},
    {"mode": "encoder_windows"},  # group_norm="centred"
    {"mode": "encoder_windows", "group_norm": "window"},
    {"mode": "encoder_windows", "group_norm": "utterance"},
]


@pytest.mark.parametrize("norm", ["layer", "group"])
@pytest.mark.parametrize("variant", _VARIANTS, ids=lambda v: "-".join(v.values()))
@pytest.mark.parametrize("hop_fraction", [0.5, 0.75, 1.0])
def test_every_windowed_variant_keeps_the_frame_grid_and_padding(norm, variant, hop_fraction):
    model = _tiny_detector() if norm == "layer" else _group_norm_detector()
    wave, lens = _waves([24000, 9000, 3000])  # 74, 28 and 9 frames: windows of 15 frames, and one shorter
    kw = dict(variant, context_s=0.3, hop_fraction=hop_fraction)
    with torch.no_grad():
        full, mask = model.frontend(wave, lens)
        local, lmask = model.windowed_frontend(wave, lens, **kw)
        alone = [model.windowed_frontend(wave[i : i + 1, : int(n)], None, **kw)[0][0] for i, n in enumerate(lens)]
        short = model.frontend(wave[2:, :3000])[0][0]
    assert local.shape == full.shape and torch.equal(lmask, mask)
    for i, n in enumerate(mask.sum(1).tolist()):
        assert local[i, n:].abs().sum() == 0  # padding stays 0
        assert local[i, :n].abs().sum(-1).min() > 0  # every valid frame has a feature
        torch.testing.assert_close(local[i, :n], alone[i], atol=1e-5, rtol=0)  # the batch changes nothing
    torch.testing.assert_close(local[2, :9], short, atol=1e-5, rtol=0)  # shorter than a window: frontend() alone


@pytest.mark.parametrize("group_norm", ["window", "centred", "utterance"])
@pytest.mark.parametrize("hop_fraction", [0.5, 0.75, 1.0])
def test_encoder_windows_equal_windows_with_a_layer_normalised_conv_encoder(hop_fraction, group_norm):
    """XLS-R's conv encoder (layer norm) is local to a frame's 400 samples, so running it once
    per utterance and only the transformer per window gives the features of the windows (there
    are no group-norm statistics to choose)."""
    model = _tiny_detector()
    wave, lens = _waves([24000, 13000, 5000])
    with torch.no_grad():
        windows, _ = model.windowed_frontend(wave, lens, context_s=0.3, hop_fraction=hop_fraction)
        encoder, _ = model.windowed_frontend(wave, lens, context_s=0.3, mode="encoder_windows",
                                             hop_fraction=hop_fraction, group_norm=group_norm)
    torch.testing.assert_close(encoder, windows, atol=1e-5, rtol=0)


def test_encoder_windows_with_window_statistics_approach_windows_with_group_norm():
    """The demo's group-normalised conv encoder: local statistics bring "encoder_windows" close
    to "windows", far closer than whole-utterance statistics (and closer than a 3/4 hop)."""
    model = _group_norm_detector()
    wave, lens = _waves([48000, 30000])
    with torch.no_grad():
        windows, mask = model.windowed_frontend(wave, lens)
        gap = {gn: (model.windowed_frontend(wave, lens, mode="encoder_windows", group_norm=gn)[0] - windows)
               .abs()[mask].mean().item() for gn in ("window", "centred", "utterance")}
        wider_hop = (model.windowed_frontend(wave, lens, hop_fraction=0.75)[0] - windows).abs()[mask].mean().item()
    scale = windows.abs()[mask].mean().item()
    for local in ("centred", "window"):
        assert gap[local] < 0.5 * gap["utterance"] and gap[local] < wider_hop, (gap, wider_hop)
        assert gap[local] < 0.1 * scale


def test_hop_fraction_one_takes_each_frame_from_the_window_that_contains_it():
    model = _tiny_detector()
    wave, _ = _waves([24000])  # 74 frames: windows start at 0, 15, 30, 45 and 59 (the last ends at frame 73)
    hop, span = model.frame_hop_samples, model.min_input_samples
    with torch.no_grad():
        win = model.windowed_frontend(wave, None, context_s=0.3, hop_fraction=1.0)[0]
        for frame, start in ((0, 0), (14, 0), (15, 15), (29, 15), (44, 30), (52, 45), (73, 59)):
            window = model.frontend(wave[:, start * hop : start * hop + 14 * hop + span])[0]  # (1, 15, D)
            torch.testing.assert_close(win[0, frame], window[0, frame - start], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", _VARIANTS, ids=lambda v: "-".join(v.values()))
def test_windowed_variants_are_local_except_with_utterance_group_norm(variant):
    """Audio more than a window (and a window step) away leaves a frame's feature unchanged: in
    every variant with a layer-normalised conv encoder, and with a group-normalised one except
    under whole-utterance statistics (group_norm="utterance"), where far audio moves a frame's
    feature through those statistics, and through them only."""
    for norm, model in (("layer", _tiny_detector()), ("group", _group_norm_detector())):
        wave, _ = _waves([24000])
        changed = wave.clone()
        changed[0, 16000:] = 0.5 * torch.randn(8000, generator=torch.Generator().manual_seed(1))  # frames >= 49
        with torch.no_grad():
            before = model.windowed_frontend(wave, None, context_s=0.3, **variant)[0]
            after = model.windowed_frontend(changed, None, context_s=0.3, **variant)[0]
        if norm == "group" and variant.get("group_norm") == "utterance":
            assert not torch.allclose(after[0, 10], before[0, 10], atol=1e-4)
            # ... through the conv hidden states alone: the transformer sees only the window's
            # (frame 10 comes from the window of frames 0-14, centre 7.5)
            with torch.no_grad():
                hidden = model._conv_hidden_states(changed, torch.tensor([24000]))  # (1, 74, D)
                window = model.ssl_model.encoder(hidden[:, :15].clone()).last_hidden_state
            torch.testing.assert_close(after[0, 10], window[0, 10], atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(after[0, :30], before[0, :30], atol=1e-6, rtol=0)
            assert not torch.allclose(after[0, 60], before[0, 60], atol=1e-4)  # near frames do change


@pytest.mark.parametrize("group_norm", ["window", "centred", "utterance"])
def test_encoder_windows_group_norm_ignores_the_padding(group_norm):
    """The demo's group-normalised conv encoder: statistics over valid samples only, so an
    utterance's conv hidden states are the same in a padded batch and alone."""
    model = _group_norm_detector()
    wave, lens = _waves([24000, 13000])
    with torch.no_grad():
        batch = model.windowed_frontend(wave, lens, mode="encoder_windows", group_norm=group_norm)[0]
        alone = model.windowed_frontend(wave[1:, :13000], None, mode="encoder_windows", group_norm=group_norm)[0]
        hidden = model._conv_hidden_states(wave, lens)
        hidden_alone = model._conv_hidden_states(wave[1:, :13000], torch.tensor([13000]))
        ssl = model.ssl_model
        reference = ssl.feature_projection(ssl.feature_extractor(wave[1:, :13000]).transpose(1, 2))[0]
    torch.testing.assert_close(batch[1, :40], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[1, :40], hidden_alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden_alone, reference, atol=1e-5, rtol=0)
    assert hidden[1, 40:].abs().sum() == 0


@pytest.mark.parametrize("norm,group_norm,shared", [
    ("layer", "centred", True), ("group", "utterance", True), ("group", "centred", False), ("group", "window", False),
    ("group_local", "centred", True), ("group_local", "utterance", False),
])
def test_frontend_with_context_runs_the_conv_encoder_once_where_that_changes_nothing(norm, group_norm, shared):
    """The verdict's features and the local-context ones in one call: the detector's own
    features exactly, the windowed ones as windowed_frontend computes them, and the conv feature
    encoder run once when it is shared (layer norm; group norm with the statistics the detector
    takes: the utterance's, or, with model.ssl.group_norm_context_s, the centred window's)."""
    model = {"layer": _tiny_detector, "group": _group_norm_detector,
             "group_local": lambda: _group_norm_detector(0.3)}[norm]()
    wave, _ = _waves([24000])
    calls = []
    hook = model.ssl_model.feature_extractor.conv_layers[-1].register_forward_hook(lambda *_: calls.append(1))
    kw = dict(context_s=0.3, mode="encoder_windows", group_norm=group_norm)
    with torch.no_grad():
        full, local, mask = model.frontend_with_context(wave, None, **kw)
        n_calls = len(calls)
        hook.remove()
        torch.testing.assert_close(full, model.frontend(wave)[0], atol=0, rtol=0)
        torch.testing.assert_close(local, model.windowed_frontend(wave, None, **kw)[0], atol=1e-5, rtol=0)
    assert model.shares_conv_encoder("encoder_windows", group_norm, 0.3) is shared
    assert n_calls == (1 if shared else 2)  # conv encoder passes
    assert bool(mask.all()) and local.shape == full.shape


def test_local_group_norm_detector_scores_padded_batches_exactly_and_trains(tmp_path):
    """model.ssl.group_norm_context_s: the first conv layer's statistics over 0.3 s around each
    frame. A padded batch scores every utterance as alone (whole-input statistics would see the
    padding), far audio reaches a frame's conv features no more, the statistics still carry
    gradients to the conv weights, and a checkpoint keeps the setting."""
    model = _group_norm_detector(0.3)
    assert model.group_norm_frames == 15 and _group_norm_detector().group_norm_frames == 0
    wave, lens = _waves([24000, 13000, 4000])
    with torch.no_grad():
        batched = model(wave, lens)
        for i, n in enumerate(lens.tolist()):
            torch.testing.assert_close(batched.logits[i], model(wave[i : i + 1, :n]).logits[0], atol=1e-5, rtol=0)
        changed = wave[:1].clone()
        changed[0, 16000:] = 0.5 * torch.randn(8000, generator=torch.Generator().manual_seed(1))  # frames >= 49
        starts = torch.arange(74)[None] - 7
        before = model._conv_hidden_states(wave[:1], torch.tensor([24000]), starts, 15)
        after = model._conv_hidden_states(changed, torch.tensor([24000]), starts, 15)
    torch.testing.assert_close(after[0, :30], before[0, :30], atol=1e-6, rtol=0)
    assert not torch.allclose(after[0, 60], before[0, 60], atol=1e-4)
    model.train()
    model(wave[:2, :16000]).logits[:, 0].sum().backward()
    grad = model.ssl_model.feature_extractor.conv_layers[0].conv.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    from xai_lib.detector import load_detector, save_detector

    loaded = load_detector(save_detector(model.eval(), tmp_path / "stage1_detector.pth"))
    assert loaded.group_norm_frames == 15
    with torch.no_grad():
        torch.testing.assert_close(loaded(wave, lens).logits, model(wave, lens).logits, atol=1e-6, rtol=0)


def test_group_norm_context_needs_a_group_normalised_conv_encoder():
    with pytest.raises(ConfigError, match="model.ssl.group_norm_context_s"):
        config_from_dict(dict(tiny_model_dict(), ssl=dict(tiny_model_dict()["ssl"], group_norm_context_s=0.3)), ModelConfig)
    with pytest.raises(ConfigError, match="model.ssl.group_norm_context_s must be positive"):
        config_from_dict(dict(tiny_model_dict(), ssl=dict(tiny_model_dict()["ssl"], feat_extract_norm="group",
                                                            group_norm_context_s=0.0)), ModelConfig)


def test_windowed_frontend_rejects_unknown_modes_and_hops():
    model = _tiny_detector()
    wave, _ = _waves([8000])
    with pytest.raises(ValueError, match="mode"):
        model.windowed_frontend(wave, mode="frames")
    with pytest.raises(ValueError, match="group_norm"):
        model.windowed_frontend(wave, mode="encoder_windows", group_norm="batch")
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="hop_fraction"):
            model.windowed_frontend(wave, hop_fraction=bad)


def test_local_group_norm_matches_per_frame_statistics_and_their_gradients():
    """The closed-form local GroupNorm (forward and backward) equals normalising every frame's
    block by hand with the mean and variance of its window, the tail past the last block and the
    padding with the last valid frame's, for a padded batch with an utterance shorter than the
    window; gradients to the input and to the affine weights included."""
    from xai_lib.detector.model import _centred_starts, _local_group_norm

    torch.manual_seed(0)
    B, C, K, frames, T = 3, 4, 8, 5, 12
    n_frames = [12, 9, 3]
    norm = torch.nn.GroupNorm(C, C).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(B, C, T * K + 6, dtype=torch.double, requires_grad=True)
    starts = _centred_starts(B, T, frames)

    def by_hand() -> torch.Tensor:
        rows = []
        for b, n in enumerate(n_frames):
            cols = []
            for t in range(T):
                lo = max(0, min(int(starts[b, min(t, n - 1)]), max(n - frames, 0)))
                window = x[b, :, lo * K : min(lo + frames, n) * K]
                mean, var = window.mean(-1, keepdim=True), window.var(-1, unbiased=False, keepdim=True)
                own = x[b, :, t * K : (t + 1) * K] if t < T - 1 else x[b, :, t * K :]
                cols.append((own - mean) / torch.sqrt(var + norm.eps) * norm.weight[:, None] + norm.bias[:, None])
            rows.append(torch.cat(cols, -1))
        return torch.stack(rows)

    y, ref = _local_group_norm(x, norm, starts, frames, n_frames, K), by_hand()
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(y)
    params = [x, norm.weight, norm.bias]
    for got, want in zip(torch.autograd.grad((y * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
