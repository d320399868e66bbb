"""Inspect: the audit verdict, both entropies, the 2-D entropy map with the thresholds, the UMAP of the
reference embeddings with box/lasso selection, per-class flag rates and a trigger-revealing view."""
from __future__ import annotations

import numpy as np
import streamlit as st

import _common as c
import cgd

st.title("Inspect")
L = cgd.layout
run = c.require_run(need=(L.CLIP_LOGITS, L.MODEL_LOGITS, L.SCORES), what="inspection")
c.init_separation_state(run)
rank_mode = st.session_state["rank_mode"]
viz = cgd.viz

df = data = None
with c.guard("Reading the scores"):
    df = c.scores(run)
    data = c.run_data(run)
if df is None or data is None:
    st.stop()

train = data.train
classes = train.classes
ref = c.ref_name(run)
subset = c.current_subset(df)
sub_names = c.subset_names(subset)
clip_rank, model_rank = c.ranks(df, rank_mode)
has_gt = train.poison_mask is not None
truth = viz.truth_labels(train.poison_mask) if has_gt else None
s1, s2, s3 = float(st.session_state["sigma1"]), float(st.session_state["sigma2"]), float(st.session_state["sigma3"])

verdict = c.verdict_card(run, classes, subset)
flagged = "Suspect" if verdict.get("poisoned") else "Lowest-ranked"
st.caption(f"Run **{run.root.name}** · {c.fmt_int(len(df))} training samples · reference: {ref} · σ1 = {s1:.2f}, "
           f"σ2 = {s2:.2f}, σ3 = {s3:.2f} ({rank_mode} ranks) · tune them on the Separate page.")
m = st.columns(4 if has_gt else 3)
for i, code in enumerate((cgd.Subset.CLEAN, cgd.Subset.SUSPECT, cgd.Subset.UNUSED)):
    n = int((subset == code).sum())
    label = flagged if code == cgd.Subset.SUSPECT else code.label.capitalize()
    m[i].metric(label, c.fmt_int(n), help=c.term(code.label), delta=f"{100 * n / max(len(df), 1):.1f} % of all",
                delta_color="off", delta_arrow="off")
if has_gt:
    caught = int(((subset == cgd.Subset.SUSPECT) & train.poison_mask).sum())
    m[3].metric("Poisons caught", f"{caught:,} / {int(train.poison_mask.sum()):,}", help=c.term("tpr"))


@st.cache_data(show_spinner=False, max_entries=4)
def _top3_text(root: str, key: tuple, classes: tuple) -> np.ndarray:
    idx, p = cgd.top_k(cgd.RunDir(root).load_array(L.CLIP_LOGITS, mmap=True), 3)
    names = np.array(classes)
    return np.array([", ".join(f"{names[j]} {q:.2f}" for j, q in zip(ii, pp)) for ii, pp in zip(idx, p)])


def top3(idx: np.ndarray) -> np.ndarray:
    return _top3_text(str(run.root), c._mtime(run, L.CLIP_LOGITS), tuple(classes))[idx]


def hover_text(idx: np.ndarray) -> list[str] | None:
    if len(idx) > 20_000:  # keep the page light: hover shows index and ranks only
        return None
    lab = df["label"].to_numpy()[idx]
    return [f"label {classes[l]}<br>{ref}: {t}" for l, t in zip(lab, top3(idx))]


PAGE_SIZE = 48


