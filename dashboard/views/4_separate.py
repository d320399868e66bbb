"""Separate: tune sigma1/sigma2/sigma3 with live counts and detection rates, move samples by hand, save
the separation into the run (a background `cgd separate` + `cgd export`) and download the lists.

Thresholds and moves not saved yet are kept as a draft in the run folder (cgd.drafts), so a
reloaded tab finds them again."""
from __future__ import annotations


import numpy as np
import pandas as pd
import streamlit as st

import _common as c
import cgd

st.title("Separate")
L, S = cgd.layout, cgd.Subset
run = c.require_run(need=(L.CLIP_LOGITS, L.MODEL_LOGITS, L.SCORES), what="separation")
c.init_separation_state(run)

df = data = None
with c.guard("Reading the scores"):
    df = c.scores(run)
    data = c.run_data(run)
if df is None or data is None:
    st.stop()
train = data.train
classes = train.classes
has_gt = train.poison_mask is not None
n = len(df)
ref = c.ref_name(run)

status = c.job_panel(run, "separate")
if st.session_state.pop("draft_restored", False):
    st.info("Restored the thresholds and manual moves you had not saved yet (kept in the run folder).",
            icon=":material/restore:")


# ------------------------------------------------------------------------------------------------
# Thresholds
# ------------------------------------------------------------------------------------------------
def _sync(name: str) -> None:  # widget state is dropped on other pages: keep the value in a plain key
    st.session_state[name] = st.session_state[f"w_{name}"]
    c.keep_draft(run)


a, b, j, r = st.columns([2, 2, 2, 1])
a.slider("σ1 · clean margin", 0.0, 0.5, value=float(st.session_state["sigma1"]), step=0.01, key="w_sigma1",
         help=c.term("sigma1"), format="%.2f", on_change=_sync, args=("sigma1",))
b.slider("σ2 · suspect margin", 0.0, 0.5, value=float(st.session_state["sigma2"]), step=0.01, key="w_sigma2",
         help=c.term("sigma2"), format="%.2f", on_change=_sync, args=("sigma2",))
j.slider("σ3 · joint margin", 0.0, 0.5, value=float(st.session_state["sigma3"]), step=0.01, key="w_sigma3",
         help=c.term("sigma3"), format="%.2f", on_change=_sync, args=("sigma3",))
modes = ["global", "per_class"]
r.selectbox("Rank mode", modes, index=modes.index(st.session_state["rank_mode"]), key="w_rank_mode", help=c.term("rank_mode"),
            on_change=_sync, args=("rank_mode",))
s1, s2, s3 = float(st.session_state["sigma1"]), float(st.session_state["sigma2"]), float(st.session_state["sigma3"])
rank_mode = st.session_state["rank_mode"]
subset = c.current_subset(df)
saved = c.saved_separation(run)
saved_subset = cgd.subsets(df, saved.separation, saved.overrides)

verdict = c.verdict_card(run, classes, subset)
cols = st.columns(4)
for i, code in enumerate((S.CLEAN, S.SUSPECT, S.UNUSED)):
    k = int((subset == code).sum())
    dk = k - int((saved_subset == code).sum())
    label = "Lowest-ranked" if code == S.SUSPECT and not verdict.get("poisoned") else code.label.capitalize()
    cols[i].metric(f"{label} ({100 * k / max(n, 1):.1f} %)", c.fmt_int(k), delta=f"{dk:+,} vs saved" if dk else None,
                   help=c.term(code.label), delta_color="off")
cols[3].metric("Manual moves", c.fmt_int(len(st.session_state.get("overrides") or {})),
               help="Samples whose subset you set by hand; they win over the rule.")

unsaved = c.unsaved_separation(run)
sv1, sv2 = st.columns([3, 2], vertical_alignment="center")
with sv1:
    if unsaved:
        sc = saved.separation
        st.warning(f"Unsaved: the run still holds σ1 = {sc.sigma1:.2f}, σ2 = {sc.sigma2:.2f}, σ3 = {sc.sigma3:.2f}, "
                   f"{sc.rank_mode} ranks and {len(saved.overrides)} manual moves. Save to use these settings for exports "
                   "and retraining (until then they are kept as a draft in the run folder).", icon=":material/save:")
    else:
        st.caption(":material/check_circle: These settings are the ones saved in the run.")
