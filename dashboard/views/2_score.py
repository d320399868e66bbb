"""Score: choose the reference (CLIP or a classifier), prompts, the model to repair and the
suspicious models, then score the run in a background job (finished stages are reused)."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import streamlit as st

import _common as c

st.title("Score")
run = c.require_run(what="scoring")
cfg = c.run_config(run)
info = run.read_run()
is_demo = cfg.get("data") == c.DEMO_SPEC
st.caption(f"Run **{run.root.name}** · data `{c.display_path(cfg['data'].split(':', 1)[-1]) if cfg.get('data') else '–'}`"
           + (f" · attack {cfg['attack']} ({100 * cfg['poison_rate']:.0f} %, target {cfg['target']})" if cfg.get("attack") else ""))

status = c.job_panel(run, "score")
busy = status.active


@st.cache_resource(show_spinner="Loading the open_clip model list…")
def clip_models() -> list[str]:
    import open_clip

    return list(open_clip.list_models())


@st.cache_data(show_spinner=False)
def clip_tags(model: str) -> list[str]:
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(model))


DEFAULT_CLIP_HUB = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"  # open_clip's source of ViT-B-32 / laion2b_s34b_b79k


@st.cache_data(show_spinner=False, ttl=300)
def hub_cached(repo: str) -> bool | None:
    """Whether open_clip weights from Hugging Face repo ``repo`` are in the local cache (None: unknown)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(repo.rstrip("/"), fn), str)
                   for fn in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    except Exception:  # noqa: BLE001
        return None


def weights_cached(model: str, tag: str) -> bool | None:
    try:
        from open_clip.pretrained import get_pretrained_cfg

        hub = (get_pretrained_cfg(model, tag) or {}).get("hf_hub", "")
    except Exception:  # noqa: BLE001
        return None
    return hub_cached(hub) if hub else None


def demo_reference_path() -> Path:
    from cgd.data import cache_dir

    return cache_dir() / "demo-reference.safetensors"


def demo_reference_ready(path: Path) -> bool:
    """The cached demo reference exists and was trained on this copy of the demo's test split."""
    if not path.is_file():
        return False
    try:
        from cgd.models import read_checkpoint_meta

        tr = read_checkpoint_meta(path).get("trained_on") or {}
        return tr.get("data") == c.DEMO_SPEC and tr.get("split") == "test" and bool(tr.get("indices"))
    except Exception:  # noqa: BLE001
        return False


def checkpoint_picker(label: str, key: str, suffixes=(".safetensors", ".pt", ".pth", ".bin"), current: str | None = None) -> str | None:
    """A file under the data folder (or uploaded); ``current``: the run's recorded file, kept by default."""
    files = c.list_under(c.data_root(), "file", suffixes, max_depth=4)
    keep = f"(keep the run's file: {Path(current).name})" if current else None
    opts = ([keep] if keep else []) + ["(none)"] + files
    a, b = st.columns(2)
    pick = a.selectbox(label, opts, key=f"{key}_pick", help=f"Files under {c.data_root()}")
    if keep and pick == keep:
        return current
    up = b.file_uploader("…or upload", type=[s.lstrip(".") for s in suffixes], key=f"{key}_up",
                         help=f"At most {c.max_upload_bytes() / 1e6:.0f} MB; stored under data/uploads/")
    with c.guard("Reading the file"):
        if up is not None:
            return str(c.save_upload(up))
        if pick != "(none)":
            return str(c.safe_path(pick))
    return None


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------
st.subheader("Reference", help="The model whose opinion of each label gives the first entropy (CGD uses CLIP zero-shot).")
default_cached = hub_cached(DEFAULT_CLIP_HUB) if is_demo else None
kinds = ["clip", "clip-file", "classifier"] + (["demo"] if is_demo else [])
kind_names = {"clip": "CLIP (open_clip + pretrained tag)", "clip-file": "CLIP from a local weights file",
              "classifier": "Reference classifier checkpoint",
              "demo": "Demo reference classifier (trained on half the demo's test images)"}
