"""Dataset: pick the training set (built-in demo, a standard dataset, your folder or file, or an
existing run), look at it, optionally plant a known backdoor (teaching mode), create the run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import streamlit as st

import _common as c
import cgd

st.title("Dataset")
st.caption("Choose the training set to audit. Nothing leaves this machine: the dashboard reads only inside "
           f"`{c.display_path(c.data_root())}` (CGD_DATA_ROOT), the built-in demo, and `{c.display_path(c.runs_root())}` (CGD_RUNS_ROOT).")

KINDS = cgd.data.DATASET_KINDS  # the dataset-kind registry: labels, layouts, what can be downloaded
SOURCES = {"demo": "Built-in demo: real CIFAR-10 sample (offline)",
           **{k: v.label for k, v in KINDS.items()},
           "run": "Existing run folder"}


@st.cache_resource(show_spinner=False, max_entries=2)
def load_source(spec: str, download: bool, on_bad_files: str, stamp: float):
    return cgd.load_splits(spec, download=download, on_bad_files=on_bad_files, data_root=str(c.data_root()),
                           allowed_root=str(c.data_root()))


def _stamp(path: str) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


# ------------------------------------------------------------------------------------------------
# Source picker
# ------------------------------------------------------------------------------------------------
keys = list(SOURCES)
default_source = st.session_state.get("ds_source", "demo")
source = st.selectbox("Source", keys, index=keys.index(default_source), format_func=SOURCES.get, key="ds_source",
                      help="Where the training set comes from. The demo needs no download and runs on a CPU in minutes.")

spec: str | None = None
train = test = None
run_for_source = None
download = False
on_bad_files = "skip"

if source == "demo":
    if not cgd.demo.available():
        st.error("The built-in demo sample is missing (assets/demo/cifar10). Rebuild it with `python scripts/make_demo.py`.")
        st.stop()
    spec = c.DEMO_SPEC
    st.caption("8,000 training and 3,000 test images of the real CIFAR-10 (Krizhevsky, 2009), 800 / 300 per class, "
               "copied as JPEG q75 by `scripts/make_demo.py`. See `assets/demo/README.md`.")
elif source == "run":
    runs = [r for r in c.run_dirs() if r.has(cgd.layout.data_file("train_x"))]
    if not runs:
        st.info(f"No run with a dataset under `{c.display_path(c.runs_root())}` yet.")
        st.stop()
    names = [str(r.root.resolve()) for r in runs]
    cur = st.session_state.get("run")
    pick = st.selectbox("Run folder", names, index=names.index(cur) if cur in names else 0,
                        format_func=lambda p: Path(p).name, help="Runs under CGD_RUNS_ROOT that hold a dataset")
    run_for_source = next(r for r in runs if str(r.root.resolve()) == pick)
elif not KINDS[source].is_file:
    kind = KINDS[source]
    st.caption(kind.layout)
    dirs = c.list_under(c.data_root(), "dir", max_depth=3)
    col1, col2 = st.columns([2, 2])
    with col1:
        picked = st.selectbox("Folder inside the data folder", ["(type a path)"] + dirs, key=f"ds_dir_{source}",
                              help=f"Folders under {c.data_root()}")
    with col2:
        typed = st.text_input("…or a path relative to the data folder", key=f"ds_typed_{source}",
                              placeholder="e.g. cifar10 or my-images/train", disabled=picked != "(type a path)")
    raw = typed if picked == "(type a path)" else picked
    if kind.downloadable:
        download = st.checkbox("Download it into this folder if absent", key=f"ds_dl_{source}",
                               help="Uses the dataset's official download (torchvision); needs internet.")
    if source == "imagefolder":
        skip = st.checkbox("Also skip image files that cannot be read (counted and reported)", value=False, key="ds_skip_bad",
                           help="Like `cgd run --on-bad-files skip-unreadable`. Off: files that are not images are skipped "
                                "(counted), and an image file that cannot be decoded stops loading with its name.")
        on_bad_files = "skip-unreadable" if skip else "skip"
    if raw:
        with c.guard("Opening the folder"):
            root = c.safe_path(raw, must_exist=not download)
            if source == "backdoorbench" and c._within(root, (c.data_root() / "uploads").resolve()):
                raise c.PathRejected("records are not read from the uploads folder; copy the record folder into the data folder")
            if download:
                root.mkdir(parents=True, exist_ok=True)
            spec = f"{source}:{root}"
else:  # a single file (npz)
    st.caption(KINDS[source].layout)
    files = c.list_under(c.data_root(), "file", (".npz",), max_depth=4)
    col1, col2 = st.columns(2)
    with col1:
        picked = st.selectbox(".npz file inside the data folder", ["(none)"] + files, key="ds_npz")
    with col2:
        up = st.file_uploader("…or upload one", type=["npz"], key="ds_npz_upload",
                              help=f"At most {c.max_upload_bytes() / 1e6:.0f} MB; stored under data/uploads/")
    with c.guard("Checking the file"):
        path = c.save_upload(up) if up is not None else (c.safe_path(picked) if picked != "(none)" else None)
        if path is not None:
            facts = cgd.data.inspect_npz(path)  # headers only: refuses bombs and absurd sizes before any array is read
            spec = f"npz:{path}"
            st.caption(f"`{Path(path).name}`: " + ", ".join(f"{m['name']} {tuple(m['shape'])} {m['dtype']}"
                                                             for m in facts.get("members", [])[:6]))

# ------------------------------------------------------------------------------------------------
# Load and describe
# ------------------------------------------------------------------------------------------------
if run_for_source is not None:
    with c.guard("Reading the run's dataset"):
        d = c.run_data(run_for_source)
        train, test = d.train, d.test
        spec = (run_for_source.read_run().get("config") or {}).get("data")
elif spec:
    with c.guard("Loading the dataset"), st.spinner("Loading and decoding (cached after the first time)…"):
        train, test = load_source(spec, download, on_bad_files, _stamp(spec.split(":", 1)[1]))

if train is None:
    if source not in ("demo", "run") and not spec:
        st.info("Pick a folder or file above.")
    st.stop()

m1, m2, m3, m4 = st.columns(4)
m1.metric("Training images", c.fmt_int(len(train)))
m2.metric("Test images", c.fmt_int(len(test)) if test is not None else "none",
          help="A clean test split is needed to measure CA/ASR/RA; without one, the pipeline holds out 10 % of the training set.")
m3.metric("Classes", c.fmt_int(train.num_classes))
m4.metric("Image size", f"{train.image_size[0]}×{train.image_size[1]}")
skipped = sum(int(s.meta.get("skipped_files", 0)) for s in (train, test) if s is not None)
if skipped:
    st.warning(f"{skipped:,} files that are not readable images were skipped (counted in the run's notes).",
               icon=":material/warning:")
if train.has_ground_truth:
    st.info(f"This set carries ground truth: {c.fmt_int(train.poison_mask.sum())} samples are known to be poisoned, "
            "so detection rates are shown on the later pages.", icon=":material/verified:")

counts = train.class_counts()
pois = np.bincount(train.labels[train.poison_mask], minlength=train.num_classes) if train.has_ground_truth else None
st.plotly_chart(cgd.viz.class_histogram(counts, train.classes, pois), width="stretch", key="ds_hist")

with st.expander("Sample images per class", expanded=True):
    cc1, cc2, cc3 = st.columns([1, 1, 3])
    seed = int(cc1.number_input("Seed", 0, 10_000, 0, key="ds_seed", help="Which images are drawn (seeded)"))
    per = int(cc2.slider("Per class", 4, 16, 10, key="ds_per"))
    shown = cc3.multiselect("Classes", train.classes, default=train.classes[:10], key="ds_classes",
                            max_selections=20) if train.num_classes > 10 else train.classes
    for name, count, png in c.class_mosaics(train, tuple(shown), per, seed):
        a, b = st.columns([1, 8], vertical_alignment="center")
        a.markdown(f"**{name}**  \n{c.fmt_int(count)}")
        b.image(png)

# ------------------------------------------------------------------------------------------------
# Teaching mode: the attack simulator
# ------------------------------------------------------------------------------------------------
attack_cfg: dict = {"attack": None}
if run_for_source is None:
    st.subheader("Teaching mode", help="Plant a known backdoor so every later page can show how well it is found.")
    attacks = cgd.attacks
    if train.has_ground_truth:
        st.caption("This set is already poisoned (it carries a ground-truth mask); the simulator is off.")
        teach = False
    else:
        teach = st.toggle("Poison this set with the attack simulator", value=source == "demo", key="ds_teach",
                          help="The poisoned samples are recorded, so detection rates (TPR/FPR) and ASR can be measured.")
    if teach:
        desc = {d["name"]: d for d in attacks.describe_all()}
        names = list(desc)
        teach_default = cgd.demo.TEACHING_ATTACK
        a1, a2, a3 = st.columns(3)
        name = a1.selectbox("Attack", names, index=names.index(teach_default["attack"]) if teach_default["attack"] in names else 0,
                            key="ds_attack", format_func=lambda n: f"{n} · {desc[n]['category']}", help="Attacks from cgd.attacks")
        rate = a2.slider("Poison rate", 0.01, 0.5, float(teach_default["poison_rate"]), 0.01, key="ds_rate",
                         help=c.term("poison_rate"), format="%.2f")
        target = a3.selectbox("Target class", list(range(train.num_classes)), key="ds_target",
                              format_func=lambda k: f"{k}: {train.classes[k]}", help=c.term("target"))
        st.caption(desc[name]["paper"])
        params: dict = {}
        defaults = desc[name]["defaults"]
        if defaults or desc[name].get("all_to_all"):
            with st.expander("Attack parameters"):
                cols = st.columns(3)
                for i, (pk, dv) in enumerate(defaults.items()):
                    col = cols[i % 3]
                    wk = f"ds_p_{name}_{pk}"
                    if isinstance(dv, bool):
                        params[pk] = col.checkbox(pk, value=dv, key=wk)
                    elif isinstance(dv, int):
                        params[pk] = int(col.number_input(pk, value=dv, step=1, key=wk))
                    elif isinstance(dv, float):
                        params[pk] = float(col.number_input(pk, value=dv, format="%.4g", key=wk))
                    else:
                        txt = col.text_input(pk, value=json.dumps(dv), key=wk, help="JSON value")
                        try:
                            params[pk] = json.loads(txt)
                        except json.JSONDecodeError:
                            col.error(f"{pk}: not valid JSON")
                            params[pk] = dv
                if desc[name].get("all_to_all"):
                    a2a = st.checkbox("All-to-all (label y → y+1) instead of all-to-one", key=f"ds_a2a_{name}")
                    if a2a:
                        params["all_to_all"] = True
        params = {k: v for k, v in params.items() if k == "all_to_all" or v != defaults.get(k)}
        attack_cfg = {"attack": name, "poison_rate": float(rate), "target": int(target), "attack_params": params}
        # preview: one training image and its poisoned version side by side. A clean-label attack
        # poisons target-class images and keeps their (correct) labels; the others relabel an image
        # of another class as the target.
        with c.guard("Previewing the trigger"):
            clean_label = desc[name]["category"] == "clean-label"
            atk = attacks.make_attack(name, image_size=train.image_size, seed=0, **params)
            if clean_label:
                pool = np.flatnonzero(train.labels == target)
            else:
                pool = np.flatnonzero(train.labels != target) if len(np.unique(train.labels)) > 1 else np.arange(len(train))
            pool = pool if len(pool) else np.arange(len(train))
            i = int(np.random.default_rng(seed).choice(pool))
            img = np.asarray(train.images[i])
            try:
                clean, poisoned, diff = atk.preview(img)
            except Exception as e:  # noqa: BLE001 - attacks that optimise their trigger on the data first
                if getattr(attacks.REGISTRY.get(name), "needs_data", False):
                    st.info(f"No instant preview for {name}: it optimises its trigger on the clean data (a surrogate "
                            "model), which happens in the background when the run starts.", icon=":material/hourglass:")
                else:
                    st.info(f"No preview for {name}: {e}")
            else:
                scale = max(1, 160 // train.image_size[0])
                own = train.classes[int(train.labels[i])]
                p1, p2, p3, _ = st.columns([1, 1, 1, 2])
                p1.image(cgd.viz.upscale(clean, scale), output_format="PNG", caption=f"clean ({own})")
                cap = (f"poisoned, label kept: {own} (clean-label)" if clean_label
                       else f"poisoned (labelled {train.classes[target]})")
                p2.image(cgd.viz.upscale(poisoned, scale), output_format="PNG", caption=cap)
                p3.image(cgd.viz.upscale(diff, scale), output_format="PNG", caption="|difference|, stretched")

# ------------------------------------------------------------------------------------------------
# Create / select the run
# ------------------------------------------------------------------------------------------------
st.divider()
if run_for_source is not None:
    st.markdown(f"Run **{run_for_source.root.name}**: `{c.display_path(run_for_source.root)}`")
    if st.button("Use this run", type="primary", icon=":material/arrow_forward:", key="ds_use_run"):
        c.select_run(run_for_source.root)
        c.switch_page(c.PAGES["score"])
    st.stop()

sub1, sub2, sub3 = st.columns([1, 1, 2])
subset = int(sub1.number_input("Use at most N training images (0 = all)", 0, 10_000_000, 0, step=100, key="ds_subset",
                               help="A seeded subset per split keeps CPU runs short."))
run_seed = int(sub2.number_input("Run seed", 0, 1_000_000, 0, key="ds_run_seed", help="Seeds the subset, the attack and every model"))
base = "demo" if source == "demo" else c.slug(Path(spec.split(":", 1)[1]).stem) or source
default_name = f"{base}-{attack_cfg['attack'] or 'audit'}-{time.strftime('%Y%m%d-%H%M%S')}"
if st.session_state.get("_ds_name_for") != (spec, attack_cfg["attack"]):
    st.session_state["ds_name"] = default_name
    st.session_state["_ds_name_for"] = (spec, attack_cfg["attack"])
name = sub3.text_input("Run name", key="ds_name", help=f"A new folder under {c.runs_root()}")

if st.button("Create run and continue", type="primary", icon=":material/arrow_forward:", key="ds_create"):
    with c.guard("Creating the run"):
        folder = c.slug(name)
        if not folder:
            raise c.PathRejected("give the run a name (letters, digits, '.', '_' or '-')")
        path = c.safe_path(folder, [c.runs_root()], must_exist=False)
        if (path / cgd.layout.RUN_JSON).exists():
            raise c.PathRejected(f"a run named {folder!r} exists already; pick another name or open it as an existing run")
        cfg = {"data": spec, "subset": subset or None, "seed": run_seed, "on_bad_files": on_bad_files,
               **attack_cfg}
        if attack_cfg["attack"] is None:
            cfg.update(attack_params={}, poison_rate=0.1, target=0)
        if source == "demo":  # the demo's models and offline reference (cgd.demo), on a GPU the paper's model
            cfg.update({k: v for k, v in cgd.demo.run_settings(attack_cfg if attack_cfg["attack"] else {}).items()
                        if k not in attack_cfg})
            if c.device_facts().get("cuda"):
                cfg.update(arch="preact-resnet18")
        cgd.jobs.write_config(path, cfg)
        c.select_run(path)
        st.session_state["new_run_source"] = source
        c.switch_page(c.PAGES["score"])
