"""One command, one table: explanation cost and quality, detector and data throughput.

``python -m xai_lib.bench`` (``make bench``) measures, in one run on one machine, everything
the README's performance section reports, and writes ``outputs/bench/results.json`` and
``outputs/bench/results.md``::

    python -m xai_lib.bench                       # the demo run in outputs/demo (made if absent)
    python -m xai_lib.bench --skip-xlsr --repeats 3
    python -m xai_lib.bench --quick --out /tmp/b  # seconds: tiny corpus, tiny detector (the test)

What is measured
----------------
**Attribution methods** (every one of :data:`xai_lib.explanation.methods.METHODS` available), on
the same partially spoofed eval utterances, in this process:

* quality, once (it is deterministic): deletion / insertion AUC, localisation ROC-AUC and
  EER, pointing game, through :func:`xai_lib.explanation.evaluation.evaluate_methods`;
* cost, ``--repeats`` times: each repetition walks the same length-sorted batches as
  ``evaluate_methods`` and times, per batch, the detector forward pass (no grad; median of
  3 passes, a single pass being short and noisy) and every method's attribution (device
  synchronised; a method whose first pass costs less than :data:`CHEAP_METHOD_FORWARDS`
  forward passes -- the learned importance, saliency, attention rollout, Grad-CAM, random -- is timed
  like the forward, as the median of 3 passes, so that both sides of its ratio are equally
  robust to a load spike). ``ms_per_utt`` is a repetition's attribution
  time divided by the utterances; ``cost_vs_forward`` is that divided by the *same
  repetition's* forward time per utterance, so each ratio is computed within one
  repetition and machine-load drifts between repetitions do not enter it. Reported: the
  median with min and max over the repetitions. ``evaluate_methods`` runs first and also
  serves as the warm-up (one-time start-up costs are not in the timed repetitions).

**Detector** (the demo architecture and, unless ``--skip-xlsr``, XLS-R 300M + Conformer-TCM
built from ``configs/conformertcm_baseline.yaml`` with random weights):

* training throughput: utterances/s of forward + backward + optimiser step on fixed random
  crops (the config's batch size and crop length; XLS-R on CPU: batch 2 of 4.2 s), timed
  per step after warm-up steps;
* inference real-time factor: seconds of processing / seconds of audio, no-grad forward of
  a batch of 4.2 s (66,800-sample) waves, timed per repetition after a warm-up pass;
* peak memory. Each of these measurements runs in its **own fresh child process**
  (``multiprocessing`` spawn) that does nothing else. After importing torch and
  transformers the child records its RSS and resets the kernel's peak-RSS high-water mark
  (``/proc/self/clear_refs``); at the end it reports the high-water mark (``VmHWM``; where
  it cannot be reset, ``getrusage`` ``ru_maxrss``). The kernel's figure sees every
  allocator (torch's CPU allocator, glibc malloc, BLAS/OpenMP buffers), so ``peak -
  baseline`` is the model, gradients, optimiser state, activations and allocator caches of
  that one measurement. ``tracemalloc`` would miss torch's C++ allocations, and in the
  bench process memory freed by earlier steps would be reused and hidden, hence the child
  (``--quick`` measures in-process to stay fast, and says so). On CUDA the figure is
  ``torch.cuda.max_memory_allocated`` of the child instead (tensors only, without the
  caching allocator's reserve or the CUDA context).

**Data**: synthetic corpus generation time (demo size into a temporary folder, timed here;
the time recorded in the corpus's ``corpus.json`` is listed beside it), and decode + crop
throughput (utterances/s through ``TrainDataset`` and a ``DataLoader``, after one warm pass
so the files are in the page cache), also with RawBoost algorithm 5 (the LA recipe).

Goal check (printed, not asserted; :func:`check_goals`). Every speed goal is a **ratio** of two
costs measured in the same repetition of this one run (machine load cancels): learned
importance <= 1.0 x one detector forward pass (stretch: <= 0.7 x) and >= 50 x cheaper than
Integrated Gradients; ``xai_lib.explain``'s verdict + importance <= 1.6 x the verdict alone (the
detector's forward on the same utterance, one utterance per call as the command runs on files,
:func:`time_explained_verdict`). Quality goals: importance deletion AUC <= IG's,
localisation AUC >= IG's.

Absolute times (ms per utterance) are in ``results.json`` always, but ``results.md`` prints them
only in its GPU section (a run with ``--device cuda``): on a shared CPU they say more about the
other processes than about the code; the ratios are what the goals are about.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from xai_lib.console import say, say_error
from xai_lib.cpu import keep_freed_memory

import numpy as np

__all__ = [
    "BenchError",
    "QUALITY_KEYS",
    "COST_KEYS",
    "METHOD_KEYS",
    "REFERENCE_CROP_SAMPLES",
    "CHEAP_METHOD_FORWARDS",
    "timing_stats",
    "machine_info",
    "measure_detector",
    "bench_methods",
    "check_goals",
    "results_markdown",
    "run_bench",
    "build_parser",
    "main",
]

log = logging.getLogger(__name__)

#: Deterministic explanation-quality metrics (computed once per run).
QUALITY_KEYS: tuple[str, ...] = ("deletion_auc", "insertion_auc", "loc_auc", "loc_eer", "pointing_game")
#: Timed metrics (``{"median", "min", "max", "n", "runs"}`` over the repetitions).
COST_KEYS: tuple[str, ...] = ("ms_per_utt", "cost_vs_forward")
#: Every key of ``results.json["methods"][NAME]`` (the Stage-3 metrics).
METHOD_KEYS: tuple[str, ...] = QUALITY_KEYS + COST_KEYS
#: A method whose first pass on a batch costs less than this many forward passes is timed as
#: the median of ``forward_passes`` passes, like the forward (IG and occlusion: one pass).
CHEAP_METHOD_FORWARDS = 10.0
#: The reference recipe's training crop (about 4.2 s at 16 kHz), also the RTF input length.
REFERENCE_CROP_SAMPLES = 66800
SAMPLE_RATE = 16000

_DEMO_RUN_DIR = "outputs/demo"
_DEMO_STAGE1_CONFIG = "configs/demo.yaml"
_XLSR_CONFIG = "configs/conformertcm_baseline.yaml"


class BenchError(RuntimeError):
    """The run to measure is missing and cannot be made (the message says what to do)."""


# ----------------------------------------------------------------------------- small helpers


def timing_stats(values: Sequence[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "n", "runs"}`` of repeated measurements (floats)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "runs": []}
    return {"median": float(np.median(vals)), "min": min(vals), "max": max(vals), "n": len(vals), "runs": vals}


def _rss_mb() -> float | None:
    """Current resident set size of this process in MiB (Linux ``/proc``), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS high-water mark to its current RSS (Linux >= 4.0).

    Writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM``, so a later
    :func:`_peak_rss_mb` sees only what happened after this call. Returns False where
    that is not possible (then the peak covers the whole process life).
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak resident set size in MiB: ``VmHWM`` (since the last reset) where Linux has it, else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _mem_available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, library versions, GPU, date."""
    import torch

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = round(int(line.split()[1]) / 1024.0**2, 1)
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for pkg in ("transformers", "captum", "numpy"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - optional information only
            versions[pkg] = None
    info: dict[str, Any] = {
        "cpu_model": cpu or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": mem_total,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
    }
    return info


# ----------------------------------------------------------------------------- detector (child processes)


def measure_detector(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One detector measurement; meant to run alone in a fresh process (see the module doc).

    Args:
        spec: ``{"what": "train" | "infer", "model": ModelConfig as a dict, "batch": B,
            "samples": L, "warmup": n, "repeats": n, "device": "cpu" | "cuda[:N]",
            "threads": torch CPU threads, "seed": int, "optimizer": "adam" | "adamw",
            "lr": float, "weight_decay": float, "class_weights": [spoof, bona],
            "bf16": autocast to bfloat16 on CUDA}``.

    Returns:
        ``{"seconds": [per timed step/pass], "baseline_rss_mb", "peak_rss_mb",
        "cuda_peak_mb", "parameters"}``; inputs are seeded random waves (B, L).
    """
    import contextlib

    import torch
    import torch.nn.functional as F

    from xai_lib.config import ModelConfig, config_from_dict
    from xai_lib.detector.model import Detector
    from xai_lib.explanation.methods import synchronize

    keep_freed_memory()  # as in training: the costs measured are the product's
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(int(spec.get("seed", 0)))
    device = torch.device(spec.get("device", "cpu"))
    gc.collect()
    baseline = _rss_mb()
    peak_reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = Detector(config_from_dict(spec["model"], ModelConfig, "<bench model>")).to(device)
    B, L = int(spec["batch"]), int(spec["samples"])
    wave = (0.1 * torch.randn(B, L)).to(device)  # (B, L)
    labels = (torch.arange(B) % 2).to(device)  # (B,) alternate spoof / bona fide
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if spec.get("bf16") and device.type == "cuda"
        else contextlib.nullcontext()
    )
    seconds: list[float] = []
    if spec["what"] == "train":
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if spec.get("optimizer", "adamw") == "adamw" else torch.optim.Adam
        opt = opt_cls(params, lr=float(spec.get("lr", 1e-4)), weight_decay=float(spec.get("weight_decay", 0.0)))
        weights = torch.tensor(spec.get("class_weights", [0.1, 0.9]), dtype=torch.float32, device=device)
        for step in range(int(spec["warmup"]) + int(spec["repeats"])):
            synchronize(device)
            t0 = time.perf_counter()
            with autocast:
                logits = model(wave).logits  # (B, 2)
            loss = F.cross_entropy(logits.float(), labels, weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            synchronize(device)
            if step >= int(spec["warmup"]):
                seconds.append(time.perf_counter() - t0)
    elif spec["what"] == "infer":
        model.eval()
        with torch.no_grad():
            for rep in range(int(spec["warmup"]) + int(spec["repeats"])):
                synchronize(device)
                t0 = time.perf_counter()
                with autocast:
                    model(wave)
                synchronize(device)
                if rep >= int(spec["warmup"]):
                    seconds.append(time.perf_counter() - t0)
    else:
        raise ValueError(f"measure_detector: 'what' must be 'train' or 'infer', got {spec['what']!r}")
    return {
        "seconds": seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_reset": peak_reset,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "pid": os.getpid(),
    }


def _measure(spec: Mapping[str, Any], isolate: bool = True) -> dict[str, Any]:
    """:func:`measure_detector` in a fresh spawned process (``isolate``) or in this one.

    A failure (an exception, or a child killed e.g. for memory) is returned as
    ``{"error": reason}`` rather than raised, so the bench reports it and goes on.
    """
    if not isolate:
        try:
            return measure_detector(spec)
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}: {exc}"}
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(measure_detector, dict(spec)).result()
    except BrokenProcessPool:
        return {"error": "the measuring child process died (killed, most likely out of memory)"}
    except Exception as exc:  # noqa: BLE001 - the bench reports a failed measurement and goes on
        return {"error": f"{type(exc).__name__}: {exc}"}


