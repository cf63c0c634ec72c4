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
# # 03 · Stage 3: compare explanations, and look at them
#
# **What it does.** Explains the frozen detector's *spoof* decisions on partially spoofed
# utterances, whose spliced spans are known, with every method: the learned Stage-2
# importance, captum's Integrated Gradients, saliency and 20 ms occlusion, attention rollout
# over the TCM attention maps, Grad-CAM on the back end's last temporal layer (and, labelled
# `grad_cam_minmax05`, the peer practice of min-max per utterance with a fixed 0.5 threshold),
# and a random floor. Measures faithfulness (deletion / insertion
# AUC on the frozen detector), localisation (frame ROC-AUC, frame EER, pointing game) and
# cost, draws the figures, runs sanity checks (model randomisation, counterfactual restoration,
# waveform-domain deletion), and ends with the interactive viewer.
#
# **What it needs.** A run directory with notebooks 01 and 02 done (`run_dir`). The data is
# the one the run trained with (its `config_stage2.yaml`); `data_root` and `overrides`
# (`data.*`) point it elsewhere.
#
# **Where the products go.** `run_dir/figures/stage3_*.png` and `metrics.json["stage3"]`
# (the sanity checks under `["sanity"]` and each method's `["restoration"]`).
# About 3-7 minutes on a 2-core CPU with the defaults (the demo: 199 s and 396 s on two machines of
# that kind; Integrated Gradients and occlusion take most of it), of which 15-30 s are the sanity
# checks (`sanity: False` skips them).

# %% tags=["parameters"]
stage1_checkpoint: str = ""  # Stage-1 checkpoint; empty: run_dir/stage1_detector.pth
stage2_checkpoint: str = ""  # Stage-2 checkpoint; empty: run_dir/stage2_xai.pth
data_root: str = ""  # database root; empty: the one the run trained with
overrides: list = []  # data.* overrides as KEY-equals-VALUE strings, on top of the run's data config
run_dir: str = "outputs/lab"  # run directory of notebooks 01 and 02; receives figures and metrics
split: str = "eval"  # partially spoofed subset to explain: dev or eval
methods: list = ["importance", "integrated_gradients", "saliency", "occlusion", "attention_rollout", "grad_cam", "grad_cam_minmax05", "random"]  # methods to compare
num_utterances: int = 24  # partially spoofed utterances explained by every method
calibration_utterances: int = 8  # bona fide dev utterances that calibrate every method's threshold (0: skip)
false_flag_rate: float = 0.01  # share of bona fide frames allowed above each method's threshold
ig_steps: int = 50  # Integrated Gradients steps
sanity: bool = True  # sanity checks: model randomisation, counterfactual restoration, waveform-domain deletion
sanity_utterances: int = 4  # partially spoofed utterances of the sanity checks (those the detector calls spoof first)
sanity_methods: list = ["importance", "integrated_gradients", "saliency", "attention_rollout", "grad_cam", "random"]  # occlusion: one detector pass per frame, add it when time allows
sanity_levels: int = 3  # randomisation levels from the top: classifier, back end, SSL transformer (4: + SSL conv encoder)
sanity_ig_steps: int = 8  # Integrated Gradients steps in the sanity checks
sanity_steps: int = 4  # deletion/insertion steps of the waveform-domain check (2 (steps + 1) detector passes per method)
sanity_retrain: bool = True  # also train Stage 2 briefly (2 epochs of at most 8 steps) on the fully randomised detector
num_threads: "Optional[int]" = None  # torch CPU threads; None: the run's training.num_threads (the demo: torch's choice)
smoke: bool = False  # seconds-long run
seed: int = 1234  # random seed (utterance draw, random baseline)

# %%
import logging

from IPython.display import Image, Markdown, display

