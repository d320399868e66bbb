"""Retrain: CLIP-guided retraining of the model to repair as a background job, with live CA / ASR /
RA and loss curves, the judged outcome (did the repair work?) and the checkpoint."""
from __future__ import annotations

import math

import pandas as pd
import streamlit as st

import _common as c
import cgd

st.title("Retrain")
L = cgd.layout
run = c.require_run(need=(L.CLIP_LOGITS, L.MODEL_LOGITS, L.SCORES), what="retraining")
cfg = c.run_config(run)
c.init_separation_state(run)

status = c.job_panel(run, "retrain")
busy = status.active

if c.unsaved_separation(run):
    st.warning("The thresholds or manual moves on the Separate page are not saved: retraining uses the separation saved "
               "in the run.", icon=":material/save:")
    c.page_link(c.PAGES["separate"], label="Save them on the Separate page", icon=":material/call_split:")
sep = {}
try:
    sep = run.read_separation() or {}
except ValueError:
    pass
if sep:
    st.caption(f"Saved separation: clean {sep.get('clean', 0):,} · suspect {sep.get('suspect', 0):,} · unused "
               f"{sep.get('unused', 0):,} (σ1 = {sep.get('config', {}).get('sigma1')}, σ2 = {sep.get('config', {}).get('sigma2')}, "
               f"σ3 = {sep.get('config', {}).get('sigma3', 0.0)}). Clean samples are trained on (oversampled per class); suspect "
               "ones get distillation from the reference plus unlearning of their labels (under a verdict naming the target, "
               "by default only those labelled with it: the other classes' suspects, and their samples the thresholds left unused, "
               "are trained as clean).")

# ------------------------------------------------------------------------------------------------
# Hyperparameters (labels here, defaults and help from cgd.config)
# ------------------------------------------------------------------------------------------------
FIELDS = [("epochs", "Epochs", 1, 500), ("lr", "Learning rate", 1e-6, 1.0), ("alpha", "α (distillation)", 0.0, 100.0),
          ("beta", "β (unlearning)", 0.0, 100.0), ("temperature", "T (temperature)", 0.1, 100.0),
          ("tolerance", "Tolerance (CA points)", 0.0, 100.0), ("tolerance_se", "Tolerance (standard errors)", 0.0, 10.0),
          ("patience", "Patience (epochs)", 1, 100), ("max_batches", "Max batches / epoch", 1, 100_000),
          ("min_batches", "Min batches / epoch", 0, 100_000), ("batch_size", "Batch size", 8, 4096),
          ("unlearn_floor", "Unlearning floor", 0.0, 0.99), ("stamp_clean_label", "Trigger stamp share (clean-label)", 0.0, 1.0),
          ("stamp", "Trigger stamp share (other)", 0.0, 1.0), ("stamp_gain", "Trigger stamp gain", 1.0, 10.0),
          ("trigger_shrink", "Trigger estimate shrink (standard errors)", 0.0, 100.0),
          ("keep", "Keep (distil from the model before repair)", 0.0, 100.0),
          ("unlearn_budget", "Unlearning budget (x estimated poisons)", 0.0, 100.0)]
hp: dict = {}
with st.expander("Hyperparameters", expanded=not run.has(L.METRICS_CSV)):
    cols = st.columns(4)
    for i, (name, label, lo, hi) in enumerate(FIELDS):
        v = cfg[name]
        col = cols[i % 4]
        if isinstance(v, int) and not isinstance(v, bool):
            hp[name] = int(col.number_input(label, int(lo), int(hi), int(v), key=f"rt_{name}", help=c.term(name), disabled=busy))
        else:
            hp[name] = float(col.number_input(label, float(lo), float(hi), float(v), format="%.4g", key=f"rt_{name}",
                                              help=c.term(name), disabled=busy))
    hp["subtract_trigger"] = st.checkbox("Clean-label: train the target class with the estimated trigger subtracted",
                                         bool(cfg["subtract_trigger"]), key="rt_subtract_trigger",
                                         help=c.term("subtract_trigger"), disabled=busy)
    hp["drop_disputed"] = st.checkbox("Dirty-label: leave out target-class samples the reference assigns elsewhere",
                                      bool(cfg["drop_disputed"]), key="rt_drop_disputed",
                                      help=c.term("drop_disputed"), disabled=busy)
    # settings with named choices: (field, label, what each choice does)
    for name, label, says in (
            ("outside_targets", "All-to-one verdict: suspects labelled with another class than the target",
             {"unlearn": "unlearn their labels (the paper)", "distill": "distillation only", "clean": "train them as clean",
              "agreed": "train as clean where the reference agrees, leave the rest out"}),
            ("take_unused", "All-to-one verdict: samples the thresholds left unused",
             {"none": "leave them out (the paper)", "others": "train those of other classes as clean",
              "agreed": "also the target's own where the reference agrees"}),
            ("split_target", "Dirty-label, one target: split the target class by the model's features",
             {"none": "no split (the paper)", "leave": "leave out the clean-looking suspects, train the rest",
              "train": "train the whole clean-looking group as clean"})):
        choices = list(cgd.flat_field(name).choices)
        hp[name] = st.selectbox(label, choices, choices.index(cfg[name]), key=f"rt_{name}", help=c.term(name),
                                disabled=busy, format_func=says.get)
    hp["bn_stats"] = "freeze" if st.checkbox(
        "Keep the BatchNorm statistics of the model before repair", cfg["bn_stats"] == "freeze", key="rt_bn_freeze",
        help=c.term("bn_stats"), disabled=busy) else "update"
    if not run.has(L.VICTIM) and not busy:
        st.caption(":material/info: The model to repair has not been built yet: the job first trains it "
                   f"({cfg.get('arch')}, {cfg.get('train_epochs')} epochs) or loads your checkpoint, as set on the Score page.")