cur_ref = cfg.get("reference", "")
if cur_ref.startswith("classifier:") and is_demo and Path(cur_ref.split(":", 1)[1]) == demo_reference_path():
    kind_default = "demo"
elif cur_ref.startswith("classifier:"):
    kind_default = "classifier"
elif cfg.get("checkpoint"):
    kind_default = "clip-file"
elif is_demo and not default_cached:
    kind_default = "demo"
else:
    kind_default = "clip"
ref_kind = st.radio("Reference model", kinds, index=kinds.index(kind_default), format_func=kind_names.get, horizontal=True,
                    key=f"sc_kind_{run.root.name}", disabled=busy)
ref_cfg: dict = {"checkpoint": None, "clip_config": None, "pretrained": None}
pre: list[list[str]] = []
is_clip = ref_kind in ("clip", "clip-file")
models = clip_models() if is_clip else []
if ref_kind == "clip":
    cur_model = cur_ref.split(":", 1)[1] if cur_ref.startswith("clip:") and cur_ref.split(":", 1)[1] in models else "ViT-B-32"
    a, b = st.columns(2)
    model = a.selectbox("open_clip model", models, index=models.index(cur_model), key="sc_model", disabled=busy)
    opts = clip_tags(model) + ["none"]
    from cgd.pipeline import DEFAULT_PRETRAINED

    want = cfg.get("pretrained") or DEFAULT_PRETRAINED.get(model) or (opts[0] if opts else "none")
    tag = b.selectbox("Pretrained tag", opts, index=opts.index(want) if want in opts else 0, key="sc_tag", disabled=busy,
                      format_func=lambda t: "none (random weights: for testing only)" if t == "none" else t)
    cached = weights_cached(model, tag) if tag != "none" else None
    if cached is False:
        st.warning("These weights are not in the local cache: open_clip downloads them when the job starts (internet "
                   "needed). Offline, use a local weights file or a reference classifier.", icon=":material/cloud_off:")
    elif cached:
        st.caption(":material/check_circle: weights found in the local cache")
    ref_cfg.update(reference=f"clip:{model}", pretrained=tag)
elif ref_kind == "clip-file":
    a, b = st.columns(2)
    model = a.selectbox("open_clip architecture", models, index=models.index("ViT-B-32"), key="sc_model_f", disabled=busy)
    ck = checkpoint_picker("CLIP weights file", "sc_clipfile", current=cfg.get("checkpoint"))
    ccfg = None
    with st.expander("Custom architecture (open_clip model config JSON)"):
        ccfg = checkpoint_picker("Model config", "sc_clipcfg", suffixes=(".json",))
        if ccfg:
            model = st.text_input("Model name defined by the config (its file name without .json)", Path(ccfg).stem,
                                  key="sc_custom_name")
    ref_cfg.update(reference=f"clip:{model}", checkpoint=ck, clip_config=ccfg)
elif ref_kind == "classifier":
    ck = checkpoint_picker("Classifier checkpoint (cgd safetensors)", "sc_cls",
                           current=cur_ref.split(":", 1)[1] if cur_ref.startswith("classifier:") else None)
    ref_cfg.update(reference=f"classifier:{ck}" if ck else None)
else:
    path = demo_reference_path()
    ready = demo_reference_ready(path)
    st.info("No CLIP weights are available offline, so the demo scores with a small CNN trained on a **trusted half "
            "of the demo's test images** (500 images, 20 epochs). The pipeline then leaves those test images out of "
            "every evaluation. " + ("It is cached and will be reused." if ready else
                                    "It is trained once when you start (about a minute on a CPU) and cached."),
            icon=":material/school:")
    ref_cfg.update(reference=f"classifier:{path}")
    if not ready:
        pre.append([sys.executable, "-m", "cgd", "train", "--data", c.DEMO_SPEC, "--split", "test", "--trusted-fraction",
                    "0.5", "--arch", "small-cnn", "--out", str(path), "--quiet"])

# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------
classnames = templates = None
if is_clip:
    st.subheader("Prompts", help="CLIP compares each image with one text embedding per class: the mean over the templates.")
    from cgd.zero_shot_metadata import default_classnames, default_templates

    classes = None
    kind = str(cfg.get("data", "")).split(":", 1)[0]
    with c.guard("Reading the class list"):
        if run.has("data/classes.json"):
            from cgd.runs import read_json

            classes = read_json(run.path("data", "classes.json"))
    if classes is None:
        st.caption("Class names can be edited after the first scoring (the data stage reads them).")
    else:
        described = (info.get("reference") or {})
        shown = cfg.get("classnames") or described.get("classnames") or default_classnames(kind, classes)
        if len(shown) != len(classes):
            shown = default_classnames(kind, classes)
        table = pd.DataFrame({"class": classes, "prompt name": shown})
        if run.has("clip_logits.npy") and is_clip:
            with c.guard("Reading zero-shot accuracy"):
                d = c.run_data(run)
                from cgd import viz

                zs = viz.zero_shot_table(run.load_array("clip_logits.npy"), d.train.true_labels(), classes)
                table["zero-shot accuracy %"] = zs["zero-shot accuracy %"].round(1)
        edited = st.data_editor(table, disabled=["class", "zero-shot accuracy %"], hide_index=True, key="sc_names",
                                width="stretch", height=min(400, 38 + 35 * len(classes)),
                                column_config={"zero-shot accuracy %": st.column_config.NumberColumn(help=c.HELP["zero_shot"], format="%.1f")})
        names = [str(x).strip() for x in edited["prompt name"]]
        if names != list(shown) or cfg.get("classnames"):
            classnames = names
    tpl_default = cfg.get("templates") or (info.get("reference") or {}).get("templates") or default_templates(kind)
    tpl_text = st.text_area("Prompt templates (one per line, `{}` = class name)", "\n".join(tpl_default), height=160,
                            key="sc_templates", disabled=busy)
    tpl = [t.strip() for t in tpl_text.splitlines() if t.strip()]
    bad = [t for t in tpl if "{}" not in t]
    if bad:
        st.error(f"Every template needs `{{}}` where the class name goes; fix: {bad[:3]}")
    elif tpl != list(tpl_default) or cfg.get("templates"):
        templates = tpl

# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
st.subheader("Models", help="The model to repair, and the suspicious models whose learning speed gives the second entropy.")
dev = c.device_facts()
m1, m2 = st.columns(2)
with m1:
    victim_kind = st.radio("Model to repair", ["train", "file"], horizontal=True, key="sc_victim", disabled=busy,
                           index=1 if cfg.get("model") else 0,
                           format_func={"train": "Train one on this data", "file": "My checkpoint"}.get)
    arch_opts = ["small-cnn", "preact-resnet18"]
    arch = st.selectbox("Architecture", arch_opts, index=arch_opts.index(cfg.get("arch", "preact-resnet18")), key="sc_arch",
                        disabled=busy, help="Of the trained model to repair and of the suspicious models. small-cnn: seconds per epoch on a CPU.")
    model_path = None
    if victim_kind == "train":
        train_epochs = st.number_input("Training epochs", 1, 500, int(6 if is_demo and cfg.get("train_epochs") == 20 else cfg.get("train_epochs", 20)),
                                       key="sc_train_epochs", disabled=busy)
    else:
        train_epochs = cfg.get("train_epochs", 20)
        model_path = checkpoint_picker("Checkpoint of the model to repair", "sc_victim_file", suffixes=(".safetensors",),
                                       current=cfg.get("model"))
with m2:
    susp = st.radio("Suspicious axis", ["train", "victim"], horizontal=True, key="sc_susp", disabled=busy,
                    index=1 if cfg.get("suspicious") == "victim" else 0,
                    format_func={"train": "Train suspicious models (the paper)", "victim": "Use the model to repair"}.get,
                    help="Fresh models trained for a few epochs learn backdoors first; the model to repair's own losses are a cheaper proxy.")
    if susp == "train":
        s1, s2 = st.columns(2)
        runs_n = s1.number_input("Suspicious models", 1, 10, int(2 if is_demo and cfg.get("suspicious_runs") == 3 else cfg.get("suspicious_runs", 3)),
                                 key="sc_susp_runs", disabled=busy, help="Their logits are averaged")
        susp_epochs = s2.number_input("Epochs each", 1, 50, int(3 if is_demo and cfg.get("suspicious_epochs") == 5 else cfg.get("suspicious_epochs", 5)),
                                      key="sc_susp_epochs", disabled=busy)
    else:
        runs_n, susp_epochs = cfg.get("suspicious_runs", 3), cfg.get("suspicious_epochs", 5)

