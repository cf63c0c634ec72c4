"""Stage-1 detector: wav2vec 2.0 / XLS-R front end + Conformer-TCM back end.

The computation follows the published "Temporal-Channel Modeling" (TCM) detector
(``shared/reference/TCM_CHECKPOINT.md``) and its module/parameter names match the
published ``avg_5_best.pth`` one to one, so :func:`xai_lib.detector.checkpoint.load_detector`
can load it by renaming only the fairseq SSL weights::

    wave (B, L) 16 kHz
      -> ssl_model (transformers Wav2Vec2Model)   ssl_features (B, T, D_ssl), 20 ms frames
      -> LL Linear(D_ssl -> E), first_bn BatchNorm2d(1), SELU      neck (B, T, E)
      -> conformer: + sinusoid positions, prepend class token,
         num_encoders x [FF/2, TCM-MHSA, Conv, FF/2, LayerNorm]    (B, 1 + T, E)
      -> fc5 on the class token                                    logits (B, 2), column 1 = bona fide

Padding: every part accepts a ``frame_mask`` (B, T) of valid frames. Padded frames are
excluded from attention keys, from the head-token and class-token means, zeroed before
the depthwise convolution and left out of BatchNorm statistics in training, so a padded
batch gives the same results as scoring each utterance alone. With no mask (or an
all-true one) the computation is exactly the reference one.

Example::

    model = Detector(config_from_dict(tiny_model_dict(), ModelConfig)).eval()
    out = model(wave, lengths)          # DetectorOutput
    out.scores                          # (B,) bona fide logit, higher = more bona fide
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from xai_lib.config import ModelConfig, SSLConfig

__all__ = [
    "PretrainedNotFoundError",
    "build_ssl",
    "ssl_config_dict",
    "ssl_from_config_dict",
    "sinusoidal_positions",
    "TCMAttention",
    "ConformerBlock",
    "TCMConformer",
    "BackendOutput",
    "DetectorOutput",
    "DetectorBackEnd",
    "Detector",
]

logger = logging.getLogger(__name__)

# Settings forced on every SSL model we build: no SpecAugment-style masking and no
# LayerDrop, so a training step depends only on the config, the data and the seed.
_SSL_DETERMINISM = {"mask_time_prob": 0.0, "mask_feature_prob": 0.0, "apply_spec_augment": False, "layerdrop": 0.0}

_XLSR_HELP = (
    "To use XLS-R, download it on a machine with internet access, e.g.\n"
    "    huggingface-cli download facebook/wav2vec2-xls-r-300m --local-dir /path/to/wav2vec2-xls-r-300m\n"
    "copy the directory here and set model.ssl.pretrained_path to it (it must contain config.json and "
    "model.safetensors or pytorch_model.bin). Set model.ssl.pretrained_path to null to build a randomly "
    "initialised front end from the model.ssl.* fields instead."
)


class PretrainedNotFoundError(FileNotFoundError):
    """``model.ssl.pretrained_path`` does not point at a usable local Wav2Vec2 directory."""


# ----------------------------------------------------------------------------- SSL front end


def build_ssl(cfg: SSLConfig) -> Wav2Vec2Model:
    """Build the wav2vec 2.0 / XLS-R front end; never contacts a model hub.

    Args:
        cfg: ``model.ssl``. With ``pretrained_path`` set, the model (architecture and
            weights) is loaded from that local directory; otherwise a randomly initialised
            model is built from the architecture fields.

    Returns:
        A ``transformers.Wav2Vec2Model`` with masking and LayerDrop disabled and the
        hidden/attention/activation/projection dropout set to ``cfg.dropout``.

    Raises:
        PretrainedNotFoundError: the directory, its ``config.json`` or its weights are missing.
    """
    dropout = {
        "hidden_dropout": cfg.dropout,
        "attention_dropout": cfg.dropout,
        "activation_dropout": cfg.dropout,
        "feat_proj_dropout": cfg.dropout,
    }
    if cfg.pretrained_path:
        path = Path(cfg.pretrained_path).expanduser()
        if not path.is_dir():
            raise PretrainedNotFoundError(
                f"model.ssl.pretrained_path: directory not found: {path}\n{_XLSR_HELP}"
            )
        if not (path / "config.json").is_file():
            raise PretrainedNotFoundError(
                f"model.ssl.pretrained_path: {path} has no config.json, so it is not a transformers "
                f"Wav2Vec2 directory.\n{_XLSR_HELP}"
            )
        try:
            model = Wav2Vec2Model.from_pretrained(
                str(path), local_files_only=True, **_SSL_DETERMINISM, **dropout
            )
        except OSError as exc:  # config present but weights missing/unreadable
            raise PretrainedNotFoundError(
                f"model.ssl.pretrained_path: could not load the weights in {path}: {exc}\n{_XLSR_HELP}"
            ) from None
        _warn_architecture_mismatch(cfg, model.config, path)
        logger.info("SSL front end loaded from %s (%d layers, hidden %d)", path,
                    model.config.num_hidden_layers, model.config.hidden_size)
        return model

    config = Wav2Vec2Config(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        conv_dim=list(cfg.conv_dim),
        conv_kernel=list(cfg.conv_kernel),
        conv_stride=list(cfg.conv_stride),
        conv_bias=cfg.conv_bias,
        feat_extract_norm=cfg.feat_extract_norm,
        do_stable_layer_norm=cfg.do_stable_layer_norm,
        num_conv_pos_embeddings=cfg.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=cfg.num_conv_pos_embedding_groups,
        **_SSL_DETERMINISM,
        **dropout,
    )
    return Wav2Vec2Model(config)


def _warn_architecture_mismatch(cfg: SSLConfig, loaded: Wav2Vec2Config, path: Path) -> None:
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    differ = [f"{f}={getattr(loaded, f)} (config says {getattr(cfg, f)})" for f in fields
              if getattr(loaded, f) != getattr(cfg, f)]
    if differ:
        logger.warning("the pretrained SSL model in %s defines its own architecture, which wins over "
                       "model.ssl.*: %s", path, ", ".join(differ))


def _json_safe(value: Any) -> Any:
    """Recursively keep JSON-safe primitives (dict keys become strings); drop the rest."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return None  # e.g. a torch dtype: not needed to rebuild the architecture


