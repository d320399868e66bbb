"""Inspect: both entropies, the 2-D entropy map with the thresholds, the UMAP of the reference
embeddings with box/lasso selection, per-class flag rates and a trigger-revealing view."""
from __future__ import annotations

import numpy as np
import streamlit as st

import _common as c
from cgd import viz

st.title("Inspect")
run = c.require_run(need=("clip_logits.npy", "model_logits.npy", "data/train_y.npy"), what="inspection")
c.init_separation_state(run)
rank_mode = st.session_state["rank_mode"]

df = data = None
with c.guard("Reading the scores"):
    df = c.scores(run, rank_mode)
    data = c.run_data(run)
if df is None or data is None:
    st.stop()

train = data.train
classes = train.classes
subset = c.current_subset(df)
sub_names = c.subset_names(subset)
has_gt = train.poison_mask is not None
truth = viz.truth_labels(train.poison_mask) if has_gt else None
s1, s2, s3 = float(st.session_state["sigma1"]), float(st.session_state["sigma2"]), float(st.session_state["sigma3"])

st.caption(f"Run **{run.root.name}** · {c.fmt_int(len(df))} training samples · σ1 = {s1:.2f}, σ2 = {s2:.2f}, σ3 = {s3:.2f} "
           f"({rank_mode} ranks) · tune them on the Separate page.")
m = st.columns(4 if has_gt else 3)
for i, name in enumerate(("clean", "suspect", "unused")):
    n = int((subset == c.SUBSET_CODES[name]).sum())
    m[i].metric(name.capitalize(), c.fmt_int(n), help=c.HELP[name], delta=f"{100 * n / max(len(df), 1):.1f} % of all",
                delta_color="off", delta_arrow="off")
if has_gt:
    caught = int(((subset == 2) & train.poison_mask).sum())
    m[3].metric("Poisons caught", f"{caught:,} / {int(train.poison_mask.sum()):,}", help=c.HELP["tpr"])


def hover_text(idx: np.ndarray) -> list[str] | None:
    if len(idx) > 20_000:  # keep the page light: hover shows index and ranks only
        return None
    lab = df["label"].to_numpy()[idx]
    return [f"label {classes[l]}<br>{t}" for l, t in zip(lab, df["clip_top3"].to_numpy()[idx])]


