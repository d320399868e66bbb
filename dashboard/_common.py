"""Shared frame for the dashboard pages: folders and path safety, session state, cached readers of
run artefacts, error display, number formats, score definitions and the job panel.

Pages draw and call the library (``cgd``); nothing here computes a method result either.
"""
from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import streamlit as st

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
LOGO = ASSETS / "logo.svg"
LOGO_ICON = ASSETS / "logo-icon.svg"
DEMO_ROOT = ASSETS / "demo"
DEMO_DATA = DEMO_ROOT / "cifar10"
DEMO_SPEC = f"imagefolder:{DEMO_DATA}"
PAGES = {"dataset": "views/1_dataset.py", "score": "views/2_score.py", "inspect": "views/3_inspect.py",
         "separate": "views/4_separate.py", "retrain": "views/5_retrain.py"}

log = logging.getLogger("cgd.dashboard")

# One-line definitions, shown as tooltips (help=) wherever the quantity appears.
HELP = {
    "clip_nll": "CLIP entropy: −log p(given label) under the reference (CLIP zero-shot or reference classifier), in nats. "
                "High = the reference disagrees with the label (typical of dirty-label poison).",
    "model_nll": "Suspicious-model entropy: −log p(given label) under models trained briefly on this data, in nats. "
                 "Low = learnt unusually fast (typical of any backdoor).",
    "clip_rank": "CLIP rank: position of the sample's CLIP entropy among all samples, divided by N (0 = most confident, 1 = least).",
    "model_rank": "Model rank: position of the sample's suspicious-model entropy among all samples, divided by N (0 = learnt fastest).",
    "sigma1": "σ1, clean margin: a sample is clean when CLIP rank ≤ 1 − σ1 and model rank ≥ σ1. Larger σ1 = smaller, purer clean subset.",
    "sigma2": "σ2, suspect margin: a sample is suspect when CLIP rank > 1 − σ2 or model rank < σ2. Larger σ2 = more samples flagged.",
    "rank_mode": "global: ranks over the whole set (the paper); per_class: ranks within each given label.",
    "sigma3": "σ3, joint margin: a sample is also suspect when it is in the top σ3 of rank(CLIP rank − model rank), "
              "i.e. fairly suspicious on both axes at once. 0 = the paper's rule.",
    "clean": "Clean subset: samples both axes agree look normal; retraining fits their labels.",
    "suspect": "Suspect subset: samples flagged as possibly poisoned; retraining distils the reference on them and unlearns their labels.",
    "unused": "Unused: neither clean nor suspect; left out of retraining.",
    "tpr": "TPR (recall): share of the positives the subset catches (suspect: poisons caught; clean: clean samples kept).",
    "fpr": "FPR: share of the negatives wrongly included (suspect: clean samples flagged; clean: poisons kept as clean).",
    "precision": "Precision: share of the subset that truly belongs to it.",
    "f1": "F1: harmonic mean of precision and TPR.",
    "auroc": "AUROC: probability that a random poisoned sample scores as more suspicious than a random clean one (0.5 = chance).",
    "poison_in_clean": "Poisoned samples that slipped into the clean subset (they are trained on as if clean).",
    "ca": "CA, clean accuracy: accuracy on the clean test set, in %.",
    "asr": "ASR, attack success rate: share of triggered test images classified as the attacker's target, in % (lower is better).",
    "ra": "RA, robust accuracy: share of triggered test images still classified as their true class, in %.",
    "epochs": "Retraining epochs (each at most `max batches` batches).",
    "lr": "Learning rate of SGD (momentum 0.9, cosine schedule).",
    "alpha": "α: weight of the distillation term KL(reference ‖ model) on suspect samples.",
    "beta": "β: weight of the unlearning term (mean log-probability of the suspect samples' given labels).",
    "patience": "Epochs in a row with CA more than the tolerance below the best epoch before training stops and the "
                "last good weights are restored. 1 = the paper's recipe; 2 rides out the dip of the first epochs.",
    "unlearn_floor": "A suspect sample stops pushing its label down once the model gives that label less than this "
                     "probability. 0 = never (the paper's recipe); 1e-4 keeps the unlearning from eroding clean features "
                     "after the backdoor is gone.",
    "temperature": "T: softmax temperature of the distillation term.",
    "tolerance": "Tolerance: stop early and restore the previous weights when CA falls more than this many points below the best epoch.",
    "max_batches": "Maximum batches per retraining epoch.",
    "batch_size": "Samples per batch.",
    "zero_shot": "Zero-shot accuracy: share of samples whose reference top-1 class equals the true class (given label where no ground truth).",
    "rate": "Processing speed of the current stage.",
    "poison_rate": "Share of the training set the simulator poisons.",
    "target": "The class the backdoor should make triggered images predict.",
}

