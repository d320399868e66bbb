"""Retrain: CLIP-guided retraining of the model to repair as a background job, with live CA / ASR /
RA and loss curves, the before/after summary and the repaired checkpoint."""
from __future__ import annotations

import math

import pandas as pd
import streamlit as st

import _common as c
from cgd import jobs, viz

st.title("Retrain")
run = c.require_run(need=("clip_logits.npy", "model_logits.npy", "scores.parquet"), what="retraining")
cfg = c.run_config(run)
is_demo = cfg.get("data") == c.DEMO_SPEC
c.init_separation_state(run)

status = c.job_panel(run, "retrain")
busy = status.active

if c.unsaved_separation(run):
    st.warning("The thresholds or manual moves on the Separate page are not saved: retraining uses the separation saved "
               "in the run.", icon=":material/save:")
    st.page_link(c.PAGES["separate"], label="Save them on the Separate page", icon=":material/call_split:")
sep = {}
try:
    from cgd.runs import read_json

    sep = read_json(run.path("separation.json"), {}) or {}
except ValueError:
    pass
if sep:
    st.caption(f"Saved separation: clean {sep.get('clean', 0):,} · suspect {sep.get('suspect', 0):,} · unused "
               f"{sep.get('unused', 0):,} (σ1 = {sep.get('config', {}).get('sigma1')}, σ2 = {sep.get('config', {}).get('sigma2')}). "
               "Clean samples are trained on (oversampled per class); suspect ones get distillation from the reference "
               "plus unlearning of their labels.")

# ------------------------------------------------------------------------------------------------
# Hyperparameters
# ------------------------------------------------------------------------------------------------
with st.expander("Hyperparameters", expanded=not run.has("metrics.csv")):
    h = st.columns(4)
    epochs = h[0].number_input("Epochs", 1, 500, int(5 if is_demo and cfg["epochs"] == 10 else cfg["epochs"]), key="rt_epochs",
                               help=c.HELP["epochs"], disabled=busy)
    lr = h[1].number_input("Learning rate", 1e-6, 1.0, float(cfg["lr"]), format="%.4g", key="rt_lr", help=c.HELP["lr"], disabled=busy)
    alpha = h[2].number_input("α (distillation)", 0.0, 100.0, float(cfg["alpha"]), format="%.4g", key="rt_alpha",
                              help=c.HELP["alpha"], disabled=busy)
    beta = h[3].number_input("β (unlearning)", 0.0, 100.0, float(cfg["beta"]), format="%.4g", key="rt_beta",
                             help=c.HELP["beta"], disabled=busy)
    h = st.columns(4)
    temp = h[0].number_input("T (temperature)", 0.1, 100.0, float(cfg["temperature"]), format="%.3g", key="rt_t",
                             help=c.HELP["temperature"], disabled=busy)
    tol = h[1].number_input("Tolerance (CA points)", 0.0, 100.0, float(cfg["tolerance"]), format="%.3g", key="rt_tol",
                            help=c.HELP["tolerance"], disabled=busy)
    maxb = h[2].number_input("Max batches / epoch", 1, 100_000, int(20 if is_demo and cfg["max_batches"] == 200 else cfg["max_batches"]),
                             key="rt_maxb", help=c.HELP["max_batches"], disabled=busy)
    bs = h[3].number_input("Batch size", 8, 4096, int(cfg["batch_size"]), step=32, key="rt_bs", help=c.HELP["batch_size"],
                           disabled=busy)
    h = st.columns(4)
    floor = h[0].number_input("Unlearning floor", 0.0, 0.99, float(cfg.get("unlearn_floor", 0.0)), format="%.3g",
                              key="rt_floor", help=c.HELP["unlearn_floor"], disabled=busy)
    patience = h[1].number_input("Patience (epochs)", 1, 100, int(cfg.get("patience", 1)), key="rt_patience",
                                 help=c.HELP["patience"], disabled=busy)
    if not run.has("models/victim.safetensors"):
        st.caption(":material/info: The model to repair has not been built yet: the job first trains it "
                   f"({cfg.get('arch')}, {cfg.get('train_epochs')} epochs) or loads your checkpoint, as set on the Score page.")