def _detector_row(config: str, what: str, spec: Mapping[str, Any], res: Mapping[str, Any], note: str = "") -> dict[str, Any]:
    B, L = int(spec["batch"]), int(spec["samples"])
    row: dict[str, Any] = {
        "config": config,
        "measurement": "training throughput" if what == "train" else "inference real-time factor",
        "unit": "utterances/s" if what == "train" else "x real time (lower is faster)",
        "input": f"batch {B} x {L / SAMPLE_RATE:.2f} s",
        "batch": B,
        "samples": L,
        "device": spec.get("device"),
        "warmup": int(spec["warmup"]),
        "note": note,
    }
    if "error" in res:
        row.update(value=timing_stats([]), skipped=True, note=(note + "; " if note else "") + res["error"])
        return row
    secs = res["seconds"]
    if what == "train":
        values = [B / s for s in secs]
    else:
        values = [s / (B * L / SAMPLE_RATE) for s in secs]
    row.update(
        value=timing_stats(values),
        seconds=timing_stats(secs),
        parameters=res.get("parameters"),
        peak_rss_mb=res.get("peak_rss_mb"),
        baseline_rss_mb=res.get("baseline_rss_mb"),
        peak_above_baseline_mb=(
            None if res.get("peak_rss_mb") is None or res.get("baseline_rss_mb") is None
            else res["peak_rss_mb"] - res["baseline_rss_mb"]
        ),
        cuda_peak_mb=res.get("cuda_peak_mb"),
        skipped=False,
    )
    return row


