"""Figures, tables and image views for the dashboard: pure functions, arrays in, objects out.

Figures are plotly ``go.Figure`` objects (no Streamlit here); tables are pandas DataFrames; image
helpers return uint8 arrays. Colours are shared so a subset looks the same on every page.

Scatter plots carry the sample index in ``customdata[0]`` of every point, so a box or lasso
selection maps back to samples whatever trace the points belong to.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "SUBSET_COLORS", "TRUTH_COLORS", "WEBGL_THRESHOLD",
    "class_histogram", "entropy_histograms", "entropy_map", "embedding_scatter", "roc_figure", "sweep_figure",
    "metric_curves", "loss_curves", "per_class_table", "zero_shot_table", "upscale", "mosaic", "trigger_views",
    "truth_labels", "selected_indices",
]

SUBSET_COLORS = {"clean": "#0F766E", "suspect": "#DC2626", "unused": "#94A3B8"}
TRUTH_COLORS = {"clean": "#2563EB", "poisoned": "#DC2626"}
METRIC_COLORS = {"ca": "#0F766E", "asr": "#DC2626", "ra": "#7C3AED", "loss": "#334155"}
_ANN = dict(bgcolor="rgba(255,255,255,0.85)", font=dict(size=11, color="#0F172A"))  # threshold labels over dense points
WEBGL_THRESHOLD = 5000  # points above which scatters switch to WebGL (go.Scattergl)
_LAYOUT = dict(template="plotly_white", margin=dict(l=55, r=20, t=95, b=50), font=dict(size=13),
               legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0.0))


def _title(text: str) -> dict:
    """Title on its own line above the legend (top left)."""
    return dict(text=text, x=0.0, xanchor="left", y=0.98, yanchor="top", font=dict(size=16))


def _go():
    import plotly.graph_objects as go

    return go


def _palette(categories: Sequence[str]) -> dict[str, str]:
    base = {**SUBSET_COLORS, **TRUTH_COLORS}
    extra = ["#2563EB", "#F59E0B", "#7C3AED", "#059669", "#DB2777", "#0891B2", "#65A30D", "#EA580C"]
    out, j = {}, 0
    for c in categories:
        if c in base:
            out[c] = base[c]
        else:
            out[c] = extra[j % len(extra)]
            j += 1
    return out


def truth_labels(poison_mask: np.ndarray) -> np.ndarray:
    """(N,) bool ground truth -> (N,) str 'poisoned' / 'clean' (for colouring)."""
    return np.where(np.asarray(poison_mask, bool), "poisoned", "clean")


def selected_indices(selection: dict | None) -> list[int]:
    """Sample indices of a plotly selection event (``customdata[0]`` of each selected point), sorted."""
    if not selection:
        return []
    pts = selection.get("points", []) if isinstance(selection, dict) else getattr(selection, "points", [])
    out = set()
    for p in pts or []:
        cd = p.get("customdata") if isinstance(p, dict) else None
        if cd is None:
            continue
        if isinstance(cd, dict):  # typed arrays come back from the browser as {"0": value, ...}
            cd = [cd[k] for k in sorted(cd, key=lambda k: int(k) if str(k).isdigit() else 0)]
        v = cd[0] if isinstance(cd, (list, tuple)) else cd
        try:
            out.add(int(v))
        except (TypeError, ValueError):
            continue
    return sorted(out)


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------

def class_histogram(counts: np.ndarray, classes: Sequence[str], poisoned: np.ndarray | None = None, title: str = "Samples per class"):
    """Bar chart of (K,) counts per class; with (K,) ``poisoned`` counts the bars are split."""
    go = _go()
    counts = np.asarray(counts)
    fig = go.Figure()
    if poisoned is not None:
        poisoned = np.asarray(poisoned)
        fig.add_bar(x=list(classes), y=counts - poisoned, name="clean", marker_color=TRUTH_COLORS["clean"])
        fig.add_bar(x=list(classes), y=poisoned, name="poisoned", marker_color=TRUTH_COLORS["poisoned"])
        fig.update_layout(barmode="stack")
    else:
        fig.add_bar(x=list(classes), y=counts, name="samples", marker_color=SUBSET_COLORS["clean"])
    fig.update_layout(**{**_LAYOUT, "margin": dict(l=55, r=20, t=95 if poisoned is not None else 50, b=50)},
                      title=_title(title), xaxis_title="class (given label)", yaxis_title="samples", height=340,
                      showlegend=poisoned is not None)
    return fig


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------

def entropy_histograms(clip_nll: np.ndarray, model_nll: np.ndarray, groups: np.ndarray | None = None,
                       group_order: Sequence[str] | None = None, bins: int = 60, ref: str = "CLIP"):
    """Histograms of both entropies side by side (nats), overlaid per group (e.g. ground truth).

    clip_nll, model_nll: (N,) float >= 0. groups: optional (N,) str labels, one overlaid histogram
    per value (``group_order`` fixes the order and colours). ref: the reference's name in the left
    title ("CLIP", "reference classifier").
    """
    go = _go()
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"{ref[:1].upper()}{ref[1:]} entropy (NLL of the given label)",
                                                        "Suspicious-model entropy (NLL of the given label)"))
    clip_nll, model_nll = np.asarray(clip_nll, float), np.asarray(model_nll, float)
    if groups is None:
        groups = np.full(len(clip_nll), "all")
    groups = np.asarray(groups).astype(str)
    order = list(group_order) if group_order else sorted(np.unique(groups))
    colors = _palette(order)
    colors.setdefault("all", "#0F766E")
    def _bins(v: np.ndarray) -> dict:  # one bin grid per panel, shared by its groups
        lo, hi = (float(np.min(v)), float(np.max(v))) if len(v) else (0.0, 1.0)
        size = (hi - lo) / bins if hi > lo else 1.0
        return dict(start=lo, end=hi + size, size=size)

    grids = {1: _bins(clip_nll), 2: _bins(model_nll)}
    for g in order:
        m = groups == g
        if not m.any():
            continue
        for col, v in ((1, clip_nll), (2, model_nll)):
            fig.add_trace(go.Histogram(x=v[m], name=f"{g} ({int(m.sum()):,})", legendgroup=g, showlegend=col == 1,
                                       marker_color=colors.get(g), opacity=0.65, xbins=grids[col], autobinx=False,
                                       hovertemplate="%{x}<br>%{y} samples<extra>" + g + "</extra>"), row=1, col=col)
    fig.update_layout(**{**_LAYOUT, "margin": dict(l=50, r=20, t=90, b=45),
                         "legend": dict(orientation="h", yanchor="bottom", y=1.14, xanchor="right", x=1.0)},
                      barmode="overlay", height=370)
    fig.update_xaxes(title_text="nats")
    fig.update_yaxes(title_text="samples", col=1)
    return fig


def _scatter(n: int, webgl: bool | None):
    go = _go()
    use_gl = n > WEBGL_THRESHOLD if webgl is None else webgl
    return go.Scattergl if use_gl else go.Scatter


def entropy_map(clip_rank: np.ndarray, model_rank: np.ndarray, color: np.ndarray, sigma1: float, sigma2: float,
                index: np.ndarray | None = None, hover: Sequence[str] | None = None, color_order: Sequence[str] | None = None,
                webgl: bool | None = None, title: str = "Entropy map", sigma3: float = 0.0, ref: str = "CLIP"):
    """The 2-D map of the reference's rank (x; ``ref`` names it: "CLIP" or "reference classifier") against suspicious-model rank (y), one trace per colour group,
    with the CGD threshold lines:

    * clean region: x <= 1 - sigma1 and y >= sigma1 (teal lines);
    * suspect region: x > 1 - sigma2 or y < sigma2 (red lines, shaded);
    * joint tail (sigma3 > 0): x - y above its (1 - sigma3) quantile, a red dash-dot diagonal.

    clip_rank, model_rank: (N,) in (0, 1]. color: (N,) str group per point. index: (N,) sample
    indices (default arange) put in customdata. hover: optional (N,) str extra hover text.
    """
    go = _go()
    x, y = np.asarray(clip_rank, float), np.asarray(model_rank, float)
    n = len(x)
    idx = np.arange(n) if index is None else np.asarray(index)
    color = np.asarray(color).astype(str)
    order = list(color_order) if color_order else sorted(np.unique(color))
    pal = _palette(order)
    Sc = _scatter(n, webgl)
    fig = go.Figure()
    fig.add_shape(type="rect", x0=1 - sigma2, x1=1.0, y0=0, y1=1, fillcolor=SUBSET_COLORS["suspect"], opacity=0.07, line_width=0, layer="below")
    fig.add_shape(type="rect", x0=0, x1=1.0, y0=0, y1=sigma2, fillcolor=SUBSET_COLORS["suspect"], opacity=0.07, line_width=0, layer="below")
    fig.add_shape(type="rect", x0=0, x1=1 - sigma1, y0=sigma1, y1=1, fillcolor=SUBSET_COLORS["clean"], opacity=0.05, line_width=0, layer="below")
    size = 6 if n < 2000 else 4 if n < 20000 else 3
    for g in order:
        m = color == g
        if not m.any():
            continue
        cd = np.stack([idx[m]], axis=1)
        text = None if hover is None else np.asarray(hover)[m]
        fig.add_trace(Sc(x=x[m], y=y[m], mode="markers", name=f"{g} ({int(m.sum()):,})", customdata=cd, text=text,
                         marker=dict(size=size, color=pal[g], opacity=0.75, line=dict(width=0)),
                         hovertemplate="sample %{customdata[0]}<br>" + ref + " rank %{x:.3f}<br>model rank %{y:.3f}"
                                       + ("<br>%{text}" if text is not None else "") + f"<extra>{g}</extra>"))
    # threshold lines, labelled outside the plot area so the labels never sit on each other or the points:
    # vertical lines above it (staggered when close), horizontal lines to its right
    vlines = [(1 - sigma1, SUBSET_COLORS["clean"], "dash", "1−σ1"), (1 - sigma2, SUBSET_COLORS["suspect"], "dot", "1−σ2")]
    hlines = [(sigma1, SUBSET_COLORS["clean"], "dash", "σ1"), (sigma2, SUBSET_COLORS["suspect"], "dot", "σ2")]
    close_v = abs(vlines[0][0] - vlines[1][0]) < 0.12
    close_h = abs(hlines[0][0] - hlines[1][0]) < 0.06
    for i, (v, col, dash, lab) in enumerate(vlines):
        fig.add_vline(x=v, line=dict(color=col, dash=dash, width=2))
        fig.add_annotation(x=v, y=1.0 + (0.075 if close_v and i == 1 else 0.0), xref="x", yref="paper", yanchor="bottom",
                           text=f"{lab} = {v:.2f}", showarrow=False, font=dict(size=11, color=col), bgcolor=_ANN["bgcolor"])
    for i, (v, col, dash, lab) in enumerate(hlines):
        fig.add_hline(y=v, line=dict(color=col, dash=dash, width=2))
        fig.add_annotation(x=1.0, y=v, xref="paper", yref="y", xanchor="left", xshift=4 + (58 if close_h and i == 1 else 0),
                           text=f"{lab} = {v:.2f}", showarrow=False, font=dict(size=11, color=col), bgcolor=_ANN["bgcolor"])
    if sigma3 > 0 and n:
        t = float(np.quantile(x - y, 1 - sigma3))  # suspect where x - y > t: right of the line x = y + t
        y0, y1 = max(0.0, -t), min(1.0, 1.0 - t)
        if y1 > y0:
            fig.add_shape(type="line", x0=y0 + t, y0=y0, x1=y1 + t, y1=y1,
                          line=dict(color=SUBSET_COLORS["suspect"], dash="dashdot", width=2))
            fig.add_annotation(x=y1 + t, y=y1, text=f"σ3 = {sigma3:.2f}", showarrow=False, xanchor="right", yanchor="bottom", bgcolor=_ANN["bgcolor"], font=_ANN["font"])
    fig.update_layout(**{**_LAYOUT, "margin": dict(l=60, r=110, t=130, b=50),
                         "legend": dict(orientation="h", yanchor="bottom", y=1.16, xanchor="left", x=0.0)},
                      title=_title(title), height=560, dragmode="lasso",
                      xaxis=dict(title=f"{ref} rank (high = the {ref} disagrees with the label)", range=[-0.02, 1.02]),
                      yaxis=dict(title="suspicious-model rank (low = learnt fastest)", range=[-0.02, 1.02]))
    return fig


def embedding_scatter(xy: np.ndarray, index: np.ndarray, color: np.ndarray, continuous: bool = False,
                      color_order: Sequence[str] | None = None, color_title: str = "", hover: Sequence[str] | None = None,
                      webgl: bool | None = None, title: str = "UMAP of the reference embeddings"):
    """Scatter of (M, 2) map coordinates. color: (M,) str groups, or (M,) floats with
    ``continuous=True`` (a colour bar). index: (M,) sample indices, put in customdata."""
    go = _go()
    xy = np.asarray(xy, float)
    index = np.asarray(index)
    n = len(xy)
    Sc = _scatter(n, webgl)
    size = 6 if n < 2000 else 4 if n < 20000 else 3
    fig = go.Figure()
    text = None if hover is None else np.asarray(hover)
    ht = "sample %{customdata[0]}" + ("<br>%{text}" if text is not None else "")
    if continuous:
        c = np.asarray(color, float)
        fig.add_trace(Sc(x=xy[:, 0], y=xy[:, 1], mode="markers", customdata=index[:, None], text=text, showlegend=False,
                         marker=dict(size=size, color=c, colorscale="Viridis", opacity=0.8, line=dict(width=0),
                                     colorbar=dict(title=color_title)),
                         hovertemplate=ht + f"<br>{color_title} " + "%{marker.color:.3f}<extra></extra>"))
    else:
        color = np.asarray(color).astype(str)
        order = list(color_order) if color_order else sorted(np.unique(color))
        pal = _palette(order)
        for g in order:
            m = color == g
            if not m.any():
                continue
            fig.add_trace(Sc(x=xy[m, 0], y=xy[m, 1], mode="markers", name=f"{g} ({int(m.sum()):,})",
                             customdata=index[m][:, None], text=None if text is None else text[m],
                             marker=dict(size=size, color=pal[g], opacity=0.75, line=dict(width=0)),
                             hovertemplate=ht + f"<extra>{g}</extra>"))
    fig.update_layout(**_LAYOUT, title=_title(title), height=520, dragmode="lasso",
                      xaxis=dict(showticklabels=False, title="", zeroline=False, showgrid=False),
                      yaxis=dict(showticklabels=False, title="", zeroline=False, showgrid=False))
    return fig


def roc_figure(curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]], title: str = "ROC: each entropy as a poison detector",
               points: Sequence[tuple[str, float, float]] = ()):
    """ROC curves: one (name, fpr, tpr, auroc) per curve, plus the chance diagonal; ``points``:
    operating points (name, fpr, tpr) drawn as markers, e.g. the suspect subset at the current thresholds."""
    go = _go()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#CBD5E1", dash="dash"), name="chance",
                             hoverinfo="skip"))
    colors = ["#0F766E", "#7C3AED", "#F59E0B", "#2563EB"]
    for i, (name, fpr, tpr, auc) in enumerate(curves):
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=f"{name} (AUROC {auc:.3f})",
                                 line=dict(color=colors[i % len(colors)], width=2.5),
                                 hovertemplate="FPR %{x:.3f}<br>TPR %{y:.3f}<extra>" + name + "</extra>"))
    for name, fpr, tpr in points:
        fig.add_trace(go.Scatter(x=[fpr], y=[tpr], mode="markers+text", name=name, text=[name], textposition="bottom right",
                                 marker=dict(color="#DC2626", size=12, symbol="x", line=dict(width=2)),
                                 hovertemplate=f"{name}<br>FPR %{{x:.3f}}<br>TPR %{{y:.3f}}<extra></extra>"))
    fig.update_layout(**_LAYOUT, title=_title(title), height=400, xaxis=dict(title="false positive rate", range=[0, 1]),
                      yaxis=dict(title="true positive rate", range=[0, 1.02]))
    return fig


def sweep_figure(rows: Sequence[dict], sigma1: float | None = None, title: str = "Threshold sweep (σ2 = ratio × σ1)"):
    """Subset sizes (left axis) and, when present, suspect TPR/FPR (right axis, %) over sigma1,
    from :func:`cgd.separation.threshold_sweep` rows; a vertical line marks the current sigma1."""
    go = _go()
    from plotly.subplots import make_subplots

    s = [r["sigma1"] for r in rows]
    has_gt = bool(rows) and "suspect_tpr" in rows[0]
    fig = make_subplots(specs=[[{"secondary_y": has_gt}]])
    for k in ("clean", "suspect", "unused"):
        fig.add_trace(go.Scatter(x=s, y=[r[k] for r in rows], mode="lines+markers", name=f"{k} size",
                                 line=dict(color=SUBSET_COLORS[k], width=2), marker=dict(size=5)), secondary_y=False)
    if has_gt:
        fig.add_trace(go.Scatter(x=s, y=[100 * r["suspect_tpr"] for r in rows], mode="lines", name="suspect TPR %",
                                 line=dict(color="#7C3AED", dash="dash", width=2)), secondary_y=True)
        fig.add_trace(go.Scatter(x=s, y=[100 * r["suspect_fpr"] for r in rows], mode="lines", name="suspect FPR %",
                                 line=dict(color="#F59E0B", dash="dash", width=2)), secondary_y=True)
        fig.update_yaxes(title_text="rate (%)", range=[0, 101], tickmode="linear", tick0=0, dtick=20, showgrid=False,
                         secondary_y=True)
    if sigma1 is not None:
        fig.add_vline(x=sigma1, line=dict(color="#0F172A", dash="dot"), annotation_text=f"σ1 = {sigma1:.2f}")
    fig.update_layout(**_LAYOUT, title=_title(title), height=380, xaxis_title="σ1")
    fig.update_yaxes(title_text="samples", secondary_y=False)
    return fig


# ------------------------------------------------------------------------------------------------
# Retraining
# ------------------------------------------------------------------------------------------------

def metric_curves(rows: Sequence[dict], title: str = "CA, ASR and RA per epoch"):
    """CA / ASR / RA (%) per retraining epoch from ``metrics.csv`` rows (epoch 0 = before repair)."""
    go = _go()
    fig = go.Figure()
    ep = [r["epoch"] for r in rows]
    names = {"ca": "CA (clean accuracy)", "asr": "ASR (attack success)", "ra": "RA (robust accuracy)"}
    for k, name in names.items():
        ys = [r.get(k) for r in rows]
        if all(v is None or (isinstance(v, float) and np.isnan(v)) for v in ys):
            continue
        fig.add_trace(go.Scatter(x=ep, y=ys, mode="lines+markers", name=name, line=dict(color=METRIC_COLORS[k], width=2.5),
                                 hovertemplate="epoch %{x}<br>%{y:.2f} %<extra>" + k.upper() + "</extra>"))
    for r in rows:
        if r.get("early_stop") in (True, "True", 1):
            fig.add_vline(x=r["epoch"], line=dict(color="#F59E0B", dash="dot"), annotation_text="early stop")
    fig.update_layout(**_LAYOUT, title=_title(title), height=360, xaxis=dict(title="epoch (0 = before repair)", dtick=1),
                      yaxis=dict(title="%", range=[0, 101]))
    return fig


def loss_curves(epoch_rows: Sequence[dict], batch_rows: Sequence[dict] = (), title: str = "Training loss"):
    """Loss per epoch (markers) and every N batches (thin line), x in epochs."""
    go = _go()
    fig = go.Figure()
    if batch_rows:
        steps = max(int(r["batch"]) for r in batch_rows) or 1
        x = [int(r["epoch"]) - 1 + int(r["batch"]) / steps for r in batch_rows]
        fig.add_trace(go.Scatter(x=x, y=[r["loss"] for r in batch_rows], mode="lines", name="loss (every N batches)",
                                 line=dict(color="#94A3B8", width=1.5)))
    er = [r for r in epoch_rows if int(r["epoch"]) > 0 and r.get("loss") is not None and not np.isnan(float(r["loss"]))]
    if er:
        fig.add_trace(go.Scatter(x=[int(r["epoch"]) for r in er], y=[float(r["loss"]) for r in er], mode="lines+markers",
                                 name="loss (epoch mean)", line=dict(color=METRIC_COLORS["loss"], width=2.5)))
    fig.update_layout(**_LAYOUT, title=_title(title), height=320, xaxis=dict(title="epoch"), yaxis=dict(title="loss"))
    return fig


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def per_class_table(labels: np.ndarray, subset: np.ndarray, classes: Sequence[str], poison_mask: np.ndarray | None = None):
    """Per given label: samples, clean / suspect / unused counts and shares (%), and, with ground
    truth, poisoned samples and how many of them the suspect subset caught. subset: (N,) codes
    (0 unused, 1 clean, 2 suspect)."""
    import pandas as pd

    from .separation import subset_counts

    labels = np.asarray(labels)
    k = len(classes)
    n = np.bincount(labels, minlength=k)
    c = subset_counts(np.asarray(subset), labels, k)
    df = pd.DataFrame({"class": list(classes), "samples": n, "clean": c["clean"], "suspect": c["suspect"], "unused": c["unused"]})
    with np.errstate(invalid="ignore", divide="ignore"):
        df["suspect %"] = np.where(n > 0, 100 * c["suspect"] / np.maximum(n, 1), np.nan)
        df["clean %"] = np.where(n > 0, 100 * c["clean"] / np.maximum(n, 1), np.nan)
    if poison_mask is not None:
        pm = np.asarray(poison_mask, bool)
        df["poisoned"] = np.bincount(labels[pm], minlength=k)
        df["poisoned in suspect"] = np.bincount(labels[pm & (np.asarray(subset) == 2)], minlength=k)
    return df


def zero_shot_table(clip_logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], prompt_names: Sequence[str] | None = None):
    """Per-class zero-shot accuracy (%) of the reference: argmax of (N, K) logits against (N,) labels
    (use the true labels where known)."""
    import pandas as pd

    labels = np.asarray(labels)
    k = len(classes)
    pred = np.asarray(clip_logits).argmax(1)
    n = np.bincount(labels, minlength=k)
    hit = np.bincount(labels[pred == labels], minlength=k)
    df = pd.DataFrame({"class": list(classes), "samples": n})
    if prompt_names is not None:
        df["prompt name"] = list(prompt_names)
    df["zero-shot accuracy %"] = np.where(n > 0, 100 * hit / np.maximum(n, 1), np.nan)
    return df


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------

def group_layout(xy: np.ndarray, group: np.ndarray) -> dict:
    """How a group of points (e.g. the poisoned or suspect samples) lies on a 2-D map, for a caption
    that describes the plot instead of presuming it.

    xy: (M, 2); group: (M,) bool. Returns {"n", "own_cluster" (bool),
    "ratio"}: ratio = median distance of a group point to its nearest other group point over the
    median distance to its nearest point outside the group; well below 1 means the group forms
    clusters of its own, near or above 1 means it sits among the other samples.
    """
    xy, group = np.asarray(xy, float), np.asarray(group, bool)
    gi = np.flatnonzero(group)
    if len(gi) < 5 or (~group).sum() < 5:
        return {"n": int(len(gi)), "own_cluster": False, "ratio": float("nan")}
    pick = gi if len(gi) <= 2000 else np.random.default_rng(0).choice(gi, 2000, replace=False)
    to_group, to_other = [], []
    for i in pick:
        d = np.sqrt(((xy - xy[i]) ** 2).sum(1))
        d[i] = np.inf
        to_group.append(d[group].min())
        to_other.append(d[~group].min())
    if not to_group:
        return {"n": int(len(gi)), "own_cluster": False, "ratio": float("nan")}
    ratio = float(np.median(to_group) / max(np.median(to_other), 1e-9))
    return {"n": int(len(gi)), "own_cluster": ratio < 0.5, "ratio": ratio}


def class_rows(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], shown: Sequence[str], per: int, seed: int,
               min_px: int = 64) -> list[tuple[str, int, np.ndarray]]:
    """One row of ``per`` seeded samples per class name in ``shown``: [(name, class count, (h, w, 3) uint8)].

    images: (N, H, W, 3) uint8 (may be memory-mapped; only the picked rows are read); labels: (N,).
    Each thumbnail is upscaled by an integer factor to at least ``min_px`` pixels."""
    rng = np.random.default_rng(seed)
    out = []
    scale = max(1, min_px // images.shape[1])
    for name in shown:
        idx = np.flatnonzero(labels == list(classes).index(name))
        if len(idx) == 0:
            continue
        pick = np.sort(rng.choice(idx, size=min(per, len(idx)), replace=False))
        out.append((name, int(len(idx)), mosaic(upscale(np.asarray(images[pick]), scale), cols=per)))
    return out


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of an (H, W, 3) or (N, H, W, 3) uint8 image by an integer factor."""
    if factor <= 1:
        return np.asarray(image)
    a = np.asarray(image)
    ax = (a.ndim - 3, a.ndim - 2)
    return np.repeat(np.repeat(a, factor, axis=ax[0]), factor, axis=ax[1])


