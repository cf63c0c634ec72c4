"""Saving and loading Stage-1 detectors.

Two on-disk formats are read by :func:`load_detector`:

* **ours** (``save_detector``): a dict ``{"format": "xai_lib.stage1", "version": 1,
  "model_config", "ssl_config", "state_dict", "extra"}`` holding tensors and primitives
  only, so the model is rebuilt without the pretrained SSL directory;
* **a published state dict**: a plain state dict with fairseq-named XLS-R weights under
  ``ssl_model.model.`` and the back end under its own names: the TCM checkpoint
  (``avg_5_best.pth``: ``LL.``, ``first_bn.``, ``conformer.``) or an SSL-AASIST one (the LA
  and DF models of the SSL_Anti-spoofing recipe: ``LL.``, ``first_bn.``, ``encoder.``,
  ``GAT_layer_S.``, ``master1``, ... ; ``docs/aasist_checkpoint.md``). The back end is
  recognised from the tensors (:func:`published_backend`). The fairseq names are mapped to
  ``transformers.Wav2Vec2Model`` names (:func:`fairseq_to_hf_key`); the architecture comes
  from a config (``ModelConfig`` defaults = the published architectures); the AASIST sizes
  are read from the tensors when the config does not give them (:func:`guess_aasist_config`).

Loading is strict: every tensor is mapped or knowingly ignored (the pretraining-only
quantizer/projection heads), shapes are checked, and any problem raises one
:class:`CheckpointError` listing the offending keys. Files are always read with
``torch.load(weights_only=True)``: a file that would need arbitrary unpickling is
refused and never executed.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import yaml
from torch import Tensor, nn

from xai_lib.files import CheckpointError, atomic_torch_save, safe_torch_load, to_primitive, unwrap_model
from xai_lib.config import AASISTConfig, ConfigError, ModelConfig, Stage1Config, config_from_dict, config_to_dict
from xai_lib.detector.model import Detector, build_detector, build_ssl, ssl_config_dict, ssl_from_config_dict

__all__ = [
    "CheckpointError",
    "LoadReport",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PRETRAINING_ONLY_PREFIXES",
    "atomic_torch_save",
    "safe_torch_load",
    "save_detector",
    "load_detector",
    "average_state_dicts",
    "fairseq_to_hf_key",
    "hf_to_fairseq_key",
    "map_published_state_dict",
    "published_backend",
    "guess_aasist_config",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "xai_lib.stage1"
FORMAT_VERSION = 1
FAIRSEQ_SSL_PREFIX = "ssl_model.model."
OUR_SSL_PREFIX = "ssl_model."
#: back-end key prefixes of the published checkpoints: TCM (``LL``, ``first_bn``, ``conformer``),
#: then AASIST (every module of the SSL-AASIST recipe's model, and its three root parameters)
BACKEND_PREFIXES = ("LL.", "first_bn.", "conformer.")
AASIST_PREFIXES = ("first_bn1.", "encoder.", "attention.", "GAT_layer_S.", "GAT_layer_T.", "HtrgGAT_layer_ST",
                   "pool_S.", "pool_T.", "pool_hS", "pool_hT", "out_layer.")
AASIST_ROOT_PARAMETERS = ("pos_S", "master1", "master2")
# fairseq Wav2Vec2Model tensors used only by the self-supervised pretraining loss
PRETRAINING_ONLY_PREFIXES = ("quantizer.", "input_quantizer.", "project_q.", "project_inp.", "final_proj.", "target_glu.")
_MAX_LISTED = 20


@dataclass
class LoadReport:
    """What :func:`load_detector` did (also attached to the model as ``model.load_report``).

    Attributes:
        path: the file read.
        format: ``"xai_lib.stage1"``, ``"tcm_state_dict"`` or ``"aasist_state_dict"`` (published
            plain state dicts).
        mapped: number of tensors loaded into the model.
        ignored: checkpoint keys knowingly not loaded (pretraining-only heads).
        stripped_prefix: a ``module.`` prefix removed from every key, if any.
        extra: the ``extra`` dict stored by :func:`save_detector` (empty otherwise).
        guessed: architecture fields read from the tensors' shapes (``model.aasist.*`` of a
            published AASIST state dict loaded without them), empty otherwise.
    """

    path: str
    format: str
    mapped: int
    ignored: list[str] = field(default_factory=list)
    stripped_prefix: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    guessed: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        ignored = ""
        if self.ignored:
            shown = ", ".join(self.ignored[:8]) + (" ..." if len(self.ignored) > 8 else "")
            ignored = f"; {len(self.ignored)} pretraining-only tensors ignored ({shown})"
        prefix = f"; stripped prefix {self.stripped_prefix!r}" if self.stripped_prefix else ""
        guessed = ""
        if self.guessed:
            guessed = "; read from the tensors: " + ", ".join(f"{k}={v}" for k, v in self.guessed.items())
        return f"{self.path} ({self.format}): {self.mapped} tensors loaded{ignored}{prefix}{guessed}"


# ----------------------------------------------------------------------------- name mapping

_FS_TO_HF: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)"), r"feature_extractor.conv_layers.\1.conv.\2"),
    (re.compile(r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)"), r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (re.compile(r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)"), r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (re.compile(r"layer_norm\.(weight|bias)"), r"feature_projection.layer_norm.\1"),
    (re.compile(r"post_extract_proj\.(weight|bias)"), r"feature_projection.projection.\1"),
    (re.compile(r"encoder\.pos_conv\.0\.bias"), r"encoder.pos_conv_embed.conv.bias"),
    (re.compile(r"encoder\.pos_conv\.0\.weight_g"), r"encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (re.compile(r"encoder\.pos_conv\.0\.weight_v"), r"encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (re.compile(r"encoder\.pos_conv\.0\.parametrizations\.weight\.original([01])"),
     r"encoder.pos_conv_embed.conv.parametrizations.weight.original\1"),
    (re.compile(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)"), r"encoder.layers.\1.attention.\2_proj.\3"),
    (re.compile(r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)"), r"encoder.layers.\1.layer_norm.\2"),
    (re.compile(r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)"), r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (re.compile(r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)"), r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (re.compile(r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)"), r"encoder.layers.\1.final_layer_norm.\2"),
    (re.compile(r"encoder\.layer_norm\.(weight|bias)"), r"encoder.layer_norm.\1"),
    (re.compile(r"mask_emb"), r"masked_spec_embed"),
]

_HF_TO_FS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)"), r"feature_extractor.conv_layers.\1.0.\2"),
    (re.compile(r"feature_projection\.layer_norm\.(weight|bias)"), r"layer_norm.\1"),
    (re.compile(r"feature_projection\.projection\.(weight|bias)"), r"post_extract_proj.\1"),
    (re.compile(r"encoder\.pos_conv_embed\.conv\.bias"), r"encoder.pos_conv.0.bias"),
    (re.compile(r"encoder\.pos_conv_embed\.conv\.(?:parametrizations\.weight\.original0|weight_g)"), r"encoder.pos_conv.0.weight_g"),
    (re.compile(r"encoder\.pos_conv_embed\.conv\.(?:parametrizations\.weight\.original1|weight_v)"), r"encoder.pos_conv.0.weight_v"),
    (re.compile(r"encoder\.layers\.(\d+)\.attention\.(q|k|v|out)_proj\.(weight|bias)"), r"encoder.layers.\1.self_attn.\2_proj.\3"),
    (re.compile(r"encoder\.layers\.(\d+)\.layer_norm\.(weight|bias)"), r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (re.compile(r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(weight|bias)"), r"encoder.layers.\1.fc1.\2"),
    (re.compile(r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(weight|bias)"), r"encoder.layers.\1.fc2.\2"),
    (re.compile(r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)"), r"encoder.layers.\1.final_layer_norm.\2"),
    (re.compile(r"encoder\.layer_norm\.(weight|bias)"), r"encoder.layer_norm.\1"),
    (re.compile(r"masked_spec_embed"), r"mask_emb"),
]
_HF_CONV_NORM = re.compile(r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)")


def fairseq_to_hf_key(name: str) -> str | None:
    """Map a fairseq XLS-R/wav2vec2 parameter name to its ``transformers.Wav2Vec2Model`` name.

    Args:
        name: a key relative to the fairseq model (without ``ssl_model.model.``),
            e.g. ``"encoder.layers.3.fc1.weight"``.

    Returns:
        The transformers name (e.g. ``"encoder.layers.3.feed_forward.intermediate_dense.weight"``;
        the weight-norm ``weight_g``/``weight_v`` of the positional convolution become
        ``parametrizations.weight.original0``/``original1``), or ``None`` when the name
        has no counterpart.
    """
    for pattern, repl in _FS_TO_HF:
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    return None


def hf_to_fairseq_key(name: str, feat_extract_norm: str = "layer") -> str | None:
    """Inverse of :func:`fairseq_to_hf_key`.

    Args:
        name: a ``transformers.Wav2Vec2Model`` key (without ``ssl_model.``).
        feat_extract_norm: ``"layer"`` (XLS-R: conv norms at ``conv_layers.{i}.2.1``) or
            ``"group"`` (wav2vec2 base: ``conv_layers.0.2``).

    Returns:
        The fairseq name, or ``None`` when the name has no fairseq counterpart.
    """
    match = _HF_CONV_NORM.fullmatch(name)
    if match:
        index, kind = match.groups()
        return f"feature_extractor.conv_layers.{index}.{'2.1' if feat_extract_norm == 'layer' else '2'}.{kind}"
    for pattern, repl in _HF_TO_FS:
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    return None


def _is_pretraining_only(fairseq_name: str) -> bool:
    return fairseq_name.startswith(PRETRAINING_ONLY_PREFIXES)


def _is_backend_key(key: str) -> bool:
    return key.startswith(BACKEND_PREFIXES + AASIST_PREFIXES) or key in AASIST_ROOT_PARAMETERS


def map_published_state_dict(
    state: Mapping[str, Tensor], model_keys: Iterable[str]
) -> tuple[dict[str, Tensor], dict[str, str], list[str], list[str]]:
    """Rename a published (TCM or SSL-AASIST) state dict to our ``Detector`` keys.

    The fairseq SSL names are mapped; back-end names are ours already (the published ones).

    Args:
        state: the checkpoint (``module.`` prefix already stripped).
        model_keys: the target model's state-dict keys (decides e.g. whether ``mask_emb`` is used).

    Returns:
        mapped: our key -> tensor.
        source_names: our key -> the checkpoint key it came from.
        ignored: checkpoint keys knowingly dropped (pretraining-only).
        unmapped: checkpoint keys with no counterpart (an error for strict loading).
    """
    model_keys = set(model_keys)
    weight_norm_legacy = any(k.endswith("pos_conv_embed.conv.weight_g") for k in model_keys)
    mapped: dict[str, Tensor] = {}
    source_names: dict[str, str] = {}
    ignored: list[str] = []
    unmapped: list[str] = []
    for key, tensor in state.items():
        if key.startswith(FAIRSEQ_SSL_PREFIX):
            sub = key[len(FAIRSEQ_SSL_PREFIX):]
            if _is_pretraining_only(sub):
                ignored.append(key)
                continue
            hf = fairseq_to_hf_key(sub)
            if hf is None:
                unmapped.append(key)
                continue
            if hf == "masked_spec_embed" and OUR_SSL_PREFIX + hf not in model_keys:
                ignored.append(key)  # only used for SpecAugment masking, which we disable
                continue
            if weight_norm_legacy:
                hf = hf.replace("parametrizations.weight.original0", "weight_g").replace(
                    "parametrizations.weight.original1", "weight_v")
            ours = OUR_SSL_PREFIX + hf
        elif _is_backend_key(key):
            ours = key
        else:
            unmapped.append(key)
            continue
        if ours in mapped:
            unmapped.append(key)  # two checkpoint keys for one tensor (e.g. both weight_g and original0)
            continue
        mapped[ours] = tensor
        source_names[ours] = key
    return mapped, source_names, ignored, unmapped


# ----------------------------------------------------------------------------- back end of a published state dict


def published_backend(state: Mapping[str, Any], path: str | Path = "<state dict>") -> str:
    """The back end a published state dict holds: ``"tcm"`` (``conformer.*``) or ``"aasist"``
    (``encoder.*``, ``GAT_layer_S.*``, ``master1`` ...), ``module.`` prefix already stripped.

    Raises:
        CheckpointError: neither, or both.
    """
    tcm = any(k.startswith("conformer.") for k in state)
    aasist = any(k.startswith(AASIST_PREFIXES) or k in AASIST_ROOT_PARAMETERS for k in state)
    if tcm and aasist:
        raise CheckpointError(
            f"{path}: the state dict holds both a TCM back end (conformer.*) and AASIST tensors (encoder.*, "
            "GAT_layer_*, master1 ...); a detector has one back end. Check that the file is one model's state dict."
        )
    if not (tcm or aasist):
        others = sorted({k.split(".")[0] for k in state if not k.startswith(FAIRSEQ_SSL_PREFIX)})
        raise CheckpointError(
            f"{path}: no known back end in the state dict: expected TCM tensors (conformer.*) or SSL-AASIST tensors "
            f"(encoder.*, GAT_layer_S.*, master1 ...); its other top-level names: {', '.join(others[:12]) or 'none'}. "
            "xai_lib loads the published TCM and SSL-AASIST checkpoints (docs/aasist_checkpoint.md)."
        )
    return "tcm" if tcm else "aasist"


def guess_aasist_config(state: Mapping[str, Any], path: str | Path = "<state dict>") -> dict[str, Any]:
    """The ``model.aasist`` sizes of a published SSL-AASIST state dict, read from tensor shapes.

    Read: ``emb_size`` (rows of ``LL.weight``), ``encoder_channels`` (output channels of every
    ``encoder.K.0.conv1.weight``), ``attention_channels`` (``attention.0.weight``), ``gat_dims``
    (``GAT_layer_S.att_proj.weight``, ``HtrgGAT_layer_ST11.att_proj.weight``); ``pos_S`` is
    checked against them. Temperatures, pool ratios and dropouts leave no trace in the tensors:
    they stay as the config (default: the recipe's).

    Returns:
        ``{"emb_size", "encoder_channels", "attention_channels", "gat_dims"}``.

    Raises:
        CheckpointError: a tensor needed is missing or has an unexpected shape (names it).
    """
    def need(key: str, dims: int) -> Tensor:
        t = state.get(key)
        if not isinstance(t, Tensor) or t.dim() != dims:
            found = "missing" if t is None else f"shape {_shape(t)}"
            raise CheckpointError(
                f"{path}: cannot read the AASIST architecture from the tensors: {key} is {found} (expected a "
                f"{dims}-d tensor). Pass the architecture instead: load_detector(path, config=<YAML or dict with "
                "model.backend: aasist and model.aasist.*>); docs/aasist_checkpoint.md lists the names and shapes."
            )
        return t

    emb_size = int(need("LL.weight", 2).shape[0])
    blocks = sorted({int(m.group(1)) for k in state for m in [re.match(r"encoder\.(\d+)\.0\.conv1\.weight$", k)] if m})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(
            f"{path}: cannot read the AASIST encoder from the tensors: expected encoder.0.0.conv1.weight, "
            f"encoder.1.0.conv1.weight, ... (found blocks {blocks}). Pass config=<... model.aasist.encoder_channels>."
        )
    channels = [int(need(f"encoder.{k}.0.conv1.weight", 4).shape[0]) for k in blocks]
    attention = int(need("attention.0.weight", 4).shape[0])
    gat_dims = [int(need("GAT_layer_S.att_proj.weight", 2).shape[0]),
                int(need("HtrgGAT_layer_ST11.att_proj.weight", 2).shape[0])]
    pos = need("pos_S", 3)
    if tuple(pos.shape) != (1, emb_size // 3, channels[-1]):
        raise CheckpointError(
            f"{path}: pos_S has shape {_shape(pos)} but LL.weight ({emb_size} rows) and the last encoder block "
            f"({channels[-1]} channels) imply (1, {emb_size // 3}, {channels[-1]}): not an SSL-AASIST state dict "
            "this loader understands; pass config=<... model.aasist.*> to see every mismatch."
        )
    return {"emb_size": emb_size, "encoder_channels": channels, "attention_channels": attention, "gat_dims": gat_dims}


# ----------------------------------------------------------------------------- strict loading


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, Tensor) else ()


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} [{len(items)}]:\n" + "\n".join(f"    {s}" for s in shown) + more


def _describe_published(state: Mapping[str, Tensor]) -> str:
    """A hint of the architecture stored in a published state dict (for error messages)."""
    hints = []
    if isinstance(state.get("LL.weight"), Tensor) and state["LL.weight"].dim() == 2:
        emb, ssl_dim = state["LL.weight"].shape
        hints.append(f"emb_size={emb}, ssl.hidden_size={ssl_dim}")
    blocks = {m.group(1) for k in state for m in [re.match(r"conformer\.encoder_blocks\.(\d+)\.", k)] if m}
    if blocks:
        hints.append(f"num_encoders={len(blocks)}")
    pos = state.get("conformer.encoder_blocks.0.attn.fn.pos_embed")
    if isinstance(pos, Tensor) and pos.dim() == 3:
        hints.append(f"heads={pos.shape[1]}")
    dw = state.get("conformer.encoder_blocks.0.conv.net.4.conv.weight")
    if isinstance(dw, Tensor) and dw.dim() == 3:
        hints.append(f"kernel_size={dw.shape[-1]}")
    if any(k.startswith("GAT_layer_S.") for k in state):
        try:
            guessed = guess_aasist_config(state)
            hints.append("backend=aasist, " + ", ".join(f"aasist.{k}={v}" for k, v in guessed.items()))
        except CheckpointError:
            hints.append("backend=aasist")
    layers = {m.group(1) for k in state for m in [re.match(r"ssl_model\.model\.encoder\.layers\.(\d+)\.", k)] if m}
    if layers:
        hints.append(f"ssl.num_hidden_layers={len(layers)}")
    return ", ".join(hints)


def _strict_load(
    model: nn.Module,
    state: dict[str, Tensor],
    *,
    path: Path,
    what: str,
    unmapped: list[str] = (),  # type: ignore[assignment]
    source_names: Mapping[str, str] | None = None,
    expected_name: Callable[[str], str | None] | None = None,
    hint: str = "",
    fields: str = "emb_size, heads, kernel_size, num_encoders, model.ssl.*",
) -> None:
    """Load ``state`` into ``model`` or raise one :class:`CheckpointError` listing every problem."""
    target = model.state_dict()
    src = (lambda k: source_names.get(k, k)) if source_names else (lambda k: k)
    missing = []
    for key in target:
        if key not in state:
            alt = expected_name(key) if expected_name else None
            missing.append(f"{key}" + (f" (expected in the checkpoint as {alt})" if alt and alt != key else ""))
    unexpected = list(unmapped) + [src(k) for k in state if k not in target]
    mismatched = [
        f"{src(k)}: checkpoint {_shape(state[k])} vs model {_shape(target[k])}"
        for k in state
        if k in target and _shape(state[k]) != _shape(target[k])
    ]
    if missing or unexpected or mismatched:
        parts = [f"{path} ({what}) does not match the model:"]
        if missing:
            parts.append(_listing("missing (the model needs them, the checkpoint lacks them)", missing))
        if unexpected:
            parts.append(_listing("unexpected (in the checkpoint, no place in the model)", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        parts.append(
            f"Check that the model config ({fields}) "
            "describes the checkpoint" + (f"; the checkpoint looks like: {hint}" if hint else "")
            + (". For a plain state dict pass the architecture: load_detector(path, config=<stage-1 YAML or "
               "model dict>)." if expected_name is not None else ".")
        )
        raise CheckpointError("\n".join(parts))
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- config resolution


_ALL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


def _resolve_model_config(config: Any) -> tuple[ModelConfig, str, frozenset[str]]:
    """Accept a ModelConfig, Stage1Config, dict or YAML path (full stage-1 file or bare model section).

    Returns the config, where it came from, and the model fields it sets explicitly (every
    field for a config object; the keys present for a mapping or YAML file).
    """
    if config is None:
        return ModelConfig(), "ModelConfig defaults (XLS-R 300M + TCM emb 144, heads 4, kernel 31, 4 encoders)", frozenset()
    if isinstance(config, ModelConfig):
        return config, "<ModelConfig>", _ALL_FIELDS
    if isinstance(config, Stage1Config):
        return config.model, "<Stage1Config>.model", _ALL_FIELDS
    if isinstance(config, (str, Path)):
        source = str(config)
        cpath = Path(config)
        if not cpath.is_file():
            raise ConfigError(f"model config file not found: {cpath} (pass a YAML file such as configs/demo.yaml)")
        try:
            data = yaml.safe_load(cpath.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{cpath}: not valid YAML: {exc}") from None
    elif isinstance(config, Mapping):
        data, source = dict(config), "<dict>"
    else:
        raise TypeError(f"config must be a YAML path, a dict, a ModelConfig or a Stage1Config, got {type(config).__name__}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    if isinstance(data.get("model"), Mapping):  # a full stage-1 file: use its model section
        data, source = data["model"], f"{source} (section model)"
    return config_from_dict(data, ModelConfig, source), source, frozenset(map(str, data))


# ----------------------------------------------------------------------------- save / load / average


def save_detector(model: nn.Module, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` in our format, atomically (see :func:`atomic_torch_save`).

    Args:
        model: a :class:`Detector` (a DDP/DataParallel wrapper is unwrapped).
        path: destination file, e.g. ``run_dir / "stage1_detector.pth"``.
        extra: primitives to keep alongside (epoch, dev EER, ...); returned by
            :func:`load_detector` as ``model.load_report.extra``.

    Returns:
        ``path`` as a ``Path``.
    """
    model = unwrap_model(model)
    if not isinstance(model, Detector):
        raise TypeError(f"save_detector expects a Detector, got {type(model).__name__}")
    obj = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_config": config_to_dict(model.cfg),
        "ssl_config": ssl_config_dict(model.ssl_model),
        "state_dict": {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
        "extra": to_primitive(dict(extra or {}), "extra"),
    }
    path = atomic_torch_save(obj, path)
    logger.info("saved detector to %s", path)
    return path


def _strip_prefix(state: Mapping[str, Any], prefix: str = "module.") -> tuple[dict[str, Any], str | None]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}, prefix
    return dict(state), None