def _skipped_row(config: str, what: str, spec: Mapping[str, Any], note: str) -> dict[str, Any]:
    return _detector_row(config, what, spec, {"error": "skipped"}, note) | {"note": note}


def _bench_detectors(
    demo_model: Mapping[str, Any],
    demo_train: Mapping[str, Any],
    device: str,
    threads: int,
    repeats: int,
    quick: bool,
    skip_xlsr: bool,
    notes: list[str],
    isolate: bool = True,
) -> list[dict[str, Any]]:
    """Training throughput, RTF and peak memory of the demo (and XLS-R) detector, one child each."""
    rows: list[dict[str, Any]] = []
    base = {"device": device, "threads": threads, "seed": 0}
    on_gpu = device.startswith("cuda")
    infer_len = 16000 if quick else REFERENCE_CROP_SAMPLES
    demo_specs = {
        "infer": {**base, "what": "infer", "model": dict(demo_model), "batch": 2 if quick else 4, "samples": infer_len,
                  "warmup": 1, "repeats": max(1, repeats)},
        "train": {**base, "what": "train", "model": dict(demo_model), **demo_train, "warmup": 1 if quick else 2,
                  "repeats": max(2, repeats)},
    }
    for what in ("infer", "train"):
        log.info("detector: demo %s ...", what)
        res = _measure(demo_specs[what], isolate)
        rows.append(_detector_row("demo", what, demo_specs[what], res, "" if isolate else "measured in the bench process"))
    if quick or skip_xlsr:
        notes.append("XLS-R 300M skipped (" + ("--quick" if quick else "--skip-xlsr") + ").")
        return rows

    from xai_lib.config import Stage1Config, config_to_dict, load_config
    from xai_lib.paths import resolve_path

    xcfg = load_config(resolve_path(_XLSR_CONFIG), Stage1Config, overrides=["model.ssl.pretrained_path=null"])
    xmodel = config_to_dict(xcfg.model)
    infer_spec = {**base, "what": "infer", "model": xmodel, "batch": 4 if on_gpu else 2,
                  "samples": REFERENCE_CROP_SAMPLES, "warmup": 1, "repeats": max(1, repeats if on_gpu else min(repeats, 3)),
                  "bf16": bool(xcfg.training.bf16)}
    train_spec = {**base, "what": "train", "model": xmodel, "batch": 2 if not on_gpu else 8,
                  "samples": REFERENCE_CROP_SAMPLES, "warmup": 1 if not on_gpu else 2,
                  "repeats": 2 if not on_gpu else max(2, repeats), "optimizer": xcfg.training.optimizer,
                  "lr": xcfg.training.lr, "weight_decay": xcfg.training.weight_decay,
                  "class_weights": list(xcfg.training.class_weights), "bf16": bool(xcfg.training.bf16)}
    xnote = "random weights (architecture of configs/conformertcm_baseline.yaml, pretrained_path=None)"
    if on_gpu and xcfg.training.bf16:
        xnote += "; bf16 autocast as in the recipe"
    log.info("detector: XLS-R 300M inference (random weights) ...")
    res = _measure(infer_spec, isolate)
    rows.append(_detector_row("XLS-R 300M + TCM", "infer", infer_spec, res, xnote))

    # Training: estimated from the forward time first (a step costs about 3 forwards).
    budget_s = 240.0
    skip_reason = None
    if "error" not in res and not on_gpu:
        per_utt = float(np.median(res["seconds"])) / infer_spec["batch"]
        est = 3.0 * per_utt * train_spec["batch"] * (train_spec["warmup"] + train_spec["repeats"])
        if est > budget_s:
            skip_reason = f"skipped: estimated {est:.0f} s for {train_spec['warmup'] + train_spec['repeats']} steps > {budget_s:.0f} s budget"
    avail = _mem_available_mb()
    params = res.get("parameters") or 317_000_000
    need_mb = params * 16 / 2**20 * 1.5  # weights + grads + 2 Adam moments, +50 % activations/caches
    if not on_gpu and avail is not None and need_mb > avail:
        skip_reason = f"skipped: needs about {need_mb / 1024:.1f} GiB, {avail / 1024:.1f} GiB available"
    if skip_reason:
        rows.append(_skipped_row("XLS-R 300M + TCM", "train", train_spec, f"{xnote}; {skip_reason}"))
        notes.append(f"XLS-R training throughput {skip_reason}.")
    else:
        log.info("detector: XLS-R 300M training steps (random weights) ...")
        res = _measure(train_spec, isolate)
        rows.append(_detector_row("XLS-R 300M + TCM", "train", train_spec, res, xnote))
    return rows


# ----------------------------------------------------------------------------- data