def show_selection(sel: list[int], source: str, key: str) -> None:
    """Thumbnail grid of selected samples, a page at a time: label, the reference's top 3, both ranks."""
    if not sel:
        st.caption("Draw a box or lasso on the plot to see the selected images here.")
        return
    st.session_state["selection"] = sel
    pages = max(1, -(-len(sel) // PAGE_SIZE))
    head, pick = st.columns([4, 1], vertical_alignment="bottom")
    page = int(pick.number_input(f"Page (of {pages})", 1, pages, 1, key=f"{key}_page")) if pages > 1 else 1
    lo, hi = (page - 1) * PAGE_SIZE, min(page * PAGE_SIZE, len(sel))
    head.markdown(f"**{len(sel):,} selected** on the {source}" + (f" · showing {lo + 1:,}–{hi:,}" if pages > 1 else ""))
    shown = np.asarray(sel[lo:hi])
    tops = top3(shown)
    cols = st.columns(6)
    scale = max(1, 96 // train.image_size[0])
    for j, i in enumerate(shown):
        with cols[j % 6]:
            st.image(viz.upscale(np.asarray(train.images[i]), scale), width="stretch", output_format="PNG")
            gt = (" · **poisoned**" if train.poison_mask[i] else " · clean") if has_gt else ""
            st.caption(f"**#{i}** {classes[int(df['label'].iat[i])]} · {sub_names[i]}{gt}  \n{ref}: {tops[j]}  \n"
                       f"ranks: {ref} {clip_rank[i]:.2f} · model {model_rank[i]:.2f}")
    c.page_link(c.PAGES["separate"], label=f"Move these {len(sel):,} samples by hand on the Separate page",
                 icon=":material/call_split:")


color_opts = ["subset"] + (["ground truth"] if has_gt else []) + ["given label"]
tabs = st.tabs(["Entropies", "Entropy map", "UMAP", "Per class", "Trigger view"])
order_of = {"subset": ["clean", "suspect", "unused"], "ground truth": ["clean", "poisoned"]}

with tabs[0]:
    groups, order = (truth, ["clean", "poisoned"]) if has_gt else (sub_names, ["clean", "suspect", "unused"])
    st.plotly_chart(viz.entropy_histograms(df["clip_nll"].to_numpy(), df["model_nll"].to_numpy(), groups, order, ref=ref),
                    width="stretch", key="insp_hist")
    st.caption(("Overlaid by ground truth. " if has_gt else "Overlaid by current subset. ")
               + c.term("clip_nll", ref) + " " + c.term("model_nll"))

with tabs[1]:
    by = st.segmented_control("Colour by", color_opts, default=color_opts[1] if has_gt else "subset", key="insp_map_color")
    col = {"subset": sub_names, "ground truth": truth, "given label": np.array(classes)[df["label"].to_numpy()]}[by or "subset"]
    fig = viz.entropy_map(clip_rank, model_rank, col, s1, s2, hover=hover_text(np.arange(len(df))),
                          color_order=order_of.get(by or "subset", list(classes)), sigma3=s3, ref=ref)
    ev = st.plotly_chart(fig, width="stretch", key="insp_map", on_select="rerun", selection_mode=("box", "lasso"))
    st.caption(f"{c.term('clip_rank', ref)} {c.term('model_rank')} Dashed teal: clean bounds (σ1); dotted red: suspect "
               "bounds (σ2); dash-dot red diagonal: the joint tail (σ3), suspect to its lower right. "
               + ("WebGL rendering for large sets." if len(df) > viz.WEBGL_THRESHOLD else ""))
    show_selection(viz.selected_indices(ev.get("selection") if ev else None), "entropy map", "sel_map")

with tabs[2]:
    DEFAULT_MAX_POINTS, load_embedding_map = cgd.embedding_map.DEFAULT_MAX_POINTS, cgd.embedding_map.load_embedding_map
    emap = None
    with c.guard("Reading the embedding map"):
        emap = load_embedding_map(run)
    status = c.job_panel(run, "umap")
    if emap is None:
        st.info(f"The UMAP of the reference embeddings is computed once per run in the background and cached in the run "
                f"folder (above {DEFAULT_MAX_POINTS:,} samples on a seeded subsample). It reports no progress while it "
                "runs: about a minute for 10,000 samples on a 2-core CPU.", icon=":material/bubble_chart:")
        if st.button("Compute UMAP", icon=":material/play_arrow:", disabled=status.active, key="insp_umap"):
            if c.start_job(run, "umap", label="UMAP"):
                st.rerun()
    else:
        if emap.subsampled:
            st.warning(f"Map drawn for a seeded subsample of {len(emap.index):,} of {emap.n_total:,} samples "
                       f"(size limit {emap.info.get('config', {}).get('max_points', DEFAULT_MAX_POINTS):,}).",
                       icon=":material/filter_alt:")
        opts = color_opts + [f"{ref} entropy", "model entropy"]
        by = st.segmented_control("Colour by", opts, default=opts[1] if has_gt else "subset", key="insp_umap_color") or "subset"
        idx = emap.index
        if by.endswith("entropy"):
            vals = df["clip_nll" if by != "model entropy" else "model_nll"].to_numpy()[idx]
            fig = viz.embedding_scatter(emap.xy, idx, vals, continuous=True, color_title="nats", hover=hover_text(idx))
        else:
            col = {"subset": sub_names, "ground truth": truth, "given label": np.array(classes)[df["label"].to_numpy()]}[by][idx]
            fig = viz.embedding_scatter(emap.xy, idx, col, color_order=order_of.get(by, list(classes)), hover=hover_text(idx))
        ev = st.plotly_chart(fig, width="stretch", key="insp_umap_plot", on_select="rerun", selection_mode=("box", "lasso"))
        group, what = ((train.poison_mask, "poisoned samples") if has_gt
                       else (subset == cgd.Subset.SUSPECT, "suspect samples"))
        lay = viz.group_layout(emap.xy, np.asarray(group)[idx])
        where = (f"here the {what} form clusters of their own (a shared trigger pulls them together)" if lay["own_cluster"]
                 else f"here the {what} sit among the other images (their content, not a shared trigger, places them)")
        st.caption(f"UMAP (umap-learn, seed {emap.info.get('config', {}).get('seed', 0)}) of the reference's image "
                   f"embeddings: {where}.")
        show_selection(viz.selected_indices(ev.get("selection") if ev else None), "UMAP", "sel_umap")

with tabs[3]:
    table = viz.per_class_table(df["label"].to_numpy(), subset, classes, train.poison_mask if has_gt else None)
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"suspect %": st.column_config.ProgressColumn(format="%.1f %%", min_value=0, max_value=100,
                                                                             help="Share of the class flagged as suspect"),
                                "clean %": st.column_config.NumberColumn(format="%.1f %%", help=c.term("clean")),
                                "samples": st.column_config.NumberColumn(format="localized")})
    st.caption("Per given label. A backdoor's target class usually stands out with a high suspect share; the verdict above "
               "says whether one does beyond what class difficulty explains.")

with tabs[4]:
    sus = subset == cgd.Subset.SUSPECT
    rates = np.bincount(df["label"].to_numpy()[sus], minlength=len(classes)) / np.maximum(np.bincount(df["label"].to_numpy(), minlength=len(classes)), 1)
    targets = verdict.get("targets") or []
    default_t = targets[0] if targets else (data.target if data.target is not None else int(np.argmax(rates)))
    t = st.selectbox("Target class to examine", list(range(len(classes))), index=int(default_t), key="insp_trig_class",
                     format_func=lambda k: f"{k}: {classes[k]} ({100 * rates[k]:.0f} % suspect)",
                     help="The class the suspect samples are labelled as; by default the verdict's target, else the known "
                          "target or the most flagged class.")
    views = c.trigger_views(run, train.images, df["label"].to_numpy(), sus, int(t))
    if views["n_suspect"] == 0:
        st.info("No suspect samples carry this label at the current thresholds.")
    else:
        scale = max(1, 192 // train.image_size[0])
        a, b, d_, _ = st.columns([1, 1, 1, 0.5])
        a.image(viz.upscale(views["mean_suspect"], scale), width=220, output_format="PNG", caption=f"mean of {views['n_suspect']:,} suspect samples labelled {classes[t]}")
        b.image(viz.upscale(views["mean_reference"], scale), width=220, output_format="PNG", caption=f"mean of {views['n_reference']:,} non-suspect samples")
        d_.image(viz.upscale(views["difference"], scale), width=220, output_format="PNG", caption="|difference|, stretched")
        st.caption("A trigger shared by the suspect samples (a patch, a blended pattern) shows up as a sharp, bright "
                   "structure in the difference image; natural class differences stay blurry.")
