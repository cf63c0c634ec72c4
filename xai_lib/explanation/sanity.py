"""Sanity checks of the Stage-3 attributions: do they describe the detector, and its evidence?

Three checks, every method on the same utterances, in one call (:func:`run_sanity`):

**Model-parameter randomisation** (Adebayo et al., 2018, "Sanity checks for saliency maps").
A copy of the detector is re-initialised cascading from the top (:data:`DEFAULT_LEVELS`:
the classifier ``fc5``; + the Conformer-TCM blocks, class token and neck; + the SSL
transformer and feature projection; + the SSL convolutional feature encoder), each level with
fresh seeded weights (``reset_parameters()`` where a module has one, else a normal draw at
the parameter's own scale). Every method attributes the same utterances again on the
randomised copy and the Spearman rank correlation with its original map is averaged over the
utterances. A map that still correlates at the deepest level (>= :data:`FLAG_SPEARMAN`) does
not depend on what the detector learned and is flagged. The learned importance is the trained
Stage-2 module applied to the randomised detector's representation (it reads SSL features, so
randomising only the back end leaves it unchanged by construction); the stronger check trains
Stage 2 briefly on the fully randomised detector (:func:`importance_on_randomised_detector`)
and measures its localisation. ``random`` is redrawn with a new seed at every level: its row is
what "uncorrelated" looks like.

**Counterfactual restoration.** The synthetic partial spoofs are bona fide utterances with
attacked spans spliced in; the corpus keeps the un-spliced bona fide source
(:func:`xai_lib.data.synthetic.source_path`), equal sample for sample outside the spans. For
every method the frames it flags (its calibrated threshold, and separately its top ``rho``
frames) are replaced by the source's samples (5 ms raised-cosine cross-fades centred on the
edges, no gain change) and the detector re-scores the result. Reported: the flip rate (among
the utterances the detector called spoof, score below the dev-EER threshold, the share it now
calls bona fide), the mean change of the detector's score (bona fide logit, as
:func:`xai_lib.detector.training.score_utterances`) over all utterances, and the share of the
frames restored. ``random`` and ``oracle`` (the true spans) bound the table. Restoring a frame
outside the spans changes nothing (the source equals the utterance there), so a method is
rewarded only for the spoofed frames it finds.

**Input-domain deletion/insertion.** The representation-domain curves of
:func:`xai_lib.explanation.evaluation.evaluate_methods` remove frames inside the detector
(bona fide reference frames); :class:`WaveformRemover` removes them in the waveform instead:
each removed frame's samples are replaced by the utterance's own noise floor (noise with the
spectrum and level of its quietest 10 % of frames), cross-faded, and the whole detector runs
again. Both domains are measured on the same utterances with the same steps, and the rank
agreement of the methods between them (Spearman over methods) is reported.

Example::

    out = run_sanity(detector, xai, items[:8], run_dir, methods, thresholds_from_stage3(stage3),
                     data_cfg, score_threshold=metrics["stage1"]["dev_threshold"])
    stage3["sanity"] = out["sanity"]
    for name, row in out["restoration"].items():
        stage3["methods"][name]["restoration"] = row
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from xai_lib.data.audio import load_audio, pad_batch
from xai_lib.explanation.methods import METHODS, HOP_SAMPLES, SAMPLE_RATE

__all__ = [
    "DEFAULT_LEVELS",
    "FLAG_SPEARMAN",
    "RETRAIN_OVERRIDES",
    "run_sanity",
    "randomisation_check",
    "randomise_",
    "randomised_copy",
    "cascade",
    "importance_on_randomised_detector",
    "restoration_check",
    "restore_frames",
    "crossfade_weights",
    "noise_floor",
    "WaveformRemover",
    "input_domain_check",
    "thresholds_from_stage3",
    "called_spoof_first",
    "load_sources",
    "sanity_tables",
]

log = logging.getLogger(__name__)

#: The randomisation cascade, top first: (level name, attribute paths re-initialised at that level).
#: Paths that a detector lacks are skipped; a level with none of its paths is dropped. The TCM
#: paths come first, then the AASIST ones (``model.backend: aasist``).
_AASIST_BACKEND = ("HtrgGAT_layer_ST11", "HtrgGAT_layer_ST12", "HtrgGAT_layer_ST21", "HtrgGAT_layer_ST22",
                   "master1", "master2", "pool_S", "pool_T", "pool_hS1", "pool_hT1", "pool_hS2", "pool_hT2",
                   "GAT_layer_S", "GAT_layer_T", "pos_S", "attention", "first_bn1", "encoder")
DEFAULT_LEVELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("classifier", ("conformer.fc5", "out_layer")),
    ("backend", ("conformer.encoder_blocks", "conformer.class_token", "LL", "first_bn", *_AASIST_BACKEND)),
    ("ssl_transformer", ("ssl_model.encoder", "ssl_model.feature_projection")),
    ("ssl_conv", ("ssl_model.feature_extractor",)),
)
FLAG_SPEARMAN = 0.5  # a map still this correlated at the deepest level is flagged
FADE_SAMPLES = 80  # 5 ms cross-fades at 16 kHz, as the corpus splices
#: The short Stage-2 schedule on the randomised detector (appended to the run's Stage-2 config).
RETRAIN_OVERRIDES: tuple[str, ...] = (
    "training.num_epochs=2",
    "training.max_steps_per_epoch=8",
    "training.patience=10",
    "data.max_train_utts=96",
    "data.max_eval_utts=48",
)
_NEVER_RANDOMISED = ("positional_emb",)  # fixed sinusoid table, not learned


# ----------------------------------------------------------------------------- randomisation


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})


def randomise_(model: nn.Module, paths: Sequence[str], seed: int = 0) -> dict[str, int]:
    """Re-initialise, in place, the modules/parameters at ``paths`` of ``model`` with seeded weights.

    Every submodule with ``reset_parameters()`` (Linear, Conv, norms; BatchNorm also resets its
    running statistics) is reset, except weight-normalised ones; every other parameter (a class
    token, weight-norm factors) is drawn from ``N(0, sd^2)``, ``sd`` its own current standard
    deviation (0.02 when that is 0). The global RNG state is left as it was.

    Returns:
        ``{"parameters": tensors re-initialised, "values": their element count, "paths": paths found}``.
    """
    from torch.nn.utils import parametrize

    found, tensors, values = 0, 0, 0
    with torch.random.fork_rng(devices=_cuda_devices(model)), torch.no_grad():
        torch.manual_seed(seed)
        for path in paths:
            try:
                targets = [(path, model.get_submodule(path))]
            except AttributeError:
                try:
                    targets = [(path, model.get_parameter(path))]
                except AttributeError:
                    continue
            found += 1
            for _, obj in targets:
                if isinstance(obj, nn.Parameter):
                    params, covered = [("", obj)], set()
                else:
                    covered: set[int] = set()
                    for sub in obj.modules():
                        weight_normed = parametrize.is_parametrized(sub) or hasattr(sub, "weight_g")  # new / old style
                        if hasattr(sub, "reset_parameters") and not weight_normed:
                            sub.reset_parameters()
                            covered.update(id(p) for p in sub.parameters(recurse=False))
                    params = list(obj.named_parameters())
                for name, p in params:
                    if name.split(".")[-1] in _NEVER_RANDOMISED:
                        continue
                    if id(p) not in covered:
                        sd = float(p.float().std()) if p.numel() > 1 else 0.0
                        p.normal_(0.0, sd if sd > 0 and math.isfinite(sd) else 0.02)
                    tensors += 1
                    values += p.numel()
    return {"parameters": tensors, "values": values, "paths": found}


def _available_levels(model: nn.Module, levels: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for name, paths in levels:
        present = []
        for p in paths:
            try:
                model.get_submodule(p)
                present.append(p)
            except AttributeError:
                try:
                    model.get_parameter(p)
                    present.append(p)
                except AttributeError:
                    pass
        if present:
            out.append((name, tuple(present)))
        else:
            log.warning("randomisation level %r: the detector has none of %s; level skipped", name, list(paths))
    return out


def cascade(
    detector: nn.Module, levels: Sequence[tuple[str, Sequence[str]]] = DEFAULT_LEVELS, seed: int = 0
) -> Iterator[tuple[str, nn.Module, dict[str, Any]]]:
    """Cascading randomisation: yields ``(level, model, info)`` for each level, top first.

    ``model`` is ONE deep copy of ``detector`` (in ``eval()``), randomised further at each level
    (level ``k`` = levels ``1..k`` re-initialised): use it before asking for the next level. The
    original ``detector`` is never modified. ``info``: the paths, and the share of the detector's
    learned parameter values re-initialised so far (the fixed positional table is not counted).
    """
    model = copy.deepcopy(detector).eval()
    total = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[-1] not in _NEVER_RANDOMISED)
    done = 0
    for k, (name, paths) in enumerate(_available_levels(model, levels)):
        stats = randomise_(model, paths, seed=seed + 1009 * (k + 1))
        done += stats["values"]
        yield name, model, {"level": name, "paths": list(paths), "fraction_of_parameters": done / max(total, 1)}


def randomised_copy(detector: nn.Module, levels: Sequence[tuple[str, Sequence[str]]] = DEFAULT_LEVELS,
                    seed: int = 0) -> nn.Module:
    """A copy of ``detector`` with every level of ``levels`` re-initialised (the fully randomised detector)."""
    model = None
    for _, model, _ in cascade(detector, levels, seed):
        pass
    if model is None:
        raise ValueError("none of the randomisation levels exists in this detector")
    return model


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    n = min(a.size, b.size)
    if n < 3:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: NaN, handled by the caller
        return float(spearmanr(a[:n], b[:n]).statistic)


def _mean_spearman(orig: Sequence[np.ndarray], new: Sequence[np.ndarray], absolute: bool = False) -> float | None:
    vals = [_spearman(np.abs(a) if absolute else a, np.abs(b) if absolute else b) for a, b in zip(orig, new)]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def randomisation_check(
    detector: nn.Module,
    xai: Any | None,
    items: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    original: Mapping[str, Sequence[np.ndarray]] | None = None,
    levels: Sequence[tuple[str, Sequence[str]]] = DEFAULT_LEVELS,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Spearman of every method's map on the cascadingly randomised detector with its original map.

    Args:
        original: ``{method: [(T_i,) per item]}`` on ``detector`` (computed when ``None``).

    Returns:
        ``{"randomisation": {NAME: [{"level", "spearman", "spearman_abs", "n_utterances"}, ...]},
        "randomisation_summary": {NAME: {"level", "spearman", "spearman_abs", "flagged"}}, "levels": [{"level",
        "paths", "fraction_of_parameters"}], "n_utterances"}``; ``spearman`` is the mean over the
        utterances (``None`` when every map is constant), ``spearman_abs`` the same on |map|.
    """
    from xai_lib.explanation.evaluation import attribute_items

    methods = [m for m in methods if m != "importance" or xai is not None]
    if original is None:
        original = attribute_items(detector, xai, items, methods, method_kwargs, batch_size, seed=seed)
    table: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    level_info = []
    for k, (name, model, info) in enumerate(cascade(detector, levels, seed)):
        t0 = time.perf_counter()
        maps = attribute_items(model, xai, items, methods, method_kwargs, batch_size, seed=seed + 7919 * (k + 1))
        for m in methods:
            table[m].append({"level": name, "spearman": _mean_spearman(original[m], maps[m]),
                             "spearman_abs": _mean_spearman(original[m], maps[m], absolute=True),
                             "n_utterances": len(items)})
        info["seconds"] = time.perf_counter() - t0
        level_info.append(info)
        log.info("randomisation level %-16s (%.0f %% of the parameters): %s", name,
                 100 * info["fraction_of_parameters"],
                 ", ".join(f"{m} {_fmt(table[m][-1]['spearman'])}" for m in methods))
    summary = {}
    for m in methods:
        last = table[m][-1] if table[m] else {"level": None, "spearman": None}
        rho = last["spearman"]
        summary[m] = {"level": last["level"], "spearman": rho, "spearman_abs": last.get("spearman_abs"),
                      "flagged": bool(rho is not None and rho >= FLAG_SPEARMAN)}
    flagged = [m for m, s in summary.items() if s["flagged"]]
    if flagged:
        log.warning("randomisation sanity check: %s keep a Spearman >= %.1f with their original map on a detector "
                    "randomised down to %s: they do not depend on what the detector learned", ", ".join(flagged),
                    FLAG_SPEARMAN, level_info[-1]["level"] if level_info else "?")
    return {"randomisation": table, "randomisation_summary": summary, "levels": level_info, "n_utterances": len(items)}