SUBSET_CODES = {"unused": 0, "clean": 1, "suspect": 2}
CODE_NAMES = {v: k for k, v in SUBSET_CODES.items()}


# ------------------------------------------------------------------------------------------------
# Folders and path safety
# ------------------------------------------------------------------------------------------------

class PathRejected(ValueError):
    """A path the dashboard may not read (outside its roots, or with '..')."""


def data_root() -> Path:
    return Path(os.environ.get("CGD_DATA_ROOT", "data")).expanduser().resolve()


def runs_root() -> Path:
    return Path(os.environ.get("CGD_RUNS_ROOT", "runs")).expanduser().resolve()


def data_roots() -> list[Path]:
    """Where datasets and checkpoints may be read: CGD_DATA_ROOT and the built-in demo."""
    return [data_root(), DEMO_ROOT.resolve()]


def max_upload_bytes() -> int:
    return int(float(os.environ.get("CGD_MAX_UPLOAD_MB", "200")) * 1024 * 1024)


def _within(p: Path, root: Path) -> bool:
    try:
        p.relative_to(root)
        return True
    except ValueError:
        return False


def safe_path(user_path: str | os.PathLike, roots: list[Path] | None = None, must_exist: bool = True) -> Path:
    """Resolve a user-given path inside ``roots`` (default: the data roots), or raise PathRejected.

    Relative paths are taken relative to the first root (then the others); '..' components are
    refused; symlinks are resolved before the check, so a link cannot lead outside.
    """
    roots = [r.resolve() for r in (roots or data_roots())]
    raw = str(user_path).strip()
    if not raw:
        raise PathRejected("empty path: pick or type a path inside the data folder")
    p = Path(raw).expanduser()
    if ".." in p.parts:
        raise PathRejected(f"{raw!r}: '..' is not allowed in paths; give a path inside {_roots_text(roots)}")
    candidates = [p.resolve()] if p.is_absolute() else [(r / p).resolve() for r in roots]
    outside = PathRejected(f"{raw!r} is outside the folders this dashboard may read ({_roots_text(roots)}); "
                           "move the data there or set CGD_DATA_ROOT / CGD_RUNS_ROOT")
    for cand in candidates:  # the first existing match decides (a symlink that leads outside is refused)
        if cand.exists():
            if any(_within(cand, r) for r in roots):
                return cand
            raise outside
    inside = [cand for cand in candidates if any(_within(cand, r) for r in roots)]
    if not inside:
        raise outside
    if must_exist:
        raise PathRejected(f"{raw!r}: not found inside {_roots_text(roots)}")
    return inside[0]