with sv2:
    if st.button("Save separation and exports", type="primary", icon=":material/save:", key="sep_save",
                 disabled=status.active, help="Writes the thresholds and overrides into the run, recomputes the subsets "
                 "with the pipeline's separate stage and writes the export files (background job, a few seconds)."):
        ok = False
        with c.guard("Saving the separation"):
            if cgd.jobs.is_running(run):
                raise cgd.RunLockedError(f"a job is running on {run.root.name}; wait for it or stop it first")
            run.save_overrides(st.session_state.get("overrides") or {})
            ok = c.start_job(run, "export", config={"sigma1": s1, "sigma2": s2, "sigma3": s3, "rank_mode": rank_mode},
                             label="saving the separation", pre=[cgd.jobs.cgd_command("separate", run)],
                             phase="separating")
            if ok:
                cgd.drafts.clear_draft(run)
        if ok:
            st.rerun()

# ------------------------------------------------------------------------------------------------
# Counts and detection quality
# ------------------------------------------------------------------------------------------------
t_counts, t_det, t_sweep, t_manual, t_table = st.tabs(["Per class", "Detection" + ("" if has_gt else " (no ground truth)"),
                                                       "Threshold sweep", "Move by hand", "Scores table"])
with t_counts:
    table = cgd.viz.per_class_table(df["label"].to_numpy(), subset, classes, train.poison_mask if has_gt else None)
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
                     column_config={"TPR": st.column_config.NumberColumn("TPR %", format="%.1f", help=c.term("tpr")),
                                    "FPR": st.column_config.NumberColumn("FPR %", format="%.1f", help=c.term("fpr")),
                                    "precision": st.column_config.NumberColumn("precision %", format="%.1f", help=c.term("precision")),
                                    "F1": st.column_config.NumberColumn("F1 %", format="%.1f", help=c.term("f1")),
                                    "size": st.column_config.NumberColumn(format="localized")})
        d1, d2, d3 = st.columns(3)
        d1.metric("Poisons in the clean subset", f"{det['poison_in_clean']:,} / {det['n_poison']:,}", help=c.term("poison_in_clean"))
        d2.metric(f"AUROC · {ref} entropy", c.fmt_float(det.get("auroc_clip")), help=c.term("auroc"))
        d3.metric("AUROC · model entropy", c.fmt_float(det.get("auroc_model")), help=c.term("auroc"))
        point = ("suspect subset now", float(det["suspect"]["fpr"]), float(det["suspect"]["tpr"]))
        st.plotly_chart(cgd.viz.roc_figure(c.roc_curves(run, df, train.poison_mask, ref), points=[point]),
                        width="stretch", key="sep_roc")
        st.caption("The red cross is the suspect subset at the current thresholds: its share of poisons caught (TPR) "
                   "against its share of clean samples flagged (FPR).")

with t_sweep:
    ratio = s2 / s1 if s1 > 0 else 0.5
    rows = c.sweep(run, df, train.poison_mask if has_gt else None, rank_mode, min(ratio, 1.0), s3)
    st.plotly_chart(cgd.viz.sweep_figure(rows, s1, title=f"Threshold sweep (σ2 = {min(ratio, 1.0):.2f} × σ1, σ3 = {s3:.2f}, without manual moves)"),
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
                            help=f"0-based positions in the run's training set (the `index` column of the scores table), "
                                 f"0 to {n - 1:,}")
        idx, bad = cgd.drafts.parse_indices(txt, n)
        if bad:
            st.error(f"Not valid indices in [0, {n - 1:,}]: {bad[:5]}")
    m1, m2, m3 = st.columns([2, 1, 1], vertical_alignment="bottom")
    to = m1.segmented_control("Move to", [s.label for s in (S.CLEAN, S.SUSPECT, S.UNUSED)], default="suspect", key="sep_to")
    if m2.button(f"Move {len(idx):,}", disabled=not idx or not to, key="sep_move", icon=":material/move_item:"):
        for i in idx:
            ov[int(i)] = int(S.parse(to))
        st.session_state["overrides"] = ov
        c.keep_draft(run)
        st.rerun()
    if m3.button("Back to the rule", disabled=not idx, key="sep_unmove", help="Remove the manual moves of these samples"):
        for i in idx:
            ov.pop(int(i), None)
        st.session_state["overrides"] = ov
        c.keep_draft(run)
        st.rerun()
    if ov:
        rule = cgd.flag_subsets(*c.ranks(df, rank_mode), cgd.SeparationConfig(s1, s2, rank_mode, s3))
        shown = list(ov)[:2000]
        ot = pd.DataFrame({"index": shown, "label": [classes[int(df["label"].iat[i])] for i in shown],
                           "rule says": [S(int(rule[i])).label for i in shown], "moved to": [S(ov[i]).label for i in shown]})
        st.dataframe(ot, hide_index=True, width="stretch", key="sep_ov_table")
        if st.button("Clear all manual moves", key="sep_clear"):
            st.session_state["overrides"] = {}
            c.keep_draft(run)
            st.rerun()

