"""Separate: tune sigma1/sigma2 with live counts and detection rates, move samples by hand, save
the separation into the run (a background `cgd separate` + `cgd export`) and download the lists."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import streamlit as st

import _common as c
from cgd import jobs, viz

st.title("Separate")
run = c.require_run(need=("clip_logits.npy", "model_logits.npy", "data/train_y.npy"), what="separation")
c.init_separation_state(run)

df = data = None
with c.guard("Reading the scores"):
    df = c.scores(run, st.session_state["rank_mode"])
    data = c.run_data(run)
if df is None or data is None:
    st.stop()
train = data.train
classes = train.classes
has_gt = train.poison_mask is not None
n = len(df)

status = c.job_panel(run, "separate")

# ------------------------------------------------------------------------------------------------
# Thresholds
# ------------------------------------------------------------------------------------------------
def _sync(name: str) -> None:  # widget state is dropped on other pages: keep the value in a plain key
    st.session_state[name] = st.session_state[f"w_{name}"]


a, b, j, r = st.columns([2, 2, 2, 1])
a.slider("σ1 · clean margin", 0.0, 0.5, value=float(st.session_state["sigma1"]), step=0.01, key="w_sigma1",
         help=c.HELP["sigma1"], format="%.2f", on_change=_sync, args=("sigma1",))
b.slider("σ2 · suspect margin", 0.0, 0.5, value=float(st.session_state["sigma2"]), step=0.01, key="w_sigma2",
         help=c.HELP["sigma2"], format="%.2f", on_change=_sync, args=("sigma2",))
j.slider("σ3 · joint margin", 0.0, 0.5, value=float(st.session_state["sigma3"]), step=0.01, key="w_sigma3",
         help=c.HELP["sigma3"], format="%.2f", on_change=_sync, args=("sigma3",))
modes = ["global", "per_class"]
r.selectbox("Rank mode", modes, index=modes.index(st.session_state["rank_mode"]), key="w_rank_mode", help=c.HELP["rank_mode"],
            on_change=_sync, args=("rank_mode",))
s1, s2, s3 = float(st.session_state["sigma1"]), float(st.session_state["sigma2"]), float(st.session_state["sigma3"])
subset = c.current_subset(df)
saved = c.saved_separation(run)
from cgd.separation import apply_overrides, separate  # noqa: E402

saved_subset = None
if saved["rank_mode"] == st.session_state["rank_mode"]:
    saved_subset = apply_overrides(separate(df["clip_rank"].to_numpy(), df["model_rank"].to_numpy(), saved["sigma1"],
                                            saved["sigma2"], saved["sigma3"]), saved["overrides"])

cols = st.columns(4)
for i, name in enumerate(("clean", "suspect", "unused")):
    k = int((subset == c.SUBSET_CODES[name]).sum())
    delta = None
    if saved_subset is not None:
        dk = k - int((saved_subset == c.SUBSET_CODES[name]).sum())
        delta = f"{dk:+,} vs saved" if dk else None
    cols[i].metric(f"{name.capitalize()} ({100 * k / max(n, 1):.1f} %)", c.fmt_int(k), delta=delta, help=c.HELP[name],
                   delta_color="off")
cols[3].metric("Manual moves", c.fmt_int(len(st.session_state.get("overrides") or {})),
               help="Samples whose subset you set by hand; they win over the rule.")

unsaved = c.unsaved_separation(run)
sv1, sv2 = st.columns([3, 2], vertical_alignment="center")
with sv1:
    if unsaved:
        st.warning(f"Unsaved: the run still holds σ1 = {saved['sigma1']:.2f}, σ2 = {saved['sigma2']:.2f}, "
                   f"σ3 = {saved['sigma3']:.2f}, "
                   f"{saved['rank_mode']} ranks and {len(saved['overrides'])} manual moves. Save to use these settings "
                   "for exports and retraining.", icon=":material/save:")
    else:
        st.caption(":material/check_circle: These settings are the ones saved in the run.")
with sv2:
    if st.button("Save separation and exports", type="primary", icon=":material/save:", key="sep_save",
                 disabled=status.active, help="Writes the thresholds and overrides into the run, recomputes the subsets "
                 "with the pipeline's separate stage and writes the export files (background job, a few seconds)."):
        ok = False
        with c.guard("Saving the separation"):
            if jobs.is_running(run):
                from cgd.runs import RunLockedError

                raise RunLockedError(f"a job is running on {run.root.name}; wait for it or stop it first")
            run.save_overrides(st.session_state.get("overrides") or {})
            ok = c.start_job(run, "export", config={"sigma1": s1, "sigma2": s2, "sigma3": s3,
                                                          "rank_mode": st.session_state["rank_mode"]},
                             label="saving the separation", pre=[jobs.cgd_command("separate", run)],
                             phase="separating")
        if ok:
            st.rerun()

# ------------------------------------------------------------------------------------------------
# Counts and detection quality
# ------------------------------------------------------------------------------------------------
t_counts, t_det, t_sweep, t_manual, t_table = st.tabs(["Per class", "Detection" + ("" if has_gt else " (no ground truth)"),
                                                       "Threshold sweep", "Move by hand", "Scores table"])
with t_counts:
    table = viz.per_class_table(df["label"].to_numpy(), subset, classes, train.poison_mask if has_gt else None)
    st.dataframe(table, hide_index=True, width="stretch", key="sep_counts",
                 column_config={"suspect %": st.column_config.ProgressColumn(format="%.1f %%", min_value=0, max_value=100),
                                "clean %": st.column_config.NumberColumn(format="%.1f %%")})

with t_det:
    if not has_gt:
        st.info("Detection rates need ground truth: it exists when the set was poisoned by the simulator (teaching "
                "mode) or comes from a BackdoorBench record.", icon=":material/info:")
    else:
        det = c.detection(run, df, subset, train.poison_mask)
        rows = []
        for key, what in (("suspect", "suspect subset: finds poisoned samples"), ("clean", "clean subset: keeps clean samples")):
            d = det[key]
            rows.append({"subset": what, "size": d["size"], "TPR": 100 * d["tpr"], "FPR": 100 * d["fpr"],
                         "precision": 100 * d["precision"], "F1": 100 * d["f1"]})
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="sep_det",
                     column_config={"TPR": st.column_config.NumberColumn("TPR %", format="%.1f", help=c.HELP["tpr"]),
                                    "FPR": st.column_config.NumberColumn("FPR %", format="%.1f", help=c.HELP["fpr"]),
                                    "precision": st.column_config.NumberColumn("precision %", format="%.1f", help=c.HELP["precision"]),
                                    "F1": st.column_config.NumberColumn("F1 %", format="%.1f", help=c.HELP["f1"]),
                                    "size": st.column_config.NumberColumn(format="localized")})
        d1, d2, d3 = st.columns(3)
        d1.metric("Poisons in the clean subset", f"{det['poison_in_clean']:,} / {det['n_poison']:,}", help=c.HELP["poison_in_clean"])
        d2.metric("AUROC · CLIP entropy", c.fmt_float(det.get("auroc_clip")), help=c.HELP["auroc"])
        d3.metric("AUROC · model entropy", c.fmt_float(det.get("auroc_model")), help=c.HELP["auroc"])
        st.plotly_chart(viz.roc_figure(c.roc_curves(run, df, train.poison_mask)),
                        width="stretch", key="sep_roc")

with t_sweep:
    ratio = s2 / s1 if s1 > 0 else 0.5
    rows = c.sweep(run, df, train.poison_mask if has_gt else None, st.session_state["rank_mode"], min(ratio, 1.0), s3)
    st.plotly_chart(viz.sweep_figure(rows, s1, title=f"Threshold sweep (σ2 = {min(ratio, 1.0):.2f} × σ1, σ3 = {s3:.2f}, without manual moves)"),
                    width="stretch", key="sep_sweep")

with t_manual:
    ov: dict = dict(st.session_state.get("overrides") or {})
    sel = st.session_state.get("selection") or []
    src = st.radio("Samples", ["selection", "typed"], horizontal=True, key="sep_src",
                   format_func={"selection": f"selected on the Inspect page ({len(sel):,})", "typed": "type indices"}.get)
    idx: list[int] = []
    if src == "selection":
        idx = list(sel)
        if not idx:
            st.caption("Select samples with box or lasso on the Inspect page's maps first.")
    else:
        txt = st.text_input("Sample indices", key="sep_typed", placeholder="e.g. 12, 40-45, 101",
                            help="0-based positions in the run's training set (the `index` column of the scores table)")
        bad = []
        for part in re.split(r"[,\s]+", txt.strip()):
            if not part:
                continue
            mm = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not mm:
                bad.append(part)
                continue
            lo, hi = int(mm.group(1)), int(mm.group(2) or mm.group(1))
            idx += list(range(lo, hi + 1))
        out = [i for i in idx if not 0 <= i < n]
        if bad or out:
            st.error(f"Not valid indices in [0, {n - 1}]: {(bad + [str(o) for o in out])[:5]}")
            idx = [i for i in idx if 0 <= i < n]
    m1, m2, m3 = st.columns([2, 1, 1], vertical_alignment="bottom")
    to = m1.segmented_control("Move to", ["clean", "suspect", "unused"], default="suspect", key="sep_to")
    if m2.button(f"Move {len(idx):,}", disabled=not idx or not to, key="sep_move", icon=":material/move_item:"):
        for i in idx:
            ov[int(i)] = c.SUBSET_CODES[to]
        st.session_state["overrides"] = ov
        st.rerun()
    if m3.button("Back to the rule", disabled=not idx, key="sep_unmove", help="Remove the manual moves of these samples"):
        for i in idx:
            ov.pop(int(i), None)
        st.session_state["overrides"] = ov
        st.rerun()
    if ov:
        rule = separate(df["clip_rank"].to_numpy(), df["model_rank"].to_numpy(), s1, s2, s3)
        ot = pd.DataFrame({"index": list(ov), "label": [classes[int(df["label"].iat[i])] for i in ov],
                           "rule says": [c.CODE_NAMES[int(rule[i])] for i in ov], "moved to": [c.CODE_NAMES[v] for v in ov.values()]})
        st.dataframe(ot, hide_index=True, width="stretch", key="sep_ov_table")
        if st.button("Clear all manual moves", key="sep_clear"):
            st.session_state["overrides"] = {}
            st.rerun()

with t_table:
    # suspect first, then clean, then unused; by model rank within each (only the shown rows are built)
    group = np.where(subset == c.SUBSET_CODES["suspect"], 0, np.where(subset == c.SUBSET_CODES["clean"], 1, 2))
    order = np.lexsort((df["model_rank"].to_numpy(), group))[:2000]
    view = df.iloc[order].assign(subset=c.subset_names(subset[order]))
    view["label"] = np.array(classes)[view["label"].to_numpy()]
    st.dataframe(view, hide_index=True, width="stretch", key="sep_scores",
                 column_config={"clip_nll": st.column_config.NumberColumn("CLIP entropy", format="%.3f", help=c.HELP["clip_nll"]),
                                "model_nll": st.column_config.NumberColumn("model entropy", format="%.3f", help=c.HELP["model_nll"]),
                                "clip_rank": st.column_config.NumberColumn("CLIP rank", format="%.3f", help=c.HELP["clip_rank"]),
                                "model_rank": st.column_config.NumberColumn("model rank", format="%.3f", help=c.HELP["model_rank"]),
                                "clip_conf": st.column_config.NumberColumn("CLIP confidence", format="%.2f")})
    if n > 2000:
        st.caption(f"First 2,000 of {n:,} rows shown (suspect first, then by model rank); the full table is in the scores CSV below.")

# ------------------------------------------------------------------------------------------------
# Exports
# ------------------------------------------------------------------------------------------------
st.subheader("Export", help="Index lists (0-based positions in the run's training set, plus source_index in the original dataset) with provenance.")
ex = run.path("exports")
prov = None
if (ex / "clean_indices.json").is_file():
    try:
        prov = json.loads((ex / "clean_indices.json").read_text()).get("provenance", {})
    except (OSError, ValueError):
        prov = None
if prov is None:
    st.info("No exports yet: press **Save separation and exports** above.", icon=":material/info:")
else:
    st.caption(f"Exports written {prov.get('created', '?')} with σ1 = {prov.get('sigma1')}, σ2 = {prov.get('sigma2')}, "
               f"σ3 = {prov.get('sigma3', 0.0)}, {prov.get('rank_mode')} ranks, {prov.get('manual_overrides', 0)} manual moves"
               + (" — differs from the sliders above; save to update." if unsaved else "."))

    def reader(p):
        return lambda: p.read_bytes()

    e = st.columns(5)
    files = [("clean_indices.csv", "Clean · CSV", "text/csv"), ("clean_indices.json", "Clean · JSON", "application/json"),
             ("suspect_indices.csv", "Suspect · CSV", "text/csv"), ("suspect_indices.json", "Suspect · JSON", "application/json"),
             ("scores.csv", "Scores table · CSV", "text/csv")]
    for col, (fn, label, mime) in zip(e, files):
        p = ex / fn
        col.download_button(label, data=reader(p) if p.is_file() else b"", file_name=f"{run.root.name}-{fn}", mime=mime,
                            disabled=not p.is_file(), key=f"dl_{fn}", icon=":material/download:", on_click="ignore",
                            width="stretch")