def _bench_data(
    data_cfg: Any, repeats: int, quick: bool, corpus_seconds: float | None, corpus_size: str,
    recorded_seconds: float | None,
) -> list[dict[str, Any]]:
    """Corpus generation time and decode + crop throughput through TrainDataset/DataLoader."""
    from torch.utils.data import DataLoader

    from xai_lib.data.datasets import TrainDataset, build_split, collate_padded

    rows: list[dict[str, Any]] = []
    gen_runs: list[float] = [] if corpus_seconds is None else [corpus_seconds]
    if not quick:
        from xai_lib.data.synthetic import generate_corpus

        for r in range(max(1, min(repeats, 3))):
            tmp = Path(tempfile.mkdtemp(prefix="xai_bench_corpus_"))
            try:
                log.info("data: generating the demo corpus into %s (%d/%d) ...", tmp, r + 1, max(1, min(repeats, 3)))
                t0 = time.perf_counter()
                generate_corpus(tmp, seed=0, size="demo", progress=False)
                gen_runs.append(time.perf_counter() - t0)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    rows.append({
        "measurement": "corpus generation",
        "input": f"synthetic '{corpus_size}' corpus, seed 0, default workers",
        "unit": "s",
        "value": timing_stats(gen_runs),
        "note": "generated into a temporary folder in this run"
        + (f"; corpus.json of the corpus used records {recorded_seconds:.1f} s" if recorded_seconds else ""),
    })

    utts = build_split(data_cfg, "train")
    for algo in (0, 5):
        n_utts = len(utts) if algo == 0 else min(len(utts), 100)
        ds = TrainDataset(utts[:n_utts], crop_samples=data_cfg.crop_samples, sample_rate=data_cfg.sample_rate,
                          rawboost_algo=algo, seed=0)
        loader = DataLoader(ds, batch_size=16, shuffle=False, collate_fn=collate_padded, num_workers=data_cfg.num_workers)
        runs = []
        for r in range(1 + max(1, repeats)):  # pass 0: page cache warm-up, untimed
            t0 = time.perf_counter()
            n = sum(len(b["utt_ids"]) for b in loader)
            if r > 0:
                runs.append(n / (time.perf_counter() - t0))
        what = "decode + crop" if algo == 0 else "decode + crop + RawBoost 5"
        rows.append({
            "measurement": what,
            "input": f"{n_utts} train utterances -> {data_cfg.crop_samples / SAMPLE_RATE:.2f} s crops, batch 16, "
                     f"num_workers={data_cfg.num_workers}",
            "unit": "utterances/s",
            "value": timing_stats(runs),
            "note": "TrainDataset + DataLoader, files in the page cache (one untimed pass first)",
        })
    return rows


# ----------------------------------------------------------------------------- attribution methods


