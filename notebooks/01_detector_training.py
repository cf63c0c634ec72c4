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
# # 01 · Stage 1: train the detector
#
# **What it does.** Trains the spoofing detector — a wav2vec 2.0 / XLS-R front end and a
# Conformer back end with Temporal-Channel Modeling attention (TCM) — with weighted
# cross-entropy, early stopping on the dev loss and the best epochs averaged into
# `stage1_detector.pth`; then scores dev and eval in the ASVspoof format and reports the EER,
# pooled and per attack.
#
# **What it needs.** A config (`configs/demo.yaml`: a tiny front end on the embedded synthetic
# corpus, which is generated here on first use in about 15 s; `configs/conformertcm_baseline.yaml`
# for XLS-R 300M on ASVspoof). Every hyper-parameter comes from the config; set one below only
# to change it.
#
# **Where the products go.** `run_dir` (default `outputs/lab`, shared with notebooks 02 and 03):
# the checkpoint, score files, figures and `metrics.json["stage1"]`. Run All with the defaults
# gives exactly the detector of `make demo` (about 3 minutes on 2 CPU cores).

# %% tags=["parameters"]
config_path: str = "configs/demo.yaml"  # Stage-1 YAML (configs/conformertcm_baseline.yaml for XLS-R 300M)
overrides: list = []  # dotted config overrides as KEY-equals-VALUE strings (see the README)
data_root: str = ""  # database root; empty keeps data.root of the config
run_dir: str = "outputs/lab"  # run directory that receives every product (notebooks 02 and 03 read it)
batch_size: "Optional[int]" = None  # utterances per training step; None: the config's
num_epochs: "Optional[int]" = None  # maximum epochs (early stopping may end sooner); None: the config's
seed: "Optional[int]" = None  # random seed; None: the config's
smoke: bool = False  # seconds-long run on a handful of utterances
asv_score_file: str = ""  # ASVspoof ASV score file for min t-DCF (empty: skip)
resume: bool = True  # continue an interrupted run found in run_dir

# %%
import logging

from IPython.display import Image, display

from xai_lib.data.synthetic import ensure_demo_corpus
from xai_lib.detector import load_detector, stage1_config, stage1_report, train_stage1
from xai_lib.paths import resolve_path
from xai_lib.runs import merge_metrics

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
logging.getLogger("xai_lib").setLevel(logging.INFO)
run_dir = resolve_path(run_dir)
run_dir.mkdir(parents=True, exist_ok=True)
cfg = stage1_config(config_path, overrides, data_root, batch_size=batch_size, num_epochs=num_epochs, seed=seed,
                    smoke=smoke)
ensure_demo_corpus(cfg.data.root)
arch = (f"emb {cfg.model.emb_size}, {cfg.model.num_encoders} encoders" if cfg.model.backend == "tcm"
        else f"AASIST, emb {cfg.model.aasist.emb_size}, encoder {cfg.model.aasist.encoder_channels}")
print(f"run_dir: {run_dir}\ndata:    {cfg.data.root}\nmodel:   {arch}, "
      f"SSL {cfg.model.ssl.pretrained_path or 'random init'}\n"
      f"training: batch {cfg.training.batch_size}, up to {cfg.training.num_epochs} epochs, seed {cfg.training.seed}")

# %% [markdown]
# ## Train
# One progress bar per epoch; a scored epoch ends with the dev loss and dev EER. The demo holds
# its learning rate for 35 epochs and decays it over the last 10 (`training.lr_schedule`,
# `decay_epochs`), and scores dev only over those 10 (`training.dev_last_epochs`; the others show
# "dev not scored" and `null` in metrics.json): they are the epochs averaged into the checkpoint.
# Curves live in TensorBoard (`tensorboard --logdir <run_dir>/logs/stage1_detector`). An interrupted
# run continues from its last finished epoch when you run the notebook again (`resume`).

# %%
result = train_stage1(cfg, run_dir, resume=resume)
print(f"epochs: {result.epochs_completed}, averaged epochs {result.best_epochs}, {result.train_seconds:.1f} s")

# %% [markdown]
# ## Score dev and eval
# The averaged detector scores every utterance (ASVspoof score files in `run_dir/scores/`).
# Look at the EER per attack: attacks seen in training should be near 0 %, unseen ones
# (eval only) show how far the detector generalises.

# %%
detector = load_detector(result.checkpoint)
metrics = stage1_report(detector, cfg, run_dir, result.history, asv_score_file or None)
metrics.update(
    train_seconds=result.train_seconds,
    epochs_completed=result.epochs_completed,
    averaged_epochs=result.best_epochs,
    checkpoint=str(result.checkpoint),
    history=result.history,
)
merge_metrics(run_dir, "stage1", metrics)
for split in ("dev", "eval"):
    if f"{split}_eer" in metrics:
        print(f"{split} EER: {100 * metrics[split + '_eer']:.2f} %  per attack: "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in metrics[f"{split}_eer_per_attack"].items()))

# %% [markdown]
# ## Figures
# Loss curves (train and dev per epoch), the DET curve and the score histograms: bona fide
# and spoof scores should separate around the dev-EER threshold.

# %%
for png in sorted((run_dir / "figures").glob("stage1_*.png")):
    display(Image(filename=str(png)))

# %% [markdown]
# ## Next
# Open `02_xai_training.ipynb` and Run All: it finds this detector in the same `run_dir` and
# trains the learned frame importance on it.