# ----------------------------------------------------------------------------- Stage 2 on a random detector


def _stage2_cfg(stage2_config: Any, overrides: Sequence[str]) -> Any:
    from xai_lib.config import Stage2Config, apply_overrides, config_from_dict, config_to_dict, load_config

    if isinstance(stage2_config, (str, Path)):
        return load_config(Path(stage2_config), Stage2Config, list(overrides))
    data = apply_overrides(config_to_dict(stage2_config), list(overrides))
    return config_from_dict(data, Stage2Config)


def importance_on_randomised_detector(
    random_detector: nn.Module,
    stage2_config: Any,
    items: Sequence[Mapping[str, Any]],
    overrides: Sequence[str] = RETRAIN_OVERRIDES,
    progress: bool = False,
    label: str = "the randomised detector",
) -> dict[str, Any]:
    """Train Stage 2 briefly on ``random_detector`` and measure its localisation on ``items``.

    The detector is saved (:func:`xai_lib.detector.save_detector`) into a temporary run directory,
    :func:`xai_lib.importance.train_stage2` trains on it with ``stage2_config`` (a YAML path or a
    ``Stage2Config``) plus ``overrides`` (the short schedule), and the module it writes explains
    ``items`` through that detector. The process's torch threads and RNG states are restored after.

    Returns:
        ``{"loc_auc", "pointing_game", "seconds", "overrides", "epochs_completed", "max_steps_per_epoch",
        "batch_size", "max_train_utts"}``.
    """
    from xai_lib.detector import save_detector
    from xai_lib.explanation.evaluation import attribute_items
    from xai_lib.explanation.metrics import localization_metrics
    from xai_lib.importance import load_xai, train_stage2

    cfg = _stage2_cfg(stage2_config, overrides)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=_cuda_devices(random_detector)), _numpy_rng_kept(), \
            tempfile.TemporaryDirectory(prefix="xai_sanity_stage2_") as tmp:
        try:
            path = save_detector(random_detector, Path(tmp) / "stage1_detector.pth",
                                 extra={"sanity": "randomised copy of the detector"})
            result = train_stage2(cfg, tmp, detector_path=path, resume=False, progress=progress)
            from xai_lib.detector import load_detector

            detector = load_detector(path).to(next(random_detector.parameters()).device).eval()
            xai = load_xai(result.checkpoint, detector=detector)
            loc_items = [it for it in items if it.get("spoof_mask") is not None]
            maps = attribute_items(detector, xai, loc_items, ["importance"])["importance"]
        finally:
            torch.set_num_threads(threads)
    loc = localization_metrics(maps, [it["spoof_mask"] for it in loc_items])
    out = {"loc_auc": _none_if_nan(loc["loc_auc"]), "pointing_game": _none_if_nan(loc["pointing_game"]),
           "seconds": time.perf_counter() - t0, "overrides": list(overrides),
           "epochs_completed": result.epochs_completed, "max_steps_per_epoch": cfg.training.max_steps_per_epoch,
           "batch_size": cfg.training.batch_size, "max_train_utts": cfg.data.max_train_utts}
    log.info("Stage 2 trained %d epochs on %s in %.0f s: loc ROC-AUC %s", result.epochs_completed, label,
             out["seconds"], _fmt(out["loc_auc"]))
    return out