from xai_lib.detector import load_detector
from xai_lib.explanation import (
    ImportanceViewer,
    calibrated_table,
    load_explanation_set,
    load_utterance_items,
    metrics_table,
    run_data_config,
    run_stage3,
    similarity_fn,
    use_run_threads,
    viewer_items,
)
from xai_lib.importance import load_xai
from xai_lib.paths import resolve_path
from xai_lib.runs import merge_metrics

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
logging.getLogger("xai_lib").setLevel(logging.INFO)
run_dir = resolve_path(run_dir)
num_threads = use_run_threads(run_dir, num_threads)
stage1_path = resolve_path(stage1_checkpoint) if stage1_checkpoint else run_dir / "stage1_detector.pth"
stage2_path = resolve_path(stage2_checkpoint) if stage2_checkpoint else run_dir / "stage2_xai.pth"
if smoke:
    num_utterances, ig_steps, calibration_utterances = min(num_utterances, 4), min(ig_steps, 4), min(calibration_utterances, 2)
    sanity_utterances, sanity_ig_steps, sanity_steps = min(sanity_utterances, 2), min(sanity_ig_steps, 2), min(sanity_steps, 2)
detector = load_detector(stage1_path)
xai = load_xai(stage2_path, detector=detector) if "importance" in methods else None
data_cfg = run_data_config(run_dir, data_root, overrides)
items = load_explanation_set(data_cfg, split=split, num_utterances=num_utterances, seed=seed, detector=detector)
calibration_items = (load_utterance_items(data_cfg, "dev", 1, calibration_utterances, seed, detector=detector)
                     if calibration_utterances else [])
whole_items = [*load_utterance_items(data_cfg, split, 1, calibration_utterances, seed, detector=detector),
               *load_utterance_items(data_cfg, split, 0, calibration_utterances, seed, detector=detector)]
print(f"detector: {stage1_path}\nxai:      {stage2_path}\ndata:     {data_cfg.root}\n"
      f"items:    {len(items)} partially spoofed {split} utterances; {len(calibration_items)} bona fide dev "
      f"utterances calibrate the thresholds; {len(whole_items)} bona fide and spoof {split} utterances")

# %% [markdown]
# ## Every method on the same utterances
# Deletion AUC: lower is better (removing the top frames first should destroy the spoof
# evidence fast); insertion AUC, localisation ROC-AUC and pointing game: higher is better;
# `random` is the floor; the last two columns are the cost.

# %%
stage3 = run_stage3(detector, xai, items, run_dir, methods=methods, seed=seed,
                    method_kwargs={"integrated_gradients": {"n_steps": ig_steps}},
                    calibration_items=calibration_items, whole_items=whole_items, false_flag_rate=false_flag_rate)
stage3.update(split=split, ig_steps=ig_steps)
methods = list(stage3["methods"])  # those run (not attention_rollout on AASIST: stage3["not_applicable"])
merge_metrics(run_dir, "stage3", stage3)
display(Markdown(metrics_table(stage3["methods"])))

# %% [markdown]
# ## Calibrated answers: which frames are spoofed?
# Each method's threshold is the 99th percentile of its raw scores over bona fide dev frames
# (no frame labels needed), so about 1 % of genuine speech is flagged; `grad_cam_minmax05` alone
# keeps its fixed 0.5 on per-utterance min-max scores (marked "fixed"), to show what the
# calibration changes. At that threshold:
# the false-flag rate on bona fide utterances of this split, precision / recall / F1 / IoU of
# the flagged frames against the spliced spans, and the PartialSpoof-style pooled segment EER
# (bona fide, partially and fully spoofed utterances; 20 ms to 640 ms segments).

# %%
display(Markdown(calibrated_table(stage3["methods"])))

# %% [markdown]
# ## Figures
# The deletion and insertion curves of every method, then for a few utterances every method's
# frame scores under the spectrogram (hatched: the spliced spans) and the learned importance
# over the spectrogram with the waveform and the prototype similarities.

# %%
for png in stage3["figures"]:
    display(Image(filename=png))