def ssl_config_dict(model: Wav2Vec2Model) -> dict[str, Any]:
    """The exact ``Wav2Vec2Config`` of ``model`` as JSON-safe primitives (for checkpoints).

    :func:`ssl_from_config_dict` rebuilds the same architecture from it without the
    pretrained directory.
    """
    data = _json_safe(model.config.to_dict())
    json.dumps(data)  # guaranteed serialisable
    return data


def ssl_from_config_dict(data: dict[str, Any]) -> Wav2Vec2Model:
    """Rebuild a (randomly initialised) ``Wav2Vec2Model`` from :func:`ssl_config_dict` output."""
    data = {k: v for k, v in data.items() if k not in ("transformers_version", "_name_or_path")}
    data.update(_SSL_DETERMINISM)
    config = Wav2Vec2Config.from_dict(data)
    return Wav2Vec2Model(config)


# ----------------------------------------------------------------------------- back end parts


def sinusoidal_positions(max_positions: int, dim: int) -> Tensor:
    """Fixed sinusoid table ``pe[p, i] = p / 10000^(2 (i // 2) / dim)``, sin on even i, cos on odd i.

    Returns:
        (1, max_positions, dim) float32.
    """
    pos = torch.arange(max_positions, dtype=torch.float64)[:, None]  # (P, 1)
    i = torch.arange(dim, dtype=torch.float64)[None, :]  # (1, dim)
    angle = pos / torch.pow(10000.0, 2 * torch.div(i, 2, rounding_mode="floor") / dim)
    pe = torch.empty(max_positions, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle[:, 0::2])
    pe[:, 1::2] = torch.cos(angle[:, 1::2])
    return pe.to(torch.float32).unsqueeze(0)


