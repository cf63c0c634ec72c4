"""The embedded default corpus: a deterministic synthetic ASVspoof-2019-LA-style database.

No download is possible or needed: :func:`generate_corpus` writes a small seeded corpus in
the ASVspoof 2019 LA layout, so the loaders for real data serve it unchanged::

    OUT/ASVspoof2019_LA_{train,dev,eval}/flac/LA_{T,D,E}_NNNNNNN.flac
    OUT/ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.{train.trn,dev.trl,eval.trl}.txt
    OUT/partial_spoof/{dev,eval}/flac/CON_{D,E}_NNNNNNN.flac
    OUT/partial_spoof/protocols/PartialSpoof.LA.cm.{dev,eval}.trl.txt
    OUT/partial_spoof/segment_labels/{dev,eval}_seglab_0.02.npy   # '1' bona fide / '0' spoof per 20 ms
    OUT/partial_spoof/spans_{dev,eval}.json                       # utt -> [[start, end), ...] samples
    OUT/partial_spoof/sources/{dev,eval}/CON_{D,E}_NNNNNNN.flac     # the same utterance, nothing spliced
    OUT/corpus.json                                               # seed, size, counts, attacks, timing

**Bona fide** utterances are procedurally synthesized speech-like signals (source-filter):
a Rosenberg glottal pulse train with per-period jitter and shimmer and a moving F0 contour
(declination, word accents, drift) per speaker (each speaker has its own F0 range, formant
scaling, jitter, shimmer and breathiness), a cascade of five formant resonators moving between
vowel targets, noise-excited fricatives and stop bursts, pauses; then a random room (short
exponentially decaying impulse response with a random direct-to-reverberant ratio and
microphone tilt), then coloured background noise at 30-50 dB SNR.

**Spoofs** are freshly synthesized content of the same kind, coloured by the same room
distribution (as a TTS/VC system models a recorded speaker), passed through one *attack*
(a vocoder-like artifact), then the *same* noise distribution, so neither room, noise,
silence nor level is a cue: every utterance is normalised to an active-speech RMS drawn
uniformly in [-26, -20] dBFS whatever its class. Attacks (:data:`ATTACKS`):

- A01 Griffin-Lim phase reconstruction with few iterations (phasiness),
- A02 mel-inversion smoothing (a temporally smoothed 16-28 band mel spectrogram inverted to
  a smooth envelope on the original phase: smeared harmonics),
- A03 band-limiting to 8 kHz and 2x upsampling with a short interpolation filter (images above 4 kHz),
- A04 buzz-excited LPC resynthesis without jitter/shimmer (impulse train at the smooth F0),
- A05 unit concatenation: 20-60 ms units, some repeated or misaligned, joined with hard seams (unseen),
- A06 low-bit (4-6 bit) mu-law companding quantisation (unseen).

Train and dev use A01-A04; eval uses A01 and A04 (seen) plus A05 and A06 (unseen).

**Partially spoofed** dev/eval subsets: a bona fide utterance with 1-3 spans of 0.2-1.5 s
(placed over speech, at least 0.1 s apart) replaced by the level-matched attacked version of
the same content (5 ms raised-cosine fades inside the span), labelled spoof with the attack
used. The 20 ms segment labels mark a segment spoof ('0') iff it overlaps a recorded span.
Beside each partially spoofed utterance its **bona fide source** is saved
(``partial_spoof/sources/{dev,eval}/``): the same content, room, noise realisation and level
without the splice, so outside the spans it is sample for sample the spliced file and inside
them it is the genuine speech the attack replaced (counterfactual restoration,
:mod:`xai_lib.explanation.sanity`). Sources are extra files: the other files are unchanged, and a
corpus written before them (``corpus.json`` without ``"bonafide_sources"``) simply has none.

The bona fide fraction is 30 % in every split (ASVspoof 2019 LA has about 10 %): enough bona
fide examples for a tiny detector to learn from, while keeping the spoof-majority imbalance
the weighted cross-entropy of the recipe is designed for.

Determinism: every utterance is rendered from its own seed ``(seed, split, index)``, so the
output is byte-identical for a seed whatever the number of worker processes.

CLI: ``python -m xai_lib.data.synthetic --out DIR [--seed N] [--size tiny|demo] [--workers N]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view
from scipy import fft as sp_fft
from scipy import ndimage, signal

from xai_lib.data.audio import splice

__all__ = [
    "SAMPLE_RATE",
    "SEGMENT_S",
    "BONAFIDE_FRACTION",
    "SIZES",
    "ATTACKS",
    "TRAIN_ATTACKS",
    "EVAL_ATTACKS",
    "GENERATOR_VERSION",
    "DEMO_CORPUS",
    "SOURCES_DIR",
    "source_path",
    "ensure_demo_corpus",
    "CorpusSize",
    "generate_corpus",
    "segment_labels_from_spans",
    "main",
]

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
SEGMENT_S = 0.02  # PartialSpoof-style segment-label resolution
GENERATOR_VERSION = 2
_GENERATOR_NAME = "xai_lib.data.synthetic"  # also when run as __main__
BONAFIDE_FRACTION = 0.3

ATTACKS: dict[str, str] = {
    "A01": "Griffin-Lim phase reconstruction from the STFT magnitude with 2-5 iterations (phasiness)",
    "A02": "mel-inversion smoothing: 16-28 band mel power, smoothed over 5-9 frames, inverted to a smooth envelope on the original phase",
    "A03": "band-limiting to 8 kHz and 2x upsampling with a short (3-7 tap) interpolation filter: spectral images above 4 kHz",
    "A04": "buzz-excited LPC resynthesis (order 18, 8 ms frames): impulse train at the smooth F0 without jitter/shimmer, noise when unvoiced",
    "A05": "unit concatenation: 20-60 ms units, some repeated or misaligned by up to 12 ms, joined with hard seams",
    "A06": "low-bit quantisation: 4-6 bit mu-law companding without dither",
}
TRAIN_ATTACKS: tuple[str, ...] = ("A01", "A02", "A03", "A04")
EVAL_ATTACKS: tuple[str, ...] = ("A01", "A04", "A05", "A06")


@dataclass(frozen=True)
class CorpusSize:
    """How many utterances of which length a corpus size holds."""

    train: int
    dev: int
    eval: int
    partial_dev: int
    partial_eval: int
    min_s: float  # utterance duration range (seconds)
    max_s: float
    speakers: tuple[int, int, int]  # speakers in train / dev / eval (disjoint)


SIZES: dict[str, CorpusSize] = {
    "tiny": CorpusSize(24, 16, 24, 6, 6, 1.0, 2.0, (4, 3, 3)),
    "demo": CorpusSize(400, 200, 300, 40, 60, 1.5, 3.5, (10, 6, 8)),
}

# split name -> (utterance prefix, speaker pool, attacks, partial?)
_SPLITS: dict[str, tuple[str, str, tuple[str, ...], bool]] = {
    "train": ("LA_T_", "train", TRAIN_ATTACKS, False),
    "dev": ("LA_D_", "dev", TRAIN_ATTACKS, False),
    "eval": ("LA_E_", "eval", EVAL_ATTACKS, False),
    "partial_dev": ("CON_D_", "dev", TRAIN_ATTACKS, True),
    "partial_eval": ("CON_E_", "eval", EVAL_ATTACKS, True),
}
_SPEAKER_BASE = {"train": 1, "dev": 31, "eval": 61}
_PROTOCOL_NAMES = {
    "train": "ASVspoof2019.LA.cm.train.trn.txt",
    "dev": "ASVspoof2019.LA.cm.dev.trl.txt",
    "eval": "ASVspoof2019.LA.cm.eval.trl.txt",
}
#: Where the bona fide sources of the partially spoofed utterances go, under the corpus root.
SOURCES_DIR = "partial_spoof/sources"
_OWNED = ("ASVspoof2019_LA_train", "ASVspoof2019_LA_dev", "ASVspoof2019_LA_eval", "ASVspoof2019_LA_cm_protocols", "partial_spoof")


# ----------------------------------------------------------------------------- speakers and jobs


@dataclass(frozen=True)
class Speaker:
    """Voice parameters of one synthetic speaker."""

    speaker_id: str
    f0_hz: float  # mean F0
    f0_range_st: float  # declination span in semitones
    formant_scale: float  # vocal-tract length factor (>1: shorter tract, higher formants)
    jitter: float  # std of the relative period perturbation
    shimmer: float  # std of the relative per-period amplitude perturbation
    breathiness: float  # aspiration noise relative to the voiced source
    open_quotient: float  # glottal open phase / period


def _make_speakers(rng: np.random.Generator, pool: str, count: int) -> list[Speaker]:
    out = []
    for i in range(count):
        female = i % 2 == 1
        out.append(
            Speaker(
                speaker_id=f"LA_{_SPEAKER_BASE[pool] + i:04d}",
                f0_hz=float(rng.uniform(170, 235) if female else rng.uniform(90, 135)),
                f0_range_st=float(rng.uniform(2.0, 6.0)),
                formant_scale=float(rng.uniform(1.08, 1.2) if female else rng.uniform(0.9, 1.02)),
                jitter=float(rng.uniform(0.004, 0.012)),
                shimmer=float(rng.uniform(0.02, 0.06)),
                breathiness=float(rng.uniform(0.03, 0.15)),
                open_quotient=float(rng.uniform(0.5, 0.7)),
            )
        )
    return out


@dataclass(frozen=True)
class _Job:
    split: str
    utt_id: str
    speaker: Speaker
    label: int  # 1 bona fide, 0 spoof
    attack: str  # "-" for bona fide
    n_samples: int
    partial: bool
    seed: tuple[int, ...]
    path: str
    source: str = ""  # partial spoofs: where the un-spliced bona fide source goes


# ----------------------------------------------------------------------------- content synthesis

# F1..F5 (Hz) of a few vowels for an adult male vocal tract (scaled per speaker)
_VOWELS = np.array(
    [
        [270, 2290, 3010, 3500, 4500],  # i
        [400, 2000, 2550, 3550, 4500],  # e
        [660, 1720, 2410, 3500, 4500],  # ae
        [730, 1090, 2440, 3400, 4400],  # a
        [570, 840, 2410, 3400, 4400],  # o
        [300, 870, 2240, 3400, 4400],  # u
        [490, 1350, 1690, 3300, 4400],  # er
        [520, 1190, 2390, 3400, 4400],  # schwa
    ],
    dtype=np.float64,
)
_BANDWIDTHS = np.array([80.0, 100.0, 140.0, 200.0, 260.0])
_HOP = 80  # control-rate hop: 5 ms


@dataclass
class _Content:
    """Dry (room-free) speech-like content and its control tracks, all (N,)."""

    wave: np.ndarray
    f0: np.ndarray  # smooth F0 contour (Hz), jitter-free
    voicing: np.ndarray  # voiced-source envelope in [0, 1]
    activity: np.ndarray  # bool: speech (voiced or fricative) present


_FRICATIVE_SOS: list[np.ndarray] | None = None


def _fricative_filters() -> list[np.ndarray]:
    global _FRICATIVE_SOS
    if _FRICATIVE_SOS is None:
        fs = SAMPLE_RATE
        _FRICATIVE_SOS = [
            signal.butter(4, 3800, btype="highpass", fs=fs, output="sos"),  # s
            signal.butter(2, [1900, 4600], btype="bandpass", fs=fs, output="sos"),  # sh
            signal.butter(1, [900, 7400], btype="bandpass", fs=fs, output="sos"),  # f / h
            signal.butter(2, 600, btype="highpass", fs=fs, output="sos"),  # stop burst
        ]
    return _FRICATIVE_SOS


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving Hann-window average along the first axis (same length)."""
    if width <= 1:
        return x
    w = np.hanning(width + 2)[1:-1]
    w /= w.sum()
    if x.ndim == 1:
        return np.convolve(np.pad(x, (width, width), mode="edge"), w, mode="same")[width:-width]
    return np.stack([_smooth(x[:, k], width) for k in range(x.shape[1])], axis=1)


