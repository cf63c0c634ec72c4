"""A toy detector with a known answer, shared by the explanation tests."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

HOP = 320


class FrameEnergyDetector(nn.Module):
    """A detector whose spoof evidence is planted: the energy of the frames.

    Frame t covers samples [320 t, 320 (t + 1)); its feature is the frame's mean squared sample.
    The spoof logit is ``gain * (scale * sum_t keep_t x_t - offset)``, so an utterance with a few
    loud frames is spoof because of exactly those frames; the bona fide logit (the score) is its
    negative. It has the detector interface the explanation code uses (``frontend``, ``backend``
    with ``frame_weights``, ``num_frames``, ``frame_hop_s``, ``min_input_samples``).
    """

    frame_hop_s = 0.02
    min_input_samples = HOP

    def __init__(self, scale: float = 2.0, offset: float = 3.0) -> None:
        super().__init__()
        self.scale, self.offset = float(scale), float(offset)
        self.gain = nn.Parameter(torch.tensor(1.0))

    def num_frames(self, lengths):
        return torch.as_tensor(lengths, dtype=torch.long) // HOP

    def frontend(self, wave, lengths=None):
        B, L = wave.shape
        T = L // HOP
        feats = (wave[:, : T * HOP].reshape(B, T, HOP) ** 2).mean(-1, keepdim=True)  # (B, T, 1)
        n = self.num_frames(lengths if lengths is not None else torch.full((B,), L)).to(wave.device)
        mask = torch.arange(T, device=wave.device)[None, :] < n[:, None]
        return feats * mask[..., None], mask

    def backend(self, ssl_features, frame_mask=None, frame_weights=None, output_attentions=False):
        x = ssl_features[..., 0]  # (B, T)
        if frame_mask is not None:
            x = x * frame_mask
        if frame_weights is not None:
            x = x * frame_weights
        s = self.gain * (self.scale * x.sum(dim=1) - self.offset)  # spoof evidence
        return SimpleNamespace(logits=torch.stack([s, -s], dim=1), attentions=None)

    def forward(self, wave, lengths=None, output_attentions=False):
        return self.backend(*self.frontend(wave, lengths))