def _masked_mean(x: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """Mean of ``x`` over ``dim`` counting only positions where ``mask`` is true (keepdim).

    ``mask`` is broadcastable to ``x``; ``None`` means a plain mean.
    """
    if mask is None:
        return x.mean(dim=dim, keepdim=True)
    m = mask.to(x.dtype)
    return (x * m).sum(dim=dim, keepdim=True) / m.sum(dim=dim, keepdim=True).clamp_min(1.0)


def _batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, mask: Tensor | None) -> Tensor:
    """Apply ``bn`` to ``x`` (B, C, ...); in training, statistics use only ``mask``-ed positions.

    Args:
        bn: a BatchNorm1d/2d module.
        x: (B, C, ...) input.
        mask: bool, broadcastable to ``x`` with size 1 on the channel dim, true = valid;
            ``None`` = all valid (plain ``bn(x)``, the reference computation).
    """
    if mask is None or not (bn.training and bn.track_running_stats):
        return bn(x)
    dims = [d for d in range(x.dim()) if d != 1]
    m = mask.to(x.dtype).expand_as(x[:, :1])  # (B, 1, ...)
    count = m.sum()
    if count < 2:
        return bn(x)
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = (x * m).sum(dim=dims) / count  # (C,)
    var = (((x - mean.view(shape)) ** 2) * m).sum(dim=dims) / count  # biased, (C,)
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(var.detach() * count / (count - 1), alpha=factor)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y


class _Scale(nn.Module):
    """``scale * fn(x)`` (the half-step feed-forward modules); keeps the ``.fn`` key level."""

    def __init__(self, scale: float, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) * self.scale