def load_detector(path: str | Path, config: Any = None, map_location: Any = "cpu") -> Detector:
    """Load a Stage-1 detector from our format or from a published TCM / SSL-AASIST state dict.

    Args:
        path: the checkpoint file.
        config: only for a published plain state dict: the architecture, as a YAML path
            (a full stage-1 config with a ``model:`` section, or a bare model section), a
            dict, a ``ModelConfig`` or a ``Stage1Config``. ``None`` = ``ModelConfig()``
            defaults, which describe the published checkpoints (XLS-R 300M front end). The back
            end is recognised from the tensors (a config that names another ``model.backend``
            is refused); for AASIST, ``model.aasist`` sizes not given by the config (a mapping
            or YAML without an ``aasist`` key, or ``None``) are read from the tensor shapes
            (reported in ``load_report.guessed``). The SSL weights come from the checkpoint,
            so ``model.ssl.pretrained_path`` is not needed. Ignored for our own format, which
            carries its config.
        map_location: passed to ``torch.load``.

    Returns:
        The :class:`Detector` in ``eval()`` mode; ``model.load_report`` is a :class:`LoadReport`.

    Raises:
        CheckpointError: missing/unsafe/unreadable file, or keys/shapes that do not match
            (the message lists every offending key).
        ConfigError: a bad ``config``.
    """
    path = Path(path)
    obj = safe_torch_load(path, map_location)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict (state dict or xai_lib checkpoint), found {type(obj).__name__}")

    if "format" in obj:
        model, report = _load_own(obj, path)
        if config is not None:
            logger.info("load_detector: %s carries its own model config; the config argument is ignored", path)
    elif obj and all(isinstance(v, Tensor) for v in obj.values()):
        model, report = _load_published(obj, path, config)
    else:
        keys = ", ".join(list(map(str, obj))[:10])
        raise CheckpointError(
            f"{path}: not a detector checkpoint: expected an xai_lib checkpoint (key 'format') or a plain "
            f"published state dict (TCM or SSL-AASIST, only tensors); found keys {keys}"
        )
    model.eval()
    model.load_report = report  # type: ignore[attr-defined]
    logger.info("loaded detector %s", report.summary())
    return model