def show_selection(sel: list[int], source: str) -> None:
    """Thumbnail grid of selected samples: label, CLIP top-3, both ranks."""
    if not sel:
        st.caption("Draw a box or lasso on the plot to see the selected images here.")
        return
    st.session_state["selection"] = sel
    limit = 48
    st.markdown(f"**{len(sel):,} selected** on the {source}" + (f" (first {limit} shown)" if len(sel) > limit else ""))
    cols = st.columns(6)
    scale = max(1, 96 // train.image_size[0])
    for j, i in enumerate(sel[:limit]):
        row = df.iloc[i]
        with cols[j % 6]:
            st.image(viz.upscale(np.asarray(train.images[i]), scale), width="stretch", output_format="PNG")
            gt = (" · **poisoned**" if train.poison_mask[i] else " · clean") if has_gt else ""
            st.caption(f"**#{i}** {classes[int(row['label'])]} · {sub_names[i]}{gt}  \nCLIP: {row['clip_top3']}  \n"
                       f"ranks: CLIP {row['clip_rank']:.2f} · model {row['model_rank']:.2f}")
    st.page_link(c.PAGES["separate"], label=f"Move these {len(sel):,} samples by hand on the Separate page",
                 icon=":material/call_split:")


color_opts = ["subset"] + (["ground truth"] if has_gt else []) + ["given label"]
tabs = st.tabs(["Entropies", "Entropy map", "UMAP", "Per class", "Trigger view"])

with tabs[0]:
    groups, order = (truth, ["clean", "poisoned"]) if has_gt else (sub_names, ["clean", "suspect", "unused"])
    st.plotly_chart(viz.entropy_histograms(df["clip_nll"].to_numpy(), df["model_nll"].to_numpy(), groups, order),
                    width="stretch", key="insp_hist")
    st.caption(("Overlaid by ground truth. " if has_gt else "Overlaid by current subset. ")
               + c.HELP["clip_nll"] + " " + c.HELP["model_nll"])

with tabs[1]:
    by = st.segmented_control("Colour by", color_opts, default=color_opts[1] if has_gt else "subset", key="insp_map_color")
    col = {"subset": sub_names, "ground truth": truth, "given label": np.array(classes)[df["label"].to_numpy()]}[by or "subset"]
    order = {"subset": ["clean", "suspect", "unused"], "ground truth": ["clean", "poisoned"]}.get(by or "subset", list(classes))
    fig = viz.entropy_map(df["clip_rank"].to_numpy(), df["model_rank"].to_numpy(), col, s1, s2, hover=hover_text(np.arange(len(df))),
                          color_order=order, sigma3=s3)
    ev = st.plotly_chart(fig, width="stretch", key="insp_map", on_select="rerun", selection_mode=("box", "lasso"))
    st.caption(f"{c.HELP['clip_rank']} {c.HELP['model_rank']} Dashed teal: clean bounds (σ1); dotted red: suspect bounds (σ2); "
               "dash-dot red diagonal: the joint tail (σ3), suspect to its lower right. "
               + ("WebGL rendering for large sets." if len(df) > viz.WEBGL_THRESHOLD else ""))
    show_selection(viz.selected_indices(ev.get("selection") if ev else None), "entropy map")

with tabs[2]:
    from cgd.embedding_map import DEFAULT_MAX_POINTS, load_embedding_map

    emap = None
    with c.guard("Reading the embedding map"):
        emap = load_embedding_map(run)
    status = c.job_panel(run, "umap")
    if emap is None:
        st.info(f"The UMAP of the reference embeddings is computed once per run in the background and cached in the run "
                f"folder (above {DEFAULT_MAX_POINTS:,} samples on a seeded subsample).", icon=":material/bubble_chart:")
        if st.button("Compute UMAP", icon=":material/play_arrow:", disabled=status.active, key="insp_umap"):
            if c.start_job(run, "umap", label="UMAP"):
                st.rerun()
    else:
        if emap.subsampled:
            st.warning(f"Map drawn for a seeded subsample of {len(emap.index):,} of {emap.n_total:,} samples "
                       f"(size limit {emap.info.get('config', {}).get('max_points', DEFAULT_MAX_POINTS):,}).",
                       icon=":material/filter_alt:")
        opts = color_opts + ["CLIP entropy", "model entropy"]
        by = st.segmented_control("Colour by", opts, default=opts[1] if has_gt else "subset", key="insp_umap_color")
        by = by or "subset"
        idx = emap.index
        if by in ("CLIP entropy", "model entropy"):
            vals = df["clip_nll" if by == "CLIP entropy" else "model_nll"].to_numpy()[idx]
            fig = viz.embedding_scatter(emap.xy, idx, vals, continuous=True, color_title="nats", hover=hover_text(idx))
        else:
            col = {"subset": sub_names, "ground truth": truth, "given label": np.array(classes)[df["label"].to_numpy()]}[by][idx]
            order = {"subset": ["clean", "suspect", "unused"], "ground truth": ["clean", "poisoned"]}.get(by, list(classes))
            fig = viz.embedding_scatter(emap.xy, idx, col, color_order=order, hover=hover_text(idx))
        ev = st.plotly_chart(fig, width="stretch", key="insp_umap_plot", on_select="rerun", selection_mode=("box", "lasso"))
        st.caption(f"UMAP (umap-learn, seed {emap.info.get('config', {}).get('seed', 0)}) of the reference's image "
                   "embeddings: poisoned samples of a dirty-label attack sit among their true class but carry the target label.")
        show_selection(viz.selected_indices(ev.get("selection") if ev else None), "UMAP")

with tabs[3]:
    table = viz.per_class_table(df["label"].to_numpy(), subset, classes, train.poison_mask if has_gt else None)
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"suspect %": st.column_config.ProgressColumn(format="%.1f %%", min_value=0, max_value=100,
                                                                             help="Share of the class flagged as suspect"),
                                "clean %": st.column_config.NumberColumn(format="%.1f %%", help=c.HELP["clean"]),
                                "samples": st.column_config.NumberColumn(format="localized")})
    st.caption("Per given label. A backdoor's target class usually stands out with a high suspect share.")

with tabs[4]:
    sus = subset == 2
    rates = np.bincount(df["label"].to_numpy()[sus], minlength=len(classes)) / np.maximum(np.bincount(df["label"].to_numpy(), minlength=len(classes)), 1)
    default_t = data.target if data.target is not None else int(np.argmax(rates))
    t = st.selectbox("Target class to examine", list(range(len(classes))), index=int(default_t), key="insp_trig_class",
                     format_func=lambda k: f"{k}: {classes[k]} ({100 * rates[k]:.0f} % suspect)",
                     help="The class the suspect samples are labelled as; by default the known target or the most flagged class.")
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
