"""The AASIST back end of the SSL-AASIST recipe (``model.backend: aasist``).

Spectro-temporal graph attention (AASIST, Jung et al., ICASSP 2022) on the XLS-R front end,
as in the "SSL_Anti-spoofing" recipe (Tak et al., Odyssey 2022, whose LA and DF checkpoints
are published). Module and parameter names are the recipe's, so a published state dict
loads by renaming only the fairseq SSL weights (:func:`xai_lib.detector.checkpoint.load_detector`;
names and shapes in ``docs/aasist_checkpoint.md``). The code is ours::

    ssl_features (B, T, D_ssl), one frame per 20 ms
      -> LL Linear(D_ssl -> E)                                   (B, T, E)
      -> as an image (B, 1, E, T), max-pool 3x3                  (B, 1, E//3, T//3)   T' = T // 3 steps
      -> first_bn BatchNorm2d(1), SELU
      -> encoder: residual blocks of (2, 3) convolutions         (B, C, E//3, T')
      -> first_bn1 BatchNorm2d(C), SELU
      -> attention: 1x1 conv, SELU, BatchNorm2d, 1x1 conv        a (B, C, E//3, T')
      -> spectral nodes: softmax(a) over time weights a sum over time, + pos_S      e_S (B, E//3, C)
         temporal nodes: softmax(a) over frequency weights a sum over frequency     e_T (B, T', C)
      -> GAT_layer_S / GAT_layer_T (graph attention), pool_S / pool_T (top-k graph pools)
      -> two branches, each: HtrgGAT layer (heterogeneous graph of T and S nodes plus a learned
         master node), pools, a second HtrgGAT layer added residually
      -> element-wise max of the branches; readout [max |T|, mean T, max |S|, mean S, master]
      -> out_layer Linear(5 g1 -> 2)                             logits (B, 2), column 1 = bona fide

Notes on the published computation, kept as it is:

* A residual block's ``bn1`` (every block but the first) is in the state dict, but the
  recipe's forward feeds the block input, not ``selu(bn1(x))``, to ``conv1``. We do the same
  and freeze ``bn1`` (it gets no gradient; frozen, DistributedDataParallel needs no unused-
  parameter search). Its running statistics are therefore not updated in training (they
  never influence an output).
* The 3x3 max-pool drops the last ``T % 3`` frames (and ``E % 3`` LL channels).

Padding: with a ``frame_mask`` the back end computes, for every utterance, what it computes
for that utterance alone (up to float rounding): an utterance of ``n`` valid frames has
``n // 3`` valid steps; padded steps are zeroed before every convolution over time (as the
zero padding of a lone utterance), left out of BatchNorm statistics in training, of the
spectral softmax over time, of the graph attention (keys and master node), and of the graph
pools, which keep ``max(int(k * n_nodes), 1)`` of each utterance's own valid nodes. The graph
pools rank nodes with ``topk``; near-equal scores may rank differently in a batch and alone
(float rounding), which can change a score by a little. Without a mask (or an all-true one)
the computation is exactly the recipe's.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Wav2Vec2Model

from xai_lib.config import AASISTConfig, ModelConfig
from xai_lib.detector.model import BackendOutput, Detector, _batch_norm, build_ssl

__all__ = [
    "SELU_FLOOR",
    "GraphAttentionLayer",
    "HtrgGraphAttentionLayer",
    "GraphPool",
    "Residual_block",
    "AASISTBackEnd",
    "AASISTDetector",
]

#: the lowest value SELU reaches (its limit at -inf): what a removed frame becomes in the neck
SELU_FLOOR = -1.0507009873554804934193349852946 * 1.6732632423543772848170429916717
#: frames per step of the neck's max-pool over time (and channels per spectral node)
POOL = 3


def _masked_softmax(scores: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """Softmax over ``dim`` with positions where ``mask`` is false excluded (mask broadcastable)."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=dim)


def _node_batch_norm(bn: nn.BatchNorm1d, x: Tensor, node_mask: Tensor | None) -> Tensor:
    """``bn`` over every node of every utterance (B, N, D) -> (B, N, D); in training the
    statistics use the valid nodes of ``node_mask`` (B, N) only."""
    B, N, D = x.shape
    flat_mask = None if node_mask is None else node_mask.reshape(B * N, 1)
    return _batch_norm(bn, x.reshape(B * N, D), flat_mask).reshape(B, N, D)