# %% [markdown]
# ## Sanity: do the explanations describe this detector, and its evidence?
# Three checks of every method on the same few utterances (`sanity_utterances`, those the
# detector calls spoof first), `xai_lib.explanation.sanity`:
#
# * **Model-parameter randomisation** (Adebayo et al., 2018). A copy of the detector is
#   re-initialised from the top down (classifier; + Conformer-TCM blocks and neck; + SSL
#   transformer; optionally + SSL conv encoder) and every method explains the same utterances
#   again. Look at the Spearman correlation with the original map: it should fall towards 0 as
#   more of the detector is random. A method still at 0.5 or more at the deepest level is
#   **flagged**: its map reflects the input or the architecture, not what the detector learned.
#   `random` is redrawn at every level (what "uncorrelated" looks like). The learned importance
#   reads SSL features, so randomising only the back end cannot change it; `sanity_retrain`
#   also trains Stage 2 briefly on the fully randomised detector: its localisation ROC-AUC should
#   fall to chance (0.5), far below the trained module's.
# * **Counterfactual restoration.** The frames a method flags (above its calibrated threshold,
#   and separately its top 30 %) are replaced by the original bona fide audio of the corpus
#   (`partial_spoof/sources/`; a corpus generated without them skips this check) and the
#   detector scores again: a good explanation flips its verdict (flip rate, among the utterances
#   called spoof at the dev-EER threshold). `random` and the `oracle` (the true spans) bound the
#   table; restoring a genuine frame changes nothing, so only the spoofed frames found count.
# * **Waveform-domain deletion/insertion.** The deletion/insertion above removes frames inside
#   the detector; here a removed frame becomes the utterance's own noise floor in the waveform
#   and the whole detector runs again. Look at whether the methods rank the same in both domains,
#   and at the spoof probability with everything removed (a removal the detector itself calls
#   spoof cannot show deletion).
#
# The subsets are small so that the section takes under a minute on 2 CPU cores with the demo
# (4 utterances, 3 levels, Integrated Gradients with `sanity_ig_steps` steps, 4 deletion steps;
# occlusion, one detector pass per frame, is left out by default): a demonstration, not final
# numbers; run `xai_lib.explanation.sanity.run_sanity` with more utterances and every method for those.

# %%
if sanity:
    import json

    from xai_lib.explanation.sanity import called_spoof_first, run_sanity, sanity_tables, thresholds_from_stage3

    dev_threshold = json.loads((run_dir / "metrics.json").read_text()).get("stage1", {}).get("dev_threshold")
    sanity_items = called_spoof_first(detector, items, dev_threshold, sanity_utterances)
    checked = run_sanity(detector, xai, sanity_items, run_dir, [m for m in sanity_methods if m in methods],
                         thresholds_from_stage3(stage3), data_cfg, dev_threshold, split=split,
                         method_kwargs={"integrated_gradients": {"n_steps": sanity_ig_steps}},
                         num_levels=sanity_levels, steps=sanity_steps, retrain=sanity_retrain, seed=seed)
    stage3["sanity"] = checked["sanity"]
    for name, row in checked["restoration"].items():
        stage3["methods"][name]["restoration"] = row
    merge_metrics(run_dir, "stage3", stage3)
    display(Markdown(sanity_tables(checked["sanity"])))
    for png in checked["sanity"]["figures"]:
        display(Image(filename=png))

# %% [markdown]
# ## The viewer
# Every method is drawn on its own absolute scale with its calibrated threshold τ (frames above
# it are highlighted; a "per-utterance min-max" toggle exists for comparison, labelled as such),
# beside the detector's verdict. Pick an utterance and a method, listen, move the threshold;
# *Explain file* explains any audio file by path, as `python -m xai_lib.explain` does; *Save
# PNG* writes the figure into `run_dir/figures/`. (In an executed copy saved by the pipeline
# the widget is static; open this notebook in JupyterLab to use it.)

# %%
viewer = ImportanceViewer.from_detector(
    detector, viewer_items(items, detector.frame_hop_s), importance_model=xai,
    methods=[m for m in methods if m != "importance" or xai is not None],
    method_options={"integrated_gradients": {"n_steps": ig_steps}},
    similarity_fn=similarity_fn(detector, xai) if xai is not None else None,
    save_dir=run_dir / "figures",
    thresholds={m: r["calibrated"]["threshold"] for m, r in stage3["methods"].items()
                if r.get("calibrated") and m != "importance"},  # the importance's own comes with it
)
viewer.save_png()
viewer

# %% [markdown]
# Use the viewer to listen to what each method flags: pick a partially spoofed utterance, set
# the method to `importance`, and compare the highlighted frames with the hatched spans. For
# files outside the corpus, `python -m xai_lib.explain FILE --run RUN_DIR` writes the same answer
# as JSON, an Audacity label track, RTTM, CSV and PNG.
