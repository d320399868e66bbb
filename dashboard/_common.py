"""Shared frame for the dashboard pages: folders and path safety, the selected run (kept in the URL),
cached readers of run artefacts, the unsaved-separation draft, error display, number formats, the job
panel and the sidebar.

Pages draw and call the library (``import cgd``); nothing here computes a method result.
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

import cgd

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
LOGO = ASSETS / "logo.svg"
LOGO_ICON = ASSETS / "logo-icon.svg"
DEMO_ROOT, DEMO_DATA, DEMO_SPEC = cgd.demo.DEMO_ROOT, cgd.demo.DEMO_DATA, cgd.demo.DEMO_SPEC
PAGES = {"dataset": "views/1_dataset.py", "score": "views/2_score.py", "inspect": "views/3_inspect.py",
         "separate": "views/4_separate.py", "retrain": "views/5_retrain.py"}

log = logging.getLogger("cgd.dashboard")

# Definitions of the quantities the pages show (the settings' own help texts come from cgd.config).
TERMS = {
    "clip_nll": "{ref} entropy: −log p(given label) under the reference ({ref}), in nats. "
                "High = the reference disagrees with the label (typical of dirty-label poison).",
    "model_nll": "Suspicious-model entropy: −log p(given label) under models trained briefly on this data, in nats. "
                 "Low = learnt unusually fast (typical of any backdoor).",
    "clip_rank": "{ref} rank: position of the sample's {ref} entropy among all samples, divided by N (0 = most confident, 1 = least).",
    "model_rank": "Model rank: position of the sample's suspicious-model entropy among all samples, divided by N (0 = learnt fastest).",
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
    "zero_shot": "Accuracy of the reference ({ref}) on the training set: share of samples whose top-1 class equals the "
                 "true class (the given label where there is no ground truth).",
    "rate": "Processing speed of the current stage.",
}


def term(key: str, ref: str = "CLIP") -> str:
    """A definition from :data:`TERMS` (``{ref}`` = the run's reference name) or a setting's help text."""
    if key in TERMS:
        t = TERMS[key].format(ref=ref)
        return t[:1].upper() + t[1:]  # "Reference classifier entropy: ..." at the start of a sentence
    return cgd.help_for(key)


def ref_name(run) -> str:
    """What this run's reference is called on the pages: "CLIP" or "reference classifier"."""
    return cgd.catalog.reference_label((run_config(run) or {}).get("reference"))


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
                if e.is_symlink() and not _within(e.resolve(), root):
                    continue  # a link that leads outside the root is never offered
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
    # a stored upload is always named upload-<name>: it can never pose as a file a loader looks for by
    # name (a BackdoorBench record's attack_result.pt, a dataset's batch files)
    name = "upload-" + (re.sub(r"[^A-Za-z0-9._-]", "_", Path(uploaded.name).name).lstrip(".") or "file")
    dest = data_root() / subdir / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    cgd.runs.atomic_write_bytes(dest, data)
    return dest


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-.")
    return s[:80]


# ------------------------------------------------------------------------------------------------
# Errors and formats
# ------------------------------------------------------------------------------------------------

def _advice(e: BaseException) -> str:
    RunLockedError = cgd.RunLockedError
    name = e.__class__.__name__
    if name == "ConfigError":
        return "Change the setting it names."
    if isinstance(e, RunLockedError):
        return "Wait for the running job to finish, or stop it, then try again."
    if isinstance(e, PathRejected):
        return "Choose a path inside the data folder (CGD_DATA_ROOT) or the runs folder (CGD_RUNS_ROOT)."
    if name == "DatasetError":
        return ("Check the dataset path and layout (see the help under the source picker); for an image folder with an "
                "unreadable file, tick 'Also skip image files that cannot be read'.")
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
        RunLockedError = cgd.RunLockedError
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
# The selected run: session state, mirrored in the URL (?run=NAME) so a reload keeps it
# ------------------------------------------------------------------------------------------------

def run_dirs() -> list:
    """Run folders under the runs root; a symlinked folder that leads outside it is left out."""
    root = runs_root()
    return [r for r in cgd.list_runs(root) if _within(r.root.resolve(), root)]


def current_run():
    """The selected RunDir (or None), validated to lie inside the runs root."""
    p = st.session_state.get("run")
    if not p:
        return None
    try:
        path = safe_path(p, [runs_root()], must_exist=False)
    except PathRejected:
        st.session_state.pop("run", None)
        return None
    return cgd.RunDir(path)


def select_run(path: str | os.PathLike | None) -> None:
    """Make ``path`` the selected run, put it in the URL and reset the per-run interaction state."""
    new = str(Path(path).resolve()) if path else None
    if st.session_state.get("run") != new:
        st.session_state["run"] = new
        for k in ("sep_for", "sigma1", "sigma2", "sigma3", "rank_mode", "overrides", "selection", "w_sigma1", "w_sigma2",
                  "w_sigma3", "w_rank_mode", "draft_restored"):
            st.session_state.pop(k, None)
    _url_run(new)


def _url_run(path: str | None) -> None:
    name = Path(path).name if path else None
    if name and st.query_params.get("run") != name:
        st.query_params["run"] = name
    elif not name and "run" in st.query_params:
        del st.query_params["run"]


def _run_query() -> dict | None:
    """``{"run": NAME}`` for the selected run: links carry it, so the address always names the run."""
    cur = st.session_state.get("run")
    return {"run": Path(cur).name} if cur else None


def page_link(page, label: str | None = None, icon: str | None = None, **kw):
    """``st.page_link`` that keeps the selected run in the address (a reload after navigating stays
    on the same page and run; Streamlit clears query parameters when switching pages)."""
    return st.page_link(page, label=label, icon=icon, query_params=_run_query(), **kw)


def switch_page(page) -> None:
    """``st.switch_page`` keeping the selected run in the address."""
    st.switch_page(page, query_params=_run_query())


def nav_links(sections: dict) -> None:
    """The sidebar's page list: ``{section: [st.Page, ...]}`` (hidden pages left out), drawn with
    :func:`page_link` so every link carries the run."""
    with st.sidebar:
        with st.container(key="cgd_nav"):
            for section, pages in sections.items():
                st.caption(section)
                for pg in pages:
                    if getattr(pg, "_visibility", getattr(pg, "visibility", "visible")) == "hidden" or getattr(pg, "_default", False):
                        continue
                    page_link(pg, width="stretch")
        st.divider()


def run_from_url() -> None:
    """Select the run named in ``?run=NAME`` (a reload, a bookmark, a shared link)."""
    qp = st.query_params.get("run")
    cur = st.session_state.get("run")
    if not qp or (cur and Path(cur).name == qp):
        return
    try:
        p = safe_path(qp, [runs_root()])
        if (p / cgd.layout.RUN_JSON).is_file():
            select_run(p)
        else:
            st.toast(f"{qp!r} is not a run folder under {display_path(runs_root())}")
    except PathRejected as e:
        st.toast(str(e))


def require_run(need: tuple[str, ...] = (), what: str = "this page"):
    """The selected run, or draw a pointer to the page that makes it and stop."""
    run = current_run()
    if run is None or not run.root.is_dir():
        st.info(f"No run selected. Pick a dataset first to use {what}.", icon=":material/info:")
        page_link(PAGES["dataset"], label="Go to Dataset", icon=":material/dataset:")
        st.stop()
    missing = [n for n in need if not run.has(n)]
    if missing:
        s = cgd.jobs.job_status(run)
        if s.active:
            st.info(f"Run **{run.root.name}** is being scored ({s.stage or s.state}); this page fills in when it finishes.",
                    icon=":material/hourglass:")
        else:
            st.info(f"Run **{run.root.name}** has no scores yet ({', '.join(missing)} missing). Score it first.",
                    icon=":material/info:")
        page_link(PAGES["score"], label="Go to Score", icon=":material/speed:")
        st.stop()
    return run


def _mtime(run, *names: str) -> tuple:
    out = []
    for n in names:
        try:
            st_ = run.path(n).stat()
            out.append((n, st_.st_size, st_.st_mtime_ns))
        except OSError:
            out.append((n, None))
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# Cached readers of run artefacts (keyed by the files' sizes and modification times)
# ------------------------------------------------------------------------------------------------

@st.cache_resource(show_spinner=False, max_entries=4)
def _run_data(root: str, key: tuple):
    return cgd.load_run_data(cgd.RunDir(root), mmap=True)


def run_data(run):
    """The run's dataset (images memory-mapped), cached until the data stage rewrites it."""
    L = cgd.layout
    return _run_data(str(run.root), _mtime(run, L.data_file("train_x"), L.data_file("train_y"), L.data_file("poison_mask")))


@st.cache_data(show_spinner=False, max_entries=8)
def _scores(root: str, key: tuple):
    return cgd.read_scores(cgd.RunDir(root))


def scores(run):
    """The run's scores table (cgd.scores: NLLs, ranks in both rank modes, saved subsets), cached."""
    return _scores(str(run.root), _mtime(run, cgd.layout.SCORES))


def ranks(df, rank_mode: str) -> tuple[np.ndarray, np.ndarray]:
    return cgd.ranks(df, rank_mode)


@st.cache_data(show_spinner=False, max_entries=4)
def _verdict(root: str, key: tuple, classes: tuple) -> dict:
    run = cgd.RunDir(root)
    doc = cgd.verdict.current_verdict(run)  # recomputed for runs judged by an older verdict, or none
    if doc is None:
        v, names = cgd.verdict.run_verdict(run)
        doc = v.to_dict(names or list(classes))
    return doc


def verdict(run, classes: list[str]) -> dict:
    """The audit verdict of the run (verdict.json, or computed from its scores when absent)."""
    return _verdict(str(run.root), _mtime(run, cgd.layout.VERDICT_JSON, cgd.layout.SCORES), tuple(classes))


@st.cache_data(show_spinner=False, max_entries=32)
def _trigger_views(root: str, key: tuple, suspect_digest: str, target: int, _images, _labels, _suspect) -> dict:
    return cgd.viz.trigger_views(_images, _labels, _suspect, target)


def trigger_views(run, images, labels: np.ndarray, suspect: np.ndarray, target: int) -> dict:
    """cgd.viz.trigger_views, cached per run, suspect set and target (it reads every image once)."""
    return _trigger_views(str(run.root), _mtime(run, cgd.layout.data_file("train_x")), _digest(np.asarray(suspect, bool), labels),
                          int(target), images, labels, suspect)


def _digest(*arrays) -> str:
    import hashlib

    h = hashlib.sha1()
    for a in arrays:
        a = np.asarray(a)
        h.update(np.packbits(a).tobytes() if a.dtype == bool else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@st.cache_data(show_spinner=False, max_entries=32)
def _detection(root: str, key: tuple, digest: str, _subset, _poison_mask, _clip_nll, _model_nll) -> dict:
    return cgd.detection_metrics(_subset, _poison_mask, _clip_nll, _model_nll)


def detection(run, df, subset: np.ndarray, poison_mask: np.ndarray) -> dict:
    """cgd.detection_metrics for this subset, cached per run and subset (AUROCs sort N scores)."""
    return _detection(str(run.root), _mtime(run, cgd.layout.SCORES), _digest(subset), subset, poison_mask,
                      df["clip_nll"].to_numpy(), df["model_nll"].to_numpy())


@st.cache_data(show_spinner=False, max_entries=8)
def _roc(root: str, key: tuple, ref: str, _clip_nll, _model_nll, _poison_mask) -> list:
    out = []
    for name, s in ((f"{ref} entropy (high = poison)", _clip_nll), ("model entropy (low = poison)", -_model_nll)):
        f, t = cgd.roc_curve(s, _poison_mask)
        out.append((name, f, t, cgd.auroc(s, _poison_mask)))
    return out


def roc_curves(run, df, poison_mask: np.ndarray, ref: str = "CLIP") -> list:
    """[(name, fpr, tpr, auroc)] for both entropies, cached per run."""
    return _roc(str(run.root), _mtime(run, cgd.layout.SCORES), ref, df["clip_nll"].to_numpy(), df["model_nll"].to_numpy(),
                poison_mask)


@st.cache_data(show_spinner=False, max_entries=32)
def _sweep(root: str, key: tuple, rank_mode: str, ratio: float, sigma3: float, _clip_rank, _model_rank, _poison_mask) -> list:
    return cgd.threshold_sweep(_clip_rank, _model_rank, _poison_mask, sigma2_ratio=ratio, sigma3=sigma3)


def sweep(run, df, poison_mask, rank_mode: str, ratio: float, sigma3: float) -> list[dict]:
    """cgd.threshold_sweep over sigma1, cached per run, rank mode, sigma2 ratio and sigma3."""
    cr, mr = cgd.ranks(df, rank_mode)
    return _sweep(str(run.root), _mtime(run, cgd.layout.SCORES), rank_mode, round(float(ratio), 4), round(float(sigma3), 4),
                  cr, mr, poison_mask)


@st.cache_data(show_spinner=False, max_entries=32)
def _class_mosaics(ident: tuple, shown: tuple, per: int, seed: int, _images, _labels, _classes) -> list:
    import io

    from PIL import Image

    out = []
    for name, count, img in cgd.viz.class_rows(_images, _labels, list(_classes), shown, per, seed, min_px=64):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append((name, count, buf.getvalue()))
    return out


def class_mosaics(train, shown: tuple, per: int, seed: int) -> list[tuple[str, int, bytes]]:
    """[(class name, class count, PNG bytes of a row of ``per`` seeded samples)], cached per dataset."""
    ident = (train.name, len(train.labels), train.images.shape, _digest(train.labels))
    return _class_mosaics(ident, tuple(shown), int(per), int(seed), train.images, train.labels, tuple(train.classes))


def run_config(run) -> dict:
    """The run's recorded configuration, flat (cgd.config's flat view)."""
    return cgd.RunConfig.from_dict(run.read_run().get("config", {})).to_dict()


# ------------------------------------------------------------------------------------------------
# The separation being edited: session state, kept as a draft in the run folder (cgd.drafts)
# ------------------------------------------------------------------------------------------------

def _session_draft():
    s = st.session_state
    sep = cgd.SeparationConfig(float(s["sigma1"]), float(s["sigma2"]), s["rank_mode"], float(s["sigma3"]))
    return cgd.Draft(sep, dict(s.get("overrides") or {}))


def init_separation_state(run) -> None:
    """Session sliders and overrides start from the run's unsaved draft (a reloaded tab finds it
    again) or else from its saved separation."""
    if st.session_state.get("sep_for") == str(run.root) and all(k in st.session_state for k in ("sigma1", "sigma2", "sigma3", "rank_mode")):
        return
    draft = cgd.drafts.read_draft(run)
    st.session_state["draft_restored"] = draft is not None
    d = draft or cgd.drafts.saved(run)
    st.session_state.update(sigma1=float(d.separation.sigma1), sigma2=float(d.separation.sigma2),
                            sigma3=float(d.separation.sigma3), rank_mode=d.separation.rank_mode, overrides=dict(d.overrides))
    st.session_state["sep_for"] = str(run.root)


def keep_draft(run) -> None:
    """Write the session's thresholds and moves into the run folder's draft (dropped when saved)."""
    try:
        cgd.drafts.write_draft(run, _session_draft())
    except OSError as e:  # a read-only run folder: the draft lives in this tab only
        log.warning("could not keep the draft of %s: %s", run.root, e)


def saved_separation(run):
    return cgd.drafts.saved(run)


def unsaved_separation(run) -> bool:
    return _session_draft().differs_from(cgd.drafts.saved(run))


def current_subset(df) -> np.ndarray:
    """(N,) Subset codes at the session's thresholds and rank mode, with its manual moves."""
    d = _session_draft()
    return cgd.subsets(df, d.separation, d.overrides)


def subset_names(codes: np.ndarray) -> np.ndarray:
    return np.array([m.label for m in cgd.Subset])[np.asarray(codes, np.int64)]


# ------------------------------------------------------------------------------------------------
# The audit verdict
# ------------------------------------------------------------------------------------------------

def verdict_card(run, classes: list[str], subset: np.ndarray | None = None) -> dict:
    """The verdict at the top of a page: poisoned or not, target, family, estimated count. On a set
    judged clean it says so and calls the rule's flagged tail what it is: the lowest-ranked samples."""
    v = verdict(run, classes)
    with st.container(border=True):
        if v.get("poisoned"):
            tgt = ", ".join(f"{t}: {n}" for t, n in zip(v.get("targets", []), v.get("target_names", []))) or "spread over all labels"
            st.markdown("#### :material/gpp_bad: Poisoning found")
            a, b, c_, d = st.columns(4)
            a.metric("Target class", tgt if v.get("mode") != "all-to-all" else "all-to-all")
            b.metric("Attack family", v.get("family", "?"))
            c_.metric("Poisoned samples (estimate)", f"≈ {fmt_int(v.get('estimated_poisons'))}")
            d.metric("Evidence score", f"{v.get('score', 0):.1f}", help=f"Largest robust z-score over classes (all-to-all: "
                     f"the combined z of the classes involved); the alarm is at {v.get('threshold', 0):.1f} (cgd.verdict). "
                     "Clean sets stay below it.")
            st.caption(v.get("summary", ""))
        else:
            st.markdown("#### :material/verified_user: No sign of poisoning")
            share = float((np.asarray(subset) == int(cgd.Subset.SUSPECT)).mean()) if subset is not None and len(subset) else None
            st.caption(v.get("summary", "") + (f" The rule below still flags its tails: those are the lowest-ranked "
                                               f"{100 * share:.1f} % of the set, not suspects." if share is not None else ""))
    return v


# ------------------------------------------------------------------------------------------------
# Job panel
# ------------------------------------------------------------------------------------------------

STATE_BADGE = {"idle": ("idle", "gray"), "starting": ("starting", "blue"), "running": ("running", "blue"),
               "done": ("done", "green"), "failed": ("failed", "red"), "stopped": ("stopped", "orange"),
               "died": ("ended unexpectedly", "red")}


def job_badge(run) -> None:
    """The run's job state as a badge, refreshed every 2 s while a job is active."""

    def body() -> None:
        s = cgd.jobs.job_status(run)
        text, color = STATE_BADGE.get(s.state, (s.state, "gray"))
        st.badge(f"{s.command or 'job'}: {text}" if s.state != "idle" else "no job yet", color=color)

    st.fragment(body, run_every=2.0 if cgd.jobs.job_status(run).active else None)()


def job_panel(run, key: str, poll_s: float = 1.0) -> Any:
    """Progress of the run's job, polled with ``st.fragment(run_every=...)`` while it is active, with
    the one Stop button; a full rerun follows when it finishes. Returns the JobStatus seen at draw time."""
    jobs = cgd.jobs
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
                    st.markdown(f"**{s.command or 'job'}** is running on `{run.root.name}`", help=TERMS["rate"])
                    frac = jobs.progress_fraction(s)
                    text = jobs.progress_text(s)
                    if frac is None:
                        st.progress(0.0, text=text)
                    else:
                        st.progress(min(max(frac, 0.0), 1.0), text=text)
                with c2:
                    if st.button("Stop", key=f"stop_{key}", icon=":material/stop_circle:", type="secondary",
                                 help="Ask the job to stop at its next checkpoint (SIGTERM after a few seconds); "
                                      "run it again to resume from there"):
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
    with guard(f"Starting {label or command}"):
        # the job reads data only inside the dashboard's roots (BackdoorBench records' data_path included) and
        # refuses hub and local-folder model names (cgd.jobs.WEB_JOB_ENV)
        env = {"CGD_DATA_ROOT": str(data_root()), "CGD_RUNS_ROOT": str(runs_root()), cgd.jobs.WEB_JOB_ENV: "1",
               **(kw.pop("env", None) or {})}
        cgd.jobs.start_job(run, command, config=config, label=label, env=env, **kw)
        st.session_state[f"_started_{run.root}"] = time.time()
        return True
    return False


# ------------------------------------------------------------------------------------------------
# Sidebar
# ------------------------------------------------------------------------------------------------

def sidebar() -> None:
    """Run picker, job state and device note (drawn by app.py on every page)."""
    run_from_url()
    with st.sidebar:
        runs = run_dirs()
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
            _url_run(str(run.root))
            job_badge(run)
        dev = device_facts()
        if dev.get("cuda"):
            st.caption(f":material/memory: GPU: {dev['name']}")
        else:
            st.caption(":material/memory: No GPU found: jobs run on the CPU. Keep data and epochs small.")