class _PreNorm(nn.Module):
    """``fn(LayerNorm(x), ...)``; ``fn`` is registered before ``norm`` as in the reference."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.norm(x), *args, **kwargs)


class _FeedForward(nn.Module):
    """Linear(E -> mult E), Swish, dropout, Linear(mult E -> E), dropout (keys ``net.0``/``net.3``)."""

    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim * mult), nn.SiLU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Transpose(nn.Module):
    """Swap the last two dims: (B, N, C) <-> (B, C, N)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class _DepthwiseConv1d(nn.Module):
    """Depthwise Conv1d with explicit "same" padding (K//2, K//2 - (K+1)%2); key ``.conv``."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.padding = (kernel_size // 2, kernel_size // 2 - (kernel_size + 1) % 2)
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, N) -> (B, C, N)
        return self.conv(F.pad(x, self.padding))


class _ConvModule(nn.Module):
    """Conformer convolution module (keys ``net.0`` LN, ``net.2``, ``net.4.conv``, ``net.5`` BN, ``net.7``)."""

    def __init__(self, dim: int, kernel_size: int, expansion: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * expansion
        self.net = nn.Sequential(
            nn.LayerNorm(dim),  # 0
            _Transpose(),  # 1: (B, N, E) -> (B, E, N)
            nn.Conv1d(dim, inner * 2, 1),  # 2: pointwise
            nn.GLU(dim=1),  # 3
            _DepthwiseConv1d(inner, kernel_size),  # 4
            nn.BatchNorm1d(inner),  # 5
            nn.SiLU(),  # 6: Swish
            nn.Conv1d(inner, dim, 1),  # 7: pointwise
            _Transpose(),  # 8: back to (B, N, E)
            nn.Dropout(dropout),  # 9
        )

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """Args: x (B, N, E); token_mask (B, N) bool or None. Returns (B, N, E)."""
        net = self.net
        y = net[1](net[0](x))  # (B, E, N)
        y = net[3](net[2](y))  # (B, 2E, N)
        mask = None if token_mask is None else token_mask[:, None, :]  # (B, 1, N)
        if mask is not None:
            y = y * mask.to(y.dtype)  # padded frames act like the zero padding of a lone utterance
        y = net[4](y)
        y = _batch_norm(net[5], y, mask)
        y = net[7](net[6](y))  # (B, E, N)
        return net[9](net[8](y))  # (B, N, E)


class TCMAttention(nn.Module):
    """Multi-head self-attention with TCM head tokens (keys ``qkv``, ``proj``, ``ht_proj``, ``ht_norm``, ``pos_embed``).

    One head token per head summarises its channel group over time; the tokens join the
    sequence for one softmax attention, then are folded into the class token.

    Args:
        dim: model width E.
        heads: number of heads H (d = E / H).
        dropout: dropout on the output (the reference applies none to the weights).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.dim_head = dim // heads
        self.scale = self.dim_head ** -0.5
        self.pos_embed = nn.Parameter(torch.zeros(1, heads, dim))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.ht_proj = nn.Linear(self.dim_head, dim)
        self.ht_norm = nn.LayerNorm(self.dim_head)
        self.out_dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Args:
            x: (B, N, E) normalised tokens, N = 1 + T (class token first).
            token_mask: (B, N) bool, true = valid token (the class token is always valid);
                ``None`` = all valid.
            need_weights: also return the attention weights.

        Returns:
            out: (B, N, E), class token updated with the head-token and frame means.
            attn: (B, H, N + H, N + H) softmax weights (rows = queries), or ``None``.
        """
        B, N, E = x.shape
        H, d = self.heads, self.dim_head

        # head tokens: per-head channel group averaged over (valid) time, projected to E
        xh = x.reshape(B, N, H, d).permute(0, 2, 1, 3)  # (B, H, N, d)
        mask_h = None if token_mask is None else token_mask[:, None, :, None]  # (B, 1, N, 1)
        ht = _masked_mean(xh, mask_h, dim=2).squeeze(2)  # (B, H, d)
        ht = self.ht_proj(ht).reshape(B, H, H, d)  # (B, H, H, d)
        ht = F.gelu(self.ht_norm(ht)).flatten(2) + self.pos_embed  # (B, H, E)
        z = torch.cat([x, ht], dim=1)  # (B, N + H, E)

        qkv = self.qkv(z).reshape(B, N + H, 3, H, d).permute(2, 0, 3, 1, 4)  # (3, B, H, N+H, d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        key_mask = None
        if token_mask is not None:
            key_mask = torch.cat([token_mask, token_mask.new_ones(B, H)], dim=1)[:, None, None, :]  # (B,1,1,N+H)

        attn: Tensor | None = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N+H, N+H)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            attn = scores.softmax(dim=-1)
            out = attn @ v  # (B, H, N+H, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=self.scale)
        out = self.proj(out.transpose(1, 2).reshape(B, N + H, E))  # (B, N+H, E)

        cls, frames, hts = torch.split(out, [1, N - 1, H], dim=1)
        frame_mask = None if token_mask is None else token_mask[:, 1:, None]  # (B, T, 1)
        cls = cls + hts.mean(dim=1, keepdim=True) + _masked_mean(frames, frame_mask, dim=1)
        out = torch.cat([cls, frames], dim=1)  # (B, N, E)
        return self.out_dropout(out), attn


class ConformerBlock(nn.Module):
    """Conformer block with TCM attention: FF/2, MHSA, Conv, FF/2 (all residual), LayerNorm.

    Keys: ``ff1.fn.{norm,fn.net.0,fn.net.3}``, ``attn.{norm,fn.*}``, ``conv.net.*``, ``ff2.*``, ``post_norm``.
    """

    def __init__(self, dim: int, heads: int, kernel_size: int, ff_mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.ff1 = _Scale(0.5, _PreNorm(dim, _FeedForward(dim, ff_mult, dropout)))
        self.attn = _PreNorm(dim, TCMAttention(dim, heads, dropout))
        self.conv = _ConvModule(dim, kernel_size, expansion=2, dropout=dropout)
        self.ff2 = _Scale(0.5, _PreNorm(dim, _FeedForward(dim, ff_mult, dropout)))
        self.post_norm = nn.LayerNorm(dim)

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Args: x (B, N, E); token_mask (B, N) bool or None. Returns ((B, N, E), attn or None)."""
        x = self.ff1(x) + x
        attn_out, attn = self.attn(x, token_mask, need_weights)
        x = attn_out + x
        x = self.conv(x, token_mask) + x
        x = self.ff2(x) + x
        return self.post_norm(x), attn