st.subheader("Compute")
k1, k2, k3 = st.columns(3)
devices = ["auto", "cpu"] + (["cuda"] if dev.get("cuda") else [])
device = k1.selectbox("Device", devices, index=devices.index(cfg.get("device")) if cfg.get("device") in devices else 0,
                      key="sc_device", disabled=busy, help="auto: the GPU when there is one")
precision = k2.selectbox("Precision", ["auto", "bf16", "fp32"], index=["auto", "bf16", "fp32"].index(cfg.get("precision", "auto")),
                         key="sc_precision", disabled=busy, help="auto: bf16 on GPUs and on CPUs with bf16 units")
batch = k3.number_input("Scoring batch size", 8, 4096, int(cfg.get("score_batch_size", 256)), step=32, key="sc_batch",
                        disabled=busy)
if not dev.get("cuda"):
    st.caption(":material/info: No GPU found: scoring and training run on the CPU. The demo takes a few minutes; for your "
               "own data, start with a subset.")

new_cfg = {**{k: v for k, v in ref_cfg.items()}, "classnames": classnames, "templates": templates, "model": model_path,
           "arch": arch, "train_epochs": int(train_epochs), "suspicious": susp, "suspicious_runs": int(runs_n),
           "suspicious_epochs": int(susp_epochs), "device": device, "precision": precision, "score_batch_size": int(batch)}
problems = []
if not new_cfg.get("reference"):
    problems.append("pick a reference checkpoint")
if ref_kind == "clip-file" and not new_cfg.get("checkpoint"):
    problems.append("pick the CLIP weights file")
if victim_kind == "file" and not model_path:
    problems.append("pick the checkpoint of the model to repair")
for p_ in problems:
    st.warning(f"To start: {p_}.")

if st.button("Start scoring", type="primary", icon=":material/play_arrow:", disabled=busy or bool(problems), key="sc_start",
             help="Runs data → reference → suspicious models → separation as a background job; finished stages are reused."):
    if c.start_job(run, "separate", config=new_cfg, label="scoring", pre=pre,
                   phase="training the demo reference classifier" if pre else None):
        st.rerun()

# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
stages = info.get("stages") or {}
if stages:
    st.subheader("Stages")
    from cgd.pipeline import STAGES

    rows = []
    for name in STAGES:
        rec = stages.get(name)
        if not rec:
            continue
        note = ""
        if name == "reference" and "images_per_s" in rec:
            note = f"{rec['images_per_s']:,.0f} images/s · zero-shot accuracy {c.fmt_pct(rec.get('zero_shot_acc'))}"
        rows.append({"stage": name, "finished": rec.get("finished", ""), "seconds": rec.get("seconds"), "notes": note})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={"seconds": st.column_config.NumberColumn(format="%.1f")})
    ds = info.get("dataset") or {}
    for n in ds.get("notes") or []:
        st.caption(f":material/info: {n}")
    if run.has("clip_logits.npy") and not is_clip and not busy:
        with c.guard("Reading the reference's accuracy"):
            from cgd import viz

            d = c.run_data(run)
            zs = viz.zero_shot_table(run.load_array("clip_logits.npy"), d.train.true_labels(), d.train.classes)
            with st.expander("Reference accuracy per class (on the training set, true labels)"):
                st.dataframe(zs, hide_index=True, width="stretch", key="sc_zs",
                             column_config={"zero-shot accuracy %": st.column_config.NumberColumn(
                                 "accuracy %", format="%.1f", help=c.HELP["zero_shot"])})
    if run.has("scores.parquet"):
        st.page_link(c.PAGES["inspect"], label="Next: inspect the scores", icon=":material/arrow_forward:")