b1, b2, _ = st.columns([1, 1, 4])
if b1.button("Start retraining", type="primary", icon=":material/play_arrow:", disabled=busy, key="rt_start",
             help="Runs `cgd retrain` on this run in the background; an interrupted retraining resumes after its last epoch."):
    hp = {"epochs": int(epochs), "lr": float(lr), "alpha": float(alpha), "beta": float(beta), "temperature": float(temp),
          "tolerance": float(tol), "max_batches": int(maxb), "batch_size": int(bs),
          "unlearn_floor": float(floor), "patience": int(patience)}
    if c.start_job(run, "retrain", config=hp, label="retraining"):
        st.rerun()
if b2.button("Stop", icon=":material/stop_circle:", disabled=not busy, key="rt_stop",
             help="Stops at the end of the current batch (the last finished epoch is kept for resuming)."):
    with st.spinner("Stopping…"):
        st.toast(jobs.stop_job(run))
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
    rows = _read_rows("metrics.csv")
    batch_rows = _read_rows("metrics_batches.csv")
    if not rows and not batch_rows:
        st.info("No retraining yet: the curves appear here as soon as the first epoch is evaluated.", icon=":material/show_chart:")
        return
    last = rows[-1] if rows else None
    if last is not None:
        k = st.columns(4)
        k[0].metric("Epoch", f"{int(last['epoch'])}" + (f" / {int(epochs)}" if busy else ""))
        for col, key in zip(k[1:], ("ca", "asr", "ra")):
            v = last.get(key)
            col.metric(key.upper(), "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f} %", help=c.HELP[key])
    a, b = st.columns(2)
    with a:
        st.plotly_chart(viz.metric_curves(rows), width="stretch", key="rt_metrics")
    with b:
        st.plotly_chart(viz.loss_curves(rows, batch_rows), width="stretch", key="rt_loss")


st.subheader("Curves", help="metrics.csv (per epoch; epoch 0 = before repair) and metrics_batches.csv (every N batches), "
             "redrawn every 2 s while the job runs.")
st.fragment(curves, run_every=2.0 if busy else None)()

# ------------------------------------------------------------------------------------------------
# Summary and checkpoint
# ------------------------------------------------------------------------------------------------
summary = run.read_run().get("summary") or {}
if summary and not busy:
    st.subheader("Before and after repair")
    before, after = summary.get("before") or {}, summary.get("after") or {}
    k = st.columns(3)
    for col, key in zip(k, ("ca", "asr", "ra")):
        a_, b_ = after.get(key), before.get(key)
        ok = a_ is not None and not (isinstance(a_, float) and math.isnan(a_))
        delta = (f"{a_ - b_:+.2f} points" if ok and b_ is not None and not math.isnan(b_) and abs(a_ - b_) >= 0.005 else None)
        col.metric(f"{key.upper()} after", f"{a_:.2f} %" if ok else "–", delta=delta, help=c.HELP[key],
                   delta_color="inverse" if key == "asr" else "normal")
    rows = [{"": "before repair", **{k_.upper(): before.get(k_) for k_ in ("ca", "asr", "ra")}},
            {"": "after repair", **{k_.upper(): after.get(k_) for k_ in ("ca", "asr", "ra")}}]
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="rt_summary",
                 column_config={k_: st.column_config.NumberColumn(f"{k_} %", format="%.2f", help=c.HELP[k_.lower()])
                                for k_ in ("CA", "ASR", "RA")})
    st.caption(f"Best epoch {summary.get('best_epoch')}" + (" · stopped early (CA fell below the tolerance)" if summary.get("stopped_early") else "")
               + f" · clean subset {summary.get('clean_size', 0):,} (oversampled to {summary.get('clean_oversampled', 0):,})"
               + f" · suspect subset {summary.get('suspect_size', 0):,}")

ck = run.path("models", "repaired.safetensors")
if ck.is_file() and not busy:
    d1, d2, _ = st.columns([2, 2, 3])
    d1.download_button("Repaired model (.safetensors)", data=lambda: ck.read_bytes(), file_name=f"{run.root.name}-repaired.safetensors",
                       mime="application/octet-stream", icon=":material/download:", key="rt_dl", on_click="ignore")
    side = ck.with_suffix(".json")
    if side.is_file():
        d2.download_button("Its metadata (.json)", data=lambda: side.read_bytes(), file_name=f"{run.root.name}-repaired.json",
                           mime="application/json", icon=":material/download:", key="rt_dl_meta", on_click="ignore")
    st.caption(f"{c.display_path(ck)} · {ck.stat().st_size / 1e6:.1f} MB · load with `cgd.models.load_checkpoint` "
               "(safetensors: no pickle).")