class TCMConformer(nn.Module):
    """The ``conformer`` module: positions, class token, encoder blocks, ``fc5`` classifier.

    Args:
        emb_size: model width E.
        heads: attention heads H.
        kernel_size: depthwise convolution kernel K.
        num_encoders: number of Conformer blocks.
        ff_mult: feed-forward expansion.
        dropout: dropout inside the blocks.
        max_positions: rows of the fixed sinusoid table (longest sequence in frames).
    """

    def __init__(
        self,
        emb_size: int,
        heads: int,
        kernel_size: int,
        num_encoders: int,
        ff_mult: int = 4,
        dropout: float = 0.0,
        max_positions: int = 10000,
    ) -> None:
        super().__init__()
        # A frozen Parameter (not a buffer) so that the key and its order match the
        # published state dict; forward() detaches it, so it is never trained.
        self.positional_emb = nn.Parameter(sinusoidal_positions(max_positions, emb_size), requires_grad=False)
        self.class_token = nn.Parameter(torch.rand(1, emb_size))
        self.encoder_blocks = nn.ModuleList(
            [ConformerBlock(emb_size, heads, kernel_size, ff_mult, dropout) for _ in range(num_encoders)]
        )
        self.fc5 = nn.Linear(emb_size, 2)

    def forward(
        self, x: Tensor, frame_mask: Tensor | None = None, output_attentions: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...] | None]:
        """Args:
            x: (B, T, E) neck output.
            frame_mask: (B, T) bool valid frames, or ``None`` (all valid).
            output_attentions: collect every block's attention weights.

        Returns:
            logits (B, 2), frame_tokens (B, T, E), cls_token (B, E),
            attentions: tuple over blocks of (B, H, 1+T+H, 1+T+H), or ``None``.
        """
        B, T, E = x.shape
        max_pos = self.positional_emb.shape[1]
        if T > max_pos:
            raise ValueError(
                f"the utterance has {T} frames but the back end's positional table has {max_pos} "
                f"(about {max_pos * 0.02:.0f} s); score long files in chunks (data.max_eval_seconds)"
            )
        x = x + self.positional_emb[:, :T].detach().to(x.dtype)  # (B, T, E)
        cls = self.class_token.to(x.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, 1, E)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + T, E)
        token_mask = None
        if frame_mask is not None:
            token_mask = torch.cat([frame_mask.new_ones(B, 1), frame_mask], dim=1)  # (B, 1 + T)
        attentions: list[Tensor] = []
        for block in self.encoder_blocks:
            x, attn = block(x, token_mask, output_attentions)
            if attn is not None:
                attentions.append(attn)
        cls_token = x[:, 0]  # (B, E)
        frame_tokens = x[:, 1:]  # (B, T, E)
        if frame_mask is not None:
            frame_tokens = frame_tokens * frame_mask[..., None].to(x.dtype)
        return self.fc5(cls_token), frame_tokens, cls_token, (tuple(attentions) if output_attentions else None)


# ----------------------------------------------------------------------------- outputs


@dataclass
class BackendOutput:
    """Output of :meth:`DetectorBackEnd.backend`.

    Attributes:
        logits: (B, 2) class logits; column 0 = spoof, column 1 = bona fide.
        neck: (B, T, E) neck output fed to the Conformer (after ``frame_weights``).
        frame_tokens: (B, T, E) last block's frame outputs (class token removed; padded frames 0).
        cls_token: (B, E) last block's class-token output (the input of ``fc5``).
        attentions: per block (B, H, N + H, N + H) attention weights, N = 1 + T, token order
            [class token, T frames, H head tokens]; ``None`` unless requested.
    """

    logits: Tensor
    neck: Tensor
    frame_tokens: Tensor
    cls_token: Tensor
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class DetectorOutput:
    """Output of :meth:`Detector.forward` (B utterances, T frames of 20 ms).

    Attributes:
        logits: (B, 2) class logits; column 0 = spoof, column 1 = bona fide.
        scores: (B,) ``logits[:, 1]``, the ASVspoof score (higher = more bona fide).
        ssl_features: (B, T, D_ssl) final SSL layer output (padded frames 0).
        neck: (B, T, E) neck output (LL, BatchNorm, SELU).
        frame_tokens: (B, T, E) last Conformer block's frame outputs (padded frames 0).
        cls_token: (B, E) last block's class-token output (the utterance embedding).
        frame_mask: (B, T) bool, true for frames inside each utterance.
        frame_lengths: (B,) long, valid frames per utterance.
        attentions: per block (B, H, N + H, N + H), N = 1 + T, token order
            [class token, frames, head tokens]; ``None`` unless ``output_attentions``.
    """

    logits: Tensor
    scores: Tensor
    ssl_features: Tensor
    neck: Tensor
    frame_tokens: Tensor
    cls_token: Tensor
    frame_mask: Tensor
    frame_lengths: Tensor
    attentions: tuple[Tensor, ...] | None = None