def _roots_text(roots: list[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def display_path(p: str | os.PathLike) -> str:
    """A path shown relative to the data/runs root or the repository where possible."""
    p = Path(p)
    for base, name in ((runs_root(), "runs"), (data_root(), "data"), (ROOT, ".")):
        try:
            rel = p.resolve().relative_to(base).as_posix()
            rel = "" if rel == "." else rel
            return f"{name}/{rel}" if name != "." else (rel or ".")
        except ValueError:
            continue
    return str(p)


def list_under(root: Path, want: str, suffixes: tuple[str, ...] = (), max_depth: int = 3, limit: int = 400) -> list[str]:
    """Relative paths of folders (``want="dir"``) or files with ``suffixes`` under ``root``,
    breadth-first to ``max_depth``; hidden entries skipped."""
    root = root.resolve()
    if not root.is_dir():
        return []
    out: list[str] = []
    frontier = [root]
    for _ in range(max_depth):
        nxt = []
        for d in frontier:
            try:
                entries = sorted(d.iterdir())
            except OSError:
                continue
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir() and not e.is_symlink():
                    nxt.append(e)
                    if want == "dir":
                        out.append(e.relative_to(root).as_posix())
                elif want == "file" and e.is_file() and e.name.lower().endswith(suffixes):
                    out.append(e.relative_to(root).as_posix())
                if len(out) >= limit:
                    return out
        frontier = nxt
    return out


def save_upload(uploaded, subdir: str = "uploads") -> Path:
    """Store an ``st.file_uploader`` file under ``CGD_DATA_ROOT/uploads`` (size-limited, safe name)."""
    size = getattr(uploaded, "size", None)
    data = uploaded.getvalue()
    size = len(data) if size is None else size
    if size > max_upload_bytes():
        raise PathRejected(f"{uploaded.name}: {size / 1e6:.1f} MB exceeds the upload limit of "
                           f"{max_upload_bytes() / 1e6:.0f} MB (CGD_MAX_UPLOAD_MB); copy large files into the data folder instead")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(uploaded.name).name).lstrip(".") or "upload"
    dest = data_root() / subdir / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    from cgd.runs import atomic_write_bytes

    atomic_write_bytes(dest, data)
    return dest


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-.")
    return s[:80]


# ------------------------------------------------------------------------------------------------
# Errors and formats
# ------------------------------------------------------------------------------------------------

def _advice(e: BaseException) -> str:
    from cgd.runs import RunLockedError

    name = e.__class__.__name__
    if isinstance(e, RunLockedError):
        return "Wait for the running job to finish, or stop it, then try again."
    if isinstance(e, PathRejected):
        return "Choose a path inside the data folder (CGD_DATA_ROOT) or the runs folder (CGD_RUNS_ROOT)."
    if name == "DatasetError":
        return "Check the dataset path and layout (see the help under the source picker)."
    if name == "CheckpointError":
        return "Pick a checkpoint written by cgd (safetensors + JSON sidecar) that fits this dataset."
    if name == "ReferenceError":
        return "Pick another reference model or tag; without internet, use a local weights file or a reference classifier."
    if isinstance(e, FileNotFoundError):
        return "A file this step needs is missing: run the earlier step (Score) first."
    if isinstance(e, MemoryError):
        return "Use a smaller subset or batch size."
    return "See the server log for details."


@contextmanager
def guard(action: str) -> Iterator[None]:
    """Show library errors as ``st.error`` with what to do; never a raw traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - shown to the user, logged for the developer
        from cgd.runs import RunLockedError

        log.warning("%s failed", action, exc_info=True)
        msg = f"**{action} failed.** {e}" if not isinstance(e, RunLockedError) else f"**{action}: busy.** {e}"
        st.error(f"{msg}\n\n{_advice(e)}", icon=":material/error:")


def fmt_int(n: Any) -> str:
    try:
        return f"{int(n):,}"
    except (TypeError, ValueError):
        return "–"


def fmt_pct(x: Any, digits: int = 1, scale: float = 100.0) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "–"
    return "–" if np.isnan(v) else f"{v * scale:.{digits}f} %"


def fmt_float(x: Any, digits: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "–"
    return "–" if np.isnan(v) else f"{v:.{digits}f}"


def fmt_duration(s: Any) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return "–"
    if np.isnan(s) or s < 0:
        return "–"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


# ------------------------------------------------------------------------------------------------
# Device
# ------------------------------------------------------------------------------------------------

@st.cache_resource(show_spinner=False)
def device_facts() -> dict:
    """CUDA availability and names, looked up once per server."""
    try:
        import torch

        if torch.cuda.is_available():
            return {"cuda": True, "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
        return {"cuda": False, "name": "CPU", "threads": torch.get_num_threads()}
    except Exception as e:  # noqa: BLE001
        return {"cuda": False, "name": f"CPU (torch unavailable: {e})"}


# ------------------------------------------------------------------------------------------------
# Selected run and cached readers
# ------------------------------------------------------------------------------------------------

def current_run():
    """The selected RunDir (or None), validated to lie inside the runs root."""
    from cgd.runs import RunDir

    p = st.session_state.get("run")
    if not p:
        return None
    try:
        path = safe_path(p, [runs_root()], must_exist=False)
    except PathRejected:
        st.session_state.pop("run", None)
        return None
    return RunDir(path)


def select_run(path: str | os.PathLike | None) -> None:
    """Make ``path`` the selected run and reset the per-run interaction state."""
    new = str(Path(path).resolve()) if path else None
    if st.session_state.get("run") != new:
        st.session_state["run"] = new
        for k in ("sep_for", "sigma1", "sigma2", "sigma3", "rank_mode", "overrides", "selection", "w_sigma1", "w_sigma2",
                  "w_sigma3", "w_rank_mode"):
            st.session_state.pop(k, None)


def require_run(need: tuple[str, ...] = (), what: str = "this page"):
    """The selected run, or draw a pointer to the page that makes it and stop."""
    run = current_run()
    if run is None or not run.root.is_dir():
        st.info(f"No run selected. Pick a dataset first to use {what}.", icon=":material/info:")
        st.page_link(PAGES["dataset"], label="Go to Dataset", icon=":material/dataset:")
        st.stop()
    missing = [n for n in need if not run.has(n)]
    if missing:
        st.info(f"Run **{run.root.name}** has no scores yet ({', '.join(missing)} missing). Score it first.",
                icon=":material/info:")
        st.page_link(PAGES["score"], label="Go to Score", icon=":material/speed:")
        st.stop()
    return run


def _mtime(run, *names: str) -> tuple:
    out = []
    for n in names:
        p = run.path(n)
        try:
            st_ = p.stat()
            out.append((n, st_.st_size, st_.st_mtime_ns))
        except OSError:
            out.append((n, None))
    return tuple(out)


@st.cache_resource(show_spinner=False, max_entries=4)
def _run_data(root: str, key: tuple):
    from cgd.pipeline import load_run_data
    from cgd.runs import RunDir

    return load_run_data(RunDir(root), mmap=True)


def run_data(run):
    """The run's dataset (images memory-mapped), cached until the data stage rewrites it."""
    return _run_data(str(run.root), _mtime(run, "data/train_x.npy", "data/train_y.npy", "data/poison_mask.npy"))


@st.cache_data(show_spinner=False, max_entries=8)
def _scores(root: str, rank_mode: str, key: tuple):
    from cgd.pipeline import RunConfig, scores_table
    from cgd.runs import RunDir
    from cgd.separation import SeparationConfig

    run = RunDir(root)
    cfg = RunConfig.from_dict(run.read_run().get("config", {}))
    return scores_table(run, SeparationConfig(cfg.sigma1, cfg.sigma2, rank_mode, cfg.sigma3), overrides={})


def scores(run, rank_mode: str = "global"):
    """Per-sample scores (cgd.pipeline.scores_table) without overrides, cached on the logits' mtimes."""
    return _scores(str(run.root), rank_mode, _scores_key(run))


@st.cache_data(show_spinner=False, max_entries=32)
def _trigger_views(root: str, key: tuple, suspect_digest: str, target: int, _images, _labels, _suspect) -> dict:
    from cgd import viz

    return viz.trigger_views(_images, _labels, _suspect, target)


def trigger_views(run, images, labels: np.ndarray, suspect: np.ndarray, target: int) -> dict:
    """cgd.viz.trigger_views, cached per run, suspect set and target (it reads every image once)."""
    return _trigger_views(str(run.root), _mtime(run, "data/train_x.npy"), _digest(np.asarray(suspect, bool), labels),
                          int(target), images, labels, suspect)


def _digest(*arrays) -> str:
    import hashlib

    h = hashlib.sha1()
    for a in arrays:
        a = np.asarray(a)
        h.update(np.packbits(a).tobytes() if a.dtype == bool else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _scores_key(run) -> tuple:
    return _mtime(run, "clip_logits.npy", "model_logits.npy", "data/train_y.npy", "data/poison_mask.npy")


@st.cache_data(show_spinner=False, max_entries=32)
def _detection(root: str, key: tuple, digest: str, _subset, _poison_mask, _clip_nll, _model_nll) -> dict:
    from cgd.separation import detection_metrics

    return detection_metrics(_subset, _poison_mask, _clip_nll, _model_nll)


def detection(run, df, subset: np.ndarray, poison_mask: np.ndarray) -> dict:
    """cgd.separation.detection_metrics for this subset, cached per run and subset (AUROCs sort N scores)."""
    return _detection(str(run.root), _scores_key(run), _digest(subset), subset, poison_mask,
                      df["clip_nll"].to_numpy(), df["model_nll"].to_numpy())


@st.cache_data(show_spinner=False, max_entries=8)
def _roc(root: str, key: tuple, _clip_nll, _model_nll, _poison_mask) -> list:
    from cgd.separation import auroc, roc_curve

    out = []
    for name, s in (("CLIP entropy (high = poison)", _clip_nll), ("model entropy (low = poison)", -_model_nll)):
        f, t = roc_curve(s, _poison_mask)
        out.append((name, f, t, auroc(s, _poison_mask)))
    return out


def roc_curves(run, df, poison_mask: np.ndarray) -> list:
    """[(name, fpr, tpr, auroc)] for both entropies, cached per run."""
    return _roc(str(run.root), _scores_key(run), df["clip_nll"].to_numpy(), df["model_nll"].to_numpy(), poison_mask)


@st.cache_data(show_spinner=False, max_entries=32)
def _sweep(root: str, key: tuple, rank_mode: str, ratio: float, sigma3: float, _clip_rank, _model_rank, _poison_mask) -> list:
    from cgd.separation import threshold_sweep

    return threshold_sweep(_clip_rank, _model_rank, _poison_mask, sigma2_ratio=ratio, sigma3=sigma3)


def sweep(run, df, poison_mask, rank_mode: str, ratio: float, sigma3: float) -> list[dict]:
    """cgd.separation.threshold_sweep over sigma1, cached per run, rank mode, sigma2 ratio and sigma3."""
    return _sweep(str(run.root), _scores_key(run), rank_mode, round(float(ratio), 4), round(float(sigma3), 4),
                  df["clip_rank"].to_numpy(), df["model_rank"].to_numpy(), poison_mask)


@st.cache_data(show_spinner=False, max_entries=32)
def _class_mosaics(ident: tuple, shown: tuple, per: int, seed: int, _images, _labels, _classes) -> list:
    import io

    from PIL import Image

    from cgd import viz

    rng = np.random.default_rng(seed)
    out = []
    for name in shown:
        idx = np.flatnonzero(_labels == _classes.index(name))
        if len(idx) == 0:
            continue
        pick = np.sort(rng.choice(idx, size=min(per, len(idx)), replace=False))
        scale = max(1, 64 // _images.shape[1])
        buf = io.BytesIO()
        Image.fromarray(viz.mosaic(viz.upscale(np.asarray(_images[pick]), scale), cols=per)).save(buf, format="PNG")
        out.append((name, int(len(idx)), buf.getvalue()))
    return out


def class_mosaics(train, shown: tuple, per: int, seed: int) -> list[tuple[str, int, bytes]]:
    """[(class name, class count, PNG bytes of a row of ``per`` seeded samples)], cached per dataset."""
    ident = (train.name, len(train.labels), train.images.shape, _digest(train.labels))
    return _class_mosaics(ident, tuple(shown), int(per), int(seed), train.images, train.labels, list(train.classes))


def run_config(run) -> dict:
    from cgd.pipeline import RunConfig

    return RunConfig.from_dict(run.read_run().get("config", {})).to_dict()


def init_separation_state(run) -> None:
    """Session sliders and overrides start from the run's saved separation."""
    if st.session_state.get("sep_for") == str(run.root) and all(k in st.session_state for k in ("sigma1", "sigma2", "sigma3", "rank_mode")):
        return
    cfg = run_config(run)
    st.session_state["sigma1"] = float(cfg["sigma1"])
    st.session_state["sigma2"] = float(cfg["sigma2"])
    st.session_state["sigma3"] = float(cfg["sigma3"])
    st.session_state["rank_mode"] = cfg["rank_mode"]
    try:
        st.session_state["overrides"] = run.read_overrides()
    except ValueError:
        st.session_state["overrides"] = {}
    st.session_state["sep_for"] = str(run.root)


def saved_separation(run) -> dict:
    cfg = run_config(run)
    try:
        ov = run.read_overrides()
    except ValueError:
        ov = {}
    return {"sigma1": float(cfg["sigma1"]), "sigma2": float(cfg["sigma2"]), "sigma3": float(cfg["sigma3"]),
            "rank_mode": cfg["rank_mode"], "overrides": ov}


def unsaved_separation(run) -> bool:
    s = saved_separation(run)
    return (any(abs(s[k] - st.session_state.get(k, s[k])) > 1e-9 for k in ("sigma1", "sigma2", "sigma3"))
            or s["rank_mode"] != st.session_state.get("rank_mode", s["rank_mode"])
            or s["overrides"] != st.session_state.get("overrides", s["overrides"]))


def current_subset(df) -> np.ndarray:
    """(N,) subset codes at the session's sigma1/sigma2/sigma3 with the session's manual overrides."""
    from cgd.separation import apply_overrides, separate

    sub = separate(df["clip_rank"].to_numpy(), df["model_rank"].to_numpy(), float(st.session_state["sigma1"]),
                   float(st.session_state["sigma2"]), float(st.session_state["sigma3"]))
    return apply_overrides(sub, st.session_state.get("overrides") or {})


def subset_names(codes: np.ndarray) -> np.ndarray:
    return np.array(["unused", "clean", "suspect"])[np.asarray(codes, np.int64)]


# ------------------------------------------------------------------------------------------------
# Job panel
# ------------------------------------------------------------------------------------------------

STATE_BADGE = {"idle": ("idle", "gray"), "starting": ("starting", "blue"), "running": ("running", "blue"),
               "done": ("done", "green"), "failed": ("failed", "red"), "stopped": ("stopped", "orange"),
               "died": ("ended unexpectedly", "red")}


def job_badge(run) -> None:
    """The run's job state as a badge, refreshed every 2 s while a job is active."""
    from cgd import jobs

    def body() -> None:
        s = jobs.job_status(run)
        text, color = STATE_BADGE.get(s.state, (s.state, "gray"))
        st.badge(f"{s.command or 'job'}: {text}" if s.state != "idle" else "no job yet", color=color)

    st.fragment(body, run_every=2.0 if jobs.job_status(run).active else None)()


def _progress_text(s) -> str:
    if s.state == "starting":  # the job has not reported yet (imports, or a setup step such as a reference)
        parts = [s.stage or "starting"]
        if s.started:
            from datetime import datetime, timezone

            try:
                el = (datetime.now(timezone.utc) - datetime.fromisoformat(s.started)).total_seconds()
                parts.append(f"{fmt_duration(el)} elapsed")
            except ValueError:
                pass
        return " · ".join(parts)
    parts = [s.stage or s.state]
    if s.total:
        parts.append(f"{fmt_int(s.done)} / {fmt_int(s.total)} {s.unit or ''}".strip())
    parts.append(f"{100 * s.progress:.0f} %")
    if s.rate:
        unit = {"img": "images"}.get(s.unit, s.unit or "items")
        if s.rate >= 100:
            parts.append(f"{s.rate:,.0f} {unit}/s")
        elif s.rate >= 1:
            parts.append(f"{s.rate:,.1f} {unit}/s")
        else:
            parts.append(f"{1 / s.rate:,.1f} s per {s.unit or 'item'}")
    if s.eta_s is not None:
        parts.append(f"ETA {fmt_duration(s.eta_s)}")
    return " · ".join(parts)


def job_panel(run, key: str, kinds: tuple[str, ...] = (), poll_s: float = 1.0) -> Any:
    """Progress of the run's job, polled with ``st.fragment(run_every=...)`` while it is active;
    a full rerun follows when it finishes. ``kinds``: the job labels this page started (others are
    still shown, read-only). Returns the JobStatus seen at draw time."""
    from cgd import jobs

    first = jobs.job_status(run)

    def body() -> None:
        s = jobs.job_status(run)
        seen_key = f"_job_seen_{key}"
        was_active = st.session_state.get(seen_key, False)
        st.session_state[seen_key] = s.active
        if s.active:
            with st.container(border=True):
                c1, c2 = st.columns([5, 1], vertical_alignment="center")
                with c1:
                    st.markdown(f"**{s.command or 'job'}** is running on `{run.root.name}`", help=HELP["rate"])
                    st.progress(min(max(s.progress, 0.0), 1.0), text=_progress_text(s))
                with c2:
                    if st.button("Stop", key=f"stop_{key}", icon=":material/stop_circle:", type="secondary",
                                 help="Ask the job to stop at its next checkpoint (SIGTERM after a few seconds)"):
                        with st.spinner("Stopping…"):
                            msg = jobs.stop_job(run)
                        st.toast(msg)
                        st.rerun()
        elif was_active:
            st.rerun()  # the job just finished: redraw the whole page with its results
        elif s.state in ("failed", "died"):
            st.error(f"The last job ({s.command or 'job'}) {'failed' if s.state == 'failed' else 'ended unexpectedly'}: "
                     f"{s.error or 'no message'}\n\nFix the setting it names and start again; finished stages are reused.",
                     icon=":material/error:")
            tail = jobs.tail_log(run, 25)
            if tail:
                with st.expander("Job log (last lines)"):
                    st.code(tail, language=None)
        elif s.state == "stopped":
            st.warning(f"The last job ({s.command or 'job'}) was stopped. Start it again to resume from its last checkpoint.",
                       icon=":material/pause_circle:")

    st.fragment(body, run_every=poll_s if first.active else None)()
    return first


def start_job(run, command: str, config: dict | None = None, label: str | None = None, **kw) -> bool:
    """Start a background job; errors (busy run, bad settings) are shown, not raised."""
    from cgd import jobs

    with guard(f"Starting {label or command}"):
        jobs.start_job(run, command, config=config, label=label, **kw)
        st.session_state[f"_started_{run.root}"] = time.time()
        return True
    return False


# ------------------------------------------------------------------------------------------------
# Sidebar
# ------------------------------------------------------------------------------------------------

def sidebar() -> None:
    """Run picker, job state and device note (drawn by app.py on every page)."""
    from cgd.runs import list_runs

    qp = st.query_params.get("run")
    if qp and qp != st.session_state.get("_qp_run"):  # deep link: ?run=NAME (a folder under the runs root)
        st.session_state["_qp_run"] = qp
        try:
            p = safe_path(qp, [runs_root()])
            if (p / "run.json").is_file():
                select_run(p)
        except PathRejected as e:
            st.toast(str(e))
    with st.sidebar:
        runs = list_runs(runs_root())
        paths = [str(r.root.resolve()) for r in runs]
        cur = st.session_state.get("run")
        if cur and cur not in paths and Path(cur).is_dir():
            paths.insert(0, cur)
        if paths:
            idx = paths.index(cur) if cur in paths else None
            choice = st.selectbox("Run", paths, index=idx, format_func=lambda p: Path(p).name,
                                  placeholder="pick a run folder", help=f"Run folders under {runs_root()}")
            if choice and choice != cur:
                select_run(choice)
                st.rerun()
        else:
            st.caption(f"No runs yet under `{display_path(runs_root())}`.")
        run = current_run()
        if run is not None and run.root.is_dir():
            job_badge(run)
        dev = device_facts()
        if dev.get("cuda"):
            st.caption(f":material/memory: GPU: {dev['name']}")
        else:
            st.caption(":material/memory: No GPU found: jobs run on the CPU. Keep data and epochs small.")
