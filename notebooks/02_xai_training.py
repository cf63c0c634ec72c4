# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Stage 2: learn which frames made the detector say "spoof"
#
# **What it does.** Loads the Stage-1 detector strictly and freezes it (no gradients, `eval()`
# throughout, its weights bit-identical afterwards), then trains the XAI module on its frame
# representation: an importance network w(t) in [0, 1] per 20 ms frame and two class
# prototypes, with an importance-weighted contrastive term, bona fide regularisation,
# temporal smoothness, weak frame labels (each frame carries its utterance's label, which puts
# w on an absolute scale) and a fidelity term tied to the detector's own decision (frames it
# "removes" are replaced by a bona fide reference's frames, a removal the detector scores like
# bona fide speech). Then **calibrates** w without frame labels — the threshold τ is the 99th
# percentile of w over the bona fide dev frames, stored in `stage2_xai.pth` — and measures how
# well "w > τ" finds the spliced spans of partially spoofed utterances.
#
# **What it needs.** The detector of notebook 01 in the same `run_dir` (or an explicit
# `stage1_checkpoint`, or a published `avg_5_best.pth`). The config is
# `configs/demo_stage2.yaml` (the demo's); `configs/xai_stage2.yaml` is the configuration for
# real corpora. Hyper-parameters come from the config unless set below.
#
# **Where the products go.** `run_dir/stage2_xai.pth`, figures, `metrics.json["stage2"]`.
# About 1 minute on 2 CPU cores with the defaults.

# %% tags=["parameters"]
stage1_checkpoint: str = ""  # Stage-1 checkpoint; empty: run_dir/stage1_detector.pth, then the avg_5_best.pth fallback
config_path: str = "configs/demo_stage2.yaml"  # Stage-2 YAML (configs/xai_stage2.yaml for real corpora)
overrides: list = []  # dotted config overrides as KEY-equals-VALUE strings (see the README)
data_root: str = ""  # database root; empty keeps data.root of the config
run_dir: str = "outputs/lab"  # run directory holding the Stage-1 detector; receives every product
prototype_mode: "Optional[str]" = None  # ema, fixed or learnable; None: the config's
lambda_fidelity: "Optional[float]" = None  # fidelity weight (0: the seed objective); None: the config's
batch_size: "Optional[int]" = None  # utterances per step; None: the config's
num_epochs: "Optional[int]" = None  # maximum epochs (early stopping may end sooner); None: the config's
seed: "Optional[int]" = None  # random seed; None: the config's
smoke: bool = False  # seconds-long run
resume: bool = True  # continue an interrupted run found in run_dir

# %%
import logging

from IPython.display import Image, display

from xai_lib.importance import stage2_config, stage2_report, train_stage2
from xai_lib.paths import resolve_path
from xai_lib.runs import merge_metrics

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
logging.getLogger("xai_lib").setLevel(logging.INFO)
run_dir = resolve_path(run_dir)
run_dir.mkdir(parents=True, exist_ok=True)
cfg = stage2_config(config_path, overrides, data_root, prototype_mode=prototype_mode,
                    lambda_fidelity=lambda_fidelity, batch_size=batch_size, num_epochs=num_epochs, seed=seed,
                    smoke=smoke)
print(f"run_dir: {run_dir}\ndata:    {cfg.data.root}\nxai:     {cfg.xai}")

# %% [markdown]
# ## Train
# The detector is found (explicit path, else `run_dir/stage1_detector.pth`, else the
# `avg_5_best.pth` fallback), loaded strictly and frozen. Watch the loss terms per epoch:
# none should dominate for good, and the dev loss decides early stopping. TensorBoard:
# `tensorboard --logdir <run_dir>/logs/stage2_xai`.

# %%
result = train_stage2(cfg, run_dir, detector_path=stage1_checkpoint or None, resume=resume)
print(f"detector: {result.detector_path}\nsaved:    {result.checkpoint}\nepochs:   {result.epochs_completed}")

# %% [markdown]
# ## Does w localise the spoofed spans, and does it use its range?
# `importance_mean_spoof` should be well above `importance_mean_bonafide` (no collapse), and
# `loc_auc_partial_dev` — the frame ROC-AUC of w against the spliced spans — well above 0.5.
# The calibrated answer: `calibrated_dev` (false-flag rate ≈ 1 % by construction, F1 and IoU of
# the flagged frames, pooled segment EER at 20–640 ms) and `importance_frac_above_threshold`
# (share of the spoof utterances' frames above τ). `removal_baseline_p_spoof`: what the detector
# makes of an utterance with every frame removed — near the bona fide utterances' own score.

# %%
metrics = stage2_report(result, cfg, run_dir)
merge_metrics(run_dir, "stage2", metrics)
display({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
{k: metrics.get(k) for k in ("calibrated_dev", "removal_baseline_p_spoof")}

# %% [markdown]
# ## Figures
# The loss terms per epoch, and the frames' cosine similarity to the two prototypes: spoofed
# frames should sit closer to the spoof prototype.

# %%
for png in sorted((run_dir / "figures").glob("stage2_*.png")):
    display(Image(filename=str(png)))

# %% [markdown]
# ## Next
# Open `03_attribution_visualization.ipynb` and Run All: it compares w with the gradient,
# occlusion and attention baselines on the same utterances and ends with the viewer.