def _load_own(obj: Mapping[str, Any], path: Path) -> tuple[Detector, LoadReport]:
    if obj.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: unknown checkpoint format {obj.get('format')!r} (expected {FORMAT_NAME!r})")
    version = obj.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is newer than this xai_lib reads ({FORMAT_VERSION}); "
            "update xai_lib"
        )
    missing = [k for k in ("model_config", "ssl_config", "state_dict") if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: incomplete {FORMAT_NAME} checkpoint, missing {', '.join(missing)}")
    cfg = config_from_dict(obj["model_config"], ModelConfig, f"{path}:model_config")
    model = build_detector(cfg, ssl_model=ssl_from_config_dict(dict(obj["ssl_config"])))
    state, prefix = _strip_prefix(obj["state_dict"])
    _strict_load(model, state, path=path, what=FORMAT_NAME)
    report = LoadReport(str(path), FORMAT_NAME, mapped=len(state), stripped_prefix=prefix,
                        extra=dict(obj.get("extra") or {}))
    return model, report


def _load_published(obj: Mapping[str, Tensor], path: Path, config: Any) -> tuple[Detector, LoadReport]:
    cfg, source, explicit = _resolve_model_config(config)
    state, prefix = _strip_prefix(obj)
    backend = published_backend(state, path)
    if "backend" in explicit and cfg.backend != backend:
        raise CheckpointError(
            f"{path} holds a{'n AASIST' if backend == 'aasist' else ' TCM'} back end but the config ({source}) says "
            f"model.backend: {cfg.backend}. Set model.backend: {backend} (or leave it out: it is recognised from the "
            "tensors)."
        )
    guessed: dict[str, Any] = {}
    if backend != cfg.backend or (backend == "aasist" and "aasist" not in explicit):
        if backend == "aasist" and "aasist" not in explicit:
            guessed = guess_aasist_config(state, path)
            aasist = config_from_dict({**config_to_dict(cfg.aasist), **guessed}, AASISTConfig, f"{path} (read sizes)")
            cfg = dataclasses.replace(cfg, backend=backend, aasist=aasist)
            source += "; model.aasist sizes read from the tensors"
        else:
            cfg = dataclasses.replace(cfg, backend=backend)
    # all SSL weights come from the checkpoint: build the architecture from the fields
    ssl_model = build_ssl(dataclasses.replace(cfg.ssl, pretrained_path=None))
    model = build_detector(cfg, ssl_model=ssl_model)
    mapped, source_names, ignored, unmapped = map_published_state_dict(state, model.state_dict().keys())
    norm = model.ssl_model.config.feat_extract_norm

    def expected_name(key: str) -> str | None:
        if key.startswith(OUR_SSL_PREFIX):
            fs = hf_to_fairseq_key(key[len(OUR_SSL_PREFIX):], norm)
            return FAIRSEQ_SSL_PREFIX + fs if fs else None
        return key

    name = "AASIST" if backend == "aasist" else "TCM"
    fields = ("model.aasist.* (emb_size, encoder_channels, attention_channels, gat_dims), model.ssl.*"
              if backend == "aasist" else "emb_size, heads, kernel_size, num_encoders, model.ssl.*")
    _strict_load(model, mapped, path=path, what=f"published {name} state dict, architecture from {source}",
                 unmapped=unmapped, source_names=source_names, expected_name=expected_name,
                 hint=_describe_published(state), fields=fields)
    return model, LoadReport(str(path), f"{backend}_state_dict", mapped=len(mapped), ignored=ignored,
                             stripped_prefix=prefix, guessed=guessed)


def average_state_dicts(state_dicts: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Element-wise mean of several state dicts of one architecture (checkpoint averaging).

    Floating tensors are averaged (accumulated in float64, returned in their dtype);
    integer/bool tensors (e.g. BatchNorm ``num_batches_tracked``) and non-tensors take
    the last state dict's value.

    Raises:
        ValueError: an empty list, or state dicts whose keys or shapes differ.
    """
    if not state_dicts:
        raise ValueError("average_state_dicts needs at least one state dict")
    keys = list(state_dicts[0].keys())
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd.keys()) != set(keys):
            diff = sorted(set(sd.keys()) ^ set(keys))
            raise ValueError(f"state dict {i} has different keys than state dict 0: {', '.join(diff[:10])}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [sd[key] for sd in state_dicts]
        last = values[-1]
        if not isinstance(last, Tensor) or not (last.is_floating_point() or last.is_complex()):
            out[key] = last.clone() if isinstance(last, Tensor) else last
            continue
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise ValueError(f"cannot average {key}: shapes differ {sorted(shapes)}")
        acc_dtype = torch.complex128 if last.is_complex() else torch.float64
        acc = torch.zeros(last.shape, dtype=acc_dtype, device=last.device)
        for v in values:
            acc += v.detach().to(device=last.device, dtype=acc_dtype)
        out[key] = (acc / len(values)).to(last.dtype)
    return out