def _plan(n_ctrl: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Segment plan at the control rate.

    Returns:
        voice (C,) voiced amplitude, fric (C, 4) noise amplitude per fricative type,
        vowel (C,) vowel index (-1 = none), words [(start, end)] in control frames.
    """
    ctrl_s = _HOP / SAMPLE_RATE
    voice = np.zeros(n_ctrl)
    fric = np.zeros((n_ctrl, 4))
    vowel = np.full(n_ctrl, -1, dtype=np.int64)
    words: list[tuple[int, int]] = []
    t = int(rng.uniform(0.08, 0.25) / ctrl_s)
    end = n_ctrl - int(rng.uniform(0.08, 0.25) / ctrl_s)

    def frames(lo: float, hi: float) -> int:
        return max(1, int(round(rng.uniform(lo, hi) / ctrl_s)))

    while t < end - 10:
        w0 = t
        for _ in range(int(rng.integers(1, 4))):  # syllables
            onset = rng.random()
            if onset < 0.35:  # fricative
                d = frames(0.05, 0.12)
                fric[t : min(t + d, end), int(rng.integers(0, 3))] = rng.uniform(0.12, 0.35)
                t += d
            elif onset < 0.6:  # stop: closure then burst
                t += frames(0.03, 0.06)
                d = frames(0.008, 0.02)
                fric[t : min(t + d, end), 3] = rng.uniform(0.3, 0.6)
                t += d
            d = frames(0.08, 0.22)
            voice[t : min(t + d, end)] = rng.uniform(0.6, 1.0)
            vowel[t : min(t + d, end)] = int(rng.integers(0, len(_VOWELS)))
            t += d
            if t >= end:
                break
        words.append((w0, min(t, end)))
        t += frames(0.15, 0.35) if rng.random() < 0.2 else frames(0.02, 0.08)
    return voice, fric, vowel, words


def _glottal_source(
    f0: np.ndarray, spk: Speaker, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rosenberg glottal flow derivative with jitter and shimmer. Returns (source, flow), (N,)."""
    n = len(f0)
    n_periods = int(n * spk.f0_hz * 1.6 / SAMPLE_RATE) + 4
    jit = 1.0 + spk.jitter * rng.standard_normal(n_periods)
    period_idx = np.minimum((np.arange(n) * spk.f0_hz / SAMPLE_RATE).astype(np.int64), n_periods - 1)
    phase = np.cumsum(f0 * jit[period_idx]) / SAMPLE_RATE
    cycle = phase.astype(np.int64)
    frac = phase - cycle
    tp, tn = 0.6 * spk.open_quotient, 0.4 * spk.open_quotient
    flow = np.where(
        frac < tp,
        0.5 * (1.0 - np.cos(np.pi * frac / tp)),
        np.where(frac < tp + tn, np.cos(0.5 * np.pi * (frac - tp) / tn), 0.0),
    )
    shim = 1.0 + spk.shimmer * rng.standard_normal(int(cycle[-1]) + 2)
    flow = flow * shim[cycle]
    source = np.diff(flow, prepend=0.0)
    return source, flow


def _blockwise_allpole(x: np.ndarray, gain: np.ndarray, den: np.ndarray, block: int, n_fft: int) -> np.ndarray:
    """Time-varying all-pole filtering: block b of ``x`` is convolved with the impulse response
    of ``gain[b] / den[b](z)`` and the results are overlap-added (exact input-switched
    filtering up to the response tail beyond ``n_fft - block`` samples, which is negligible here).

    Args:
        x: (N,) input.
        gain: (B,) numerators; den: (B, P+1) denominators with den[:, 0] = 1; B * block >= N.
        block: block length; n_fft: FFT size, a multiple of ``block``.
    """
    n = len(x)
    n_blocks = int(math.ceil(n / block))
    blocks = np.zeros((n_blocks, n_fft))
    padded = np.zeros(n_blocks * block)
    padded[:n] = x
    blocks[:, :block] = padded.reshape(n_blocks, block)
    response = gain[:n_blocks, None] / sp_fft.rfft(den[:n_blocks], n_fft, axis=1)  # (B, F)
    filtered = sp_fft.irfft(sp_fft.rfft(blocks, axis=1) * response, n_fft, axis=1)  # (B, n_fft)
    out = np.zeros((n_blocks - 1) * block + n_fft)
    for r in range(n_fft // block):
        out[r * block : (r + n_blocks) * block] += filtered[:, r * block : (r + 1) * block].reshape(-1)
    return out[:n]


_TRACT_BLOCK = 128  # vocal-tract filter update: 8 ms


def _formant_filter(x: np.ndarray, formants: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Time-varying cascade of second-order resonators (unit DC gain), updated every 8 ms.

    Args:
        x: (N,) excitation.
        formants: (B, K) centre frequencies (Hz) per 8 ms block; B * 128 >= N.
        bandwidths: (K,) bandwidths (Hz).
    """
    r = np.exp(-np.pi * bandwidths / SAMPLE_RATE)[None, :]  # (1, K)
    theta = 2.0 * np.pi * formants / SAMPLE_RATE  # (B, K)
    a1, a2 = -2.0 * r * np.cos(theta), np.broadcast_to(r * r, theta.shape)
    n_blocks, k = formants.shape
    den = np.ones((n_blocks, 1))
    for j in range(k):  # multiply the second-order denominators, row by row
        nxt = np.zeros((n_blocks, den.shape[1] + 2))
        nxt[:, :-2] += den
        nxt[:, 1:-1] += a1[:, j : j + 1] * den
        nxt[:, 2:] += a2[:, j : j + 1] * den
        den = nxt
    gain = np.prod(1.0 + a1 + a2, axis=1)  # unit gain at DC
    return _blockwise_allpole(x, gain, den, _TRACT_BLOCK, 1024)


def _synthesize_content(spk: Speaker, n: int, rng: np.random.Generator) -> _Content:
    """Dry speech-like content of ``n`` samples for speaker ``spk``."""
    n_ctrl = int(math.ceil(n / _HOP)) + 1
    ctrl_t = np.arange(n_ctrl) * _HOP
    voice_c, fric_c, vowel_c, words = _plan(n_ctrl, rng)

    # F0: declination + word accents + slow drift, in semitones around the speaker's mean
    pos = np.linspace(0.5, -0.5, n_ctrl) * spk.f0_range_st
    for w0, w1 in words:
        centre = rng.uniform(w0, max(w0 + 1, w1))
        pos += rng.uniform(0.5, 3.0) * np.exp(-0.5 * ((np.arange(n_ctrl) - centre) / 20.0) ** 2)
    pos += _smooth(rng.standard_normal(n_ctrl), 40) * 3.0
    f0_c = spk.f0_hz * 2.0 ** (pos / 12.0)

    # formant tracks: move linearly between vowel targets, with a small wander
    targets = _VOWELS * spk.formant_scale
    voiced_idx = np.flatnonzero(vowel_c >= 0)
    if len(voiced_idx) == 0:
        form_c = np.repeat(targets[7][None], n_ctrl, axis=0)
    else:
        form_c = np.stack(
            [np.interp(np.arange(n_ctrl), voiced_idx, targets[vowel_c[voiced_idx], k]) for k in range(5)], axis=1
        )
    form_c = _smooth(form_c, 12) * (1.0 + 0.02 * _smooth(rng.standard_normal((n_ctrl, 5)), 30))
    form_c = np.minimum(form_c, 0.45 * SAMPLE_RATE)
    bandwidths = _BANDWIDTHS * rng.uniform(0.8, 1.3)

    # sample-rate tracks
    t = np.arange(n)
    voice = np.interp(t, ctrl_t, _smooth(voice_c, 4))
    f0 = np.interp(t, ctrl_t, f0_c)
    source, flow = _glottal_source(f0, spk, rng)
    voiced_rms = np.sqrt(np.mean(source[voice > 0.3] ** 2)) if np.any(voice > 0.3) else 1.0
    source = source / max(voiced_rms, 1e-9)
    aspiration = spk.breathiness * rng.standard_normal(n) * (0.3 + flow)
    tract_in = (source + aspiration) * voice
    block_centres = (np.arange(int(math.ceil(n / _TRACT_BLOCK))) + 0.5) * _TRACT_BLOCK
    form_b = np.stack([np.interp(block_centres, ctrl_t, form_c[:, k]) for k in range(5)], axis=1)
    speech = _formant_filter(tract_in, form_b, bandwidths)
    speech /= max(np.sqrt(np.mean(speech[voice > 0.3] ** 2)) if np.any(voice > 0.3) else 1.0, 1e-9)

    fric_env = np.zeros(n)
    for k, sos in enumerate(_fricative_filters()):
        env = np.interp(t, ctrl_t, _smooth(fric_c[:, k], 3))
        on = np.flatnonzero(env > 0)
        if len(on) == 0:
            continue
        lo, hi = max(0, on[0] - 256), min(n, on[-1] + 1)  # filter only where this noise sounds
        noise = signal.sosfilt(sos, rng.standard_normal(hi - lo))
        speech[lo:hi] += noise / max(np.std(noise[256:] if hi - lo > 512 else noise), 1e-9) * env[lo:hi]
        fric_env = np.maximum(fric_env, env)
    return _Content(speech, f0, np.clip(voice, 0.0, 1.0), (voice > 0.1) | (fric_env > 0.05))


# ----------------------------------------------------------------------------- room, noise, level


def _room(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random room impulse response and microphone tilt (the 'recording' of the content)."""
    n = len(x)
    rt60 = rng.uniform(0.1, 0.5)
    length = int(rng.uniform(0.03, 0.2) * SAMPLE_RATE)
    tail = rng.standard_normal(length) * np.exp(-6.9 * np.arange(length) / (rt60 * SAMPLE_RATE))
    tail[: int(0.002 * SAMPLE_RATE)] = 0.0  # the first reflections arrive after 2 ms
    drr_db = rng.uniform(3.0, 15.0)
    tail *= np.sqrt(10.0 ** (-drr_db / 10.0) / max(np.sum(tail**2), 1e-12))
    tail[0] = 1.0  # direct path
    y = signal.fftconvolve(x, tail)[:n]
    tilt = rng.uniform(-0.4, 0.4)  # first-order microphone colouration
    return signal.lfilter([1.0, -tilt], [1.0], y) / (1.0 + abs(tilt))


def _add_noise(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Coloured background noise at 30-50 dB SNR (bona fide and spoof alike)."""
    n = len(y)
    noise = signal.lfilter([1.0], [1.0, -rng.uniform(0.7, 0.98)], rng.standard_normal(n))
    snr_db = rng.uniform(30.0, 50.0)
    noise *= np.sqrt(_active_power(y) / (np.mean(noise**2) * 10.0 ** (snr_db / 10.0)))
    return y + noise


def _active_power(x: np.ndarray, frame: int = 320) -> float:
    """Mean power of the frames within 35 dB of the loudest one (speech activity)."""
    n = len(x) // frame * frame
    if n == 0:
        return float(np.mean(x**2)) + 1e-12
    e = np.mean(x[:n].reshape(-1, frame) ** 2, axis=1)
    active = e >= e.max() * 10.0 ** (-35.0 / 10.0)
    return float(np.mean(e[active])) + 1e-12


def _normalise_level(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scale to an active-speech level drawn uniformly in [-26, -20] dBFS (peak kept below 0.98)."""
    target_db = rng.uniform(-26.0, -20.0)
    y = x * (10.0 ** (target_db / 20.0) / np.sqrt(_active_power(x)))
    peak = np.abs(y).max()
    if peak > 0.98:
        y *= 0.98 / peak
    return y


def _same_noise_and_level(clean: np.ndarray, dry: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``clean`` with the noise and gain that ``_normalise_level(_add_noise(dry, rng), rng)`` gives ``dry``.

    ``rng`` must be in the state ``_add_noise`` started from. The arithmetic repeats those two
    functions step by step, so wherever ``clean`` equals ``dry`` the result equals theirs exactly.
    """
    n = len(dry)
    noise = signal.lfilter([1.0], [1.0, -rng.uniform(0.7, 0.98)], rng.standard_normal(n))
    snr_db = rng.uniform(30.0, 50.0)
    noise *= np.sqrt(_active_power(dry) / (np.mean(noise**2) * 10.0 ** (snr_db / 10.0)))
    noisy_dry, noisy_clean = dry + noise, clean + noise
    target_db = rng.uniform(-26.0, -20.0)
    gain = 10.0 ** (target_db / 20.0) / np.sqrt(_active_power(noisy_dry))
    y, out = noisy_dry * gain, noisy_clean * gain
    peak = np.abs(y).max()
    if peak > 0.98:
        out *= 0.98 / peak
    return out


def source_path(root: str | Path, split: str, utt_id: str) -> Path:
    """Where the corpus at ``root`` keeps the bona fide source of partially spoofed ``utt_id`` of
    ``split`` ("dev" or "eval"); the file exists only in corpora written with sources."""
    return Path(root) / SOURCES_DIR / split / f"{utt_id}.flac"


# ----------------------------------------------------------------------------- attacks

_N_FFT, _STFT_HOP = 512, 128
_WINDOW = np.hanning(_N_FFT + 1)[:-1]  # periodic Hann


def _stft(x: np.ndarray) -> np.ndarray:
    """(N,) -> (T, F) complex, centred frames (zero padding)."""
    pad = _N_FFT // 2
    n_frames = 1 + int(math.ceil(len(x) / _STFT_HOP))
    xp = np.zeros((n_frames - 1) * _STFT_HOP + _N_FFT)
    xp[pad : pad + len(x)] = x
    frames = sliding_window_view(xp, _N_FFT)[::_STFT_HOP]
    return sp_fft.rfft(frames * _WINDOW, axis=1)


def _istft(spec: np.ndarray, n: int) -> np.ndarray:
    """(T, F) complex -> (n,) by weighted overlap-add (inverse of :func:`_stft`)."""
    frames = sp_fft.irfft(spec, _N_FFT, axis=1) * _WINDOW  # (T, n_fft)
    n_frames = frames.shape[0]
    out = np.zeros((n_frames - 1) * _STFT_HOP + _N_FFT)
    for r in range(_N_FFT // _STFT_HOP):
        sl = slice(r * _STFT_HOP, (r + 1) * _STFT_HOP)
        out[r * _STFT_HOP : (r + n_frames) * _STFT_HOP] += frames[:, sl].reshape(-1)
    pad = _N_FFT // 2
    return out[pad : pad + n] / _window_sum(n_frames)[pad : pad + n]


_WSUM_CACHE: dict[int, np.ndarray] = {}


def _window_sum(n_frames: int) -> np.ndarray:
    """Overlap-added squared window of ``n_frames`` frames (the ISTFT normaliser)."""
    if n_frames not in _WSUM_CACHE:
        w = np.zeros((n_frames - 1) * _STFT_HOP + _N_FFT)
        for t in range(n_frames):
            w[t * _STFT_HOP : t * _STFT_HOP + _N_FFT] += _WINDOW**2
        _WSUM_CACHE[n_frames] = np.maximum(w, 1e-8)
    return _WSUM_CACHE[n_frames]


def _attack_griffin_lim(c: _Content, rng: np.random.Generator) -> np.ndarray:
    mag = np.abs(_stft(c.wave))
    angles = np.exp(2j * np.pi * rng.random(mag.shape))
    for _ in range(int(rng.integers(2, 6))):
        angles = _stft(_istft(mag * angles, len(c.wave)))
        angles /= np.abs(angles) + 1e-12
    return _istft(mag * angles, len(c.wave))


def _mel_filterbank(n_mels: int) -> np.ndarray:
    """(n_mels, F) triangular HTK-mel filters over 0 .. fs/2."""
    freqs = np.fft.rfftfreq(_N_FFT, 1.0 / SAMPLE_RATE)
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    edges = 700.0 * (10.0 ** (np.linspace(0.0, mel(SAMPLE_RATE / 2), n_mels + 2) / 2595.0) - 1.0)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down))


def _attack_mel_smoothing(c: _Content, rng: np.random.Generator) -> np.ndarray:
    spec = _stft(c.wave)
    fb = _mel_filterbank(int(rng.integers(16, 29)))  # (M, F)
    mel = (np.abs(spec) ** 2) @ fb.T  # (T, M)
    mel = ndimage.uniform_filter1d(mel, int(rng.integers(5, 10)), axis=0, mode="nearest")
    band_mean = mel / np.maximum(fb.sum(axis=1), 1e-12)[None]  # mean power per bin of each band
    weights = fb / np.maximum(fb.sum(axis=0, keepdims=True), 1e-12)  # interpolate bands -> bins
    power = np.maximum(band_mean @ weights, 0.0)  # (T, F)
    return _istft(np.sqrt(power) * spec / (np.abs(spec) + 1e-12), len(c.wave))


def _attack_band_limit(c: _Content, rng: np.random.Generator) -> np.ndarray:
    low = signal.resample_poly(c.wave, 1, 2)  # 8 kHz, anti-aliased
    up = np.zeros(2 * len(low))
    up[::2] = low
    taps = int(rng.choice([3, 5, 7]))
    h = 2.0 * signal.firwin(taps, 0.5)  # a short interpolator leaves images above 4 kHz
    return np.convolve(up, h, mode="same")[: len(c.wave)]


def _levinson(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levinson-Durbin over rows. r: (B, p+1) autocorrelation -> a (B, p+1) with a[:,0]=1, err (B,)."""
    b, p1 = r.shape
    a = np.zeros((b, p1))
    a[:, 0] = 1.0
    err = r[:, 0].copy()
    for i in range(1, p1):
        acc = r[:, i] + np.sum(a[:, 1:i] * r[:, i - 1 : 0 : -1], axis=1)
        k = -acc / np.maximum(err, 1e-12)
        a_prev = a[:, 1:i].copy()
        a[:, 1:i] = a_prev + k[:, None] * a_prev[:, ::-1]
        a[:, i] = k
        err = err * (1.0 - k * k)
    return a, np.maximum(err, 0.0)


def _attack_lpc_buzz(c: _Content, rng: np.random.Generator) -> np.ndarray:
    order, frame, hop = 18, 400, 128  # 25 ms analysis windows, 8 ms synthesis blocks
    n = len(c.wave)
    window = np.hamming(frame)
    pre = signal.lfilter([1.0, -0.97], [1.0], c.wave)
    n_blocks = int(math.ceil(n / hop))
    padded = np.zeros(n_blocks * hop + frame)
    offset = frame // 2 - hop // 2  # analysis window centred on its synthesis block
    padded[offset : offset + n] = pre
    frames = sliding_window_view(padded, frame)[::hop][:n_blocks] * window  # (B, frame)
    r = sp_fft.irfft(np.abs(sp_fft.rfft(frames, 512, axis=1)) ** 2, 512, axis=1)[:, : order + 1]
    r[:, 0] = r[:, 0] * 1.0001 + 1e-10  # white-noise correction keeps the filters stable
    r *= np.exp(-0.5 * (2 * np.pi * 60.0 * np.arange(order + 1) / SAMPLE_RATE) ** 2)  # lag window
    a, err = _levinson(r)
    gain = np.sqrt(err / np.sum(window**2))
    # excitation: jitter-free impulse train at the smooth F0 when voiced, white noise otherwise
    phase = np.cumsum(c.f0) / SAMPLE_RATE
    pulses = np.diff(np.floor(phase), prepend=0.0) * np.sqrt(SAMPLE_RATE / c.f0)
    v = np.clip(c.voicing * 1.5, 0.0, 1.0)
    exc = v * pulses + (1.0 - v) * rng.standard_normal(n)
    out = _blockwise_allpole(exc, gain, a, hop, 1024)
    out = signal.lfilter([1.0], [1.0, -0.97], out)
    return np.nan_to_num(out)


def _attack_concatenation(c: _Content, rng: np.random.Generator) -> np.ndarray:
    x, n = c.wave, len(c.wave)
    out = np.empty(n)
    pos = 0
    while pos < n:
        length = int(rng.uniform(0.02, 0.06) * SAMPLE_RATE)
        u = rng.random()
        if u < 0.2 and pos >= length:
            src = pos - length  # the previous unit again
        elif u < 0.45:
            src = pos + int(rng.uniform(-0.012, 0.012) * SAMPLE_RATE)  # a misaligned unit
        else:
            src = pos
        src = int(np.clip(src, 0, max(0, n - length)))
        take = min(length, n - pos)
        unit = x[src : src + take]
        out[pos : pos + len(unit)] = unit * 10.0 ** (rng.uniform(-1.5, 1.5) / 20.0)
        if len(unit) < take:
            out[pos + len(unit) : pos + take] = 0.0
        pos += take
    return out


def _attack_companding(c: _Content, rng: np.random.Generator) -> np.ndarray:
    bits, mu = int(rng.integers(4, 7)), 255.0
    peak = max(np.abs(c.wave).max(), 1e-12)
    xn = c.wave / peak
    comp = np.sign(xn) * np.log1p(mu * np.abs(xn)) / np.log1p(mu)
    levels = 2 ** (bits - 1) - 1  # mid-tread: silence stays silent
    q = np.round(comp * levels) / levels
    return np.sign(q) * np.expm1(np.abs(q) * np.log1p(mu)) / mu * peak


_ATTACK_FNS: dict[str, Callable[[_Content, np.random.Generator], np.ndarray]] = {
    "A01": _attack_griffin_lim,
    "A02": _attack_mel_smoothing,
    "A03": _attack_band_limit,
    "A04": _attack_lpc_buzz,
    "A05": _attack_concatenation,
    "A06": _attack_companding,
}


# ----------------------------------------------------------------------------- partial spoofs


def _choose_spans(content: _Content, rng: np.random.Generator) -> list[tuple[int, int]]:
    """1-3 spans of 0.2-1.5 s over speech (>= 40 % active), >= 0.1 s apart, <= 60 % of the utterance."""
    n = len(content.wave)
    dur, gap = n / SAMPLE_RATE, 0.1
    spans: list[tuple[int, int]] = []
    for _ in range(30):
        k = int(rng.integers(1, 4))
        while k > 1 and min(1.5, 0.6 * dur / k) < 0.2:
            k -= 1
        max_len = max(0.2, min(1.5, 0.6 * dur / k))
        lens = rng.uniform(0.2, max_len, size=k)
        free = dur - lens.sum() - gap * (k - 1)
        if free <= 0:
            continue
        gaps = rng.dirichlet(np.ones(k + 1)) * free
        spans, t = [], gaps[0]
        for i in range(k):
            s = int(round(t * SAMPLE_RATE))
            e = min(n, s + int(round(lens[i] * SAMPLE_RATE)))
            spans.append((s, e))
            t += lens[i] + gap + gaps[i + 1]
        if all(content.activity[s:e].mean() >= 0.4 for s, e in spans):
            break
    if not spans:  # unreachable for durations >= 1 s; a centred span keeps the contract
        half = min(n // 4, int(0.75 * SAMPLE_RATE))
        spans = [(n // 2 - half, n // 2 + half)]
    return spans


def segment_labels_from_spans(
    n_samples: int, spans: Sequence[Sequence[int]], segment_samples: int = int(SEGMENT_S * SAMPLE_RATE)
) -> np.ndarray:
    """PartialSpoof-style labels: one ``'1'`` (bona fide) / ``'0'`` (spoof) per segment.

    A segment ``[k * seg, (k + 1) * seg)`` is spoof iff it overlaps a span ``[start, end)``.
    Returns an array of ``ceil(n_samples / segment_samples)`` one-character strings.
    """
    n_seg = int(math.ceil(n_samples / segment_samples))
    mask = np.zeros(n_seg * segment_samples, dtype=bool)
    for s, e in spans:
        mask[int(s) : int(e)] = True
    spoof = mask.reshape(n_seg, segment_samples).any(axis=1)
    return np.where(spoof, "0", "1").astype("<U1")


# ----------------------------------------------------------------------------- rendering


def _render(job: _Job) -> dict[str, Any]:
    """Synthesize one utterance, write its FLAC, return its metadata (runs in a worker)."""
    rng = np.random.default_rng(np.random.SeedSequence(list(job.seed)))
    content = _synthesize_content(job.speaker, job.n_samples, rng)
    # The room colours the content before any attack, as a TTS/VC system models a recorded
    # speaker; the attacks (vocoder-like processing) act on that, as in ASVspoof LA.
    content = replace(content, wave=_room(content.wave, rng))
    spans: list[tuple[int, int]] = []
    if job.partial:
        spans = _choose_spans(content, rng)
        dry = splice(content.wave, _ATTACK_FNS[job.attack](content, rng), spans, fade=int(0.005 * SAMPLE_RATE))
    elif job.label == 0:
        dry = _ATTACK_FNS[job.attack](content, rng)
    else:
        dry = content.wave
    noise_rng = copy.deepcopy(rng) if job.source else None  # the draws the noise and level are made with
    wave = _normalise_level(_add_noise(dry, rng), rng).astype(np.float32)
    if not np.isfinite(wave).all():  # pragma: no cover - a bug, not a user error
        raise RuntimeError(f"synthesis produced non-finite samples for {job.utt_id}")
    sf.write(job.path, wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    if noise_rng is not None:
        source = _same_noise_and_level(content.wave, dry, noise_rng).astype(np.float32)
        sf.write(job.source, source, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return {"utt_id": job.utt_id, "n_samples": len(wave), "spans": [[int(s), int(e)] for s, e in spans]}


def _plan_jobs(out: Path, seed: int, size: CorpusSize) -> list[_Job]:
    jobs: list[_Job] = []
    spk_rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    speakers = {
        pool: _make_speakers(spk_rng, pool, count) for pool, count in zip(("train", "dev", "eval"), size.speakers)
    }
    id_rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    for split_idx, (split, (prefix, pool, attacks, partial)) in enumerate(_SPLITS.items()):
        count = getattr(size, split)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 13, split_idx]))
        numbers = id_rng.choice(9_000_000, size=count, replace=False) + 1_000_000
        if partial:
            labels = [0] * count
        else:
            n_bona = int(round(BONAFIDE_FRACTION * count))
            labels = [1] * n_bona + [0] * (count - n_bona)
        spoof_rank = np.cumsum([lab == 0 for lab in labels]) - 1
        attack_of = [attacks[spoof_rank[i] % len(attacks)] if lab == 0 else "-" for i, lab in enumerate(labels)]
        spk_list = speakers[pool]
        spk_of = [spk_list[i % len(spk_list)] for i in range(count)]
        order = rng.permutation(count)
        durations = rng.uniform(size.min_s, size.max_s, size=count)
        folder = out / ("partial_spoof/" + pool if partial else f"ASVspoof2019_LA_{split}") / "flac"
        for i, j in enumerate(order):
            utt = f"{prefix}{int(numbers[i]):07d}"
            jobs.append(
                _Job(
                    split=split,
                    utt_id=utt,
                    speaker=spk_of[j],
                    label=labels[j],
                    attack=attack_of[j],
                    n_samples=int(durations[i] * SAMPLE_RATE),
                    partial=partial,
                    seed=(seed, 17, split_idx, i),
                    path=str(folder / f"{utt}.flac"),
                    source=str(source_path(out, pool, utt)) if partial else "",
                )
            )
    return jobs


def _mp_context() -> Any:
    """``fork`` where available (workers start in milliseconds and only use NumPy/SciPy/soundfile),
    else ``spawn``."""
    import multiprocessing

    return get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _default_workers(n_jobs: int) -> int:
    if n_jobs < 200:
        return 1  # process start-up costs more than it saves
    return max(1, min(os.cpu_count() or 1, 8))


def _prepare_out(out: Path, seed: int, size: str, overwrite: bool) -> bool:
    """Returns True when a matching, complete corpus is already there."""
    marker = out / "corpus.json"
    if marker.is_file():
        try:
            meta = json.loads(marker.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("generator") not in (_GENERATOR_NAME, "__main__"):
            raise FileExistsError(f"{marker} was not written by {_GENERATOR_NAME}; choose another output folder")
        same = (meta.get("seed"), meta.get("size"), meta.get("version")) == (seed, size, GENERATOR_VERSION)
        if same and meta.get("complete") and not overwrite:
            return True
        log.info("replacing the synthetic corpus in %s (seed %s size %s)", out, meta.get("seed"), meta.get("size"))
        for name in _OWNED:
            shutil.rmtree(out / name, ignore_errors=True)
    elif any((out / name).exists() for name in _OWNED):
        raise FileExistsError(
            f"{out} already holds ASVspoof-style folders but no corpus.json from {_GENERATOR_NAME}: it may be a real "
            "database. Choose an empty output folder (nothing was changed)."
        )
    return False


#: Where the embedded demo corpus lives, relative to the project (configs/demo.yaml's data.root).
DEMO_CORPUS = "outputs/data/demo_corpus"


def ensure_demo_corpus(root: str | Path, progress: bool = True) -> bool:
    """Generate the embedded demo corpus at ``root`` when ``root`` is its place and it is absent.

    Lets notebook 01 run by hand on a fresh clone. Any other folder, or one that already
    holds a corpus (of any size), is left as it is.

    Returns:
        True when a corpus was generated.
    """
    root = Path(root)
    if tuple(root.parts[-3:]) != tuple(Path(DEMO_CORPUS).parts) or (root / "corpus.json").is_file():
        return False
    log.info("generating the demo corpus into %s", root)
    generate_corpus(root, seed=0, size="demo", progress=progress)
    return True


def generate_corpus(
    out: str | Path,
    seed: int = 0,
    size: str = "demo",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the synthetic corpus (layout in the module docstring) into ``out``.

    Args:
        out: the corpus root (``DataConfig.root``).
        seed: same seed → byte-identical protocols and audio.
        size: ``"tiny"`` (tests, a few seconds) or ``"demo"`` (the embedded default).
        workers: worker processes (default: 1 for tiny, up to 8 for demo); the output does
            not depend on it.
        overwrite: regenerate even when a complete corpus with this seed/size is there.
        progress: show a tqdm progress bar.

    Returns:
        ``out`` as a Path. An existing complete corpus with the same seed and size is reused.

    Raises:
        ValueError: unknown size; FileExistsError: ``out`` holds a database not made here.
    """
    if size not in SIZES:
        raise ValueError(f"unknown corpus size {size!r}; choose one of {sorted(SIZES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if _prepare_out(out, seed, size, overwrite):
        log.info("reusing the synthetic corpus in %s (seed %d, size %s)", out, seed, size)
        return out
    t0 = time.perf_counter()
    spec = SIZES[size]
    meta: dict[str, Any] = {"generator": _GENERATOR_NAME, "version": GENERATOR_VERSION, "seed": seed, "size": size, "complete": False}
    (out / "corpus.json").write_text(json.dumps(meta, indent=2))
    jobs = _plan_jobs(out, seed, spec)
    for folder in {Path(p).parent for j in jobs for p in (j.path, j.source) if p}:
        folder.mkdir(parents=True, exist_ok=True)
    n_workers = workers if workers is not None else _default_workers(len(jobs))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=f"synthesizing {size} corpus", disable=not progress, leave=False)
    results: list[dict[str, Any]] = []
    if n_workers <= 1:
        for job in jobs:
            results.append(_render(job))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=_mp_context()) as pool:
            for res in pool.map(_render, jobs, chunksize=8):
                results.append(res)
                bar.update()
    bar.close()

    _write_products(out, jobs, results)
    seconds = time.perf_counter() - t0
    meta.update(_summary(jobs, results, spec))
    meta.update({"generation_seconds": round(seconds, 3), "workers": n_workers, "complete": True})
    (out / "corpus.json").write_text(json.dumps(meta, indent=2))
    log.info("synthetic %s corpus (seed %d): %d utterances in %.1f s -> %s", size, seed, len(jobs), seconds, out)
    return out


def _write_products(out: Path, jobs: Sequence[_Job], results: Sequence[dict[str, Any]]) -> None:
    proto_dir = out / "ASVspoof2019_LA_cm_protocols"
    partial_dir = out / "partial_spoof"
    for d in (proto_dir, partial_dir / "protocols", partial_dir / "segment_labels"):
        d.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {s: [] for s in _SPLITS}
    seglab: dict[str, dict[str, np.ndarray]] = {"dev": {}, "eval": {}}
    spans: dict[str, dict[str, list[list[int]]]] = {"dev": {}, "eval": {}}
    for job, res in zip(jobs, results):
        key = "bonafide" if job.label == 1 else "spoof"
        lines[job.split].append(f"{job.speaker.speaker_id} {job.utt_id} - {job.attack} {key}")
        if job.partial:
            pool = _SPLITS[job.split][1]
            seglab[pool][job.utt_id] = segment_labels_from_spans(res["n_samples"], res["spans"])
            spans[pool][job.utt_id] = res["spans"]
    for split, name in _PROTOCOL_NAMES.items():
        (proto_dir / name).write_text("\n".join(lines[split]) + "\n")
    for pool in ("dev", "eval"):
        (partial_dir / "protocols" / f"PartialSpoof.LA.cm.{pool}.trl.txt").write_text(
            "\n".join(lines[f"partial_{pool}"]) + "\n"
        )
        np.save(partial_dir / "segment_labels" / f"{pool}_seglab_{SEGMENT_S}.npy", seglab[pool], allow_pickle=True)
        (partial_dir / f"spans_{pool}.json").write_text(json.dumps(spans[pool], indent=1))


def _summary(jobs: Sequence[_Job], results: Sequence[dict[str, Any]], spec: CorpusSize) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for job, res in zip(jobs, results):
        s = splits.setdefault(job.split, {"utterances": 0, "bonafide": 0, "spoof": 0, "attacks": {}, "seconds": 0.0})
        s["utterances"] += 1
        s["bonafide" if job.label == 1 else "spoof"] += 1
        if job.label == 0:
            s["attacks"][job.attack] = s["attacks"].get(job.attack, 0) + 1
        s["seconds"] += res["n_samples"] / SAMPLE_RATE
    for s in splits.values():
        s["seconds"] = round(s["seconds"], 2)
        s["attacks"] = dict(sorted(s["attacks"].items()))
    speakers = {}
    for job in jobs:
        speakers[job.speaker.speaker_id] = asdict(job.speaker)
    return {
        "sample_rate": SAMPLE_RATE,
        "segment_label_resolution_s": SEGMENT_S,
        "bonafide_fraction": BONAFIDE_FRACTION,
        "duration_range_s": [spec.min_s, spec.max_s],
        "splits": splits,
        "attacks": ATTACKS,
        "train_attacks": list(TRAIN_ATTACKS),
        "eval_attacks": list(EVAL_ATTACKS),
        "unseen_eval_attacks": [a for a in EVAL_ATTACKS if a not in TRAIN_ATTACKS],
        "bonafide_sources": SOURCES_DIR + "/{dev,eval}",
        "speakers": speakers,
    }


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xai_lib.data.synthetic --out DIR [--seed N] [--size tiny|demo]``."""
    parser = argparse.ArgumentParser(description="Generate the embedded synthetic anti-spoofing corpus.")
    parser.add_argument("--out", required=True, help="output folder (the corpus root)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed: identical corpus)")
    parser.add_argument("--size", choices=sorted(SIZES), default="demo", help="corpus size")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: automatic)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if the same corpus exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    t0 = time.perf_counter()
    try:
        generate_corpus(args.out, seed=args.seed, size=args.size, workers=args.workers, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    log.info("done in %.1f s", time.perf_counter() - t0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
