"""Run configuration: YAML files in ``configs/`` loaded into typed dataclasses.

Every YAML file maps onto one of the top-level dataclasses below
(:class:`Stage1Config` for the detector, :class:`Stage2Config` for the XAI module).
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the key and the file, before any work starts.

Example::

    cfg = load_config("configs/demo.yaml", Stage1Config, overrides=["training.batch_size=16"])
    save_config(cfg, run_dir / "config_stage1.yaml")
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "SSLConfig",
    "AASISTConfig",
    "ModelConfig",
    "DataConfig",
    "Stage1TrainingConfig",
    "Stage1Config",
    "XAIConfig",
    "DetectorSourceConfig",
    "Stage2TrainingConfig",
    "Stage2Config",
    "load_config",
    "notebook_config",
    "save_config",
    "config_to_dict",
    "config_from_dict",
    "apply_overrides",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


# ----------------------------------------------------------------------------- schema


@dataclass
class SSLConfig:
    """The wav2vec 2.0 / XLS-R front end.

    ``pretrained_path`` points at a *local* directory holding a transformers
    ``Wav2Vec2Model`` (``config.json`` + weights), e.g. a downloaded
    ``facebook/wav2vec2-xls-r-300m``. When it is ``None`` the front end is built from the
    architecture fields below with random weights (the embedded demo uses a tiny one).
    """

    pretrained_path: str | None = None  # local directory; never fetched from a hub
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    conv_dim: list[int] = field(default_factory=lambda: [512] * 7)
    conv_kernel: list[int] = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    conv_stride: list[int] = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    conv_bias: bool = True
    feat_extract_norm: str = "layer"  # "layer" (XLS-R) keeps padded batches exact
    do_stable_layer_norm: bool = True  # pre-LN transformer as in XLS-R
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    dropout: float = 0.0  # hidden/attention/activation dropout inside the SSL model
    freeze: bool = False  # True: keep the SSL weights fixed in Stage 1 (only the back end trains)
    gradient_checkpointing: bool = False
    # a group-normalised first conv layer ("group") takes its per-channel statistics over this many
    # seconds centred on each frame instead of over the whole input (None: the whole input, as
    # wav2vec 2.0 does). Local statistics make a frame's features independent of far audio, so the
    # Stage-2 local context can reuse the detector's own conv pass; padded batches become exact.
    group_norm_context_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "num_conv_pos_embeddings", "num_conv_pos_embedding_groups"):
            _check_positive(f"model.ssl.{name}", getattr(self, name))
        for name in ("conv_dim", "conv_kernel", "conv_stride"):
            values = getattr(self, name)
            if not values or any(v <= 0 for v in values):
                raise ConfigError(f"model.ssl.{name} must be a non-empty list of positive integers, got {values!r}")
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride)):
            raise ConfigError(
                "model.ssl.conv_dim, conv_kernel and conv_stride must have the same length "
                f"(got {len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("model.ssl.hidden_size must be divisible by model.ssl.num_attention_heads")
        if self.feat_extract_norm not in ("layer", "group"):
            raise ConfigError("model.ssl.feat_extract_norm must be 'layer' or 'group'")
        if self.group_norm_context_s is not None:
            if self.feat_extract_norm != "group":
                raise ConfigError("model.ssl.group_norm_context_s needs model.ssl.feat_extract_norm: group "
                                  f"(got {self.feat_extract_norm!r}: a layer-normalised conv encoder has no statistics "
                                  "over time); set it to null")
            _check_positive("model.ssl.group_norm_context_s", self.group_norm_context_s)
        _check_range("model.ssl.dropout", self.dropout, 0.0, 1.0, hi_open=True)


@dataclass
class AASISTConfig:
    """The AASIST back end (``model.backend: aasist``) after the SSL front end.

    Defaults are the published SSL-AASIST recipe (XLS-R + AASIST, Tak et al. 2022), so a
    published LA/DF checkpoint needs no other setting. ``docs/aasist_checkpoint.md`` lists
    the parameter names and shapes these sizes give.
    """

    emb_size: int = 128  # width of LL (SSL dim -> emb_size); the 3x3 max-pool leaves emb_size // 3 spectral nodes
    # output channels of each residual block of the encoder (the first block reads 1 channel)
    encoder_channels: list[int] = field(default_factory=lambda: [32, 32, 64, 64, 64, 64])
    attention_channels: int = 128  # hidden channels of the 1x1 attention conv stack
    gat_dims: list[int] = field(default_factory=lambda: [64, 32])  # [GAT_layer_S/T output, heterogeneous layers output]
    # share of nodes each graph pool keeps: [pool_S, pool_T, the four pool_hS*/pool_hT*]
    # (the recipe lists a fourth value its model never reads)
    pool_ratios: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # attention temperatures: [GAT_layer_S, GAT_layer_T, the four HtrgGAT layers] (same remark)
    temperatures: list[float] = field(default_factory=lambda: [2.0, 2.0, 100.0])
    graph_dropout: float = 0.2  # input dropout of every graph attention layer
    pool_dropout: float = 0.3  # dropout before each graph pool's scoring projection
    branch_dropout: float = 0.2  # dropout on both inference branches before their element-wise max
    hidden_dropout: float = 0.5  # dropout on the 5 x gat_dims[1] readout before out_layer

    def __post_init__(self) -> None:
        if self.emb_size < 3:
            raise ConfigError(f"model.aasist.emb_size must be >= 3 (the 3x3 max-pool), got {self.emb_size}")
        if not self.encoder_channels or any(c <= 0 for c in self.encoder_channels):
            raise ConfigError(
                f"model.aasist.encoder_channels must be a non-empty list of positive integers, got {self.encoder_channels!r}")
        _check_positive("model.aasist.attention_channels", self.attention_channels)
        if len(self.gat_dims) != 2 or any(d <= 0 for d in self.gat_dims):
            raise ConfigError(f"model.aasist.gat_dims must be two positive integers, got {self.gat_dims!r}")
        if len(self.pool_ratios) != 3 or any(not 0 < r <= 1 for r in self.pool_ratios):
            raise ConfigError(
                f"model.aasist.pool_ratios must be three values in (0, 1] (S, T, heterogeneous), got {self.pool_ratios!r}")
        if len(self.temperatures) != 3 or any(not t > 0 for t in self.temperatures):
            raise ConfigError(
                f"model.aasist.temperatures must be three positive values (S, T, heterogeneous), got {self.temperatures!r}")
        for name in ("graph_dropout", "pool_dropout", "branch_dropout", "hidden_dropout"):
            _check_range(f"model.aasist.{name}", getattr(self, name), 0.0, 1.0, hi_open=True)


#: the back ends ``model.backend`` selects
BACKENDS = ("tcm", "aasist")


@dataclass
class ModelConfig:
    """SSL front end + a back end: the neck + Conformer-TCM (``tcm``, the default) or AASIST.

    ``emb_size`` ... ``max_positions`` describe the TCM back end, ``aasist`` the AASIST one;
    the fields of the back end not selected by ``backend`` are not used.
    """

    ssl: SSLConfig = field(default_factory=SSLConfig)
    backend: str = "tcm"  # "tcm" (LL, first_bn, Conformer-TCM) | "aasist" (SSL-AASIST recipe; sizes in model.aasist)
    emb_size: int = 144
    num_encoders: int = 4
    heads: int = 4
    kernel_size: int = 31
    ff_mult: int = 4
    dropout: float = 0.0  # dropout inside the Conformer blocks (the reference uses none at inference)
    max_positions: int = 10000
    aasist: AASISTConfig = field(default_factory=AASISTConfig)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"model.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.emb_size <= 0 or self.heads <= 0 or self.emb_size % self.heads:
            raise ConfigError(f"model.emb_size ({self.emb_size}) must be a positive multiple of model.heads ({self.heads})")
        if self.num_encoders < 1:
            raise ConfigError("model.num_encoders must be >= 1")
        if self.kernel_size < 1:
            raise ConfigError("model.kernel_size must be >= 1")
        _check_positive("model.ff_mult", self.ff_mult)
        _check_positive("model.max_positions", self.max_positions)
        _check_range("model.dropout", self.dropout, 0.0, 1.0, hi_open=True)


@dataclass
class DataConfig:
    """Where the data is and how utterances become tensors.

    Protocol, segment-label and audio-folder paths are relative to ``root`` unless absolute.
    ``format`` is one of ``auto``, ``asvspoof2019`` (5 columns), ``3col`` (the original
    project's), ``asvspoof2021`` (trial list + keys), ``in_the_wild`` (``meta.csv``),
    ``partialspoof``. The ``*_audio_dir`` keys name the folder holding a split's audio;
    ``null`` discovers it (next to the protocol or under ``root``, see
    :mod:`xai_lib.data.protocols`).
    """

    root: str = "outputs/data/demo_corpus"
    format: str = "auto"
    train_protocol: str | None = "ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.train.trn.txt"
    dev_protocol: str | None = "ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.dev.trl.txt"
    eval_protocol: str | None = "ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.eval.trl.txt"
    # partially spoofed subsets (PartialSpoof-style protocol + 20 ms segment labels)
    partial_dev_protocol: str | None = "partial_spoof/protocols/PartialSpoof.LA.cm.dev.trl.txt"
    partial_eval_protocol: str | None = "partial_spoof/protocols/PartialSpoof.LA.cm.eval.trl.txt"
    partial_dev_segment_labels: str | None = "partial_spoof/segment_labels/dev_seglab_0.02.npy"
    partial_eval_segment_labels: str | None = "partial_spoof/segment_labels/eval_seglab_0.02.npy"
    # audio folders (null: discovered from the protocol's place and root)
    train_audio_dir: str | None = None
    dev_audio_dir: str | None = None
    eval_audio_dir: str | None = None
    partial_dev_audio_dir: str | None = None
    partial_eval_audio_dir: str | None = None
    sample_rate: int = 16000
    crop_samples: int = 66800  # training crop (repeat-padded when shorter)
    eval_crop_samples: int | None = None  # None: score full length
    max_eval_seconds: float = 60.0  # longer files are scored in chunks of this size
    rawboost_algo: int = 5  # 0 = off; 1..8 as in the reference recipe
    # splice augmentation (training crops): with this probability a crop becomes a bona fide crop
    # with one span (splice_min_s .. splice_max_fraction x crop) taken from another utterance: a spoof
    # one for a spoof label (a partially spoofed crop), a bona fide one for a bona fide label (so that
    # seams carry no label). 0 = off (the reference recipe).
    splice_prob: float = 0.0
    splice_min_s: float = 0.1
    splice_max_fraction: float = 0.5
    on_bad_audio: str = "error"  # "error" | "skip"
    num_workers: int = 0
    # decoded audio kept in memory across epochs, per process, up to this many MiB (0 = off): the
    # training set and the dev set are decoded once instead of every epoch. The same values either
    # way; useful with num_workers 0 (workers are re-created each epoch and start empty).
    cache_audio_mb: float = 0.0
    max_train_utts: int | None = None  # subsample (smoke runs)
    max_eval_utts: int | None = None

    def __post_init__(self) -> None:
        allowed = ("auto", "asvspoof2019", "3col", "asvspoof2021", "in_the_wild", "partialspoof")
        if self.format not in allowed:
            raise ConfigError(f"data.format must be one of {allowed}, got {self.format!r}")
        if self.sample_rate <= 0:
            raise ConfigError("data.sample_rate must be positive")
        if self.crop_samples < 400:
            raise ConfigError("data.crop_samples must be >= 400 (one SSL frame)")
        if not 0 <= self.rawboost_algo <= 8:
            raise ConfigError(f"data.rawboost_algo must be 0 (off) or 1..8, got {self.rawboost_algo}")
        if not 0.0 <= self.splice_prob <= 1.0:
            raise ConfigError(f"data.splice_prob must be in [0, 1] (0 = off), got {self.splice_prob}")
        _check_positive("data.splice_min_s", self.splice_min_s)
        if not 0.0 < self.splice_max_fraction < 1.0:
            raise ConfigError(f"data.splice_max_fraction must be in (0, 1), got {self.splice_max_fraction}")
        if self.splice_prob > 0 and self.splice_min_s * self.sample_rate > self.splice_max_fraction * self.crop_samples:
            raise ConfigError(
                f"data.splice_min_s ({self.splice_min_s} s) is longer than splice_max_fraction x crop_samples "
                f"({self.splice_max_fraction} x {self.crop_samples} samples); lower it or use longer crops"
            )
        if self.on_bad_audio not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_audio must be 'error' or 'skip', got {self.on_bad_audio!r}")
        _check_positive("data.max_eval_seconds", self.max_eval_seconds)
        if self.eval_crop_samples is not None and self.eval_crop_samples < 400:
            raise ConfigError("data.eval_crop_samples must be null (full length) or >= 400 (one SSL frame)")
        _check_optional_positive("data.max_train_utts", self.max_train_utts)
        _check_optional_positive("data.max_eval_utts", self.max_eval_utts)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not self.cache_audio_mb >= 0:
            raise ConfigError(f"data.cache_audio_mb must be >= 0 (MiB; 0 = off), got {self.cache_audio_mb}")
        for split in ("train", "dev", "eval", "partial_dev", "partial_eval"):
            value = getattr(self, f"{split}_audio_dir")
            if value is not None and not value.strip():
                raise ConfigError(f"data.{split}_audio_dir must be null (discover the folder) or a folder path, got {value!r}")


#: ``training.lr_schedule`` values (see :func:`xai_lib.detector.training.scheduled_lr`).
LR_SCHEDULES = ("constant", "cosine", "onecycle")


@dataclass
class Stage1TrainingConfig:
    """Stage-1 optimisation (the reference recipe: Adam lr 1e-6, wd 1e-4, weighted CE)."""

    batch_size: int = 32
    eval_batch_size: int = 16
    num_epochs: int = 30
    optimizer: str = "adam"  # "adam" | "adamw"
    lr: float = 1e-6
    weight_decay: float = 1e-4
    class_weights: list[float] = field(default_factory=lambda: [0.1, 0.9])  # [spoof, bona fide]
    patience: int = 7  # early stopping on dev loss
    keep_best: int = 5  # N best checkpoints averaged into the final model
    grad_clip: float | None = None
    max_steps_per_epoch: int | None = None
    seed: int = 1234
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    bf16: bool = False  # autocast to bfloat16 on CUDA
    num_threads: int | None = None  # torch CPU threads (None: torch default)
    # learning rate over the run's num_epochs x steps-per-epoch optimiser steps, set every step from
    # the step count (so a resumed run continues the curve): "constant" (lr throughout, after the
    # warm-up if any), "cosine" (linear warm-up from 0 to lr, lr until the last decay_epochs, then
    # half a cosine down to lr * min_lr_ratio at the last step), "onecycle" (torch's OneCycleLR curve
    # without momentum cycling: half a cosine up from lr / 25 to lr over the warm-up, then down to
    # lr * min_lr_ratio)
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0  # epochs (fractions allowed) of the warm-up
    decay_epochs: float | None = None  # cosine: epochs of the decay at the end (null: all after the warm-up)
    min_lr_ratio: float = 0.0  # cosine/onecycle: the final lr as a fraction of lr
    # score the dev set (dev loss/EER, early stopping, N-best candidates) only after the last N epochs
    # (e.g. those of a final decay); null = after every epoch
    dev_last_epochs: int | None = None

    def __post_init__(self) -> None:
        _check_positive("training.batch_size", self.batch_size)
        _check_positive("training.eval_batch_size", self.eval_batch_size)
        _check_positive("training.num_epochs", self.num_epochs)
        _check_positive("training.lr", self.lr)
        if self.weight_decay < 0:
            raise ConfigError("training.weight_decay must be >= 0")
        if self.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"training.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if len(self.class_weights) != 2 or any(w <= 0 for w in self.class_weights):
            raise ConfigError("training.class_weights must be two positive numbers [spoof, bona fide]")
        _check_positive("training.patience", self.patience)
        _check_positive("training.keep_best", self.keep_best)
        _check_optional_positive("training.grad_clip", self.grad_clip)
        _check_optional_positive("training.max_steps_per_epoch", self.max_steps_per_epoch)
        _check_optional_positive("training.num_threads", self.num_threads)
        _check_device("training.device", self.device)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"training.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not self.warmup_epochs >= 0:  # longer than the run: the run ends inside the warm-up
            raise ConfigError(f"training.warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        _check_optional_positive("training.decay_epochs", self.decay_epochs)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("training.min_lr_ratio must be in [0, 1]")
        _check_optional_positive("training.dev_last_epochs", self.dev_last_epochs)


@dataclass
class Stage1Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: Stage1TrainingConfig = field(default_factory=Stage1TrainingConfig)


@dataclass
class XAIConfig:
    """The Stage-2 XAI module. Defaults are the seed configuration."""

    # "ssl" (SSL output, the original) | "backend" (the back end's frame tokens: TCM, the last Conformer
    # block's; AASIST, the temporal node features of each 3-frame step, repeated over its frames)
    representation: str = "ssl"
    # seconds of audio the frozen front end sees when computing h(t): null = the whole utterance (as
    # the detector scores it, the original); e.g. 0.3 = overlapping 0.3 s windows on the detector's
    # frame grid, each frame from the window centred nearest to it (local evidence stays local).
    # The fidelity term and Stage-3 deletion/insertion always use the detector's own full-context features.
    context_s: float | None = None
    # how the windows are computed: "windows" (the whole front end per window) or "encoder_windows"
    # (the conv feature encoder once per utterance, only the transformer per window; same features
    # with layer norm (XLS-R), centred 0.3 s statistics with group norm; about half the cost)
    context_mode: str = "windows"
    # encoder_windows with a group-normalised conv encoder (wav2vec 2.0 base style, the demo): where its
    # first layer's statistics come from -- "centred" (context_s centred on each frame), "window" (the
    # frame's window) or "utterance" (the whole utterance, as the detector's own pass: the conv encoder
    # then runs once for the verdict and the importance). No effect with layer norm (XLS-R)
    context_group_norm: str = "centred"
    prototype_mode: str = "ema"  # "ema" | "fixed" | "learnable"
    ema_momentum: float = 0.99
    importance_arch: str = "mlp"  # "mlp" (per frame) | "conv" (temporal 1-D conv variant)
    importance_hidden_dim: int = 256
    # > 0: w(t) is the mean of the importance network's per-frame outputs over this many seconds
    # around t (inside the module, so training sees it too); 0 = per frame, the seed
    importance_smoothing_s: float = 0.0
    dropout: float = 0.1
    temperature: float = 0.07
    lambda_bonafide_reg: float = 0.1
    lambda_temporal_smooth: float = 0.1
    lambda_sparsity: float = 0.01
    lambda_fidelity: float = 1.0  # 0 reproduces the seed objective
    target_sparsity: float = 0.3  # fraction of frames a spoof explanation marks; also the fidelity keep budget
    # weak frame labels: binary cross-entropy of w(t) against each frame's label -- the utterance's
    # label on every frame, or, on a spliced training crop (data.splice_prob), 1 inside the inserted
    # spoof span and 0 around it. Gives w an absolute scale on every corpus; 0 = off (the seed)
    lambda_frame: float = 0.0
    # how the fidelity term removes a frame: "zero" (its neck output zeroed, the seed) or "bonafide"
    # (replaced by the same frame of a bona fide reference utterance, xai_lib.detector.removal)
    removal: str = "zero"
    reference_utterances: int = 8  # bona fide references for removal "bonafide"
    # label-free calibration: the frame threshold is the (1 - false_flag_rate) quantile of w over
    # every frame of the bona fide dev utterances
    false_flag_rate: float = 0.01

    def __post_init__(self) -> None:
        if self.representation not in ("ssl", "backend"):
            raise ConfigError(f"xai.representation must be 'ssl' or 'backend', got {self.representation!r}")
        if self.context_s is not None and not (math.isfinite(self.context_s) and self.context_s >= 0.03):
            raise ConfigError(
                f"xai.context_s must be null (whole utterance) or >= 0.03 seconds (one SSL frame), got {self.context_s}"
            )
        if self.context_mode not in ("windows", "encoder_windows"):
            raise ConfigError(f"xai.context_mode must be 'windows' or 'encoder_windows', got {self.context_mode!r}")
        if self.context_group_norm not in ("centred", "window", "utterance"):
            raise ConfigError(
                f"xai.context_group_norm must be 'centred', 'window' or 'utterance', got {self.context_group_norm!r}"
            )
        if self.prototype_mode not in ("ema", "fixed", "learnable"):
            raise ConfigError(
                f"xai.prototype_mode must be one of 'ema', 'fixed', 'learnable', got {self.prototype_mode!r}"
            )
        if self.importance_arch not in ("mlp", "conv"):
            raise ConfigError(f"xai.importance_arch must be 'mlp' or 'conv', got {self.importance_arch!r}")
        _check_range("xai.ema_momentum", self.ema_momentum, 0.0, 1.0, hi_open=True)
        _check_positive("xai.importance_hidden_dim", self.importance_hidden_dim)
        _check_range("xai.importance_smoothing_s", self.importance_smoothing_s, 0.0, 10.0)
        _check_range("xai.dropout", self.dropout, 0.0, 1.0, hi_open=True)
        _check_positive("xai.temperature", self.temperature)
        if self.removal not in ("zero", "bonafide"):
            raise ConfigError(f"xai.removal must be 'zero' or 'bonafide', got {self.removal!r}")
        _check_positive("xai.reference_utterances", self.reference_utterances)
        _check_range("xai.false_flag_rate", self.false_flag_rate, 0.0, 0.5, hi_open=True)
        if self.false_flag_rate == 0:
            raise ConfigError("xai.false_flag_rate must be in (0, 0.5): the share of bona fide frames allowed above the threshold")
        for name in ("lambda_bonafide_reg", "lambda_temporal_smooth", "lambda_sparsity", "lambda_fidelity", "lambda_frame"):
            if getattr(self, name) < 0:
                raise ConfigError(f"xai.{name} must be >= 0, got {getattr(self, name)}")
        _check_range("xai.target_sparsity", self.target_sparsity, 0.0, 1.0)
        if self.lambda_fidelity > 0 and self.target_sparsity == 0:
            raise ConfigError("xai.target_sparsity is also the fidelity frame budget: it must be in (0, 1] when xai.lambda_fidelity > 0")


@dataclass
class DetectorSourceConfig:
    """Where Stage 2 finds the frozen Stage-1 detector."""

    path: str | None = None  # explicit checkpoint; else run_dir/stage1_detector.pth; else fallback
    fallback: str = "avg_5_best.pth"  # published TCM checkpoint (relative to the working directory)
    config: str | None = None  # architecture YAML for a published state dict (schema of conformertcm_baseline.yaml)


@dataclass
class Stage2TrainingConfig:
    batch_size: int = 24
    eval_batch_size: int = 24
    num_epochs: int = 50
    lr: float = 1e-4
    weight_decay: float = 1e-4
    patience: int = 10
    max_steps_per_epoch: int | None = None
    seed: int = 1234
    device: str = "auto"
    num_threads: int | None = None

    def __post_init__(self) -> None:
        _check_positive("training.batch_size", self.batch_size)
        _check_positive("training.eval_batch_size", self.eval_batch_size)
        _check_positive("training.num_epochs", self.num_epochs)
        _check_positive("training.lr", self.lr)
        if self.weight_decay < 0:
            raise ConfigError("training.weight_decay must be >= 0")
        _check_positive("training.patience", self.patience)
        _check_optional_positive("training.max_steps_per_epoch", self.max_steps_per_epoch)
        _check_optional_positive("training.num_threads", self.num_threads)
        _check_device("training.device", self.device)


@dataclass
class Stage2Config:
    xai: XAIConfig = field(default_factory=XAIConfig)
    detector: DetectorSourceConfig = field(default_factory=DetectorSourceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: Stage2TrainingConfig = field(default_factory=Stage2TrainingConfig)


# ----------------------------------------------------------------------------- checks


def _check_positive(name: str, value: float) -> None:
    if value is None or not value > 0 or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{name} must be positive, got {value!r}")


def _check_optional_positive(name: str, value: float | None) -> None:
    if value is not None:
        _check_positive(name, value)


_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


def _check_device(name: str, value: str) -> None:
    if not _DEVICE.match(value):
        raise ConfigError(f"{name} must be 'auto', 'cpu', 'cuda', 'cuda:N' (or 'mps', 'xpu'), got {value!r}")


def _check_range(name: str, value: float, lo: float, hi: float, hi_open: bool = False) -> None:
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"{name} must be in [{lo}, {hi}{bracket}, got {value!r}")


# ----------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (recursing into dataclasses/lists)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:  # try the next alternative
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # .nan / .inf / "nan" would slip past every range check
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where and not where.endswith(":") else where
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def config_from_dict(data: Mapping[str, Any], schema: type[T], source: str = "<dict>") -> T:
    """Build ``schema`` from a nested mapping; errors name the key and ``source``."""
    try:
        return _build(schema, data or {}, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def _parse_override_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Apply dotted overrides (``"training.batch_size=16"`` or ``{"training.batch_size": 16}``)."""
    if not overrides:
        return data
    items = overrides.items() if isinstance(overrides, Mapping) else None
    if items is None:
        parsed = []
        for ov in overrides:
            if "=" not in ov:
                raise ConfigError(f"override {ov!r} must look like section.key=value (e.g. training.batch_size=16)")
            key, raw = ov.split("=", 1)
            parsed.append((key.strip(), _parse_override_value(raw.strip())))
        items = parsed
    for key, value in items:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_config(
    source: str | Path | Mapping[str, Any] | T | None,
    schema: type[T],
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
) -> T:
    """Load a YAML file (or a dict, or an existing config) into ``schema`` with overrides.

    Raises:
        ConfigError: a missing file, YAML syntax error, unknown key, wrong type or bad value;
            the message names the key and the file.
    """
    if isinstance(source, schema):
        data, name = config_to_dict(source), f"<{schema.__name__}>"
    elif source is None:
        data, name = {}, "<defaults>"
    elif isinstance(source, Mapping):
        data, name = _deep_copy(source), "<dict>"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (pass a YAML file, e.g. configs/demo.yaml)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        data = apply_overrides(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return config_from_dict(data, schema, name)


def notebook_config(
    config_path: str | Path,
    schema: type[T],
    overrides: Iterable[str] = (),
    data_root: str | Path | None = None,
    settings: Mapping[str, Any] | None = None,
    final_overrides: Iterable[str] = (),
) -> T:
    """The config a notebook (or the pipeline through it) runs with, in one place.

    Layers, later ones winning: the YAML file, the user's ``overrides``
    (``"section.key=value"``), every notebook setting that is not ``None``
    (``{"training.batch_size": 32}``; ``None`` keeps the file's value), ``data_root``,
    then ``final_overrides`` (the smoke-run limits). ``data.root`` comes back absolute
    (:func:`xai_lib.paths.resolve_path`), so a notebook run from ``notebooks/`` and the
    pipeline run from the repository resolve the same config.

    Raises:
        ConfigError: as :func:`load_config`, naming the file and the key.
    """
    from xai_lib.paths import resolve_path

    path = resolve_path(config_path)
    data = config_to_dict(load_config(path, schema, list(overrides)))
    try:
        apply_overrides(data, {k: v for k, v in (settings or {}).items() if v is not None})
        if data_root:
            apply_overrides(data, {"data.root": str(resolve_path(data_root))})
        apply_overrides(data, list(final_overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg = config_from_dict(data, schema, str(path))
    data_cfg = getattr(cfg, "data", None)
    if data_cfg is not None:
        data_cfg.root = str(resolve_path(data_cfg.root))
    return cfg


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else (list(v) if isinstance(v, list) else v) for k, v in data.items()}


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (used for every run directory)."""
    from xai_lib.files import atomic_write_text  # a crash leaves the old file whole

    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
