"""Stage-1 detector: wav2vec 2.0 / XLS-R front end + a back end (Conformer-TCM here, AASIST in
:mod:`xai_lib.detector.aasist`).

:class:`Detector` holds the front end; ``Detector(cfg)`` (or :func:`build_detector`) returns the
subclass of ``cfg.backend``: :class:`TCMDetector` (below) or ``AASISTDetector``.

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

    model = Detector(config_from_dict(tiny_model_dict(), ModelConfig)).eval()   # a TCMDetector
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
    "TCMDetector",
    "build_detector",
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

    Attributes:
        gradcam_tap: ``nn.Identity`` applied to the frame tokens entering the **last** block,
            laid out (B, E, T), on the path to the logits (Grad-CAM's layer). The logits come
            from the last block's class token (``fc5``), which reads that block's input frames
            through its attention (and their neighbours through its convolution) but never the
            block's own frame outputs, so those get zero gradient; the frames entering the last
            block (the second-to-last block's output, or neck + positions with one block) are
            the last temporal features the decision depends on.
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
        # Grad-CAM's layer (xai_lib.explanation.methods, "grad_cam"): parameter-free, so no
        # state-dict key and no change to any computation; see forward() for where it sits.
        self.gradcam_tap = nn.Identity()

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
        last = len(self.encoder_blocks) - 1
        for i, block in enumerate(self.encoder_blocks):
            if i == last:
                # Grad-CAM tap on the frame tokens entering the last block, (B, E, T): the last
                # block's own frame outputs never reach fc5 (it reads the class token only), so
                # its input is the last temporal layer on the path to the logits.
                frames = self.gradcam_tap(x[:, 1:].transpose(1, 2)).transpose(1, 2)  # (B, T, E)
                x = torch.cat([x[:, :1], frames], dim=1)
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
    """Output of a back end's ``backend`` (:meth:`DetectorBackEnd.backend` for TCM,
    :meth:`~xai_lib.detector.aasist.AASISTBackEnd.backend` for AASIST).

    Attributes:
        logits: (B, 2) class logits; column 0 = spoof, column 1 = bona fide.
        neck: per-frame neck output (after ``frame_weights``). TCM: (B, T, E) fed to the
            Conformer. AASIST: (B, T, emb_size // 3), each frame's LL output max-pooled over
            frequency, normalised by ``first_bn`` and SELU, before the time max-pool.
        frame_tokens: (B, T, frame_token_dim) the back end's last per-time features on the 20 ms
            frame grid (padded frames 0). TCM: the last block's frame outputs (class token
            removed). AASIST: the temporal node features (input of ``GAT_layer_T``), each step
            repeated over the frames it pools.
        cls_token: (B, D) the utterance embedding the classifier reads (TCM: the last block's
            class token, input of ``fc5``; AASIST: the readout, input of ``out_layer``).
        attentions: TCM: per block (B, H, N + H, N + H) attention weights, N = 1 + T, token order
            [class token, T frames, H head tokens]; ``None`` unless requested, and always
            ``None`` for AASIST (its graph attention is not over frames).
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
        neck: (B, T, E) neck output (TCM: LL, BatchNorm, SELU; see :class:`BackendOutput`).
        frame_tokens: (B, T, E) the back end's per-frame features (TCM: the last Conformer
            block's frame outputs; see :class:`BackendOutput`), padded frames 0.
        cls_token: (B, E) the utterance embedding (TCM: the last block's class token).
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


@dataclass
class _WindowPlan:
    """Where :meth:`Detector.windowed_frontend` takes each frame from.

    Attributes:
        whole: utterances no longer than one window (processed whole).
        win_utt, win_start: utterance and first frame of every window of the longer ones.
        assignment: (utterance, frame, window, position in the window) of every frame of the
            longer utterances, four (F,) long tensors.
    """

    whole: list[int]
    win_utt: list[int]
    win_start: list[int]
    assignment: tuple[Tensor, Tensor, Tensor, Tensor]


def _window_plan(n_frames: list[int], win_frames: int, step: int) -> _WindowPlan:
    """Windows of ``win_frames`` frames every ``step`` frames (the last one ending at the last
    frame) over utterances of ``n_frames`` frames; each frame goes to the window whose centre
    is nearest (ties: the earlier window). Windows serving no frame are left out."""
    whole, win_utt, win_start = [], [], []
    parts: list[list[Tensor]] = [[], [], [], []]
    for b, n in enumerate(n_frames):
        if n <= win_frames:
            whole.append(b)
            continue
        starts = list(range(0, n - win_frames + 1, step))
        if starts[-1] != n - win_frames:
            starts.append(n - win_frames)
        start_t = torch.tensor(starts)
        centres = start_t.float() + win_frames / 2.0
        frames = torch.arange(n)
        nearest = (frames[:, None].float() + 0.5 - centres[None, :]).abs().argmin(dim=1)  # (n,)
        used, window = torch.unique(nearest, return_inverse=True)  # windows serving a frame, in order
        parts[0].append(torch.full((n,), b, dtype=torch.long))
        parts[1].append(frames)
        parts[2].append(window + len(win_utt))
        parts[3].append(frames - start_t[nearest])
        win_utt += [b] * len(used)
        win_start += start_t[used].tolist()
    empty = torch.zeros(0, dtype=torch.long)
    assignment = tuple(torch.cat(p) if p else empty for p in parts)
    return _WindowPlan(whole, win_utt, win_start, assignment)  # type: ignore[arg-type]


def _centred_starts(B: int, T: int, frames: int) -> Tensor:
    """(B, T) first frame of a window of ``frames`` frames centred on each frame (shifted inside
    each utterance at its ends by :func:`_local_group_norm`)."""
    return (torch.arange(T) - (frames - 1) // 2).expand(B, T)


class _LocalGroupNorm(torch.autograd.Function):
    """Per-channel normalisation with per-frame statistics over windows of blocks (forward and
    the closed-form backward of :func:`_local_group_norm`; autograd through the same arithmetic
    took 60 ms against 27 ms forward + backward on a 16 x 1 s batch of the demo, torch's
    GroupNorm 11 ms)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, lo: Tensor, hi: Tensor,
                block: int, eps: float) -> Tensor:
        B, C, L0 = x.shape
        T = lo.shape[1]
        blocks = x[:, :, : T * block].reshape(B, C, T, block)  # a view
        s1 = blocks.sum(dim=-1).double()  # (B, C, T) block sums (one pass each, no copy of x)
        s2 = torch.linalg.vector_norm(blocks, dim=-1).double().square()
        zero = s1.new_zeros(B, C, 1)
        c1, c2 = torch.cat([zero, s1.cumsum(-1)], -1), torch.cat([zero, s2.cumsum(-1)], -1)  # (B, C, T + 1)
        lo_i, hi_i = lo[:, None, :].expand(B, C, T), hi[:, None, :].expand(B, C, T)
        count = ((hi - lo) * block).to(torch.float64)[:, None, :]  # (B, 1, T)
        mean = (c1.gather(2, hi_i) - c1.gather(2, lo_i)) / count
        var = ((c2.gather(2, hi_i) - c2.gather(2, lo_i)) / count - mean * mean).clamp_min(0.0)
        rstd = torch.rsqrt(var + eps)
        gamma = weight.double()[None, :, None] if weight is not None else 1.0
        scale = rstd * gamma
        shift = -mean * scale + (bias.double()[None, :, None] if bias is not None else 0.0)
        scale_f, shift_f = scale.to(x.dtype), shift.to(x.dtype)  # (B, C, T)
        out = torch.empty_like(x)
        torch.addcmul(shift_f[..., None], blocks, scale_f[..., None], out=out[:, :, : T * block].view(B, C, T, block))
        if L0 > T * block:  # past the last block: the last frame's statistics
            torch.addcmul(shift_f[:, :, -1:], x[:, :, T * block :], scale_f[:, :, -1:], out=out[:, :, T * block :])
        ctx.save_for_backward(x, weight, lo, hi, mean, rstd, count)
        ctx.block, ctx.has_bias = block, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, lo, hi, mean, rstd, count = ctx.saved_tensors
        block = ctx.block
        B, C, L0 = x.shape
        T = lo.shape[1]
        n_main = T * block
        g_blocks = grad[:, :, :n_main].reshape(B, C, T, block)
        x_blocks = x[:, :, :n_main].reshape(B, C, T, block)
        gx = (g_blocks * x_blocks).sum(-1).double()  # (B, C, T): sum of grad * x under each frame
        g1 = g_blocks.sum(-1).double()  # sum of grad under each frame
        if L0 > n_main:  # the tail took the last frame's statistics
            gx[:, :, -1] += (grad[:, :, n_main:] * x[:, :, n_main:]).sum(-1).double()
            g1[:, :, -1] += grad[:, :, n_main:].sum(-1).double()
        gamma = weight.double()[None, :, None] if weight is not None else torch.ones_like(rstd[:, :1, :1])
        centred = gx - mean * g1  # sum of grad * (x - mean)
        d_rstd = gamma * centred
        d_mean = -gamma * rstd * g1
        r3 = rstd.pow(3)
        d_s2 = -0.5 * d_rstd * r3 / count  # d loss / d (window sum of x^2)
        d_s1 = (d_mean + d_rstd * r3 * mean) / count  # d loss / d (window sum of x)
        # each block's share: the sum over the frames whose window holds it (a difference array)
        lo_i, hi_i = lo[:, None, :].expand(B, C, T), hi[:, None, :].expand(B, C, T)
        per_block = []
        for d in (d_s1, d_s2):
            diff = d.new_zeros(B, C, T + 1)
            diff.scatter_add_(2, lo_i, d).scatter_add_(2, hi_i, -d)
            per_block.append(diff.cumsum(-1)[:, :, :T].to(x.dtype))
        u, w = per_block
        scale = (rstd * gamma).to(x.dtype)
        dx = torch.empty_like(x)
        dx_main = dx[:, :, :n_main].view(B, C, T, block)
        torch.mul(g_blocks, scale[..., None], out=dx_main)
        dx_main.add_(u[..., None]).addcmul_(x_blocks, 2.0 * w[..., None])
        if L0 > n_main:
            torch.mul(grad[:, :, n_main:], scale[:, :, -1:], out=dx[:, :, n_main:])
        d_weight = (rstd * centred).sum(dim=(0, 2)).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        d_bias = g1.sum(dim=(0, 2)).to(x.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, d_weight, d_bias, None, None, None, None


def _local_group_norm(
    x: Tensor, norm: nn.GroupNorm, starts: Tensor, frames: int, n_frames: list[int], block: int
) -> Tensor:
    """Per-channel GroupNorm of the first conv layer's output ``x`` (B, C, L0), with statistics
    over a window of ``frames`` frames per frame instead of the whole input (a new tensor;
    differentiable, so a detector can train with it).

    Frame ``t`` owns the ``block`` outputs ``[t * block, (t + 1) * block)`` (its 20 ms); they are
    normalised with the mean and variance of the outputs owned by frames ``starts[b, t] ...
    starts[b, t] + frames - 1``. Outputs past the last valid frame's block (the tail of its
    receptive field, and padding) take the last valid frame's statistics. Rows of utterances
    not longer than ``frames`` are left for the caller.
    """
    T = max(n_frames)
    n = torch.tensor(n_frames, device=x.device)
    last = (n - 1).clamp_min(0)[:, None]  # (B, 1)
    t = torch.minimum(torch.arange(T, device=x.device)[None, :], last)  # frames past the end: the last one's
    lo = starts.to(x.device).gather(1, t).clamp(min=0)  # (B, T)
    lo = torch.minimum(lo, (n[:, None] - frames).clamp_min(0))
    hi = torch.minimum(lo + frames, n[:, None])
    weight, bias = (norm.weight, norm.bias) if norm.affine else (None, None)
    return _LocalGroupNorm.apply(x, weight, bias, lo, hi, block, norm.eps)


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

    @property
    def frame_token_dim(self) -> int:
        """Width of :attr:`BackendOutput.frame_tokens` (the ``backend`` representation of Stage 2)."""
        return int(self.emb_size)

    @property
    def gradcam_tap(self) -> nn.Module:
        """Grad-CAM's layer: ``conformer.gradcam_tap``, (B, E, T) frame tokens entering the last block."""
        return self.conformer.gradcam_tap

    #: detector frames per step of the tapped time axis (TCM: one token per 20 ms frame)
    gradcam_frames_per_step: int = 1


class Detector(nn.Module):
    """The Stage-1 detector: SSL front end (``ssl_model``) + the back end ``cfg.backend`` names.

    ``Detector(cfg)`` builds the subclass of the configured back end (as :func:`build_detector`
    does): :class:`TCMDetector` for ``model.backend: tcm`` (neck + Conformer-TCM, the default)
    or :class:`~xai_lib.detector.aasist.AASISTDetector` for ``aasist``; both are ``Detector``
    instances. This class holds what every back end shares: the front end
    (:meth:`frontend`, :meth:`windowed_frontend`, :meth:`num_frames`, ``frame_hop_s``) and
    :meth:`forward`; a back end adds ``backend(ssl_features, frame_mask=None,
    frame_weights=None, output_attentions=False) -> BackendOutput``, ``ssl_dim``,
    ``frame_token_dim`` and, for Grad-CAM, ``gradcam_tap``.

    Args:
        cfg: the model config.
        ssl_model: an already built front end (used by the checkpoint loader to rebuild
            a stored architecture); ``None`` builds it with :func:`build_ssl` from ``cfg.ssl``.

    Attributes:
        frame_hop_s: 0.02, seconds per output frame.
        ssl_model: the ``transformers.Wav2Vec2Model`` (state-dict keys ``ssl_model.*``).
    """

    frame_hop_s: float = 0.02
    #: whether ``forward(..., output_attentions=True)`` returns attention maps over the frames
    #: (needed by the ``attention_rollout`` attribution method)
    has_attention_maps: bool = False

    def __new__(cls, cfg: ModelConfig | None = None, *args: Any, **kwargs: Any) -> "Detector":
        if cls is Detector:  # Detector(cfg): the configured back end's class
            if cfg is None:
                raise TypeError("Detector(cfg) needs the model config")
            cls = _detector_class(cfg.backend)
        return super().__new__(cls)

    def _attach_ssl(self, ssl_model: Wav2Vec2Model) -> None:
        """Register ``ssl_model`` first among the modules (state dicts and parameter lists put the
        front end first, as the published checkpoints do), freeze it or enable gradient
        checkpointing as ``cfg.ssl`` says. Called by a back end's ``__init__`` after it built its
        own modules (the front end itself is built before them: seeded runs)."""
        self.ssl_model = ssl_model
        modules = self._modules
        object.__setattr__(self, "_modules", {"ssl_model": modules.pop("ssl_model"), **modules})
        if self.cfg.ssl.freeze:
            self.ssl_model.requires_grad_(False)
        if self.cfg.ssl.gradient_checkpointing:
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
        norm_frames = self.group_norm_frames
        if norm_frames:  # the first conv layer normalised over a window centred on each frame
            full = torch.full((B,), L, dtype=torch.long, device=wave.device) if lengths is None else lengths
            n_frames = self.num_frames(full)
            T = int(n_frames.max())
            hidden = self._conv_hidden_states(wave, full, _centred_starts(B, T, norm_frames), norm_frames)[:, :T]
            mask = None if attention_mask is None else torch.arange(T, device=wave.device)[None, :] < n_frames[:, None]
            hidden = self.ssl_model.encoder(hidden, attention_mask=mask).last_hidden_state  # (B, T, D)
        else:
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

    #: ``windowed_frontend`` modes: the whole front end per window (the original), or the
    #: convolutional feature encoder once per utterance and the transformer encoder per window.
    WINDOW_MODES = ("windows", "encoder_windows")
    #: where ``encoder_windows`` takes a group-normalised first conv layer's statistics from
    GROUP_NORM_STATISTICS = ("centred", "window", "utterance")

    def windowed_frontend(
        self,
        wave: Tensor,
        lengths: Tensor | None = None,
        context_s: float = 0.3,
        max_windows: int = 256,
        mode: str = "windows",
        hop_fraction: float = 0.5,
        group_norm: str = "centred",
        conv_hidden: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """SSL features computed with a limited audio context per frame.

        :meth:`frontend` lets every frame see the whole utterance (the transformer attends
        globally, and a group-normalised first conv layer normalises over the whole input), so
        a short spoofed span colours the features of every frame. Here the front end runs on
        windows of ``context_s`` seconds of audio, ``hop_fraction`` of a window apart, laid on
        the detector's own frame grid, and every frame takes its feature from the window whose
        centre is nearest (with ``hop_fraction=1``: the window that contains it): the same
        frames, the same frozen weights, a local context.

        ``mode="windows"`` (the original): the whole front end (conv feature encoder and
        transformer) runs on each window of audio, at about ``1 / hop_fraction`` times the
        front end's cost. Every feature depends only on its window's audio. Utterances no longer
        than one window are processed whole (exactly :meth:`frontend` on that utterance).

        ``mode="encoder_windows"``: the convolutional feature encoder and the feature projection
        run once on each whole utterance, and only the transformer encoder (its positional conv
        included) runs on windows of those hidden states. The conv encoder's receptive field is
        one frame's 400 samples, so with a layer-normalised conv encoder (XLS-R,
        ``feat_extract_norm: layer``) the features equal ``"windows"`` ones (up to float
        rounding) at a fraction of the cost. A group-normalised one (wav2vec 2.0 base, the demo)
        normalises its first conv layer per channel over its whole input; ``group_norm`` says
        over what the statistics are taken here:

        * ``"centred"`` (default): the outputs under each frame (its 20 ms) are normalised
          with their statistics over ``context_s`` centred on the frame (the window shifted
          inside the utterance at its ends). Close to, not equal to, ``"windows"`` features; a
          frame depends on audio up to half a window beyond its transformer window.
        * ``"window"``: with the statistics of the window the frame takes its feature from,
          as ``"windows"`` does for that frame (the window's other frames use their own
          windows' statistics); numerically closer to ``"windows"``, but it localised worse
          on the demo.
        * ``"utterance"``: over the utterance's valid samples, as :meth:`frontend` on the
          utterance alone: far audio then moves every frame's feature through these
          statistics (not local).

        Utterances no longer than one window equal :meth:`frontend` on that utterance, and the
        statistics never see padding, so a padded batch gives each utterance's features alone.

        Args:
            wave: (B, L) float waveform at 16 kHz, right-padded.
            lengths: (B,) valid samples; ``None`` = all L.
            context_s: window length in seconds (at least one frame).
            max_windows: windows per front-end call (bounds memory).
            mode: ``"windows"`` or ``"encoder_windows"`` (above).
            hop_fraction: window step as a fraction of the window, in (0, 1]; 0.5 = half a
                window (the original), 1 = windows side by side without overlap.
            group_norm: ``"window"``, ``"centred"`` or ``"utterance"``: the statistics of a
                group-normalised first conv layer in mode ``"encoder_windows"`` (above).
            conv_hidden: mode ``"encoder_windows"`` only: the transformer encoder's input
                (B, T', D_ssl) already computed (:meth:`frontend_with_context` passes the
                detector's own); used instead of running the conv feature encoder again.

        Returns:
            ssl_features: (B, T, D_ssl) with T as :meth:`frontend` gives it, padded frames 0.
            frame_mask: (B, T) bool, true for valid frames.
        """
        if wave.dim() != 2:
            raise ValueError(f"wave must be (B, L) samples, got shape {tuple(wave.shape)}")
        if mode not in self.WINDOW_MODES:
            raise ValueError(f"mode must be one of {self.WINDOW_MODES}, got {mode!r}")
        if not 0.0 < hop_fraction <= 1.0:
            raise ValueError(f"hop_fraction must be in (0, 1], got {hop_fraction}")
        if group_norm not in self.GROUP_NORM_STATISTICS:
            raise ValueError(f"group_norm must be one of {self.GROUP_NORM_STATISTICS}, got {group_norm!r}")
        B, L = wave.shape
        lengths = (torch.full((B,), L, dtype=torch.long, device=wave.device) if lengths is None
                   else torch.as_tensor(lengths, dtype=torch.long, device=wave.device))
        hop, span = self.frame_hop_samples, self.min_input_samples
        n_frames = self.num_frames(lengths).tolist()
        if min(n_frames) < 1:
            raise ValueError(f"audio too short: {int(lengths.min())} samples, the SSL front end needs at least {span}")
        T = max(n_frames)
        win_frames = max(1, int(round(context_s / self.frame_hop_s)))
        step = max(1, int(win_frames * hop_fraction))  # 0.5: win_frames // 2, as always
        plan = _window_plan(n_frames, win_frames, step)
        param = next(self.ssl_model.parameters())
        out = torch.zeros(B, T, int(self.ssl_model.config.hidden_size), dtype=param.dtype, device=wave.device)
        frame_mask = torch.arange(T, device=wave.device)[None, :] < torch.tensor(n_frames, device=wave.device)[:, None]
        dev = wave.device
        if mode == "windows":
            for b in plan.whole:  # one window: the whole utterance, as frontend() sees it
                n = n_frames[b]
                out[b, :n] = self.frontend(wave[b : b + 1, : int(lengths[b])])[0][0, :n]
            if not plan.win_utt:
                return out, frame_mask
            win_samples = (win_frames - 1) * hop + span
            segments = [wave[b, s0 * hop : s0 * hop + win_samples] for b, s0 in zip(plan.win_utt, plan.win_start)]
            feats = torch.cat([self.frontend(torch.stack(segments[i : i + max_windows]))[0]  # (n, win_frames, D)
                               for i in range(0, len(segments), max_windows)])
        else:
            if group_norm == "utterance":
                starts_bt = None
            elif group_norm == "window":  # each frame: the statistics of the window it takes its feature from
                starts_bt = torch.zeros(B, T, dtype=torch.long)
                f_utt, f_time, f_win, _ = plan.assignment
                starts_bt[f_utt, f_time] = torch.tensor(plan.win_start, dtype=torch.long)[f_win]
            else:  # "centred": a window centred on each frame
                starts_bt = _centred_starts(B, T, win_frames)
            if conv_hidden is None:
                hidden = self._conv_hidden_states(wave, lengths, starts_bt, win_frames)  # (B, T', D), padded frames 0
            else:
                hidden = conv_hidden[:, :T] * frame_mask[..., None].to(conv_hidden.dtype)
            hidden = hidden[:, :T]  # the batch may be padded beyond its longest utterance
            starts = plan.win_start + [0] * len(plan.whole)
            utts = plan.win_utt + list(plan.whole)
            sizes = [win_frames] * len(plan.win_utt) + [n_frames[b] for b in plan.whole]
            width = max(sizes)
            idx = torch.tensor(starts, device=dev)[:, None] + torch.arange(width, device=dev)  # (N, W)
            size = torch.tensor(sizes, device=dev)
            valid = torch.arange(width, device=dev)[None, :] < size[:, None]  # (N, W)
            idx = torch.where(valid, idx, torch.zeros_like(idx))
            utt = torch.tensor(utts, device=dev)
            feats = []
            for i in range(0, len(utts), max_windows):
                windows = hidden[utt[i : i + max_windows, None], idx[i : i + max_windows]]  # (n, W, D)
                mask = valid[i : i + max_windows]
                windows = windows * mask[..., None].to(windows.dtype)
                mask = None if bool(mask.all()) else mask
                feats.append(self.ssl_model.encoder(windows, attention_mask=mask).last_hidden_state)
            feats = torch.cat(feats)  # (N, W, D)
        f_utt, f_time, f_win, f_loc = (x.to(dev) for x in plan.assignment)
        if mode == "encoder_windows":  # the whole-utterance windows follow the planned ones
            for j, b in enumerate(plan.whole):
                n = n_frames[b]
                out[b, :n] = feats[len(plan.win_utt) + j, :n].to(out.dtype)
        out[f_utt, f_time] = feats[f_win, f_loc].to(out.dtype)
        return out, frame_mask

    @property
    def group_norm_frames(self) -> int:
        """Frames of the centred window over which a group-normalised first conv layer takes its
        statistics in the detector's own pass (``model.ssl.group_norm_context_s``); 0 = the
        whole input (wav2vec 2.0), or a layer-normalised conv encoder (no statistics over time)."""
        seconds = getattr(self.cfg.ssl, "group_norm_context_s", None)
        norm = getattr(self.ssl_model.feature_extractor.conv_layers[0], "layer_norm", None)
        if not seconds or not isinstance(norm, nn.GroupNorm):
            return 0
        return max(1, int(round(seconds / self.frame_hop_s)))

    def shares_conv_encoder(self, mode: str, group_norm: str, context_s: float = 0.3) -> bool:
        """Whether :meth:`frontend_with_context` computes the conv feature encoder once for both
        outputs: mode ``"encoder_windows"`` with the same conv features the detector's own pass
        takes: a layer-normalised conv encoder (XLS-R: its features are local anyway), or a
        group-normalised one whose statistics are the detector's: ``group_norm="utterance"``
        for a detector normalising over the whole input, ``"centred"`` over ``context_s`` for
        one built with ``model.ssl.group_norm_context_s`` of that many seconds."""
        if mode != "encoder_windows":
            return False
        norm = getattr(self.ssl_model.feature_extractor.conv_layers[0], "layer_norm", None)
        if not isinstance(norm, nn.GroupNorm):
            return True
        own = self.group_norm_frames
        if own == 0:
            return group_norm == "utterance"
        return group_norm == "centred" and own == max(1, int(round(context_s / self.frame_hop_s)))

    def frontend_with_context(
        self,
        wave: Tensor,
        lengths: Tensor | None = None,
        context_s: float = 0.3,
        mode: str = "encoder_windows",
        group_norm: str = "centred",
        hop_fraction: float = 0.5,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The detector's own SSL features and local-context ones of the same batch, in one call.

        ``ssl_features`` are exactly :meth:`frontend`'s (what the detector scores). ``local``
        are :meth:`windowed_frontend`'s, except that when :meth:`shares_conv_encoder` holds the
        transformer windows read the conv feature encoder output of the detector's own pass
        instead of computing it again: identical features with a layer-normalised conv
        encoder; with a group-normalised one, when the context asks for the statistics the
        detector takes (``"utterance"`` for a wav2vec 2.0-style detector, whose padded batches
        let the padding into them; ``"centred"`` over ``context_s`` for a detector built with
        ``model.ssl.group_norm_context_s`` of that many seconds). The conv encoder is most of
        the demo front end's cost (XLS-R: a smaller share).

        Returns:
            ssl_features (B, T, D_ssl), local (B, T, D_ssl), frame_mask (B, T) bool.
        """
        options = dict(mode=mode, group_norm=group_norm, hop_fraction=hop_fraction)
        if not self.shares_conv_encoder(mode, group_norm, context_s):
            ssl_features, frame_mask = self.frontend(wave, lengths)
            return ssl_features, self.windowed_frontend(wave, lengths, context_s, **options)[0], frame_mask
        captured: list[Tensor] = []
        hook = self.ssl_model.feature_projection.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
        try:
            ssl_features, frame_mask = self.frontend(wave, lengths)
        finally:
            hook.remove()
        local = self.windowed_frontend(wave, lengths, context_s, conv_hidden=captured[-1], **options)[0]
        return ssl_features, local, frame_mask

    def occlusion_reach(self) -> tuple[int, int] | None:
        """How far silencing one frame's samples reaches in the transformer encoder's input, for an
        occlusion that recomputes only that part of the conv feature encoder (exact, not an
        approximation): ``(reach, margin)`` in frames. When frame ``k`` of an utterance of ``n``
        frames is silenced, only the conv frames within ``reach`` of ``k`` can change, and they are
        computed exactly from the audio of frames ``max(0, k - margin) ... min(n, k + margin + 1)``.

        ``None`` when a silenced frame changes every conv frame: a group-normalised first conv
        layer with whole-utterance statistics (wav2vec 2.0 base), or an adapter.

        Layer-normalised convs (XLS-R): a frame sees ``rf`` frames of audio (the receptive field,
        400 samples = 2 frames), so reach ``rf``. Statistics over ``W`` frames centred on each
        frame (``model.ssl.group_norm_context_s``): a silenced frame changes the statistics of the
        blocks whose window holds it (at most ``W`` away, windows being shifted inside the
        utterance at its ends), so reach ``W + rf``; the margin keeps every needed block's window
        the utterance's own (inside the segment, or clipped where the utterance clips it).
        """
        if getattr(self.ssl_model, "adapter", None) is not None:
            return None
        norm = getattr(self.ssl_model.feature_extractor.conv_layers[0], "layer_norm", None)
        window = self.group_norm_frames
        if isinstance(norm, nn.GroupNorm) and window == 0:
            return None
        rf = -(-self.min_input_samples // self.frame_hop_samples)
        reach = window + rf
        return reach, reach + rf + window // 2 + 1

    def conv_frames(self, wave: Tensor, lengths: Tensor) -> Tensor:
        """The transformer encoder's input for ``wave`` as :meth:`frontend` computes it: conv
        feature encoder + feature projection, (B, T, D_ssl), padded frames 0 (with
        :meth:`logits_from_conv_frames`, the detector's forward in two halves)."""
        window = self.group_norm_frames
        if window:
            T = int(self.num_frames(lengths).max())
            return self._conv_hidden_states(wave, lengths, _centred_starts(wave.shape[0], T, window), window)[:, :T]
        return self._conv_hidden_states(wave, lengths)

    def logits_from_conv_frames(self, hidden: Tensor, lengths: Tensor, padded: bool) -> Tensor:
        """Logits (B, 2) from :meth:`conv_frames`' output: the transformer encoder and the back end,
        as :meth:`forward` runs them (``padded``: whether the batch the frames came from had
        padding, which decides whether the encoder is given an attention mask)."""
        T = hidden.shape[1]
        mask = torch.arange(T, device=hidden.device)[None, :] < self.num_frames(lengths).to(hidden.device)[:, None]
        feats = self.ssl_model.encoder(hidden, attention_mask=mask if padded else None).last_hidden_state
        if padded:
            feats = feats * mask[..., None].to(feats.dtype)
        return self.backend(feats, mask).logits

    def _conv_hidden_states(
        self, wave: Tensor, lengths: Tensor, norm_starts: Tensor | None = None, norm_frames: int = 0
    ) -> Tensor:
        """The transformer encoder's input: conv feature encoder + feature projection, per utterance.

        A group-normalised first conv layer takes its per-channel statistics over each
        utterance's valid samples (what :class:`transformers.Wav2Vec2Model` computes for the
        utterance alone: padding changes nothing), or, with ``norm_starts``, over a window of
        ``norm_frames`` frames per frame: the layer's outputs under frame ``t`` (its 20 ms
        block) are normalised with the statistics of the outputs under frames
        ``norm_starts[b, t] ... norm_starts[b, t] + norm_frames - 1``. Utterances no longer
        than ``norm_frames`` frames keep their whole-utterance statistics. A layer-normalised
        conv encoder (XLS-R) has no such statistics: every frame is local anyway.

        Args:
            wave: (B, L) waveform, right-padded; lengths: (B,) valid samples.
            norm_starts: (B, T) long first frame of each frame's statistics window, or ``None``.
            norm_frames: the statistics window in frames (with ``norm_starts``).

        Returns:
            (B, T', D_ssl) hidden states, T' = the conv encoder's frames of L, padded frames 0.
        """
        ssl = self.ssl_model
        if getattr(ssl, "adapter", None) is not None:
            raise ValueError("encoder_windows does not support a Wav2Vec2 adapter (it changes the frame rate)")
        wave = wave.to(dtype=next(ssl.parameters()).dtype)
        layers = ssl.feature_extractor.conv_layers
        norm = getattr(layers[0], "layer_norm", None)
        B, L = wave.shape
        local = norm_starts is not None and norm_frames > 0
        if isinstance(norm, nn.GroupNorm) and (local or not bool((lengths == L).all())):
            conv = layers[0].conv
            x = conv(wave[:, None])  # (B, C, L0)
            n0 = (torch.div(lengths - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1).tolist()
            n_frames = self.num_frames(lengths).tolist()
            whole = [b for b in range(B) if not local or n_frames[b] <= norm_frames]
            y = x
            if len(whole) < B:
                y = _local_group_norm(x, norm, norm_starts, norm_frames, n_frames, self.frame_hop_samples // conv.stride[0])
            if whole:  # each utterance's valid samples alone (the padding is left as it is)
                rows = [y[b : b + 1] for b in range(B)]
                for b in whole:
                    rows[b] = torch.cat([norm(x[b : b + 1, :, : n0[b]]), x[b : b + 1, :, n0[b] :]], dim=2)
                y = torch.cat(rows)
            x = layers[0].activation(y)
            for layer in layers[1:]:
                x = layer(x)
        else:
            x = ssl.feature_extractor(wave)  # (B, C, T)
        hidden, _ = ssl.feature_projection(x.transpose(1, 2))  # (B, T, D)
        T = hidden.shape[1]
        frame_mask = torch.arange(T, device=hidden.device)[None, :] < self.num_frames(lengths).to(hidden.device)[:, None]
        return hidden * frame_mask[..., None].to(hidden.dtype)

    def forward(self, wave: Tensor, lengths: Tensor | None = None, output_attentions: bool = False) -> DetectorOutput:
        """Score a batch of waveforms.

        Args:
            wave: (B, L) float waveform at 16 kHz, right-padded with zeros.
            lengths: (B,) valid samples per utterance; ``None`` = all L.
            output_attentions: also return the TCM attention weights of every block (a back end
                without attention maps over frames, AASIST, returns ``None``).

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


class TCMDetector(Detector, DetectorBackEnd):
    """The detector with the neck + Conformer-TCM back end (``model.backend: tcm``).

    Module and parameter names are the published TCM checkpoint's (``ssl_model``, ``LL``,
    ``first_bn``, ``conformer``); see :class:`Detector` for the arguments.
    """

    has_attention_maps = True

    def __init__(self, cfg: ModelConfig, ssl_model: Wav2Vec2Model | None = None) -> None:
        ssl_model = ssl_model if ssl_model is not None else build_ssl(cfg.ssl)  # built first: seeded runs
        DetectorBackEnd.__init__(self, cfg, int(ssl_model.config.hidden_size))
        self._attach_ssl(ssl_model)


def _detector_class(backend: str) -> type[Detector]:
    if backend == "tcm":
        return TCMDetector
    if backend == "aasist":
        from xai_lib.detector.aasist import AASISTDetector  # aasist.py imports this module

        return AASISTDetector
    raise ValueError(f"unknown model.backend {backend!r}; valid: tcm, aasist")


def build_detector(cfg: ModelConfig, ssl_model: Wav2Vec2Model | None = None) -> Detector:
    """The detector ``cfg`` describes: its SSL front end and the back end ``cfg.backend`` names.

    Args:
        cfg: the model config (``model.backend``: ``tcm`` or ``aasist``).
        ssl_model: an already built front end, or ``None`` to build it from ``cfg.ssl``.

    Returns:
        A :class:`TCMDetector` or :class:`~xai_lib.detector.aasist.AASISTDetector` (both
        :class:`Detector`), in training mode, as ``nn.Module`` constructors leave it.
    """
    return _detector_class(cfg.backend)(cfg, ssl_model=ssl_model)