def _pairwise_products(x: Tensor) -> Tensor:
    """(B, N, D) -> (B, N, N, D): element-wise product of every pair of nodes."""
    return x.unsqueeze(2) * x.unsqueeze(1)


def _xavier_vector(rows: int) -> nn.Parameter:
    weight = torch.empty(rows, 1)
    nn.init.xavier_normal_(weight)
    return nn.Parameter(weight)


class GraphAttentionLayer(nn.Module):
    """Graph attention over one node type (keys ``att_proj``, ``att_weight``, ``proj_with_att``,
    ``proj_without_att``, ``bn``).

    The edge score of nodes ``i, j`` is ``tanh(att_proj(x_i * x_j)) . att_weight / temperature``,
    normalised over ``j``; the output is ``SELU(BN(proj_with_att(sum_j a_ij x_j) + proj_without_att(x_i)))``.

    Args:
        in_dim, out_dim: node widths.
        temperature: divides the edge scores.
        dropout: input dropout.
    """

    def __init__(self, in_dim: int, out_dim: int, temperature: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        self.att_proj = nn.Linear(in_dim, out_dim)
        self.att_weight = _xavier_vector(out_dim)
        self.proj_with_att = nn.Linear(in_dim, out_dim)
        self.proj_without_att = nn.Linear(in_dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        self.input_drop = nn.Dropout(dropout)
        self.temperature = temperature

    def forward(self, x: Tensor, node_mask: Tensor | None = None) -> Tensor:
        """Args: x (B, N, in_dim); node_mask (B, N) bool valid nodes or None. Returns (B, N, out_dim)."""
        x = self.input_drop(x)
        scores = (torch.tanh(self.att_proj(_pairwise_products(x))) @ self.att_weight).squeeze(-1)  # (B, N, N)
        keys = None if node_mask is None else node_mask[:, None, :]
        att = _masked_softmax(scores / self.temperature, keys, dim=-1)  # rows: query i, over keys j
        x = self.proj_with_att(att @ x) + self.proj_without_att(x)  # (B, N, out)
        x = F.selu(_node_batch_norm(self.bn, x, node_mask))
        return x if node_mask is None else x * node_mask[..., None].to(x.dtype)


class HtrgGraphAttentionLayer(nn.Module):
    """Heterogeneous graph attention over temporal (type 1) and spectral (type 2) nodes and a
    master node (keys ``proj_type1/2``, ``att_proj``, ``att_projM``, ``att_weight11/22/12/M``,
    ``proj_with_att``, ``proj_without_att``, ``proj_with_attM``, ``proj_without_attM``, ``bn``).

    Both node types are projected to ``in_dim`` and joined into one graph. An edge between
    two nodes scores ``tanh(att_proj(x_i * x_j))`` against ``att_weight11`` (both temporal),
    ``att_weight22`` (both spectral) or ``att_weight12`` (one of each). The master node
    attends to every node (``att_projM``, ``att_weightM``) and is updated with
    ``proj_with_attM``/``proj_without_attM``; it is not a node of the graph.

    Args:
        in_dim, out_dim: node widths.
        temperature: divides every attention score (nodes and master).
        dropout: input dropout.
    """

    def __init__(self, in_dim: int, out_dim: int, temperature: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        self.proj_type1 = nn.Linear(in_dim, in_dim)
        self.proj_type2 = nn.Linear(in_dim, in_dim)
        self.att_proj = nn.Linear(in_dim, out_dim)
        self.att_projM = nn.Linear(in_dim, out_dim)
        self.att_weight11 = _xavier_vector(out_dim)
        self.att_weight22 = _xavier_vector(out_dim)
        self.att_weight12 = _xavier_vector(out_dim)
        self.att_weightM = _xavier_vector(out_dim)
        self.proj_with_att = nn.Linear(in_dim, out_dim)
        self.proj_without_att = nn.Linear(in_dim, out_dim)
        self.proj_with_attM = nn.Linear(in_dim, out_dim)
        self.proj_without_attM = nn.Linear(in_dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        self.input_drop = nn.Dropout(dropout)
        self.temperature = temperature

    def forward(
        self, x1: Tensor, x2: Tensor, master: Tensor, mask1: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Args:
            x1: (B, N1, in_dim) temporal nodes; mask1: (B, N1) bool valid ones, or None (all).
            x2: (B, N2, in_dim) spectral nodes (always all valid).
            master: (B or 1, 1, in_dim) master node.

        Returns:
            x1 (B, N1, out_dim), x2 (B, N2, out_dim), master (B, 1, out_dim).
        """
        n1 = x1.shape[1]
        x = torch.cat([self.proj_type1(x1), self.proj_type2(x2)], dim=1)  # (B, N, in)
        mask = None
        if mask1 is not None:
            mask = torch.cat([mask1, mask1.new_ones(x2.shape[0], x2.shape[1])], dim=1)  # (B, N)
        x = self.input_drop(x)
        keys = None if mask is None else mask[:, None, :]

        hidden = torch.tanh(self.att_proj(_pairwise_products(x)))  # (B, N, N, out)
        top = torch.cat([hidden[:, :n1, :n1] @ self.att_weight11, hidden[:, :n1, n1:] @ self.att_weight12], dim=2)
        bottom = torch.cat([hidden[:, n1:, :n1] @ self.att_weight12, hidden[:, n1:, n1:] @ self.att_weight22], dim=2)
        scores = torch.cat([top, bottom], dim=1).squeeze(-1)  # (B, N, N)
        att = _masked_softmax(scores / self.temperature, keys, dim=-1)

        m_scores = (torch.tanh(self.att_projM(x * master)) @ self.att_weightM).squeeze(-1)  # (B, N)
        m_att = _masked_softmax(m_scores / self.temperature, mask, dim=-1)  # (B, N)
        master = self.proj_with_attM(m_att.unsqueeze(1) @ x) + self.proj_without_attM(master)  # (B, 1, out)

        x = self.proj_with_att(att @ x) + self.proj_without_att(x)
        x = F.selu(_node_batch_norm(self.bn, x, mask))
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        return x[:, :n1], x[:, n1:], master


class GraphPool(nn.Module):
    """Keep the ``ratio`` best-scored nodes, scaled by their score (key ``proj``).

    Each node scores ``sigmoid(proj(dropout(h)))``; the ``max(int(ratio * n), 1)`` best of an
    utterance's ``n`` valid nodes are kept, best first, each multiplied by its score.

    Args:
        ratio: share of nodes kept.
        in_dim: node width.
        dropout: dropout before ``proj``.
    """

    def __init__(self, ratio: float, in_dim: int, dropout: float) -> None:
        super().__init__()
        self.ratio = ratio
        self.proj = nn.Linear(in_dim, 1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def kept(self, n_nodes: int) -> int:
        return max(int(n_nodes * self.ratio), 1)

    def forward(self, h: Tensor, node_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Args: h (B, N, D); node_mask (B, N) bool or None.

        Returns:
            (B, K, D) kept nodes (best first; 0 past an utterance's own count) and their
            (B, K) mask (``None`` when every row keeps K nodes).
        """
        B, N, D = h.shape
        scores = torch.sigmoid(self.proj(self.drop(h)))  # (B, N, 1)
        if node_mask is None:
            idx = torch.topk(scores, self.kept(N), dim=1).indices  # (B, K, 1)
            return torch.gather(h * scores, 1, idx.expand(-1, -1, D)), None
        kept = [self.kept(int(n)) for n in node_mask.sum(dim=1).tolist()]
        ranked = scores.masked_fill(~node_mask[..., None], float("-inf"))
        idx = torch.topk(ranked, max(kept), dim=1).indices
        out = torch.gather(h * scores, 1, idx.expand(-1, -1, D))
        new_mask = torch.arange(max(kept), device=h.device)[None, :] < torch.tensor(kept, device=h.device)[:, None]
        if bool(new_mask.all()):
            return out, None
        return out * new_mask[..., None].to(out.dtype), new_mask


class Residual_block(nn.Module):  # noqa: N801 -- the recipe's name, kept for recognisability
    """Residual block of (2, 3) convolutions over (frequency, time) (keys ``bn1`` unless first,
    ``conv1``, ``bn2``, ``conv2``, ``conv_downsample`` when the channel count changes).

    ``out = conv2(SELU(bn2(conv1(x)))) + (conv_downsample(x) or x)``; ``conv1`` pads (1, 1)
    and ``conv2`` (0, 1), so the shape (F, T') is kept. ``bn1`` is stored, frozen and unused
    (see the module docstring).

    Args:
        in_channels, out_channels: channels.
        first: the first block has no ``bn1``.
    """

    def __init__(self, in_channels: int, out_channels: int, first: bool = False) -> None:
        super().__init__()
        if not first:
            self.bn1 = nn.BatchNorm2d(in_channels)
            self.bn1.requires_grad_(False)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=(2, 3), padding=(1, 1))
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=(2, 3), padding=(0, 1))
        if in_channels != out_channels:
            self.conv_downsample = nn.Conv2d(in_channels, out_channels, kernel_size=(1, 3), padding=(0, 1))
        else:
            self.conv_downsample = None

    def forward(self, x: Tensor, step_mask: Tensor | None = None) -> Tensor:
        """Args: x (B, C_in, F, T'); step_mask (B, 1, 1, T') bool or None. Returns (B, C_out, F, T')."""
        if step_mask is not None:
            x = x * step_mask.to(x.dtype)  # padded steps act like the zero padding of a lone utterance
        out = F.selu(_batch_norm(self.bn2, self.conv1(x), step_mask))
        if step_mask is not None:
            out = out * step_mask.to(out.dtype)
        out = self.conv2(out)
        return out + (x if self.conv_downsample is None else self.conv_downsample(x))


class AASISTBackEnd(nn.Module):
    """The SSL-AASIST back end on SSL features: ``LL``, ``first_bn``, ``encoder``, ``first_bn1``,
    ``attention``, ``pos_S``, ``GAT_layer_S/T``, ``master1/2``, ``HtrgGAT_layer_ST11/12/21/22``,
    ``pool_S/T``, ``pool_hS1/hT1/hS2/hT2``, ``out_layer`` (the recipe's names).

    **Grad-CAM tap** (``gradcam_tap``, an ``nn.Identity``, no state-dict keys): called on the
    path to the logits on the temporal node features laid out as (B, C, T'): channels on dim
    1, time last, ``C = encoder_channels[-1]``, ``T' = T // 3`` (the 20 ms frames of the
    batch pooled by 3). It is the last per-time feature map before the graph layers mix time
    steps (``GAT_layer_T`` and the graph pools rank and drop steps, so no later layer keeps a
    time axis). Step ``s`` covers the 20 ms frames ``3 s, 3 s + 1, 3 s + 2``
    (:attr:`gradcam_frames_per_step` = 3; :meth:`steps_to_frames` maps a (B, T') map back to
    (B, T) frames); an utterance with ``n`` valid frames has ``n // 3`` valid steps, its last
    ``n % 3`` frames are not seen by the model (0 after mapping back) and the steps past its
    valid ones are padding.

    **frame_weights** (``w`` (B, T) in [0, 1], per 20 ms frame) act before the time
    max-pool: each frame's LL output is max-pooled over frequency, normalised by
    ``first_bn`` with the statistics of the pooled steps (running ones in ``eval()``) and
    passed through SELU, then moved towards SELU's floor: ``floor + w (n - floor)``, and the
    steps are the max over their 3 frames. A frame with ``w = 0`` therefore never wins the
    max unless its whole step is removed, in which case the step is the floor (nothing). With
    ``w`` all 1 this equals the recipe's pool-then-normalise order (up to rounding) because
    ``first_bn`` has a positive scale (checked; a negative one is refused).

    Args:
        cfg: the model config (``cfg.aasist`` holds the sizes).
        ssl_dim: width of the SSL features (1024 for XLS-R 300M).
    """

    #: 20 ms input frames per step of the Grad-CAM tap's time axis (the neck's max-pool)
    gradcam_frames_per_step: int = POOL

    def __init__(self, cfg: ModelConfig, ssl_dim: int) -> None:
        super().__init__()
        a: AASISTConfig = cfg.aasist
        self.cfg = cfg
        self.ssl_dim = ssl_dim
        self.emb_size = a.emb_size
        channels = int(a.encoder_channels[-1])
        g0, g1 = (int(d) for d in a.gat_dims)
        self.LL = nn.Linear(ssl_dim, a.emb_size)
        self.first_bn = nn.BatchNorm2d(num_features=1)
        self.first_bn1 = nn.BatchNorm2d(num_features=channels)
        self.drop = nn.Dropout(a.hidden_dropout)
        self.drop_way = nn.Dropout(a.branch_dropout)
        blocks, c_in = [], 1
        for k, c_out in enumerate(a.encoder_channels):
            blocks.append(nn.Sequential(Residual_block(c_in, int(c_out), first=k == 0)))  # keys encoder.K.0.*
            c_in = int(c_out)
        self.encoder = nn.Sequential(*blocks)
        self.attention = nn.Sequential(
            nn.Conv2d(channels, a.attention_channels, kernel_size=(1, 1)),
            nn.SELU(),
            nn.BatchNorm2d(a.attention_channels),
            nn.Conv2d(a.attention_channels, channels, kernel_size=(1, 1)),
        )
        self.pos_S = nn.Parameter(torch.randn(1, a.emb_size // POOL, channels))
        self.master1 = nn.Parameter(torch.randn(1, 1, g0))
        self.master2 = nn.Parameter(torch.randn(1, 1, g0))
        t_s, t_t, t_h = a.temperatures
        self.GAT_layer_S = GraphAttentionLayer(channels, g0, temperature=t_s, dropout=a.graph_dropout)
        self.GAT_layer_T = GraphAttentionLayer(channels, g0, temperature=t_t, dropout=a.graph_dropout)
        self.HtrgGAT_layer_ST11 = HtrgGraphAttentionLayer(g0, g1, temperature=t_h, dropout=a.graph_dropout)
        self.HtrgGAT_layer_ST12 = HtrgGraphAttentionLayer(g1, g1, temperature=t_h, dropout=a.graph_dropout)
        self.HtrgGAT_layer_ST21 = HtrgGraphAttentionLayer(g0, g1, temperature=t_h, dropout=a.graph_dropout)
        self.HtrgGAT_layer_ST22 = HtrgGraphAttentionLayer(g1, g1, temperature=t_h, dropout=a.graph_dropout)
        r_s, r_t, r_h = a.pool_ratios
        self.pool_S = GraphPool(r_s, g0, a.pool_dropout)
        self.pool_T = GraphPool(r_t, g0, a.pool_dropout)
        self.pool_hS1 = GraphPool(r_h, g1, a.pool_dropout)
        self.pool_hT1 = GraphPool(r_h, g1, a.pool_dropout)
        self.pool_hS2 = GraphPool(r_h, g1, a.pool_dropout)
        self.pool_hT2 = GraphPool(r_h, g1, a.pool_dropout)
        self.out_layer = nn.Linear(5 * g1, 2)
        self.gradcam_tap = nn.Identity()

    @property
    def frame_token_dim(self) -> int:
        """Width of :attr:`BackendOutput.frame_tokens`: the temporal node features' channels."""
        return int(self.cfg.aasist.encoder_channels[-1])

    @staticmethod
    def steps_to_frames(steps: Tensor, num_frames: int) -> Tensor:
        """Map a per-step map (B, T', ...) to the 20 ms frame grid (B, num_frames, ...).

        Step ``s`` is copied to frames ``3 s .. 3 s + 2``; frames past ``3 T'`` get 0.
        """
        frames = steps.repeat_interleave(POOL, dim=1)[:, :num_frames]
        missing = num_frames - frames.shape[1]
        if missing > 0:
            frames = torch.cat([frames, frames.new_zeros(frames.shape[0], missing, *frames.shape[2:])], dim=1)
        return frames

    # ------------------------------------------------------------------ neck

    def _first_bn_affine(self, steps: Tensor, step_mask: Tensor | None, update: bool) -> tuple[Tensor, Tensor]:
        """``first_bn`` as ``x * scale + shift`` (scalars as (1,) tensors) with the statistics it
        uses for ``steps`` (B, 1, F, T'): the (valid) steps' batch statistics in training, the
        running ones otherwise; ``update`` also updates the running statistics (training)."""
        bn = self.first_bn
        if bn.training and bn.track_running_stats:
            m = (torch.ones_like(steps) if step_mask is None else step_mask.to(steps.dtype).expand_as(steps))
            count = m.sum()
            mean = (steps * m).sum() / count
            var = (((steps - mean) ** 2) * m).sum() / count
            if update:
                with torch.no_grad():
                    bn.num_batches_tracked.add_(1)
                    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                    bn.running_mean.mul_(1 - factor).add_(mean.detach().reshape(1), alpha=factor)
                    unbiased = var.detach() * count / (count - 1).clamp_min(1.0)
                    bn.running_var.mul_(1 - factor).add_(unbiased.reshape(1), alpha=factor)
            mean, var = mean.reshape(1), var.reshape(1)
        else:
            mean, var = bn.running_mean.to(steps.dtype), bn.running_var.to(steps.dtype)
        scale = torch.rsqrt(var + bn.eps)
        shift = -mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        return scale, shift

    def _neck(
        self, ssl_features: Tensor, step_mask4: Tensor | None, frame_weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """LL, 3x3 max-pool, first_bn, SELU.

        Returns:
            steps: (B, 1, F, T') the encoder's input.
            neck: (B, T, F) each frame's normalised, activated value (after ``frame_weights``).
        """
        B, T, _ = ssl_features.shape
        x = self.LL(ssl_features).transpose(1, 2).unsqueeze(1)  # (B, 1, E, T)
        per_frame = F.max_pool2d(x, (POOL, 1))  # (B, 1, F, T) each frame pooled over frequency
        pooled = F.max_pool2d(per_frame, (1, POOL))  # (B, 1, F, T') = the recipe's 3x3 max-pool
        if frame_weights is None:
            steps = F.selu(_batch_norm(self.first_bn, pooled, step_mask4))
            scale, shift = self._first_bn_affine(pooled, step_mask4, update=False)
            neck = F.selu(per_frame * scale + shift)
            return steps, neck.squeeze(1).transpose(1, 2)
        if frame_weights.shape != (B, T):
            raise ValueError(f"frame_weights must be (B, T) = {(B, T)}, got {tuple(frame_weights.shape)}")
        scale, shift = self._first_bn_affine(pooled, step_mask4, update=True)
        if not bool((scale > 0).all()):
            raise ValueError(
                "frame_weights on the AASIST back end need first_bn to have a positive scale (its weight "
                f"is {float(self.first_bn.weight.reshape(-1)[0]):.4g}); per-frame removal before the max-pool "
                "is not defined otherwise"
            )
        neck = F.selu(per_frame * scale + shift)  # (B, 1, F, T)
        w = frame_weights.to(neck.dtype)[:, None, None, :]
        neck = SELU_FLOOR + w * (neck - SELU_FLOOR)
        steps = F.max_pool2d(neck, (1, POOL))
        return steps, neck.squeeze(1).transpose(1, 2)

    # ------------------------------------------------------------------ forward

    def backend(
        self,
        ssl_features: Tensor,
        frame_mask: Tensor | None = None,
        frame_weights: Tensor | None = None,
        output_attentions: bool = False,
    ) -> BackendOutput:
        """Run AASIST on SSL features.

        Args:
            ssl_features: (B, T, D_ssl), T >= 3.
            frame_mask: (B, T) bool valid frames (right padding); ``None`` = all valid.
            frame_weights: (B, T) in [0, 1] per 20 ms frame, applied before the time max-pool
                (see the class docstring; 0 = frame removed; differentiable).
            output_attentions: accepted for the common interface; AASIST returns no
                attention maps over frames (``attentions`` is ``None``).

        Returns:
            :class:`~xai_lib.detector.model.BackendOutput`: ``neck`` (B, T, emb_size // 3),
            ``frame_tokens`` (B, T, C) the temporal node features per frame, ``cls_token``
            (B, 5 g1) the readout, ``attentions`` ``None``.
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
        n_frames = frame_mask.sum(dim=1) if frame_mask is not None else torch.full((B,), T, device=ssl_features.device)
        n_steps = torch.div(n_frames, POOL, rounding_mode="floor")  # (B,)
        if int(n_steps.min()) < 1:
            raise ValueError(
                f"audio too short for the AASIST back end: {int(n_frames.min())} SSL frames, it needs at least "
                f"{POOL} ({POOL * 20} ms of frames; about 80 ms of audio at 16 kHz)"
            )
        T_steps = T // POOL
        step_mask = None
        if frame_mask is not None:
            step_mask = torch.arange(T_steps, device=ssl_features.device)[None, :] < n_steps[:, None]  # (B, T')
            if bool(step_mask.all()):
                step_mask = None
        m4 = None if step_mask is None else step_mask[:, None, None, :]  # (B, 1, 1, T')

        x, neck = self._neck(ssl_features, m4, frame_weights)  # (B, 1, F, T'), (B, T, F)
        for wrapper in self.encoder:
            x = wrapper[0](x, m4)  # (B, C, F, T')
        x = F.selu(_batch_norm(self.first_bn1, x, m4))
        a = F.selu(self.attention[0](x))
        a = self.attention[3](_batch_norm(self.attention[2], a, m4))  # (B, C, F, T')
        if m4 is not None:
            x = x.masked_fill(~m4, 0.0)

        spectral = (x * _masked_softmax(a, m4, dim=-1)).sum(dim=-1)  # (B, C, F) weighted over time
        e_S = spectral.transpose(1, 2) + self.pos_S  # (B, F, C)
        temporal = (x * a.softmax(dim=-2)).sum(dim=-2)  # (B, C, T') weighted over frequency
        temporal = self.gradcam_tap(temporal)
        e_T = temporal.transpose(1, 2)  # (B, T', C)

        out_S, _ = self.pool_S(self.GAT_layer_S(e_S))  # (B, N_S, g0)
        out_T, t_mask = self.pool_T(self.GAT_layer_T(e_T, step_mask), step_mask)  # (B, N_T, g0)

        branches = []
        for first, second, pool_s, pool_t, master in (
            (self.HtrgGAT_layer_ST11, self.HtrgGAT_layer_ST12, self.pool_hS1, self.pool_hT1, self.master1),
            (self.HtrgGAT_layer_ST21, self.HtrgGAT_layer_ST22, self.pool_hS2, self.pool_hT2, self.master2),
        ):
            h_T, h_S, m = first(out_T, out_S, master, t_mask)
            h_S, _ = pool_s(h_S)
            h_T, h_mask = pool_t(h_T, t_mask)
            aug_T, aug_S, aug_m = second(h_T, h_S, m, h_mask)
            branches.append((self.drop_way(h_T + aug_T), self.drop_way(h_S + aug_S), self.drop_way(m + aug_m), h_mask))
        (t1, s1, m1, mask1), (t2, s2, m2, _) = branches
        nodes_T, nodes_S, master = torch.max(t1, t2), torch.max(s1, s2), torch.max(m1, m2)

        if mask1 is None:
            t_max, t_avg = nodes_T.abs().amax(dim=1), nodes_T.mean(dim=1)
        else:
            valid = mask1[..., None].to(nodes_T.dtype)  # (B, K, 1)
            t_max = (nodes_T.abs() * valid).amax(dim=1)
            t_avg = (nodes_T * valid).sum(dim=1) / valid.sum(dim=1)
        readout = torch.cat([t_max, t_avg, nodes_S.abs().amax(dim=1), nodes_S.mean(dim=1), master.squeeze(1)], dim=1)
        logits = self.out_layer(self.drop(readout))  # (B, 2)

        frame_tokens = self.steps_to_frames(e_T, T)  # (B, T, C)
        seen = torch.arange(T, device=x.device)[None, :] < (n_steps * POOL)[:, None]  # (B, T)
        frame_tokens = frame_tokens * seen[..., None].to(frame_tokens.dtype)
        if frame_mask is not None:
            neck = neck * frame_mask[..., None].to(neck.dtype)
        return BackendOutput(logits=logits, neck=neck, frame_tokens=frame_tokens, cls_token=readout, attentions=None)

    def forward(self, ssl_features: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        """Logits (B, 2) from SSL features (B, T, D_ssl); see :meth:`backend`."""
        return self.backend(ssl_features, frame_mask).logits


class AASISTDetector(Detector, AASISTBackEnd):
    """The detector with the SSL-AASIST back end (``model.backend: aasist``).

    Module and parameter names are the recipe's (``ssl_model``, ``LL``, ``first_bn``,
    ``encoder``, ...; fairseq SSL names are mapped by the checkpoint loader). See
    :class:`~xai_lib.detector.model.Detector` for the arguments and :class:`AASISTBackEnd`
    for the back end, its padding, ``frame_weights`` and the Grad-CAM tap.
    """

    has_attention_maps = False

    def __init__(self, cfg: ModelConfig, ssl_model: Wav2Vec2Model | None = None) -> None:
        ssl_model = ssl_model if ssl_model is not None else build_ssl(cfg.ssl)  # built first: seeded runs
        AASISTBackEnd.__init__(self, cfg, int(ssl_model.config.hidden_size))
        self._attach_ssl(ssl_model)