def mosaic(images: np.ndarray, cols: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)-pad, cols*(W+pad)-pad, 3) grid image, row-major."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), fill, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = images[i]
    return out


def trigger_views(images: np.ndarray, labels: np.ndarray, suspect: np.ndarray, target: int,
                  reference: np.ndarray | None = None) -> dict[str, np.ndarray | int]:
    """Mean images that reveal a trigger shared by the suspect samples labelled ``target``.

    images: (N, H, W, 3) uint8 (may be memory-mapped); labels: (N,); suspect: (N,) bool.
    reference: (N,) bool of the samples to compare against (default: the non-suspect samples of
    every class, whose mean is roughly the average natural image). Returns uint8 images
    ``mean_suspect``, ``mean_reference`` and ``difference`` (|mean_suspect - mean_reference|
    stretched to 0..255) plus the counts ``n_suspect`` / ``n_reference``.
    """
    labels = np.asarray(labels)
    suspect = np.asarray(suspect, bool)
    sel = np.flatnonzero(suspect & (labels == target))
    ref = np.flatnonzero(~suspect if reference is None else np.asarray(reference, bool))
    h, w = images.shape[1:3]

    def _mean(idx: np.ndarray) -> np.ndarray:
        if len(idx) == 0:
            return np.zeros((h, w, 3), np.float64)
        acc = np.zeros((h, w, 3), np.float64)
        for s in range(0, len(idx), 4096):
            acc += np.asarray(images[idx[s:s + 4096]], np.float64).sum(0)
        return acc / len(idx)

    ms, mr = _mean(sel), _mean(ref)
    diff = np.abs(ms - mr) if len(sel) and len(ref) else np.zeros((h, w, 3))
    top = diff.max()
    diff = diff / top * 255.0 if top > 0 else diff
    return {"mean_suspect": np.clip(ms, 0, 255).astype(np.uint8), "mean_reference": np.clip(mr, 0, 255).astype(np.uint8),
            "difference": diff.astype(np.uint8), "n_suspect": int(len(sel)), "n_reference": int(len(ref))}