def bench_methods(
    detector: Any,
    xai: Any | None,
    items: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    repeats: int,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 8,
    deletion_steps: int = 20,
    seed: int = 0,
    progress: bool = True,
    forward_passes: int = 3,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Quality (once) and cost (``repeats`` times) of every method on the same utterances.

    Args:
        detector: the frozen detector in ``eval()``.
        xai: the Stage-2 model (``None``: no ``importance``).
        items: explanation items (``wave`` (L,), ``spoof_mask`` (T,), ``label``).
        methods: the methods to measure.
        repeats: timing repetitions.
        method_kwargs: per-method options (e.g. IG ``n_steps``).
        batch_size: utterances per batch (as ``evaluate_methods``).
        deletion_steps: deletion/insertion curve steps.
        seed: seed of the ``random`` method.
        progress: tqdm bars.
        forward_passes: the reference forward of each batch is timed this many times per
            repetition and the median is used (one pass is short and noisy); so is every
            method cheaper than :data:`CHEAP_METHOD_FORWARDS` forward passes.

    Returns:
        ``({method: {QUALITY_KEYS..., "ms_per_utt": stats, "cost_vs_forward": stats,
        "deletion_curve", "insertion_curve"}}, {"forward_ms_per_utt": stats, ...})``.
    """
    import torch
    from tqdm.auto import tqdm

    from xai_lib.explanation.methods import Attributor
    from xai_lib.data.audio import pad_batch
    from xai_lib.explanation.evaluation import evaluate_methods, time_forward

    method_kwargs = {k: dict(v) for k, v in (method_kwargs or {}).items()}
    quality = evaluate_methods(
        detector, xai, list(items), methods=list(methods), steps=deletion_steps, batch_size=batch_size,
        seed=seed, progress=progress, method_kwargs=method_kwargs, warmup=False,
    )  # untimed here: this pass is also the warm-up of the timing repetitions below
    attributor = Attributor(detector, importance_model=xai)
    device = attributor.device
    waves = [torch.as_tensor(np.asarray(it["wave"], dtype=np.float32)) for it in items]
    order = sorted(range(len(waves)), key=lambda i: -waves[i].numel())
    batches = [order[k: k + batch_size] for k in range(0, len(order), batch_size)]
    n = len(waves)
    audio_s = sum(w.numel() for w in waves) / SAMPLE_RATE
    fwd_ms: list[float] = []
    ms: dict[str, list[float]] = {m: [] for m in methods}
    ratio: dict[str, list[float]] = {m: [] for m in methods}
    load: list[list[float] | None] = []
    for rep in tqdm(range(repeats), desc="timing repetitions", disable=not progress):
        load.append(_loadavg())
        fwd_s = 0.0
        secs = {m: 0.0 for m in methods}
        for k, rows in enumerate(batches):
            wave, lengths = pad_batch([waves[i] for i in rows])  # (B, L), (B,)
            wave, lengths = wave.to(device), lengths.to(device)
            fwd = time_forward(detector, wave, lengths, forward_passes)
            fwd_s += fwd
            for m in methods:
                kw = dict(method_kwargs.get(m, {}))
                if m == "random":
                    kw["seed"] = seed + k
                passes = [attributor.attribute(wave, lengths, method=m, target=0, **kw).seconds]
                if passes[0] < CHEAP_METHOD_FORWARDS * fwd:
                    passes += [attributor.attribute(wave, lengths, method=m, target=0, **kw).seconds
                               for _ in range(forward_passes - 1)]
                secs[m] += float(np.median(passes))
        f = 1000.0 * fwd_s / n
        fwd_ms.append(f)
        for m in methods:
            ms[m].append(1000.0 * secs[m] / n)
            ratio[m].append(ms[m][-1] / f)
        log.info("timing repetition %d/%d: forward %.1f ms/utt; %s (load average %s)", rep + 1, repeats, f,
                 ", ".join(f"{m} {ms[m][-1]:.1f}" for m in methods), load[-1])
    results: dict[str, dict[str, Any]] = {}
    for m in methods:
        entry: dict[str, Any] = {k: quality[m].get(k) for k in QUALITY_KEYS}
        entry["ms_per_utt"] = timing_stats(ms[m])
        entry["cost_vs_forward"] = timing_stats(ratio[m])
        entry["deletion_curve"] = quality[m].get("deletion_curve")
        entry["insertion_curve"] = quality[m].get("insertion_curve")
        results[m] = entry
    extra: dict[str, Any] = {
        "forward_ms_per_utt": timing_stats(fwd_ms),
        "num_utterances": n,
        "audio_seconds": round(audio_s, 2),
        "batch_size": batch_size,
        "batches": len(batches),
        "deletion_steps": deletion_steps,
        "forward_passes_per_batch": forward_passes,
        "load_average_per_repetition": load,
    }
    if xai is not None and "importance" in methods:
        extra["explained_verdict_vs_verdict"] = timing_stats(
            time_explained_verdict(detector, xai, waves, repeats, forward_passes))
    if "importance" in methods and "integrated_gradients" in methods:
        extra["ig_over_importance"] = timing_stats(
            [a / b for a, b in zip(ms["integrated_gradients"], ms["importance"]) if b > 0]
        )
    return results, extra


def time_explained_verdict(detector: Any, xai: Any, waves: Sequence[Any], repeats: int, passes: int = 3) -> list[float]:
    """Per repetition: the time of ``xai_lib.explain``'s verdict + learned importance over every
    wave (one utterance per call, as the command runs on files) divided by the verdict alone (the
    detector's forward on the same wave), each the median of ``passes`` calls per wave."""
    import torch

    from xai_lib.explain import Explainer
    from xai_lib.explanation.methods import synchronize

    explainer = Explainer(detector, method="importance", importance_model=xai, score_threshold=0.0)
    device = explainer.device

    def timed(fn: Any) -> float:
        times = []
        for _ in range(max(1, passes)):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    ratios = []
    for _ in range(repeats):
        verdict = explained = 0.0
        for w in waves:
            x = w[None].to(device)
            with torch.no_grad():
                verdict += timed(lambda: detector(x))
            explained += timed(lambda: explainer.frame_scores(w.numpy()))
        ratios.append(explained / max(verdict, 1e-12))
    return ratios


# ----------------------------------------------------------------------------- goals


#: Speed goals: (key, goal text, threshold, higher is better). Each value is a ratio of two costs
#: measured within the same repetitions of one bench run.
SPEED_GOALS: tuple[tuple[str, str, float, bool], ...] = (
    ("importance_vs_forward", "importance cost <= 1.0 x one forward pass", 1.0, False),
    ("importance_vs_forward", "importance cost <= 0.7 x one forward pass (stretch)", 0.7, False),
    ("ig_over_importance", "importance >= 50 x cheaper than Integrated Gradients", 50.0, True),
    ("explained_verdict_vs_verdict", "explained verdict (verdict + importance) <= 1.6 x the verdict alone", 1.6, False),
)


def check_goals(methods: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The explanation-cost and quality goals, each ``{"goal", "value", "status": PASS|FAIL|N/A, "detail", "kind"}``.

    Speed goals (``kind`` ``"speed"``) are ratios measured in one run (median over the
    repetitions of the per-repetition ratio); quality goals (``"quality"``) compare the learned
    importance with Integrated Gradients on the same utterances.
    """
    imp = methods.get("importance")
    ig = methods.get("integrated_gradients")

    def goal(name: str, value: float | None, ok: bool | None, detail: str, kind: str) -> dict[str, Any]:
        status = "N/A" if ok is None else ("PASS" if ok else "FAIL")
        return {"goal": name, "value": value, "status": status, "detail": detail, "kind": kind}

    ratios = {
        "importance_vs_forward": (((imp or {}).get("cost_vs_forward") or {}).get("median"),
                                  "median over repetitions of importance ms / forward ms", "no importance model"),
        "ig_over_importance": ((extra.get("ig_over_importance") or {}).get("median"),
                               "median over repetitions of IG ms / importance ms", "importance or IG missing"),
        "explained_verdict_vs_verdict": ((extra.get("explained_verdict_vs_verdict") or {}).get("median"),
                                         "median over repetitions of xai_lib.explain (importance) / the verdict's "
                                         "forward, one utterance per call", "no importance model"),
    }
    out = []
    for key, name, threshold, higher in SPEED_GOALS:
        value, detail, missing = ratios[key]
        ok = None if value is None else (value >= threshold if higher else value <= threshold)
        out.append(goal(name, value, ok, detail if value is not None else missing, "speed"))
    for key, name, better in (
        ("deletion_auc", "importance deletion AUC <= IG's (lower is better)", lambda a, b: a <= b),
        ("loc_auc", "importance localisation AUC >= IG's", lambda a, b: a >= b),
    ):
        a = (imp or {}).get(key)
        b = (ig or {}).get(key)
        ok = None if a is None or b is None else better(a, b)
        out.append(goal(name, a, ok, f"importance {_f(a)} vs IG {_f(b)}", "quality"))
    return out


# ----------------------------------------------------------------------------- report


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (int, float)):
        if v != 0 and (abs(v) >= 1000 or abs(v) < 10 ** -digits):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.{digits}f}"
    return str(v)


def _stat(s: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not s or s.get("median") is None:
        return "–"
    if s.get("n", 0) <= 1:
        return f"{_f(s['median'], digits)} (n=1)"
    return f"{_f(s['median'], digits)} ({_f(s['min'], digits)}–{_f(s['max'], digits)})"


def results_markdown(results: Mapping[str, Any]) -> str:
    """The speed goals, the three tables (methods, detector, data), absolute times on a GPU and the
    goal check, as markdown."""
    m = results["machine"]
    s = results["settings"]
    me = results["methods_setup"]
    lines = [
        f"Measured {m['date']} on {m['cpu_model'] or 'unknown CPU'} ({m['usable_cores']} usable cores, "
        f"{m['torch_threads']} torch threads, {m['memory_gib']} GiB), device {m['device']}"
        + (f" ({m['cuda_device']})" if m.get("cuda_device") else "")
        + f", torch {m['torch']}; load average {results['load']['start']} at start, {results['load']['end']} at end.",
        "Timings: median (min–max) over the repetitions; ratios are taken within each repetition.",
        "",
        "### Speed goals (ratios measured in this run)",
        "",
    ]
    for g in results["goals"]:
        if g.get("kind", "speed") == "speed":
            lines.append(f"- **{g['status']}** {g['goal']}: {_f(g['value'])} ({g['detail']})")
    lines += [
        "",
        f"### Attribution methods ({me['num_utterances']} partially spoofed eval utterances, "
        f"{me['audio_seconds']} s of audio, batches of {me['batch_size']}, {s['repeats']} repetitions)",
        "",
        "| method | × forward pass | deletion AUC ↓ | insertion AUC ↑ | loc ROC-AUC ↑ | loc EER ↓ | pointing game ↑ |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["methods"].items():
        lines.append(
            f"| {name} | {_stat(r['cost_vs_forward'], 2)} | {_f(r['deletion_auc'])} | "
            f"{_f(r['insertion_auc'])} | {_f(r['loc_auc'])} | {_f(r['loc_eer'])} | {_f(r['pointing_game'])} |"
        )
    lines += [
        "",
        f"IG: {s['ig_steps']} steps; deletion/insertion: {me['deletion_steps']} steps, frames removed in the "
        "detector's representation; random = the floor. Cost: the method's time over one no-grad detector "
        "forward pass of the same batches in the same repetition.",
        "",
    ]
    if str(m.get("device", "")).startswith("cuda"):
        lines += [
            f"### GPU: absolute times ({m.get('cuda_device') or m['device']})",
            "",
            f"One detector forward: {_stat(me['forward_ms_per_utt'], 2)} ms/utt.",
            "",
            "| method | ms / utt |",
            "|---|---|",
            *[f"| {name} | {_stat(r['ms_per_utt'], 2)} |" for name, r in results["methods"].items()],
            "",
        ]
    lines += [
        "### Detector throughput",
        "",
        "| config | measurement | input | median (min–max) | unit | peak memory above baseline | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["detector"]:
        if r.get("cuda_peak_mb") is not None:
            mem = f"{r['cuda_peak_mb']:.0f} MiB (CUDA allocated)"
        elif r.get("peak_above_baseline_mb") is not None:
            mem = f"{r['peak_above_baseline_mb']:.0f} MiB (peak RSS {r['peak_rss_mb']:.0f} MiB)"
        else:
            mem = "–"
        value = "skipped" if r.get("skipped") else _stat(r["value"], 3)
        lines.append(f"| {r['config']} | {r['measurement']} | {r['input']} | {value} | {r['unit']} | {mem} | {r.get('note') or ''} |")
    isolated = not results["settings"]["quick"]
    lines += [
        "",
        ("Peak memory: each measurement ran alone in a fresh child process; its peak RSS (Linux VmHWM, reset after "
         "importing torch/transformers) minus its RSS at that point, i.e. model, gradients, optimiser state, "
         "activations and allocator caches of that measurement." if isolated else
         "Peak memory (--quick): measured in the bench process, growth of its peak RSS (VmHWM reset just before) "
         "over its RSS then; memory the process had already freed and reuses is not counted."),
        "",
        "### Data",
        "",
        "| measurement | input | median (min–max) | unit | note |",
        "|---|---|---|---|---|",
    ]
    for r in results["data"]:
        lines.append(f"| {r['measurement']} | {r['input']} | {_stat(r['value'], 2)} | {r['unit']} | {r.get('note') or ''} |")
    lines += ["", "### Goal check", ""]
    for g in results["goals"]:
        kind = "speed" if g.get("kind", "speed") == "speed" else "quality"
        lines.append(f"- **{g['status']}** ({kind}) {g['goal']}: {_f(g['value'])} ({g['detail']})")
    if results.get("notes"):
        lines += ["", "Notes:", *[f"- {n}" for n in results["notes"]]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the run to measure


def _quick_model_dict() -> dict[str, Any]:
    """A tiny detector (a few ms per forward pass on CPU) for ``--quick``."""
    return {
        "ssl": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                "conv_dim": [16] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
                "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2},
        "emb_size": 16, "num_encoders": 2, "heads": 2, "kernel_size": 7,
    }


def _prepare_quick_run(work: Path, device: str, notes: list[str]) -> tuple[Path, Path, float]:
    """Tiny corpus + a tiny detector trained 2 steps + a tiny Stage-2 model trained 2 steps."""
    from xai_lib.config import Stage1Config, Stage2Config, load_config
    from xai_lib.data.synthetic import generate_corpus
    from xai_lib.detector.training import train_stage1

    corpus = work / "corpus"
    run_dir = work / "run"
    t0 = time.perf_counter()
    generate_corpus(corpus, seed=0, size="tiny", progress=False, overwrite=True)
    corpus_s = time.perf_counter() - t0
    data = {"root": str(corpus), "format": "asvspoof2019", "crop_samples": 8000, "rawboost_algo": 0,
            "max_train_utts": 16, "max_eval_utts": 8}
    cfg1 = load_config({"model": _quick_model_dict(), "data": data,
                        "training": {"batch_size": 4, "eval_batch_size": 8, "num_epochs": 1, "max_steps_per_epoch": 2,
                                     "keep_best": 1, "lr": 1e-3, "optimizer": "adamw", "device": device}}, Stage1Config)
    train_stage1(cfg1, run_dir, resume=False, progress=False)
    try:
        from xai_lib.importance.training import train_stage2
    except ImportError as exc:
        notes.append(f"Stage 2 unavailable ({exc}); no learned importance.")
        return run_dir, corpus, corpus_s
    cfg2 = load_config({"xai": {"importance_hidden_dim": 16}, "data": {**data, "max_eval_utts": 4},
                        "training": {"batch_size": 4, "eval_batch_size": 4, "num_epochs": 1, "max_steps_per_epoch": 2,
                                     "device": device}}, Stage2Config)
    train_stage2(cfg2, run_dir, detector_path=run_dir / "stage1_detector.pth", resume=False, progress=False)
    return run_dir, corpus, corpus_s


def _ensure_run(run_dir: Path, notes: list[str]) -> None:
    """Check the run to measure; the demo run (``outputs/demo``) is made with the pipeline when absent.

    Raises:
        BenchError: a run directory other than the demo's has no ``stage1_detector.pth``, or
            the demo pipeline failed.
    """
    from xai_lib import pipeline
    from xai_lib.paths import resolve_path

    detector = run_dir / "stage1_detector.pth"
    is_demo = run_dir.resolve() == resolve_path(_DEMO_RUN_DIR).resolve()
    if not detector.is_file() and not is_demo:
        raise BenchError(
            f"--run-dir {run_dir}: no stage1_detector.pth there. Train it first "
            f"(python -m xai_lib.pipeline --run-dir {run_dir}), or leave --run-dir out to measure the demo run "
            f"({_DEMO_RUN_DIR}, made automatically when absent)."
        )
    if not detector.is_file():
        log.info("no %s: running the demo pipeline (corpus, Stage 1, 2, 3) into %s", detector, run_dir)
        code = pipeline.main(["--demo", "--run-dir", str(run_dir), "--no-progress"])
        if code != 0 or not detector.is_file():
            raise BenchError(
                f"the demo pipeline failed (exit code {code}) and {detector} was not made; "
                f"run `python -m xai_lib.pipeline --demo --run-dir {run_dir}` and read its report"
            )
        notes.append(f"The run {run_dir} was made by this bench (python -m xai_lib.pipeline --demo).")
    elif is_demo and not (run_dir / "stage2_xai.pth").is_file():
        log.info("no %s: running Stage 2 of the demo into %s", run_dir / "stage2_xai.pth", run_dir)
        code = pipeline.main(["--demo", "--stage2", "--run-dir", str(run_dir), "--no-progress"])
        if code != 0:
            notes.append(f"Stage 2 of the demo failed (exit code {code}); no learned importance measured.")


def _stage1_config(run_dir: Path) -> Any:
    from xai_lib.config import Stage1Config, load_config
    from xai_lib.paths import resolve_path

    saved = run_dir / "config_stage1.yaml"
    return load_config(saved if saved.is_file() else resolve_path(_DEMO_STAGE1_CONFIG), Stage1Config)


# ----------------------------------------------------------------------------- main flow


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement of ``args`` (see :func:`build_parser`); write and return the results."""
    import torch

    from xai_lib.training import resolve_device

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(args.device))
    threads_before = torch.get_num_threads()
    threads = args.threads or (1 if args.quick else threads_before)  # --quick: 1 thread, steady on a busy machine
    torch.set_num_threads(threads)
    try:
        return _run_bench(args, out, device, threads)
    finally:
        torch.set_num_threads(threads_before)


def _run_bench(args: argparse.Namespace, out: Path, device: str, threads: int) -> dict[str, Any]:
    from xai_lib.explanation.methods import METHODS
    from xai_lib.config import config_to_dict
    from xai_lib.explanation.evaluation import load_explanation_set
    from xai_lib.detector.checkpoint import load_detector
    from xai_lib.paths import resolve_path

    notes: list[str] = []
    sections: dict[str, float] = {}
    t_section = time.perf_counter()

    def section(name: str) -> None:
        nonlocal t_section
        now = time.perf_counter()
        sections[name] = round(now - t_section, 1)
        t_section = now

    load_start = _loadavg()
    t_start = time.perf_counter()
    repeats = 1 if args.quick else max(1, args.repeats)
    ig_steps = 4 if args.quick else args.ig_steps
    num_utts = min(args.num_utterances, 4) if args.quick else args.num_utterances
    deletion_steps = 5 if args.quick else 20

    # ---- the run to explain
    quick_corpus_s = None
    if args.quick:
        work = out / "quick_run"
        shutil.rmtree(work, ignore_errors=True)
        run_dir, _, quick_corpus_s = _prepare_quick_run(work, device, notes)
        notes.append("--quick: tiny corpus, tiny detector and Stage-2 model trained for 2 steps each; "
                     "1 repetition; the numbers only prove that the bench runs.")
    else:
        run_dir = resolve_path(args.run_dir)
        _ensure_run(run_dir, notes)
    cfg1 = _stage1_config(run_dir)
    data_cfg = cfg1.data
    data_cfg.root = str(resolve_path(data_cfg.root))

    detector = load_detector(run_dir / "stage1_detector.pth", map_location=device).to(device).eval()
    xai = None
    stage2_path = run_dir / "stage2_xai.pth"
    if stage2_path.is_file():
        try:
            from xai_lib.importance.checkpoint import load_xai

            xai = load_xai(stage2_path, detector=detector, map_location=device)
        except ImportError as exc:
            notes.append(f"Stage 2 code unavailable ({exc}); the learned importance is not measured.")
    else:
        notes.append(f"{stage2_path} not found; the learned importance is not measured.")
    methods = [m for m in METHODS if m != "importance" or xai is not None]
    items = load_explanation_set(data_cfg, "eval", num_utterances=num_utts, seed=args.seed, detector=detector,
                                 max_seconds=1.0 if args.quick else None)
    section("prepare run")
    method_kwargs: dict[str, dict[str, Any]] = {"integrated_gradients": {"n_steps": ig_steps}}
    if args.quick:
        method_kwargs["occlusion"] = {"perturbations_per_eval": 16}

    # ---- methods (same process, same utterances)
    log.info("methods: %s on %d utterances, %d timing repetitions", ", ".join(methods), len(items), repeats)
    method_results, method_extra = bench_methods(
        detector, xai, items, methods, repeats, method_kwargs=method_kwargs,
        deletion_steps=deletion_steps, seed=args.seed, progress=not args.no_progress,
    )
    del detector, xai
    section("attribution methods")

    # ---- detector throughput and memory (one child process per measurement)
    demo_model = config_to_dict(cfg1.model)
    tc = cfg1.training
    demo_train = {"batch": 2 if args.quick else tc.batch_size, "samples": 4000 if args.quick else data_cfg.crop_samples,
                  "optimizer": tc.optimizer, "lr": tc.lr, "weight_decay": tc.weight_decay,
                  "class_weights": list(tc.class_weights), "bf16": bool(tc.bf16)}
    detector_rows = _bench_detectors(demo_model, demo_train, device, threads, repeats, args.quick, args.skip_xlsr, notes,
                                     isolate=not args.quick)
    if args.quick:
        notes.append("--quick: detector measurements ran in the bench process (no child), so their memory "
                     "figures are the growth of this process's peak RSS from just before each measurement.")
    section("detector")

    # ---- data
    recorded = None
    try:
        recorded = json.loads((Path(data_cfg.root) / "corpus.json").read_text()).get("generation_seconds")
    except (OSError, ValueError):
        pass
    data_rows = _bench_data(data_cfg, repeats, args.quick, quick_corpus_s, "tiny" if args.quick else "demo",
                            None if args.quick else recorded)
    section("data")

    results: dict[str, Any] = {
        "machine": machine_info(device),
        "settings": {
            "quick": bool(args.quick), "repeats": repeats, "num_utterances": num_utts, "ig_steps": ig_steps,
            "run_dir": str(run_dir), "data_root": data_cfg.root, "seed": args.seed, "skip_xlsr": bool(args.skip_xlsr),
            "threads": threads, "method_kwargs": method_kwargs,
        },
        "load": {"start": load_start, "end": _loadavg()},
        "methods": method_results,
        "methods_setup": method_extra,
        "detector": detector_rows,
        "data": data_rows,
        "goals": check_goals(method_results, method_extra),
        "notes": notes,
        "bench_seconds": round(time.perf_counter() - t_start, 1),
        "section_seconds": sections,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_markdown(results))
    return results


def detector_sweep(device: str, batches: Sequence[int], repeats: int = 5, threads: int | None = None,
                   isolate: bool = True) -> list[dict[str, Any]]:
    """XLS-R 300M + Conformer-TCM (random weights) training and inference, fp32 vs bf16 autocast.

    For a GPU: one fresh child per (what, batch, precision) so that each peak-memory figure is
    its own; 4.2 s (66,800-sample) inputs; ``batches`` are the training batch sizes, inference
    uses the largest. A failure (e.g. out of memory) is a row with ``error``.

    Returns:
        rows ``{"what", "batch", "precision", "utt_per_s", "rtf", "step_s", "cuda_peak_mb", "error"}``.
    """
    from xai_lib.config import Stage1Config, config_to_dict, load_config
    from xai_lib.paths import resolve_path

    xcfg = load_config(resolve_path(_XLSR_CONFIG), Stage1Config, overrides=["model.ssl.pretrained_path=null"])
    tc = xcfg.training
    base = {"device": device, "threads": threads, "seed": 0, "model": config_to_dict(xcfg.model),
            "samples": REFERENCE_CROP_SAMPLES, "optimizer": tc.optimizer, "lr": tc.lr,
            "weight_decay": tc.weight_decay, "class_weights": list(tc.class_weights)}
    jobs = [("train", b) for b in batches] + [("infer", max(batches))]
    rows: list[dict[str, Any]] = []
    for what, batch in jobs:
        for bf16 in (False, True):
            spec = {**base, "what": what, "batch": batch, "bf16": bf16, "warmup": 2, "repeats": repeats}
            log.info("XLS-R %s batch %d %s ...", what, batch, "bf16" if bf16 else "fp32")
            res = _measure(spec, isolate)
            row: dict[str, Any] = {"what": what, "batch": batch, "precision": "bf16" if bf16 else "fp32"}
            if "error" in res:
                row["error"] = res["error"]
            else:
                step = float(np.median(res["seconds"]))
                row.update(step_s=step, utt_per_s=batch / step, rtf=step / (batch * REFERENCE_CROP_SAMPLES / SAMPLE_RATE),
                           cuda_peak_mb=res.get("cuda_peak_mb"), peak_rss_mb=res.get("peak_rss_mb"))
            log.info("  %s", row)
            rows.append(row)
    return rows


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m xai_lib.bench``."""
    p = argparse.ArgumentParser(
        prog="python -m xai_lib.bench",
        description="Explanation cost/quality, detector throughput and data throughput in one run "
                    "-> OUT/results.json and OUT/results.md.",
    )
    p.add_argument("--out", default="outputs/bench", help="output folder (default: outputs/bench)")
    p.add_argument("--run-dir", default=_DEMO_RUN_DIR,
                   help="run directory with stage1_detector.pth / stage2_xai.pth (default: outputs/demo, made if absent)")
    p.add_argument("--repeats", type=int, default=5, help="timing repetitions (median, min, max reported)")
    p.add_argument("--num-utterances", type=int, default=24, help="partially spoofed eval utterances explained")
    p.add_argument("--ig-steps", type=int, default=50, help="Integrated Gradients steps (default 50, as notebook 03)")
    p.add_argument("--seed", type=int, default=1234, help="utterance draw and random-baseline seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="seconds-long run on a tiny corpus and tiny models, 1 repetition, no XLS-R (used by the test)")
    p.add_argument("--skip-xlsr", action="store_true", help="do not measure the XLS-R 300M architecture")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--xlsr-sweep", type=int, nargs="+", metavar="BATCH", default=None,
                   help="only XLS-R 300M training at these batch sizes (and inference), fp32 vs bf16, "
                        "-> OUT/xlsr_sweep.json (meant for a GPU: --device cuda)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m xai_lib.bench``; prints the tables and the goal check."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # as every stage does: the costs measured are the product's
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    if args.repeats < 1 or args.num_utterances < 1 or args.ig_steps < 1:
        say_error("error: --repeats, --num-utterances and --ig-steps must be >= 1")
        return 2
    if args.xlsr_sweep:
        device = "cuda" if args.device == "auto" and _cuda_available() else ("cpu" if args.device == "auto" else args.device)
        rows = detector_sweep(device, args.xlsr_sweep, repeats=args.repeats, threads=args.threads)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "xlsr_sweep.json").write_text(json.dumps({"machine": machine_info(device), "rows": rows}, indent=2))
        for r in rows:
            say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
        return 0
    try:
        results = run_bench(args)
    except BenchError as exc:
        say_error(f"error: {exc}")
        return 2
    out = Path(args.out)
    sys.stdout.write(results_markdown(results))
    sys.stdout.write(f"\nwrote {out / 'results.json'} and {out / 'results.md'} ({results['bench_seconds']} s)\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
