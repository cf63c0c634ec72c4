"""RawBoost data augmentation (Tak et al., "RawBoost: a raw data boosting and augmentation
method applied to automatic speaker verification anti-spoofing", ICASSP 2022).

Implemented from the paper's description with :mod:`scipy.signal`; the parameter defaults are
those of the reference recipe. Three noise types and their combinations (``algo``):

====  ==========================================================================
 0    off (the input is returned)
 1    LnL: linear and non-linear convolutive noise (multi-band FIR filters applied
      to x, x^2, ..., x^N_f with decreasing gains)
 2    ISD: impulsive signal-dependent noise (P % of samples get g_sd * x[n] * U(-1,1))
 3    SSI: stationary signal-independent additive noise (white noise coloured by a
      random multi-band filter, SNR uniform in [SNRmin, SNRmax] dB)
 4    1 + 2 + 3 in series
 5    1 + 2 in series   (the ASVspoof LA recipe)
 6    1 + 3 in series
 7    2 + 3 in series   (3 alone is the DF recipe)
 8    1 and 2 in parallel (the two outputs averaged)
====  ==========================================================================

All randomness comes from the ``rng`` passed in, so an augmentation is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal

__all__ = ["RawBoostParams", "rawboost", "lnl_convolutive_noise", "isd_additive_noise", "ssi_additive_noise"]


@dataclass(frozen=True)
class RawBoostParams:
    """The reference recipe's defaults (frequencies in Hz, gains in dB)."""

    n_bands: int = 5  # bands of each multi-band filter
    min_f: float = 20.0  # band centre range
    max_f: float = 8000.0
    min_bw: float = 100.0  # band width range
    max_bw: float = 1000.0
    min_coeff: int = 10  # FIR length range
    max_coeff: int = 100
    min_g: float = 0.0  # gain of the linear term
    max_g: float = 0.0
    min_bias_lin_nonlin: float = 5.0  # non-linear terms are this much weaker (dB)
    max_bias_lin_nonlin: float = 20.0
    n_f: int = 5  # highest non-linear order of LnL
    p: float = 10.0  # ISD: percentage of samples hit
    g_sd: float = 2.0  # ISD: impulse gain relative to the signal
    snr_min: float = 10.0  # SSI: SNR range (dB)
    snr_max: float = 40.0


DEFAULT_PARAMS = RawBoostParams()


def _multiband_filter(rng: np.random.Generator, sample_rate: int, p: RawBoostParams) -> np.ndarray:
    """A random FIR filter: the sum of ``n_bands`` band-pass filters, unit peak gain. (K,)"""
    nyq = sample_rate / 2.0
    n_taps = int(rng.integers(p.min_coeff, p.max_coeff + 1))
    n_taps += 1 - n_taps % 2  # odd length: a linear-phase filter with an integer delay
    h = np.zeros(n_taps)
    for _ in range(p.n_bands):
        fc = rng.uniform(p.min_f, p.max_f)
        bw = rng.uniform(p.min_bw, p.max_bw)
        lo, hi = max(fc - bw / 2.0, 1.0), min(fc + bw / 2.0, nyq - 1.0)
        if hi - lo < 1.0:  # band squeezed against 0 Hz or Nyquist: move it inside
            lo, hi = max(1.0, nyq - 1.0 - bw), nyq - 1.0
        h += signal.firwin(n_taps, [lo, hi], window="hamming", pass_zero=False, fs=sample_rate)
    peak = np.abs(np.fft.rfft(h, 1024)).max()
    return h / max(peak, 1e-8)