# ----------------------------------------------------------------------------- models


class DetectorBackEnd(nn.Module):
    """Neck + Conformer-TCM back end (``LL``, ``first_bn``, ``conformer``) on SSL features.

    :class:`Detector` adds the SSL front end. Built alone, its state dict has exactly
    the back-end keys of the published checkpoint.

    Args:
        cfg: the model config (``emb_size``, ``heads``, ``kernel_size``, ``num_encoders``, ...).
        ssl_dim: width of the SSL features (1024 for XLS-R 300M).
    """

    def __init__(self, cfg: ModelConfig, ssl_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.ssl_dim = ssl_dim
        self.emb_size = cfg.emb_size
        self.LL = nn.Linear(ssl_dim, cfg.emb_size)
        self.first_bn = nn.BatchNorm2d(num_features=1)
        self.conformer = TCMConformer(
            emb_size=cfg.emb_size,
            heads=cfg.heads,
            kernel_size=cfg.kernel_size,
            num_encoders=cfg.num_encoders,
            ff_mult=cfg.ff_mult,
            dropout=cfg.dropout,
            max_positions=cfg.max_positions,
        )

    def backend(
        self,
        ssl_features: Tensor,
        frame_mask: Tensor | None = None,
        frame_weights: Tensor | None = None,
        output_attentions: bool = False,
    ) -> BackendOutput:
        """Run the neck and the Conformer-TCM on SSL features.

        Args:
            ssl_features: (B, T, D_ssl).
            frame_mask: (B, T) bool valid frames (right padding); ``None`` = all valid.
            frame_weights: (B, T) in [0, 1], multiplies the neck output per frame
                (0 = frame removed from the representation; differentiable).
            output_attentions: also return every block's attention weights.

        Returns:
            :class:`BackendOutput`.
        """
        if ssl_features.dim() != 3:
            raise ValueError(f"ssl_features must be (B, T, D), got shape {tuple(ssl_features.shape)}")
        B, T, _ = ssl_features.shape
        if frame_mask is not None:
            if frame_mask.shape != (B, T):
                raise ValueError(f"frame_mask must be (B, T) = {(B, T)}, got {tuple(frame_mask.shape)}")
            frame_mask = frame_mask.bool()
            if bool(frame_mask.all()):
                frame_mask = None  # exactly the unmasked reference computation
        x = self.LL(ssl_features)  # (B, T, E)
        bn_mask = None if frame_mask is None else frame_mask[:, None, :, None]  # (B, 1, T, 1)
        x = F.selu(_batch_norm(self.first_bn, x.unsqueeze(1), bn_mask)).squeeze(1)  # (B, T, E)
        if frame_weights is not None:
            if frame_weights.shape != (B, T):
                raise ValueError(f"frame_weights must be (B, T) = {(B, T)}, got {tuple(frame_weights.shape)}")
            x = x * frame_weights.to(x.dtype).unsqueeze(-1)
        logits, frame_tokens, cls_token, attentions = self.conformer(x, frame_mask, output_attentions)
        return BackendOutput(logits=logits, neck=x, frame_tokens=frame_tokens, cls_token=cls_token,
                             attentions=attentions)

    def forward(self, ssl_features: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        """Logits (B, 2) from SSL features (B, T, D_ssl); see :meth:`backend`."""
        return self.backend(ssl_features, frame_mask).logits


class Detector(DetectorBackEnd):
    """The Stage-1 detector: SSL front end (``ssl_model``) + neck + Conformer-TCM.

    Args:
        cfg: the model config.
        ssl_model: an already built front end (used by the checkpoint loader to rebuild
            a stored architecture); ``None`` builds it with :func:`build_ssl` from ``cfg.ssl``.

    Attributes:
        frame_hop_s: 0.02, seconds per output frame.
        ssl_model: the ``transformers.Wav2Vec2Model`` (state-dict keys ``ssl_model.*``).
        LL, first_bn, conformer: the back end, named as in the published checkpoint.
    """

    frame_hop_s: float = 0.02

    def __init__(self, cfg: ModelConfig, ssl_model: Wav2Vec2Model | None = None) -> None:
        ssl_model = ssl_model if ssl_model is not None else build_ssl(cfg.ssl)  # built first: seeded runs
        super().__init__(cfg, int(ssl_model.config.hidden_size))
        self.ssl_model = ssl_model
        # the front end first in state dicts and parameter lists, as in the published checkpoint
        modules = self._modules
        object.__setattr__(self, "_modules", {"ssl_model": modules.pop("ssl_model"), **modules})
        if cfg.ssl.freeze:
            self.ssl_model.requires_grad_(False)
        if cfg.ssl.gradient_checkpointing:
            self.ssl_model.gradient_checkpointing_enable()

    @property
    def min_input_samples(self) -> int:
        """Shortest waveform (samples) that yields one SSL frame (400 = 25 ms for XLS-R)."""
        span = 1
        for kernel, stride in reversed(list(zip(self.ssl_model.config.conv_kernel, self.ssl_model.config.conv_stride))):
            span = (span - 1) * stride + kernel
        return span

    def num_frames(self, lengths: Tensor) -> Tensor:
        """Number of SSL frames for waveforms of ``lengths`` samples.

        Args:
            lengths: (B,) long sample counts.

        Returns:
            (B,) long frame counts (wav2vec2 conv arithmetic, 0 when too short).
        """
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        return self.ssl_model._get_feat_extract_output_lengths(lengths).to(torch.long).clamp_min(0)

    def frontend(self, wave: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """SSL features of a (padded) batch of waveforms.

        Args:
            wave: (B, L) float waveform at 16 kHz, right-padded.
            lengths: (B,) valid samples per utterance; ``None`` = all L.

        Returns:
            ssl_features: (B, T, D_ssl), padded frames set to 0.
            frame_mask: (B, T) bool, true for valid frames.
        """
        if wave.dim() != 2:
            raise ValueError(f"wave must be (B, L) samples, got shape {tuple(wave.shape)}")
        B, L = wave.shape
        param = next(self.ssl_model.parameters())
        wave = wave.to(dtype=param.dtype)
        need = self.min_input_samples
        attention_mask = None
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.long, device=wave.device)
            if lengths.shape != (B,):
                raise ValueError(f"lengths must be (B,) = ({B},), got {tuple(lengths.shape)}")
            if bool((lengths > L).any()):
                raise ValueError(f"lengths exceed the padded length {L}: {lengths.tolist()}")
            if not bool((lengths == L).all()):
                attention_mask = (torch.arange(L, device=wave.device)[None, :] < lengths[:, None]).long()
            shortest = int(lengths.min())
        else:
            shortest = L
        if shortest < need:
            raise ValueError(
                f"audio too short: {shortest} samples, the SSL front end needs at least {need} "
                f"({need / 16000 * 1000:.0f} ms at 16 kHz) for one frame"
            )
        hidden = self.ssl_model(wave, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        T = hidden.shape[1]
        if attention_mask is None:
            frame_mask = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
            return hidden, frame_mask
        frame_lengths = self.num_frames(lengths).to(hidden.device)  # (B,)
        frame_mask = torch.arange(T, device=hidden.device)[None, :] < frame_lengths[:, None]  # (B, T)
        return hidden * frame_mask[..., None].to(hidden.dtype), frame_mask

    @property
    def frame_hop_samples(self) -> int:
        """Samples between SSL frames (the product of the conv strides: 320 = 20 ms)."""
        hop = 1
        for stride in self.ssl_model.config.conv_stride:
            hop *= int(stride)
        return hop

    def windowed_frontend(
        self, wave: Tensor, lengths: Tensor | None = None, context_s: float = 0.3, max_windows: int = 256
    ) -> tuple[Tensor, Tensor]:
        """SSL features computed with a limited audio context per frame.

        :meth:`frontend` lets every frame see the whole utterance (the transformer attends
        globally, and a group-normalised first conv layer normalises over the whole input), so
        a short spoofed span colours the features of every frame. Here the whole front end
        runs on overlapping windows of ``context_s`` seconds of audio, half a window apart,
        laid on the detector's own frame grid, and every frame takes its feature from the
        window whose centre is nearest: the same frames, the same frozen weights, a local
        context, at about twice the front end's cost. Utterances no longer than one window
        are processed whole (exactly :meth:`frontend` on that utterance).

        Args:
            wave: (B, L) float waveform at 16 kHz, right-padded.
            lengths: (B,) valid samples; ``None`` = all L.
            context_s: window length in seconds (at least one frame).
            max_windows: windows per front-end call (bounds memory).

        Returns:
            ssl_features: (B, T, D_ssl) with T as :meth:`frontend` gives it, padded frames 0.
            frame_mask: (B, T) bool, true for valid frames.
        """
        if wave.dim() != 2:
            raise ValueError(f"wave must be (B, L) samples, got shape {tuple(wave.shape)}")
        B, L = wave.shape
        lengths = (torch.full((B,), L, dtype=torch.long, device=wave.device) if lengths is None
                   else torch.as_tensor(lengths, dtype=torch.long, device=wave.device))
        hop, span = self.frame_hop_samples, self.min_input_samples
        n_frames = self.num_frames(lengths).tolist()
        if min(n_frames) < 1:
            raise ValueError(f"audio too short: {int(lengths.min())} samples, the SSL front end needs at least {span}")
        T = max(n_frames)
        win_frames = max(1, int(round(context_s / self.frame_hop_s)))
        win_samples = (win_frames - 1) * hop + span
        step = max(1, win_frames // 2)
        param = next(self.ssl_model.parameters())
        out = torch.zeros(B, T, int(self.ssl_model.config.hidden_size), dtype=param.dtype, device=wave.device)
        segments: list[Tensor] = []
        targets: list[tuple[int, Tensor, Tensor]] = []  # (utterance, global frames, frames in the window)
        for b, n in enumerate(n_frames):
            if n <= win_frames:  # one window: the whole utterance, as frontend() sees it
                out[b, :n] = self.frontend(wave[b : b + 1, : int(lengths[b])])[0][0, :n]
                continue
            starts = list(range(0, n - win_frames + 1, step))
            if starts[-1] != n - win_frames:
                starts.append(n - win_frames)
            centres = torch.tensor(starts, dtype=torch.float32) + win_frames / 2.0
            frames = torch.arange(n)
            nearest = (frames[:, None].float() + 0.5 - centres[None, :]).abs().argmin(dim=1)  # (n,)
            for k, s0 in enumerate(starts):
                mine = frames[nearest == k]
                if len(mine):
                    segments.append(wave[b, s0 * hop : s0 * hop + win_samples])
                    targets.append((b, mine.to(out.device), (mine - s0).to(out.device)))
        for i in range(0, len(segments), max_windows):
            feats, _ = self.frontend(torch.stack(segments[i : i + max_windows]))  # (N, win_frames, D)
            for j, (b, glob, loc) in enumerate(targets[i : i + max_windows]):
                out[b, glob] = feats[j, loc]
        frame_mask = torch.arange(T, device=wave.device)[None, :] < torch.tensor(n_frames, device=wave.device)[:, None]
        return out, frame_mask

    def forward(self, wave: Tensor, lengths: Tensor | None = None, output_attentions: bool = False) -> DetectorOutput:
        """Score a batch of waveforms.

        Args:
            wave: (B, L) float waveform at 16 kHz, right-padded with zeros.
            lengths: (B,) valid samples per utterance; ``None`` = all L.
            output_attentions: also return the TCM attention weights of every block.

        Returns:
            :class:`DetectorOutput`; ``scores`` (B,) is the bona fide logit.
        """
        ssl_features, frame_mask = self.frontend(wave, lengths)
        out = self.backend(ssl_features, frame_mask if lengths is not None else None,
                           output_attentions=output_attentions)
        frame_lengths = frame_mask.sum(dim=1)
        return DetectorOutput(
            logits=out.logits,
            scores=out.logits[:, 1],
            ssl_features=ssl_features,
            neck=out.neck,
            frame_tokens=out.frame_tokens,
            cls_token=out.cls_token,
            frame_mask=frame_mask,
            frame_lengths=frame_lengths,
            attentions=out.attentions,
        )
