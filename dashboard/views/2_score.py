"""Score: choose the reference (CLIP or a classifier), prompts, the model to repair and the
suspicious models, then score the run in a background job (finished stages are reused)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

import _common as c
import cgd

st.title("Score")
run = c.require_run(what="scoring")
cfg = c.run_config(run)
info = run.read_run()
is_demo = cgd.demo.is_demo(cfg.get("data"))
st.caption(f"Run **{run.root.name}** · data `{c.display_path(cfg['data'].split(':', 1)[-1]) if cfg.get('data') else '–'}`"
           + (f" · attack {cfg['attack']} ({100 * cfg['poison_rate']:.0f} %, target {cfg['target']})" if cfg.get("attack") else ""))

status = c.job_panel(run, "score")
busy = status.active
catalog = cgd.catalog


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
default_tag = cgd.DEFAULT_PRETRAINED["ViT-B-32"]
default_cached = catalog.weights_cached("ViT-B-32", default_tag) if is_demo else None
kinds = ["clip", "clip-file", "classifier"] + (["demo"] if is_demo else [])
cur_ref = cfg.get("reference", "")
if cur_ref.startswith("classifier:") and is_demo and Path(cur_ref.split(":", 1)[1]) == cgd.demo.reference_path():
    kind_default = "demo"
elif cur_ref.startswith("classifier:"):
    kind_default = "classifier"
elif cfg.get("checkpoint"):
    kind_default = "clip-file"
elif is_demo and not default_cached:
    kind_default = "demo"
else:
    kind_default = "clip"
ref_kind = st.radio("Reference model", kinds, index=kinds.index(kind_default), format_func=lambda k: catalog.REFERENCE_KINDS[k].label,
                    horizontal=True, key=f"sc_kind_{run.root.name}", disabled=busy, help=catalog.REFERENCE_KINDS[kind_default].help)
ref_cfg: dict = {"checkpoint": None, "clip_config": None, "pretrained": None}
pre: list[list[str]] = []
blockers: list[str] = []
is_clip = ref_kind in ("clip", "clip-file")
models = list(catalog.clip_models()) if is_clip else []
if ref_kind == "clip":
    cur_model = cur_ref.split(":", 1)[1] if cur_ref.startswith("clip:") and cur_ref.split(":", 1)[1] in models else "ViT-B-32"
    a, b = st.columns(2)
    model = a.selectbox("open_clip model", models, index=models.index(cur_model), key="sc_model", disabled=busy,
                        help="Only open_clip's own model names (no hub or local-folder names on the dashboard)")
    opts = list(catalog.clip_tags(model)) + ["none"]
    want = cfg.get("pretrained") or cgd.DEFAULT_PRETRAINED.get(model) or (opts[0] if opts else "none")
    tag = b.selectbox("Pretrained tag", opts, index=opts.index(want) if want in opts else 0, key="sc_tag", disabled=busy,
                      format_func=lambda t: "none (random weights: for testing only)" if t == "none" else t)
    ws = catalog.weights_status(model, None if tag == "none" else tag)
    if not ws.ok:
        st.error(f"Cannot score with {model}/{tag} here: {ws.message}", icon=":material/cloud_off:")
        blockers.append("pick a reference whose weights are available (see above)")
    elif ws.cached:
        st.caption(f":material/check_circle: {ws.message}")
    elif tag != "none":
        st.warning(ws.message, icon=":material/cloud_download:")
    ref_cfg.update(reference=f"clip:{model}", pretrained=tag)
elif ref_kind == "clip-file":
    ck = checkpoint_picker("CLIP weights file", "sc_clipfile", current=cfg.get("checkpoint"))
    ccfg = None
    with st.expander("Custom architecture (open_clip model config JSON)"):
        st.caption("The config is checked against an allowlist of architecture keys: no tokenizer settings, hub names or "
                   "remote code. Its file name (without .json) is the model's name.")
        ccfg = checkpoint_picker("Model config", "sc_clipcfg", suffixes=(".json",))
        if ccfg:
            with c.guard("Checking the model config"):
                cgd.validate_clip_config(ccfg)
                st.caption(f":material/check_circle: `{Path(ccfg).name}` defines the architecture **{Path(ccfg).stem}**")
    if ccfg:
        model = Path(ccfg).stem
    else:
        model = st.selectbox("open_clip architecture", models, index=models.index("ViT-B-32"), key="sc_model_f", disabled=busy)
    ref_cfg.update(reference=f"clip:{model}", checkpoint=ck, clip_config=ccfg)
elif ref_kind == "classifier":
    ck = checkpoint_picker("Classifier checkpoint (cgd safetensors)", "sc_cls", suffixes=(".safetensors",),
                           current=cur_ref.split(":", 1)[1] if cur_ref.startswith("classifier:") else None)
    ref_cfg.update(reference=f"classifier:{ck}" if ck else None)
else:
    path = cgd.demo.reference_path()
    ready = cgd.demo.reference_ready(path)
    n_test = 3000
    st.info("No CLIP weights are available offline, so the demo scores with a small CNN trained on a **trusted half "
            f"of the demo's test images** ({int(n_test * cgd.demo.TRUSTED_FRACTION):,} images, {cgd.demo.REFERENCE_EPOCHS} "
            "epochs). The pipeline then leaves those test images out of every evaluation. "
            + ("It is cached and will be reused." if ready else "It is trained once when you start (about half a minute "
                                                                "on a CPU) and cached."), icon=":material/school:")
    ref_cfg.update(reference=f"classifier:{path}")
    if not ready:
        pre.append(cgd.demo.reference_command(path) + ["--progress-run", str(run.root)])

# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------
classnames = templates = None
if is_clip:
    st.subheader("Prompts", help="CLIP compares each image with one text embedding per class: the mean over the templates.")
    default_classnames, default_templates = cgd.zero_shot_metadata.default_classnames, cgd.zero_shot_metadata.default_templates
    classes = None
    kind = str(cfg.get("data", "")).split(":", 1)[0]
    with c.guard("Reading the class list"):
        classes = run.read_classes()
    if classes is None:
        st.caption("Class names can be edited after the first scoring (the data stage reads them).")
    else:
        described = (info.get("reference") or {})
        shown = cfg.get("classnames") or described.get("classnames") or default_classnames(kind, classes)
        if len(shown) != len(classes):
            shown = default_classnames(kind, classes)
        table = pd.DataFrame({"class": classes, "prompt name": shown})
        if run.has(cgd.layout.CLIP_LOGITS) and cur_ref.startswith("clip:"):
            with c.guard("Reading zero-shot accuracy"):
                d = c.run_data(run)
                zs = cgd.viz.zero_shot_table(run.load_array(cgd.layout.CLIP_LOGITS), d.train.true_labels(), classes)
                table["zero-shot accuracy %"] = zs["zero-shot accuracy %"].round(1)
        edited = st.data_editor(table, disabled=["class", "zero-shot accuracy %"], hide_index=True, key="sc_names",
                                width="stretch", height=min(400, 38 + 35 * len(classes)),
                                column_config={"zero-shot accuracy %": st.column_config.NumberColumn(help=c.term("zero_shot"), format="%.1f")})
        names = [str(x).strip() for x in edited["prompt name"]]
        if names != list(shown) or cfg.get("classnames"):
            classnames = names
    tpl_default = cfg.get("templates") or (info.get("reference") or {}).get("templates") or default_templates(kind)
    tpl_text = st.text_area("Prompt templates (one per line, `{}` = class name)", "\n".join(tpl_default), height=160,
                            key="sc_templates", disabled=busy)
    tpl = [t.strip() for t in tpl_text.splitlines() if t.strip()]
    bad = [t for t in tpl if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}")]
    if bad:
        st.error(f"Every template needs exactly one `{{}}` where the class name goes, and no other braces; fix: {bad[:3]}")
        blockers.append("fix the prompt templates")
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
    arch_opts = list(cgd.ARCHITECTURES)
    arch = st.selectbox("Architecture", arch_opts, index=arch_opts.index(cfg.get("arch", "preact-resnet18")), key="sc_arch",
                        disabled=busy, format_func=lambda a: f"{a} · {cgd.ARCHITECTURES[a]}",
                        help="Of the trained model to repair and of the suspicious models.")
    flips = list(cgd.flat_field("flip").choices)
    flip = st.selectbox("Horizontal flips in training", flips, index=flips.index(cfg.get("flip", "auto")), key="sc_flip",
                        disabled=busy, format_func={"auto": "auto (off where classes mirror each other)", "on": "on",
                                                    "off": "off"}.get, help=c.term("flip"))
    model_path = None
    if victim_kind == "train":
        train_epochs = st.number_input("Training epochs", 1, 500, int(cfg["train_epochs"]), key="sc_train_epochs", disabled=busy,
                                       help=c.term("train_epochs"))
    else:
        train_epochs = cfg["train_epochs"]
        model_path = checkpoint_picker("Checkpoint of the model to repair", "sc_victim_file", suffixes=(".safetensors",),
                                       current=cfg.get("model"))
with m2:
    susp = st.radio("Suspicious axis", ["train", "victim"], horizontal=True, key="sc_susp", disabled=busy,
                    index=1 if cfg.get("suspicious") == "victim" else 0,
                    format_func={"train": "Train suspicious models (the paper)", "victim": "Use the model to repair"}.get,
                    help="Fresh models trained for a few epochs learn backdoors first; the model to repair's own losses are a cheaper proxy.")
    if susp == "train":
        s1, s2 = st.columns(2)
        runs_n = s1.number_input("Suspicious models", 1, 10, int(cfg["suspicious_runs"]), key="sc_susp_runs", disabled=busy,
                                 help=c.term("suspicious_runs"))
        susp_epochs = s2.number_input("Epochs each", 1, 50, int(cfg["suspicious_epochs"]), key="sc_susp_epochs", disabled=busy)
    else:
        runs_n, susp_epochs = cfg["suspicious_runs"], cfg["suspicious_epochs"]

st.subheader("Compute")
k1, k2, k3 = st.columns(3)
devices = ["auto", "cpu"] + (["cuda"] if dev.get("cuda") else [])
device = k1.selectbox("Device", devices, index=devices.index(cfg.get("device")) if cfg.get("device") in devices else 0,
                      key="sc_device", disabled=busy, help="auto: the GPU when there is one")
precs = list(cgd.flat_field("precision").choices)
precision = k2.selectbox("Precision", precs, index=precs.index(cfg.get("precision", "auto")),
                         key="sc_precision", disabled=busy, help=c.term("precision"))
batch = k3.number_input("Scoring batch size", 8, 4096, int(cfg.get("score_batch_size", 256)), step=32, key="sc_batch",
                        disabled=busy)
if not dev.get("cuda"):
    st.caption(":material/info: No GPU found: scoring and training run on the CPU. The demo takes a few minutes; for your "
               "own data, start with a subset.")

new_cfg = {**{k: v for k, v in ref_cfg.items()}, "classnames": classnames, "templates": templates, "model": model_path,
           "arch": arch, "flip": flip, "train_epochs": int(train_epochs), "suspicious": susp, "suspicious_runs": int(runs_n),
           "suspicious_epochs": int(susp_epochs), "device": device, "precision": precision, "score_batch_size": int(batch)}
problems = list(blockers)
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
    ref = c.ref_name(run)
    rows = []
    for name in cgd.STAGES:
        rec = stages.get(name)
        if not rec:
            continue
        note = ""
        if name == "reference" and "images_per_s" in rec:
            acc = "zero-shot accuracy" if ref == "CLIP" else "reference accuracy"
            note = (f"{rec['images_per_s']:,.0f} images/s · {acc} {c.fmt_pct(rec.get('zero_shot_acc'))}"
                    + (" · read from the score cache" if rec.get("from_cache") else ""))
        rows.append({"stage": name, "finished": rec.get("finished", ""), "seconds": rec.get("seconds"), "notes": note})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={"seconds": st.column_config.NumberColumn(format="%.1f")})
    ds = info.get("dataset") or {}
    for n in ds.get("notes") or []:
        st.caption(f":material/info: {n}")
    if run.has(cgd.layout.CLIP_LOGITS) and not cur_ref.startswith("clip:") and not busy:
        with c.guard("Reading the reference's accuracy"):
            d = c.run_data(run)
            zs = cgd.viz.zero_shot_table(run.load_array(cgd.layout.CLIP_LOGITS), d.train.true_labels(), d.train.classes)
            with st.expander("Reference accuracy per class (on the training set, true labels)"):
                st.dataframe(zs, hide_index=True, width="stretch", key="sc_zs",
                             column_config={"zero-shot accuracy %": st.column_config.NumberColumn(
                                 "accuracy %", format="%.1f", help=c.term("zero_shot", ref))})
    if run.has(cgd.layout.SCORES):
        c.page_link(c.PAGES["inspect"], label="Next: inspect the scores", icon=":material/arrow_forward:")