def _filter_same(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Linear-phase FIR filtering without delay, same length as ``x``."""
    return np.convolve(x, h, mode="same")


def _match_peak(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    peak_y, peak_ref = np.abs(y).max(initial=0.0), np.abs(ref).max(initial=0.0)
    if peak_y < 1e-12:
        return y
    return y * (peak_ref / peak_y if peak_ref > 0 else 1.0)


def lnl_convolutive_noise(
    x: np.ndarray, sample_rate: int, rng: np.random.Generator, p: RawBoostParams = DEFAULT_PARAMS
) -> np.ndarray:
    """Linear and non-linear convolutive noise: ``sum_j g_j * (h_j * x^j)``, j = 1..n_f.

    Each order j has its own random multi-band filter h_j; the linear term's gain is drawn
    in [min_g, max_g] dB, the non-linear terms' in [min_g - max_bias, max_g - min_bias] dB.
    The output is scaled back to the input's peak level.
    """
    y = np.zeros_like(x, dtype=np.float64)
    for j in range(1, p.n_f + 1):
        if j == 1:
            g_db = rng.uniform(p.min_g, p.max_g)
        else:
            g_db = rng.uniform(p.min_g - p.max_bias_lin_nonlin, p.max_g - p.min_bias_lin_nonlin)
        h = _multiband_filter(rng, sample_rate, p)
        y += 10.0 ** (g_db / 20.0) * _filter_same(np.power(x, j), h)
    return _match_peak(y, x)


def isd_additive_noise(x: np.ndarray, rng: np.random.Generator, p: RawBoostParams = DEFAULT_PARAMS) -> np.ndarray:
    """Impulsive signal-dependent noise: P % of the samples get ``g_sd * x[n] * U(-1, 1)`` added."""
    y = np.array(x, dtype=np.float64, copy=True)
    n_hit = int(round(len(x) * p.p / 100.0))
    if n_hit == 0:
        return y
    idx = rng.choice(len(x), size=n_hit, replace=False)
    y[idx] += p.g_sd * x[idx] * rng.uniform(-1.0, 1.0, size=n_hit)
    return y


def ssi_additive_noise(
    x: np.ndarray, sample_rate: int, rng: np.random.Generator, p: RawBoostParams = DEFAULT_PARAMS
) -> np.ndarray:
    """Stationary signal-independent noise: white noise through a random multi-band filter,
    added at an SNR drawn uniformly in [snr_min, snr_max] dB."""
    noise = _filter_same(rng.standard_normal(len(x)), _multiband_filter(rng, sample_rate, p))
    snr_db = rng.uniform(p.snr_min, p.snr_max)
    p_sig, p_noise = float(np.mean(np.square(x))), float(np.mean(np.square(noise)))
    if p_sig <= 0 or p_noise <= 0:
        return np.asarray(x, dtype=np.float64)
    scale = np.sqrt(p_sig / (p_noise * 10.0 ** (snr_db / 10.0)))
    return x + scale * noise


def rawboost(
    x: np.ndarray,
    algo: int,
    sample_rate: int,
    rng: np.random.Generator,
    params: RawBoostParams = DEFAULT_PARAMS,
) -> np.ndarray:
    """Apply RawBoost algorithm ``algo`` (0..8, see the module docstring).

    Args:
        x: (N,) waveform.
        algo: 0 = off, 1..8 as in the reference recipe.
        sample_rate: sampling rate of ``x`` in Hz.
        rng: the source of randomness.
        params: the noise parameters (the recipe's defaults).

    Returns:
        (N,) float32, finite.
    """
    if algo == 0:
        return x
    if not 1 <= algo <= 8:
        raise ValueError(f"RawBoost algo must be 0 (off) or 1..8, got {algo}")
    if len(x) == 0:
        return np.asarray(x, dtype=np.float32)
    x64 = np.asarray(x, dtype=np.float64)
    if algo == 1:
        y = lnl_convolutive_noise(x64, sample_rate, rng, params)
    elif algo == 2:
        y = isd_additive_noise(x64, rng, params)
    elif algo == 3:
        y = ssi_additive_noise(x64, sample_rate, rng, params)
    elif algo == 4:
        y = lnl_convolutive_noise(x64, sample_rate, rng, params)
        y = isd_additive_noise(y, rng, params)
        y = ssi_additive_noise(y, sample_rate, rng, params)
    elif algo == 5:
        y = isd_additive_noise(lnl_convolutive_noise(x64, sample_rate, rng, params), rng, params)
    elif algo == 6:
        y = ssi_additive_noise(lnl_convolutive_noise(x64, sample_rate, rng, params), sample_rate, rng, params)
    elif algo == 7:
        y = ssi_additive_noise(isd_additive_noise(x64, rng, params), sample_rate, rng, params)
    else:  # 8: parallel LnL and ISD, averaged
        y1 = lnl_convolutive_noise(x64, sample_rate, rng, params)
        y2 = isd_additive_noise(x64, rng, params)
        y = _match_peak(0.5 * (y1 + y2), x64)
    y = np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
    return y.astype(np.float32)