@contextlib.contextmanager
def _numpy_rng_kept() -> Iterator[None]:
    import random

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


# ----------------------------------------------------------------------------- frames and samples


def _frame_of_sample(n_samples: int, n_frames: int, hop: int) -> np.ndarray:
    """(n_samples,) the frame of every sample: ``s // hop``, the last frame running to the end."""
    return np.minimum(np.arange(n_samples) // hop, max(n_frames - 1, 0))


def crossfade_weights(mask: np.ndarray, fade: int = FADE_SAMPLES) -> np.ndarray:
    """A 0/1 sample mask smoothed into [0, 1] weights with raised-cosine edges ``fade`` samples
    long, centred on each edge (edge values extended, so an all-1 mask stays all 1)."""
    m = np.asarray(mask, dtype=np.float64).reshape(-1)
    if fade <= 1 or m.size == 0 or m.min() == m.max():
        return m
    k = np.hanning(fade + 2)[1:-1]
    k /= k.sum()
    padded = np.pad(m, (fade // 2, fade - 1 - fade // 2), mode="edge")
    return np.clip(np.convolve(padded, k, mode="valid"), 0.0, 1.0)


def restore_frames(wave: np.ndarray, source: np.ndarray, frames: np.ndarray, hop: int = HOP_SAMPLES,
                   fade: int = FADE_SAMPLES) -> np.ndarray:
    """``wave`` with the samples of the ``frames`` (bool (T,)) taken from ``source``, cross-faded.

    Frame ``t`` covers samples ``[t * hop, (t + 1) * hop)`` (the last one runs to the end), as
    the attributions pool them. No gain is applied: the source is the utterance's own audio.
    """
    wave = np.asarray(wave, dtype=np.float64)
    frames = np.asarray(frames, dtype=bool).reshape(-1)
    if not frames.any():
        return wave.astype(np.float32)
    w = crossfade_weights(frames[_frame_of_sample(wave.size, frames.size, hop)].astype(np.float64), fade)
    return ((1.0 - w) * wave + w * np.asarray(source, dtype=np.float64)[: wave.size]).astype(np.float32)


def noise_floor(wave: np.ndarray, hop: int = HOP_SAMPLES, quiet_fraction: float = 0.1,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Noise as long as ``wave`` with the spectrum and level of its quietest ``quiet_fraction`` of frames.

    The quietest full frames (at least one) give the power spectrum (Hann-windowed, averaged)
    and the RMS; seeded white noise is shaped by that spectrum and scaled to that RMS.
    """
    x = np.asarray(wave, dtype=np.float64).reshape(-1)
    rng = rng if rng is not None else np.random.default_rng(0)
    n_full = x.size // hop
    if n_full < 1:
        return np.zeros_like(x)
    frames = x[: n_full * hop].reshape(n_full, hop)
    power = (frames**2).mean(axis=1)
    quiet = np.argsort(power, kind="stable")[: max(1, int(math.ceil(quiet_fraction * n_full)))]
    level = math.sqrt(float(power[quiet].mean()))
    spec = (np.abs(np.fft.rfft(frames[quiet] * np.hanning(hop), axis=1)) ** 2).mean(axis=0)  # (hop // 2 + 1,)
    white = np.fft.rfft(rng.standard_normal(x.size))
    shape = np.sqrt(np.interp(np.linspace(0.0, 1.0, white.size), np.linspace(0.0, 1.0, spec.size), spec))
    noise = np.fft.irfft(white * shape, n=x.size)
    rms = math.sqrt(float(np.mean(noise**2)))
    return noise * (level / rms) if rms > 0 else noise


class WaveformRemover:
    """A deletion/insertion ``score_fn`` that removes frames in the waveform and re-runs the detector.

    A removed frame's samples become the utterance's own noise floor (:func:`noise_floor`), with
    :func:`crossfade_weights` edges; the whole detector (front end included) scores the result.

    Args:
        detector: the frozen detector (eval mode).
        wave: (B, L) right-padded waveforms; lengths: (B,) valid samples (``None``: all L).
        quiet_fraction: share of the quietest frames that define the noise floor.
        fade: cross-fade length in samples.
        seed: seeds the noise (utterance ``b`` uses ``seed + b``).

    Calling it with ``keep`` (B, T) in {0, 1} returns the spoof probability (B,) (softmax column 0).
    """

    def __init__(self, detector: nn.Module, wave: Tensor, lengths: Tensor | None = None, quiet_fraction: float = 0.1,
                 fade: int = FADE_SAMPLES, seed: int = 0, sample_rate: int = SAMPLE_RATE) -> None:
        if detector.training:
            raise ValueError("WaveformRemover: put the detector in eval() mode first (detector.eval())")
        self.detector = detector
        self.device = next(detector.parameters()).device
        wave = torch.as_tensor(wave, dtype=torch.float32)
        B, L = wave.shape
        self.lengths = (torch.full((B,), L, dtype=torch.long) if lengths is None
                        else torch.as_tensor(lengths, dtype=torch.long).reshape(-1).cpu())
        self.n_frames = detector.num_frames(self.lengths).to(torch.long).cpu()
        self.hop = int(round(float(getattr(detector, "frame_hop_s", 0.02)) * sample_rate))
        self.fade = fade
        self.wave = wave.cpu().numpy().astype(np.float64)
        self.noise = np.zeros_like(self.wave)
        for b in range(B):
            n = int(self.lengths[b])
            self.noise[b, :n] = noise_floor(self.wave[b, :n], self.hop, quiet_fraction, np.random.default_rng(seed + b))

    def remove(self, keep: Tensor | np.ndarray) -> Tensor:
        """(B, L) waveforms with the frames of ``keep = 0`` replaced by the noise floor (padding 0)."""
        keep = np.asarray(torch.as_tensor(keep).detach().cpu(), dtype=np.float64)
        out = np.zeros_like(self.wave)
        for b in range(self.wave.shape[0]):
            n, t = int(self.lengths[b]), int(self.n_frames[b])
            k = keep[b, :t]
            if t == 0:
                continue
            w = crossfade_weights(k[_frame_of_sample(n, t, self.hop)], self.fade)
            out[b, :n] = w * self.wave[b, :n] + (1.0 - w) * self.noise[b, :n]
        return torch.from_numpy(out.astype(np.float32))

    @torch.no_grad()
    def __call__(self, keep: Tensor) -> Tensor:
        x = self.remove(keep).to(self.device)
        logits = self.detector(x, self.lengths.to(self.device)).logits
        return logits.float().softmax(-1)[:, 0].cpu()


def input_domain_check(
    detector: nn.Module,
    items: Sequence[Mapping[str, Any]],
    attributions: Mapping[str, Sequence[np.ndarray]],
    reference: Any = None,
    steps: int = 10,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Deletion/insertion AUCs of every method with frames removed in the waveform and in the
    representation (:func:`~xai_lib.explanation.evaluation.representation_score_fn` with
    ``reference``), on the same items (those whose label is not bona fide) and steps.

    Returns:
        ``{"methods": {NAME: {"deletion_auc", "insertion_auc", "representation_deletion_auc",
        "representation_insertion_auc"}}, "rank_agreement": {"deletion_spearman",
        "insertion_spearman"}, "steps", "n_utterances", "removal"}``.
    """
    from xai_lib.explanation.evaluation import representation_score_fn
    from xai_lib.explanation.metrics import deletion_insertion

    rows = [i for i, it in enumerate(items) if it.get("label") != 1]
    methods = list(attributions)
    acc = {m: {k: [] for k in ("wd", "wi", "rd", "ri")} for m in methods}
    ends: dict[str, list[float]] = {k: [] for k in ("w0", "w1", "r0", "r1")}  # p_spoof, nothing / everything removed
    device = next(detector.parameters()).device
    order = sorted(rows, key=lambda i: -len(items[i]["wave"]))
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        wave, lengths = pad_batch([np.asarray(items[i]["wave"], dtype=np.float32) for i in idx])
        wave_scorer = WaveformRemover(detector, wave, lengths, seed=seed + start)
        rep_scorer = representation_score_fn(detector, wave.to(device), lengths.to(device), reference)
        n_frames = wave_scorer.n_frames
        for m in methods:
            imp = [np.asarray(attributions[m][i], dtype=np.float64)[: int(n)] for i, n in zip(idx, n_frames)]
            for key, scorer in (("w", wave_scorer), ("r", rep_scorer)):
                res = deletion_insertion(scorer, imp, lengths=n_frames, steps=steps, device=device)
                acc[m][key + "d"].extend(res["deletion_auc_per_utt"].tolist())
                acc[m][key + "i"].extend(res["insertion_auc_per_utt"].tolist())
                if m == methods[0]:  # the same for every ordering
                    ends[key + "0"].extend(res["deletion_curves"][:, 0].tolist())
                    ends[key + "1"].extend(res["deletion_curves"][:, -1].tolist())
    table = {
        m: {"deletion_auc": _mean(a["wd"]), "insertion_auc": _mean(a["wi"]),
            "representation_deletion_auc": _mean(a["rd"]), "representation_insertion_auc": _mean(a["ri"])}
        for m, a in acc.items()
    }
    agree = {}
    for kind in ("deletion", "insertion"):
        x = [table[m][f"{kind}_auc"] for m in methods]
        y = [table[m][f"representation_{kind}_auc"] for m in methods]
        ok = len(methods) >= 3 and all(v is not None for v in (*x, *y))
        agree[f"{kind}_spearman"] = _none_if_nan(_spearman(np.array(x), np.array(y))) if ok else None
    return {"methods": table, "rank_agreement": agree, "steps": steps, "n_utterances": len(rows),
            "p_spoof_nothing_removed": {"waveform": _mean(ends["w0"]), "representation": _mean(ends["r0"])},
            "p_spoof_everything_removed": {"waveform": _mean(ends["w1"]), "representation": _mean(ends["r1"])},
            "removal": "waveform: the utterance's noise floor (quietest 10 % of frames), 5 ms cross-fades; "
                       f"representation: {'bona fide reference frames' if reference is not None else 'zeroed'}"}


# ----------------------------------------------------------------------------- restoration


def load_sources(
    items: Sequence[Mapping[str, Any]], data_root: str | Path | None = None, split: str = "eval",
    sources_dir: str | Path | None = None, sample_rate: int = SAMPLE_RATE,
) -> tuple[list[np.ndarray | None], str | None]:
    """The bona fide source of every item (``None`` where there is none), and why some are missing.

    Looked up in ``sources_dir/<utt>.flac`` when given, else where the synthetic corpus writes
    them (:func:`xai_lib.data.synthetic.source_path` under ``data_root``). A source shorter than
    its item is not used; a longer one is cut (items cropped to ``max_seconds`` start at 0).
    """
    from xai_lib.data.synthetic import source_path

    out: list[np.ndarray | None] = []
    missing = []
    for it in items:
        utt = it.get("utt_id")
        path = None
        if utt is not None:
            path = (Path(sources_dir) / f"{utt}.flac" if sources_dir is not None
                    else source_path(data_root, split, utt) if data_root is not None else None)
        if path is None or not path.is_file():
            out.append(None)
            missing.append(str(path) if path is not None else f"{utt} (no data root)")
            continue
        src = load_audio(path, sample_rate)
        n = len(it["wave"])
        out.append(src[:n] if len(src) >= n else None)
    reason = None
    if missing:
        reason = (f"{len(missing)} of {len(items)} items have no bona fide source (first: {missing[0]}); a corpus "
                  "generated before the sources were saved has none: regenerate it with `python -m "
                  "xai_lib.data.synthetic` (the other files stay identical) to enable counterfactual restoration")
    return out, reason


@torch.no_grad()
def _bona_scores(detector: nn.Module, waves: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
    """(N,) the detector's score (bona fide logit, as score_utterances) of every wave."""
    device = next(detector.parameters()).device
    out = np.zeros(len(waves))
    order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        wave, lengths = pad_batch([np.asarray(waves[i], dtype=np.float32) for i in idx])
        logits = detector(wave.to(device), lengths.to(device)).logits.float()
        out[idx] = logits[:, 1].cpu().numpy()
    return out


def _top_frames(scores: np.ndarray, rho: float) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    k = int(round(rho * s.size))
    sel = np.zeros(s.size, dtype=bool)
    sel[np.argsort(-s, kind="stable")[:k]] = True
    return sel


def restoration_check(
    detector: nn.Module,
    items: Sequence[Mapping[str, Any]],
    sources: Sequence[np.ndarray | None],
    attributions: Mapping[str, Sequence[np.ndarray]],
    thresholds: Mapping[str, float | None],
    score_threshold: float,
    rho: float = 0.3,
    fade: int = FADE_SAMPLES,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Replace the frames each method flags by the bona fide source and re-score.

    Args:
        items: partially spoofed items (``wave``, ``spoof_mask``); those without a source are left out.
        sources: the bona fide source of every item (:func:`load_sources`).
        attributions: ``{method: [(T_i,) per item]}``; ``oracle`` (the spoof mask) is added.
        thresholds: ``{method: calibrated frame threshold}`` (frames with score > tau are restored);
            a method without one gets no ``calibrated`` selection.
        score_threshold: the detector's dev-EER threshold on its score (>= threshold: bona fide).
        rho: the share of frames restored by the ``top_rho`` selection.

    Returns:
        ``{"rows": {NAME: {"calibrated": {...} | None, "top_rho": {...}}, "oracle": {"true_spans": {...}}},
        "n_utterances", "n_called_spoof", "score_threshold", "rho"}``; a selection holds
        ``flip_rate`` (share of the utterances called spoof that are called bona fide after the
        restoration; ``None`` when none was called spoof), ``mean_score_change`` (over all
        utterances), ``frames_restored_fraction`` (pooled over all frames) and
        ``spoofed_frames_restored`` (the share of the spoofed frames among them).
    """
    keep = [i for i, s in enumerate(sources) if s is not None]
    hop = int(round(float(getattr(detector, "frame_hop_s", 0.02)) * SAMPLE_RATE))
    waves = [np.asarray(items[i]["wave"], dtype=np.float32) for i in keep]
    srcs = [np.asarray(sources[i], dtype=np.float32) for i in keep]
    n_frames = [int(detector.num_frames(torch.tensor([len(w)])).item()) for w in waves]
    masks = []
    for i, n in zip(keep, n_frames):
        m = items[i].get("spoof_mask")
        m = np.zeros(n, bool) if m is None else np.asarray(m, dtype=bool)[:n]
        masks.append(np.pad(m, (0, n - m.size)))
    before = _bona_scores(detector, waves, batch_size)
    called_spoof = before < score_threshold

    def measure(selections: list[np.ndarray]) -> dict[str, Any]:
        restored = [restore_frames(w, s, sel, hop, fade) for w, s, sel in zip(waves, srcs, selections)]
        after = _bona_scores(detector, restored, batch_size)
        flips = (after >= score_threshold) & called_spoof
        n_sel = sum(int(s.sum()) for s in selections)
        n_all = sum(s.size for s in selections)
        n_spoof = sum(int(m.sum()) for m in masks)
        return {
            "flip_rate": float(flips.sum() / called_spoof.sum()) if called_spoof.any() else None,
            "mean_score_change": float(np.mean(after - before)) if len(after) else None,
            "frames_restored_fraction": n_sel / n_all if n_all else None,
            "spoofed_frames_restored": (sum(int((s & m).sum()) for s, m in zip(selections, masks)) / n_spoof
                                        if n_spoof else None),
        }

    rows: dict[str, dict[str, Any]] = {}
    for m, maps in attributions.items():
        scores = [np.asarray(maps[i], dtype=np.float64)[:n] for i, n in zip(keep, n_frames)]
        scores = [np.pad(s, (0, n - s.size)) for s, n in zip(scores, n_frames)]
        tau = thresholds.get(m)
        rows[m] = {
            "calibrated": measure([s > tau for s in scores]) if tau is not None else None,
            "top_rho": measure([_top_frames(s, rho) for s in scores]),
            "threshold": tau,
        }
    rows["oracle"] = {"true_spans": measure(masks)}
    out = {"rows": rows, "n_utterances": len(keep), "n_called_spoof": int(called_spoof.sum()),
           "score_threshold": float(score_threshold), "rho": rho,
           "mean_score_before": float(before.mean()) if len(before) else None}
    log.info("restoration on %d utterances (%d called spoof at %.3f): oracle flip rate %s", len(keep),
             out["n_called_spoof"], score_threshold, _fmt(rows["oracle"]["true_spans"]["flip_rate"]))
    return out


def called_spoof_first(detector: nn.Module, items: Sequence[Mapping[str, Any]], score_threshold: float | None,
                       n: int, batch_size: int = 8) -> list[Mapping[str, Any]]:
    """``n`` of ``items``: those the detector calls spoof (score below ``score_threshold``) first, in
    their order, then the others (a subset whose restoration flip rate is defined; ``None``: the
    first ``n``)."""
    items = list(items)
    if score_threshold is None or n >= len(items):
        return items[:n]
    scores = _bona_scores(detector, [np.asarray(it["wave"], dtype=np.float32) for it in items], batch_size)
    order = [i for i in range(len(items)) if scores[i] < score_threshold]
    order += [i for i in range(len(items)) if scores[i] >= score_threshold]
    return [items[i] for i in sorted(order[:n])]


# ----------------------------------------------------------------------------- the entry point


def thresholds_from_stage3(stage3: Mapping[str, Any]) -> dict[str, float]:
    """``{method: calibrated threshold}`` from ``run_stage3``'s result (``metrics.json["stage3"]``)."""
    out = {}
    for m, r in (stage3.get("methods") or {}).items():
        c = (r or {}).get("calibrated") or {}
        if c.get("threshold") is not None:
            out[m] = float(c["threshold"])
    return out


def _dev_threshold(run_dir: Path) -> float | None:
    try:
        return float(json.loads((run_dir / "metrics.json").read_text())["stage1"]["dev_threshold"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def run_sanity(
    detector: nn.Module,
    xai: Any | None,
    items: Sequence[Mapping[str, Any]],
    run_dir: str | Path,
    methods: Sequence[str] = METHODS,
    thresholds: Mapping[str, float] | None = None,
    data_cfg: Any = None,
    score_threshold: float | None = None,
    *,
    split: str = "eval",
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    attributions: Mapping[str, Sequence[np.ndarray]] | None = None,
    levels: Sequence[tuple[str, Sequence[str]]] = DEFAULT_LEVELS,
    num_levels: int | None = None,
    randomisation_utterances: int | None = None,
    rho: float = 0.3,
    steps: int = 10,
    calibration_items: Sequence[Mapping[str, Any]] = (),
    false_flag_rate: float = 0.01,
    retrain: bool = True,
    stage2_config: Any = None,
    retrain_overrides: Sequence[str] = RETRAIN_OVERRIDES,
    retrain_control: bool = False,
    sources_dir: str | Path | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """The three sanity checks of every method on ``items`` (partially spoofed utterances), with figures.

    Args:
        detector, xai: the frozen detector and the Stage-2 model (``None``: no ``importance``).
        items: explanation items (``utt_id``, ``wave``, ``spoof_mask``, ``label``), e.g. the first
            few of ``load_explanation_set``; every check uses them all (randomisation: the first
            ``randomisation_utterances``).
        run_dir: figures go to ``run_dir/figures/stage3_sanity_*.png``; its ``metrics.json`` gives
            the verdict threshold and its ``config_stage2.yaml`` the Stage-2 config when not passed.
        methods: methods to check (``random`` is added for the restoration table).
        thresholds: ``{method: calibrated frame threshold}`` (:func:`thresholds_from_stage3`); missing
            ones are calibrated on ``calibration_items`` (bona fide dev items) at ``false_flag_rate``.
        data_cfg: the run's data config (its ``root`` locates the bona fide sources).
        score_threshold: the detector's dev-EER threshold (``None``: ``metrics.json["stage1"]["dev_threshold"]``).
        split: the split of ``items`` (where the sources are).
        method_kwargs: per-method options, e.g. ``{"integrated_gradients": {"n_steps": 8}}``.
        attributions: the methods' maps of ``items`` on ``detector`` when already computed.
        levels, num_levels: the randomisation cascade and how many of its levels to use.
        rho: share of frames of the ``top_rho`` restoration.
        steps: deletion/insertion steps of the input-domain check (``2 (steps + 1)`` detector passes
            per method and batch).
        retrain: train Stage 2 briefly on the fully randomised detector (``stage2_config``: a YAML
            path or Stage2Config; ``None``: ``run_dir/config_stage2.yaml``; ``retrain_overrides``:
            the schedule); ``retrain_control`` also trains it with the same schedule on the real
            detector (the fair reference for the short schedule).
        sources_dir: a folder of ``<utt>.flac`` bona fide sources (default: the corpus's own).

    Returns:
        ``{"sanity": {...}, "restoration": {NAME: {...}}}``: ``sanity`` is
        ``metrics.json["stage3"]["sanity"]`` (``randomisation``, ``randomisation_summary``,
        ``levels``, ``importance_loc_auc`` and ``importance_on_randomised_detector_loc_auc``,
        ``retrain``, ``restoration`` (rows incl. ``random`` and ``oracle``, or ``skipped``),
        ``input_domain``, ``seconds``, ``figures``, ``num_utterances``); ``restoration`` is each
        method's ``metrics.json["stage3"]["methods"][NAME]["restoration"]``.
    """
    from xai_lib.explanation.calibration import frame_threshold
    from xai_lib.explanation.evaluation import applicable_methods, attribute_items
    from xai_lib.explanation.metrics import localization_metrics

    if detector.training:
        raise ValueError("run_sanity: put the detector in eval() mode first (detector.eval())")
    run_dir = Path(run_dir)
    methods = [m for m in methods if m != "importance" or xai is not None]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown attribution method(s) {unknown}; valid methods: {', '.join(METHODS)}")
    methods = applicable_methods(detector, methods)  # e.g. no attention_rollout on an AASIST back end
    items = list(items)
    if not items:
        raise ValueError("run_sanity needs at least one item")
    all_levels = list(levels)
    levels = all_levels[: num_levels] if num_levels else all_levels
    seconds: dict[str, float] = {}
    sanity: dict[str, Any] = {"num_utterances": len(items)}

    t0 = time.perf_counter()
    need = [m for m in dict.fromkeys([*methods, "random"]) if attributions is None or m not in attributions]
    original = dict(attributions or {})
    if need:
        original.update(attribute_items(detector, xai, items, need, method_kwargs, batch_size, seed=seed))
    seconds["attributions"] = time.perf_counter() - t0

    # 1. randomisation
    t0 = time.perf_counter()
    n_rand = len(items) if randomisation_utterances is None else max(1, min(randomisation_utterances, len(items)))
    rand = randomisation_check(detector, xai, items[:n_rand], methods, {m: original[m][:n_rand] for m in methods},
                               levels, method_kwargs, batch_size, seed)
    sanity.update(rand)
    seconds["randomisation"] = time.perf_counter() - t0

    loc_rows = [i for i, it in enumerate(items) if it.get("spoof_mask") is not None and np.any(it["spoof_mask"])]
    if "importance" in methods and loc_rows:
        loc = localization_metrics([original["importance"][i] for i in loc_rows], [items[i]["spoof_mask"] for i in loc_rows])
        sanity["importance_loc_auc"] = _none_if_nan(loc["loc_auc"])
    sanity["importance_on_randomised_detector_loc_auc"] = None
    if retrain and xai is not None:
        t0 = time.perf_counter()
        cfg_src = stage2_config if stage2_config is not None else run_dir / "config_stage2.yaml"
        if isinstance(cfg_src, (str, Path)) and not Path(cfg_src).is_file():
            sanity["retrain"] = {"skipped": f"no Stage-2 config at {cfg_src}"}
            log.warning("sanity: Stage 2 is not retrained on the randomised detector: no Stage-2 config at %s", cfg_src)
        else:
            full = randomised_copy(detector, all_levels, seed)  # every level, whatever num_levels says
            res = importance_on_randomised_detector(full, cfg_src, [items[i] for i in loc_rows], retrain_overrides,
                                                    progress)
            del full
            sanity["importance_on_randomised_detector_loc_auc"] = res["loc_auc"]
            sanity["retrain"] = res
            if retrain_control:
                ctrl = importance_on_randomised_detector(detector, cfg_src, [items[i] for i in loc_rows],
                                                         retrain_overrides, progress, label="the detector itself")
                sanity["importance_short_schedule_on_detector_loc_auc"] = ctrl["loc_auc"]
                sanity["retrain_control"] = ctrl
        seconds["retrain"] = time.perf_counter() - t0

    # 2. restoration
    t0 = time.perf_counter()
    restoration: dict[str, Any] = {}
    if score_threshold is None:
        score_threshold = _dev_threshold(run_dir)
    root = getattr(data_cfg, "root", None) if data_cfg is not None else None
    sources, reason = load_sources(items, root, split, sources_dir)
    rest_methods = list(dict.fromkeys([*methods, "random"]))
    if score_threshold is None:
        sanity["restoration"] = {"skipped": "no verdict threshold: pass score_threshold or run Stage 1 into run_dir "
                                            "(metrics.json['stage1']['dev_threshold'])"}
        log.warning("sanity: counterfactual restoration skipped: %s", sanity["restoration"]["skipped"])
    elif all(s is None for s in sources):
        sanity["restoration"] = {"skipped": reason}
        log.warning("sanity: counterfactual restoration skipped: %s", reason)
    else:
        if reason:
            log.warning("sanity: restoration uses the items that have a source: %s", reason)
        taus: dict[str, float | None] = {m: (thresholds or {}).get(m) for m in rest_methods}
        missing = [m for m, t in taus.items() if t is None]
        if missing and calibration_items:
            cal = attribute_items(detector, xai, calibration_items, missing, method_kwargs, batch_size, seed=seed)
            taus.update({m: frame_threshold(cal[m], false_flag_rate) for m in missing})
        elif missing:
            log.warning("sanity: no calibrated threshold for %s (pass thresholds or calibration_items): their "
                        "'calibrated' restoration is skipped", ", ".join(missing))
        res = restoration_check(detector, items, sources, {m: original[m] for m in rest_methods}, taus,
                                float(score_threshold), rho, batch_size=batch_size)
        sanity["restoration"] = res
        restoration = {m: res["rows"][m] for m in methods}
    seconds["restoration"] = time.perf_counter() - t0

    # 3. input-domain deletion/insertion
    t0 = time.perf_counter()
    reference = getattr(xai, "removal_reference", None)
    sanity["input_domain"] = input_domain_check(detector, items, {m: original[m] for m in methods}, reference, steps,
                                                batch_size, seed)
    seconds["input_domain"] = time.perf_counter() - t0

    sanity["seconds"] = seconds
    sanity["figures"] = _figures(sanity, run_dir / "figures")
    log.info("sanity checks done in %.0f s (%s)", sum(seconds.values()),
             ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return {"sanity": sanity, "restoration": restoration}


# ----------------------------------------------------------------------------- tables and figures


def sanity_tables(sanity: Mapping[str, Any]) -> str:
    """Markdown tables of the randomisation, restoration and input-domain results."""
    out = []
    rand = sanity.get("randomisation") or {}
    if rand:
        levels = [e["level"] for e in next(iter(rand.values()))]
        out += ["| method | " + " | ".join(levels) + " | same on abs values, last level | flagged |",
                "|" + "---|" * (len(levels) + 3)]
        for m, entries in rand.items():
            flag = (sanity.get("randomisation_summary") or {}).get(m, {}).get("flagged")
            out.append(f"| {m} | " + " | ".join(_fmt(e["spearman"]) for e in entries)
                       + f" | {_fmt(entries[-1].get('spearman_abs')) if entries else '–'} | {'**yes**' if flag else 'no'} |")
        out.append("")
        out.append(f"Stage 2 trained on the fully randomised detector: loc ROC-AUC "
                   f"{_fmt(sanity.get('importance_on_randomised_detector_loc_auc'))} (trained module on the real "
                   f"detector: {_fmt(sanity.get('importance_loc_auc'))})")
        out.append("")
    rest = sanity.get("restoration") or {}
    if rest.get("rows"):
        out += ["| method | flip rate (calibrated) | score change | frames restored | flip rate (top "
                f"{rest['rho']:.0%}) | score change | frames restored |", "|" + "---|" * 7]
        for m, row in rest["rows"].items():
            cells = []
            for sel in (("calibrated",), ("top_rho",)) if m != "oracle" else (("true_spans",), ("true_spans",)):
                r = row.get(sel[0])
                cells += ([_fmt(r["flip_rate"]), _fmt(r["mean_score_change"]), _fmt(r["frames_restored_fraction"])]
                          if r else ["–"] * 3)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append(f"\n{rest['n_called_spoof']} of {rest['n_utterances']} utterances called spoof at the dev-EER "
                   f"threshold {rest['score_threshold']:.3f}.\n")
    elif rest.get("skipped"):
        out.append(f"Restoration skipped: {rest['skipped']}\n")
    dom = sanity.get("input_domain") or {}
    if dom.get("methods"):
        out += ["| method | deletion (waveform) | deletion (representation) | insertion (waveform) | "
                "insertion (representation) |", "|---|---|---|---|---|"]
        for m, r in dom["methods"].items():
            out.append(f"| {m} | {_fmt(r['deletion_auc'])} | {_fmt(r['representation_deletion_auc'])} | "
                       f"{_fmt(r['insertion_auc'])} | {_fmt(r['representation_insertion_auc'])} |")
        ra, p0, p1 = dom["rank_agreement"], dom["p_spoof_nothing_removed"], dom["p_spoof_everything_removed"]
        out.append(f"\nRank agreement of the methods between the domains (Spearman): deletion "
                   f"{_fmt(ra['deletion_spearman'])}, insertion {_fmt(ra['insertion_spearman'])}. Spoof probability "
                   f"with nothing / everything removed: waveform {_fmt(p0['waveform'])} / {_fmt(p1['waveform'])}, "
                   f"representation {_fmt(p0['representation'])} / {_fmt(p1['representation'])}.")
    return "\n".join(out)


def _figures(sanity: Mapping[str, Any], fig_dir: Path) -> list[str]:
    import matplotlib.pyplot as plt

    from xai_lib import plots

    figures = []
    rand = sanity.get("randomisation") or {}
    if rand:
        fig, ax = plt.subplots(figsize=(7.5, 3.8), layout="constrained")
        for m, entries in rand.items():
            x = np.arange(len(entries) + 1)
            y = [1.0] + [np.nan if e["spearman"] is None else e["spearman"] for e in entries]
            if m == "random":
                y[0] = np.nan  # a fresh draw is never compared with itself
            ax.plot(x, y, marker="o", label=m)
        names = ["original"] + [e["level"] for e in next(iter(rand.values()))]
        ax.set_xticks(np.arange(len(names)), [f"+ {n}" if i > 1 else n for i, n in enumerate(names)])
        ax.axhline(FLAG_SPEARMAN, color="grey", ls="--", lw=1)
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("detector randomised from the top down to")
        ax.set_ylabel("Spearman with the original map")
        ax.set_title("model-parameter randomisation (should fall towards 0)")
        ax.legend(fontsize="small")
        figures.append(str(plots.save_figure(fig, fig_dir / "stage3_sanity_randomisation.png")))
    dom = (sanity.get("input_domain") or {}).get("methods") or {}
    if dom:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
        for ax, kind in zip(axes, ("deletion", "insertion")):
            for m, r in dom.items():
                if r[f"{kind}_auc"] is not None and r[f"representation_{kind}_auc"] is not None:
                    ax.scatter(r[f"representation_{kind}_auc"], r[f"{kind}_auc"], label=m)
                    ax.annotate(m, (r[f"representation_{kind}_auc"], r[f"{kind}_auc"]), fontsize="x-small")
            ax.set_xlabel(f"{kind} AUC, frames removed in the representation")
            ax.set_ylabel(f"{kind} AUC, frames removed in the waveform")
            ax.set_title(f"{kind} ({'lower' if kind == 'deletion' else 'higher'} is better)")
        figures.append(str(plots.save_figure(fig, fig_dir / "stage3_sanity_domains.png")))
    return figures


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _none_if_nan(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"