if st.button("Start retraining", type="primary", icon=":material/play_arrow:", disabled=busy, key="rt_start",
             help="Runs `cgd retrain` on this run in the background; an interrupted retraining resumes after its last epoch. "
                  "Stop it with the Stop button of the job panel above."):
    if c.start_job(run, "retrain", config=hp, label="retraining"):
        st.rerun()


# ------------------------------------------------------------------------------------------------
# Live curves
# ------------------------------------------------------------------------------------------------
def _read_rows(name: str) -> list[dict]:
    p = run.path(name)
    if not p.is_file() or p.stat().st_size == 0:
        return []
    try:
        return pd.read_csv(p, comment="#").to_dict("records")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError):
        return []


def curves() -> None:
    rows = _read_rows(L.METRICS_CSV)
    batch_rows = _read_rows(L.METRICS_BATCHES_CSV)
    if not rows and not batch_rows:
        st.info("No retraining yet: the curves appear here as soon as the first epoch is evaluated.", icon=":material/show_chart:")
        return
    last = rows[-1] if rows else None
    if last is not None:
        k = st.columns(4)
        k[0].metric("Epoch", f"{int(last['epoch'])}" + (f" / {int(hp['epochs'])}" if busy else ""))
        for col, key in zip(k[1:], ("ca", "asr", "ra")):
            v = last.get(key)
            col.metric(key.upper(), "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f} %", help=c.term(key))
    a, b = st.columns(2)
    with a:
        st.plotly_chart(cgd.viz.metric_curves(rows), width="stretch", key="rt_metrics")
    with b:
        st.plotly_chart(cgd.viz.loss_curves(rows, batch_rows), width="stretch", key="rt_loss")


st.subheader("Curves", help="metrics.csv (per epoch; epoch 0 = before repair) and metrics_batches.csv (every N batches), "
             "redrawn every 2 s while the job runs.")
st.fragment(curves, run_every=2.0 if busy else None)()

# ------------------------------------------------------------------------------------------------
# Outcome, summary and checkpoint
# ------------------------------------------------------------------------------------------------
summary = run.read_run().get("summary") or {}
outcome = summary.get("outcome") or {}
if summary and not busy:
    st.subheader("Before and after repair")
    if outcome:
        box = st.success if outcome.get("ok") else st.error
        box(outcome.get("message", ""), icon=":material/check_circle:" if outcome.get("ok") else ":material/report:")
        for tip in outcome.get("suggestions") or []:
            st.markdown(f"- **Try:** {tip}")
    before, after = summary.get("before") or {}, summary.get("after") or {}
    k = st.columns(3)
    for col, key in zip(k, ("ca", "asr", "ra")):
        a_, b_ = after.get(key), before.get(key)
        ok = a_ is not None and not (isinstance(a_, float) and math.isnan(a_))
        delta = (f"{a_ - b_:+.2f} points" if ok and b_ is not None and not math.isnan(b_) and abs(a_ - b_) >= 0.005 else None)
        col.metric(f"{key.upper()} after", f"{a_:.2f} %" if ok else "–", delta=delta, help=c.term(key),
                   delta_color="inverse" if key == "asr" else "normal")
    rows = [{"": "before repair", **{k_.upper(): before.get(k_) for k_ in ("ca", "asr", "ra")}},
            {"": f"after repair (epoch {summary.get('kept_epoch', '?')})", **{k_.upper(): after.get(k_) for k_ in ("ca", "asr", "ra")}}]
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="rt_summary",
                 column_config={k_: st.column_config.NumberColumn(f"{k_} %", format="%.2f", help=c.term(k_.lower()))
                                for k_ in ("CA", "ASR", "RA")})
    kept, ran, total = summary.get("kept_epoch"), summary.get("epochs_run"), summary.get("epochs")
    how = f"weights of epoch {kept}" + (f" of {total}" if total else "")
    if summary.get("restored"):
        how += " restored after a drop in clean accuracy" + (f" (stopped after epoch {ran})" if summary.get("stopped_early") else "")
    st.caption(f"After = {how} · highest CA at epoch {summary.get('best_epoch')}"
               + f" · clean subset {summary.get('clean_size', 0):,} (oversampled to {summary.get('clean_oversampled', 0):,})"
               + f" · suspect subset {summary.get('suspect_size', 0):,}")

ck = run.path(L.REPAIRED)
if ck.is_file() and not busy:
    label = outcome.get("label", "Retrained model")
    d1, d2, _ = st.columns([2, 2, 3])
    d1.download_button(f"{label} (.safetensors)", data=lambda: ck.read_bytes(),
                       file_name=f"{run.root.name}-{'repaired' if outcome.get('ok') else 'retrained'}.safetensors",
                       mime="application/octet-stream", icon=":material/download:", key="rt_dl", on_click="ignore",
                       type="primary" if outcome.get("ok") else "secondary")
    side = ck.with_suffix(".json")
    if side.is_file():
        d2.download_button("Its metadata (.json)", data=lambda: side.read_bytes(), file_name=f"{run.root.name}-retrained.json",
                           mime="application/json", icon=":material/download:", key="rt_dl_meta", on_click="ignore")
    st.caption(f"{c.display_path(ck)} · {ck.stat().st_size / 1e6:.1f} MB · load with `cgd.models.load_checkpoint` "
               "(safetensors: no pickle). Its metadata records the outcome above.")