with t_table:
    # suspect first, then clean, then unused; by model rank within each (only the shown rows are built)
    group = np.where(subset == S.SUSPECT, 0, np.where(subset == S.CLEAN, 1, 2))
    cr, mr = c.ranks(df, rank_mode)
    order = np.lexsort((mr, group))[:2000]
    view = df.iloc[order][["index", "source_index", "label", "clip_nll", "model_nll", "clip_pred", "clip_conf"]].assign(
        clip_rank=cr[order], model_rank=mr[order], subset=c.subset_names(subset[order]))
    view["label"] = np.array(classes)[view["label"].to_numpy()]
    view["clip_pred"] = np.array(classes)[view["clip_pred"].to_numpy()]
    st.dataframe(view, hide_index=True, width="stretch", key="sep_scores",
                 column_config={"clip_nll": st.column_config.NumberColumn(f"{ref} entropy", format="%.3f", help=c.term("clip_nll", ref)),
                                "model_nll": st.column_config.NumberColumn("model entropy", format="%.3f", help=c.term("model_nll")),
                                "clip_rank": st.column_config.NumberColumn(f"{ref} rank", format="%.3f", help=c.term("clip_rank", ref)),
                                "model_rank": st.column_config.NumberColumn("model rank", format="%.3f", help=c.term("model_rank")),
                                "clip_pred": st.column_config.TextColumn(f"{ref} says"),
                                "clip_conf": st.column_config.NumberColumn(f"{ref} confidence", format="%.2f")})
    if n > 2000:
        st.caption(f"First 2,000 of {n:,} rows shown (suspect first, then by model rank); the full table is in the scores CSV below.")

# ------------------------------------------------------------------------------------------------
# Exports
# ------------------------------------------------------------------------------------------------
st.subheader("Export", help="Index lists (0-based positions in the run's training set, plus source_index in the original "
             "dataset and, for image folders, each file's path) with their provenance beside them.")
ex = run.path(L.EXPORTS)
try:
    prov = run.read_provenance()
except (OSError, ValueError):
    prov = None
if prov is None:
    st.info("No exports yet: press **Save separation and exports** above.", icon=":material/info:")
else:
    st.caption(f"Exports written {prov.get('created', '?')} to `{c.display_path(ex)}` (on the server: `{ex}`) with "
               f"σ1 = {prov.get('sigma1')}, σ2 = {prov.get('sigma2')}, σ3 = {prov.get('sigma3', 0.0)}, {prov.get('rank_mode')} "
               f"ranks, {prov.get('manual_overrides', 0)} manual moves"
               + (f"; file paths are relative to `{prov['files_root']}`" if prov.get("files_root") else "")
               + (" — differs from the sliders above; save to update." if unsaved else "."))

    def reader(p):
        return lambda: p.read_bytes()

    files = [(name, what) for name, what in L.EXPORT_FILES]
    e = st.columns(len(files))
    for col, (fn, what) in zip(e, files):
        p = ex / fn
        col.download_button(fn, data=reader(p) if p.is_file() else b"", file_name=f"{run.root.name}-{fn}",
                            mime="application/json" if fn.endswith(".json") else "text/csv", help=what,
                            disabled=not p.is_file(), key=f"dl_{fn}", icon=":material/download:", on_click="ignore",
                            width="stretch")
