"""The Streamlit dashboard, page by page, with streamlit.testing (AppTest), over a real run folder.

The session fixture builds one small run with the library (real CIFAR-10 images from the built-in
demo sample, BadNets, a reference classifier trained on a trusted part of the demo's test split,
small-cnn, one epoch everywhere, a UMAP map) so no page test waits on training. Background-job
tests start real ``python -m cgd`` subprocesses.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboard" / "app.py")
DEMO = ROOT / "assets" / "demo" / "cifar10"
TIMEOUT = 120  # seconds per AppTest run: the first one imports torch on a busy 2-core machine

pytest.importorskip("streamlit")


def _metric(at, label_start: str) -> str:
    for m in at.metric:
        if m.label.startswith(label_start):
            return m.value
    raise AssertionError(f"no metric starting with {label_start!r}: {[m.label for m in at.metric]}")


def _int(text: str) -> int:
    return int(text.split("/")[0].replace(",", "").strip())


@pytest.fixture(scope="session")
def dash(tmp_path_factory):
    """A finished run folder under a temporary runs root, and the dashboard's environment."""
    if not DEMO.is_dir():
        pytest.skip("the demo sample assets/demo/cifar10 is absent (python scripts/make_demo.py)")
    from cgd.cli import main as cli
    from cgd.embedding_map import MapConfig, compute_embedding_map
    from cgd.pipeline import RunConfig, run_pipeline
    from cgd.runs import RunDir

    base = tmp_path_factory.mktemp("dash")
    data_root, runs_root = base / "data", base / "runs"
    data_root.mkdir()
    runs_root.mkdir()
    spec = f"imagefolder:{DEMO}"
    ref = data_root / "reference.safetensors"
    assert cli(["train", "--data", spec, "--split", "test", "--trusted-fraction", "0.5", "--arch", "small-cnn",
                "--epochs", "2", "--device", "cpu", "--out", str(ref), "--quiet"]) == 0
    run = runs_root / "badnets-run"
    cfg = RunConfig.from_flat(data=spec, out=str(run), device="cpu", subset=300, attack="badnets", poison_rate=0.1, target=0,
                    reference=f"classifier:{ref}", arch="small-cnn", train_epochs=1, suspicious_runs=1,
                    suspicious_epochs=1, epochs=1, max_batches=3, batch_size=64)
    run_pipeline(cfg, progress_bars=False)
    compute_embedding_map(RunDir(run), MapConfig(method="umap", seed=0))
    old = {k: os.environ.get(k) for k in ("CGD_DATA_ROOT", "CGD_RUNS_ROOT")}
    os.environ["CGD_DATA_ROOT"], os.environ["CGD_RUNS_ROOT"] = str(data_root), str(runs_root)
    sys.path.insert(0, str(ROOT / "dashboard"))
    yield SimpleNamespace(run=run, runs_root=runs_root, data_root=data_root, spec=spec, ref=ref, cfg=cfg)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _app(run: Path | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if run is not None:
        at.session_state["run"] = str(run.resolve())
    return at


def _page(at, name: str):
    at.switch_page(f"views/{name}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _scores(run: Path):
    from cgd.pipeline import scores_table
    from cgd.runs import RunDir

    return scores_table(RunDir(run), overrides={})


def _wait_job(run: Path, timeout: float = 240.0):
    from cgd import jobs

    return jobs.wait_job(run, timeout)


# ------------------------------------------------------------------------------------------------
# Path safety
# ------------------------------------------------------------------------------------------------

def test_an_upload_cannot_pose_as_a_record_or_leave_the_upload_folder(dash):
    """Audit item 3: a `.pt` upload named attack_result.pt must not become a BackdoorBench record in
    the data folder, and a name with a path in it stays inside uploads/."""
    import types

    import _common as c

    for name in ("attack_result.pt", "../../attack_result.pt", ".hidden", "data_batch_1"):
        up = types.SimpleNamespace(name=name, size=3, getvalue=lambda: b"abc")
        dest = c.save_upload(up)
        assert dest.parent == (dash.data_root / "uploads").resolve() or dest.parent == dash.data_root / "uploads"
        assert dest.name.startswith("upload-") and dest.name != name and dest.read_bytes() == b"abc"
    assert not list(dash.data_root.rglob("attack_result.pt"))


def test_safe_path_stays_inside_the_roots(dash, tmp_path):
    import _common as c

    (dash.data_root / "sets" / "a").mkdir(parents=True)
    assert c.safe_path("sets/a") == (dash.data_root / "sets" / "a").resolve()
    assert c.safe_path(str(dash.data_root / "sets")) == (dash.data_root / "sets").resolve()
    assert c.safe_path("cifar10/train") == (DEMO / "train").resolve()  # the built-in demo root
    with pytest.raises(c.PathRejected, match=r"'\.\.' is not allowed"):
        c.safe_path("sets/../../etc")
    with pytest.raises(c.PathRejected, match="outside the folders"):
        c.safe_path("/etc")
    outside = tmp_path / "secret"
    outside.mkdir()
    (dash.data_root / "link").symlink_to(outside)
    with pytest.raises(c.PathRejected, match="outside the folders"):
        c.safe_path("link")  # a symlink may not lead outside
    with pytest.raises(c.PathRejected, match="not found"):
        c.safe_path("sets/nope")
    assert c.safe_path(dash.run.name, [dash.runs_root]) == dash.run.resolve()


# ------------------------------------------------------------------------------------------------
# Pages
# ------------------------------------------------------------------------------------------------

def test_dataset_page_defaults_to_the_demo_and_creates_a_run(dash):
    at = _app()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="ds_source").value == "demo"
    assert _metric(at, "Training images") == "8,000"
    assert _metric(at, "Test images") == "3,000"
    assert _metric(at, "Classes") == "10"
    assert at.toggle(key="ds_teach").value is True  # teaching mode on for the demo
    assert at.selectbox(key="ds_attack").value == "badnets"
    assert len(at.get("plotly_chart")) == 1  # class histogram
    assert len(at.get("image")) >= 10 + 3  # one thumbnail row per class + the trigger preview
    at.number_input(key="ds_subset").set_value(200)
    at.slider(key="ds_rate").set_value(0.2)
    at.text_input(key="ds_name").input("created-by-test").run()
    at.button(key="ds_create").click().run()
    assert not at.exception, [e.value for e in at.exception]
    run = dash.runs_root / "created-by-test"
    cfg = json.loads((run / "run.json").read_text())["config"]
    assert cfg["data"] == f"imagefolder:{DEMO}"
    assert cfg["attack"] == "badnets" and cfg["poison_rate"] == pytest.approx(0.2) and cfg["subset"] == 200
    from cgd import demo

    # the demo's own models and offline reference, from the library's demo settings
    assert {k: cfg[k] for k in demo.DEMO_SETTINGS} == demo.DEMO_SETTINGS
    assert cfg["reference"] == f"classifier:{demo.reference_path()}"
    assert at.session_state["run"] == str(run.resolve())
    assert at.query_params["run"] in ("created-by-test", ["created-by-test"])  # the URL names the run: a reload keeps it
    shutil.rmtree(run)


def test_dataset_page_refuses_paths_outside_the_data_root(dash):
    at = _app()
    at.run()
    at.selectbox(key="ds_source").set_value("imagefolder").run()
    at.text_input(key="ds_typed_imagefolder").input("../../etc").run()
    assert not at.exception
    assert any("'..' is not allowed" in e.value for e in at.error), [e.value for e in at.error]
    at.text_input(key="ds_typed_imagefolder").input("/etc").run()
    assert any("outside the folders" in e.value for e in at.error), [e.value for e in at.error]


def test_pages_without_a_run_point_to_the_dataset_page(dash):
    at = _app()
    at.run()
    for name in ("2_score", "3_inspect", "4_separate", "5_retrain"):
        _page(at, name)
        assert any("No run selected" in i.value for i in at.info), name


def test_score_page_shows_settings_and_the_finished_stages(dash):
    at = _page(_app(dash.run).run(), "2_score")
    kind = at.radio(key=f"sc_kind_{dash.run.name}")
    assert kind.value == "classifier" and "clip" in kind.options[0].lower()
    assert at.button(key="sc_start").disabled is False
    assert at.selectbox(key="sc_arch").value == "small-cnn"
    assert at.selectbox(key="sc_flip").value == "auto" and at.selectbox(key="sc_flip").options[0].startswith("auto")
    assert at.selectbox(key="sc_device").value == "cpu"
    stages = at.dataframe[0].value
    assert list(stages["stage"]) == ["data", "victim", "reference", "suspicious", "separate", "retrain", "export"]
    assert "reference accuracy" in " ".join(stages["notes"])  # a classifier reference is not called zero-shot
    # switching to CLIP shows the prompt editor with per-class zero-shot accuracy
    kind.set_value("clip").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.text_area(key="sc_templates").value.count("{}") >= 3
    assert at.selectbox(key="sc_model").value == "ViT-B-32"
    assert "laion2b_s34b_b79k" in at.selectbox(key="sc_tag").options


def _flagged(at) -> str:
    """The suspect count's label: "Suspect" on a set judged poisoned, "Lowest-ranked" on one judged clean."""
    return "Suspect" if any(m.label.startswith("Suspect") for m in at.metric) else "Lowest-ranked"


def test_inspect_page_draws_every_view(dash):
    at = _page(_app(dash.run).run(), "3_inspect")
    df = _scores(dash.run)
    from cgd.separation import separate

    sub = separate(df["clip_rank"].to_numpy(), df["model_rank"].to_numpy(), 0.2, 0.1)
    assert _int(_metric(at, "Clean")) == int((sub == 1).sum())
    assert _int(_metric(at, _flagged(at))) == int((sub == 2).sum())
    assert _int(_metric(at, "Unused")) == int((sub == 0).sum())
    caught = _metric(at, "Poisons caught")
    assert _int(caught) == int(((sub == 2) & df["poison"].to_numpy()).sum()) and caught.endswith("30")
    assert len(at.get("plotly_chart")) == 3  # histograms, entropy map, UMAP (cached by the fixture)
    per_class = at.dataframe[0].value
    assert list(per_class["class"]) == sorted(p.name for p in (DEMO / "train").iterdir())
    assert int(per_class["poisoned"].sum()) == 30 and int(per_class["samples"].sum()) == 300
    assert len(at.get("image")) >= 3  # trigger view: mean, reference, difference


def test_separate_slider_changes_the_counts(dash):
    from cgd.separation import separate

    at = _page(_app(dash.run).run(), "4_separate")
    df = _scores(dash.run)
    cr, mr = df["clip_rank"].to_numpy(), df["model_rank"].to_numpy()
    before = _int(_metric(at, _flagged(at)))
    assert before == int((separate(cr, mr, 0.2, 0.1) == 2).sum())
    at.slider(key="w_sigma2").set_value(0.3).run()
    assert not at.exception
    after = _int(_metric(at, _flagged(at)))
    assert after == int((separate(cr, mr, 0.2, 0.3) == 2).sum()) and after > before
    assert any("Unsaved" in w.value for w in at.warning)
    tpr = at.dataframe[1].value  # detection table (ground truth known)
    assert list(tpr["size"]) == [after, int((separate(cr, mr, 0.2, 0.3) == 1).sum())]
    assert len(at.get("plotly_chart")) == 2  # ROC + sweep
    # the slider value survives a visit to another page
    _page(at, "3_inspect")
    assert any("σ2 = 0.30" in cap.value for cap in at.caption)
    _page(at, "4_separate")
    assert at.slider(key="w_sigma2").value == pytest.approx(0.3)
    # σ3 = 0 is the paper's rule: the joint tail's extra suspects go back to clean / unused
    assert at.slider(key="w_sigma3").value == pytest.approx(0.1)
    at.slider(key="w_sigma3").set_value(0.0).run()
    assert not at.exception
    paper = int((separate(cr, mr, 0.2, 0.3, 0.0) == 2).sum())
    assert _int(_metric(at, _flagged(at))) == paper <= after
    # a reloaded tab (a new session, the run from the URL) finds the unsaved thresholds again
    fresh = _app()
    fresh.query_params["run"] = dash.run.name
    fresh.run()
    _page(fresh, "4_separate")
    assert fresh.session_state["run"] == str(dash.run.resolve())
    assert fresh.slider(key="w_sigma2").value == pytest.approx(0.3) and fresh.slider(key="w_sigma3").value == pytest.approx(0.0)
    assert any("Restored" in i.value for i in fresh.info)
    from cgd import drafts
    from cgd.runs import RunDir

    drafts.clear_draft(RunDir(dash.run))  # leave the shared run as the fixture made it


def test_separate_manual_moves_and_exports(dash, tmp_path):
    from cgd.separation import separate

    run = tmp_path / "runs" / "sep-run"
    shutil.copytree(dash.run, run)
    at = _app(run)
    at.session_state["run"] = str(run.resolve())
    os.environ["CGD_RUNS_ROOT"] = str(run.parent)
    try:
        at.run()
        _page(at, "4_separate")
        at.slider(key="w_sigma1").set_value(0.25).run()
        at.radio(key="sep_src").set_value("typed").run()
        at.text_input(key="sep_typed").input("0-4, 7").run()
        at.segmented_control(key="sep_to").set_value("suspect").run()
        at.button(key="sep_move").click().run()
        assert not at.exception
        assert at.session_state["overrides"] == {0: 2, 1: 2, 2: 2, 3: 2, 4: 2, 7: 2}
        assert _int(_metric(at, "Manual moves")) == 6
        at.button(key="sep_save").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]
        s = _wait_job(run)
        assert s.state == "done", (s.state, s.error)
        at.run()
        assert not at.exception
        assert not any("Unsaved" in w.value for w in at.warning)
        df = _scores(run)
        sub = separate(df["clip_rank"].to_numpy(), df["model_rank"].to_numpy(), 0.25, 0.1)
        sub[[0, 1, 2, 3, 4, 7]] = 2
        doc = json.loads((run / "exports" / "suspect_indices.json").read_text())
        assert doc["indices"] == np.flatnonzero(sub == 2).tolist()
        assert doc["provenance"]["sigma1"] == pytest.approx(0.25) and doc["provenance"]["manual_overrides"] == 6
        assert doc["provenance"]["sigma3"] == pytest.approx(0.1)
        clean = json.loads((run / "exports" / "clean_indices.json").read_text())
        assert clean["indices"] == np.flatnonzero(sub == 1).tolist()
        import pandas as pd

        table = pd.read_csv(run / "exports" / "clean_indices.csv")  # plain CSV: pandas reads it as is
        assert list(table.columns) == ["index", "source_index", "label", "label_name", "file"]
        assert table["index"].tolist() == clean["indices"]
        assert table["file"].str.match(r"^train/[a-z]+/\d{4}\.jpg$").all()  # relative to the dataset folder
        assert (DEMO / table["file"].iloc[0]).is_file()
        assert json.loads((run / "exports" / "provenance.json").read_text())["sigma1"] == pytest.approx(0.25)
        assert json.loads((run / "overrides.json").read_text()) == {str(i): 2 for i in (0, 1, 2, 3, 4, 7)}
        assert any("exports" in cap.value and "written" in cap.value for cap in at.caption)  # where the files are
        dls = at.get("download_button")
        assert len(dls) == 6 and not any(d.proto.disabled for d in dls)
    finally:
        os.environ["CGD_RUNS_ROOT"] = str(dash.runs_root)


def test_retrain_page_shows_curves_summary_and_checkpoint(dash):
    at = _page(_app(dash.run).run(), "5_retrain")
    rows = [r for r in (dash.run / "metrics.csv").read_text().splitlines() if not r.startswith("#")]
    assert rows[0].startswith("epoch,")
    assert _metric(at, "Epoch") == "1"
    info = json.loads((dash.run / "run.json").read_text())["summary"]
    assert _metric(at, "CA after") == f"{info['after']['ca']:.2f} %"
    assert len(at.get("plotly_chart")) == 2  # CA/ASR/RA and loss
    assert at.button(key="rt_start").disabled is False
    assert not [b for b in at.button if b.key == "rt_stop"]  # one Stop button: the job panel's
    assert at.number_input(key="rt_epochs").value == 1
    cfg = json.loads((dash.run / "run.json").read_text())["config"]
    assert at.number_input(key="rt_patience").value == cfg["patience"]
    assert at.number_input(key="rt_unlearn_floor").value == cfg["unlearn_floor"]
    assert at.number_input(key="rt_min_batches").value == cfg["min_batches"]
    assert at.number_input(key="rt_trigger_shrink").value == cfg["trigger_shrink"] == 6.0
    assert at.checkbox(key="rt_drop_disputed").value is cfg["drop_disputed"] is True
    assert at.checkbox(key="rt_subtract_trigger").value is cfg["subtract_trigger"] is True
    assert at.selectbox(key="rt_outside_targets").value == cfg["outside_targets"] == "clean"
    assert at.selectbox(key="rt_split_target").value == cfg["split_target"]
    assert at.checkbox(key="rt_bn_freeze").value is (cfg["bn_stats"] == "freeze") is False
    dls = at.get("download_button")
    assert len(dls) == 2  # the retrained checkpoint and its metadata
    # the outcome is judged and the checkpoint named by it, never "repaired" when the backdoor stayed
    outcome = info["outcome"]
    shown = [e.value for e in (at.success if outcome["ok"] else at.error)]
    assert any(outcome["message"] == v for v in shown), shown
    assert dls[0].proto.label.startswith(outcome["label"])
    if not outcome["ok"]:
        assert "Repaired" not in dls[0].proto.label


# ------------------------------------------------------------------------------------------------
# Background jobs
# ------------------------------------------------------------------------------------------------

def test_jobs_refuse_a_second_job_and_stop(dash, tmp_path):
    from cgd import jobs
    from cgd.runs import RunLockedError

    run = tmp_path / "job-run"
    shutil.copytree(dash.run, run)
    s = jobs.start_job(run, "retrain", config={"epochs": 200, "max_batches": 50, "batch_size": 16}, label="retraining")
    assert s.state == "starting" and s.command == "retraining"
    with pytest.raises(RunLockedError, match="busy"):
        jobs.start_job(run, "retrain")
    t0 = time.time()
    while jobs.job_status(run).stage != "retrain" and time.time() - t0 < 120:
        time.sleep(0.5)
    assert jobs.job_status(run).state == "running"
    msg = jobs.stop_job(run, grace_s=3.0, kill_after_s=5.0)
    assert "stop" in msg or "terminated" in msg
    st = jobs.job_status(run)
    assert st.state == "stopped" and not st.active
    pid = json.loads((run / "job.json").read_text())["pid"]
    assert not jobs._alive(pid)
    assert "retraining" in jobs.tail_log(run, 50) or "cgd retrain" in jobs.tail_log(run, 50)
    # after stopping, the run folder takes a new job
    assert not jobs.is_running(run)


def test_embedding_map_is_cached_and_invalidated(dash, tmp_path):
    from cgd.embedding_map import MapConfig, compute_embedding_map, load_embedding_map
    from cgd.runs import RunDir

    run = RunDir(tmp_path / "map-run")
    run.root.mkdir()
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    run.save_array("embeddings.npy", emb)
    m = compute_embedding_map(run, MapConfig(method="pca", max_points=40, seed=1))
    assert m.xy.shape == (40, 2) and m.subsampled and len(np.unique(m.index)) == 40
    again = load_embedding_map(run)
    assert again is not None and np.array_equal(again.index, m.index) and np.allclose(again.xy, m.xy)
    time.sleep(0.01)
    run.save_array("embeddings.npy", emb + 1)  # re-scored: the cached map is stale
    assert load_embedding_map(run) is None


def test_viz_figures_carry_thresholds_and_indices(dash):
    from cgd import viz

    rng = np.random.default_rng(0)
    x, y = rng.random(50), rng.random(50)
    fig = viz.entropy_map(x, y, np.where(x > 0.5, "suspect", "clean"), 0.2, 0.1, index=np.arange(100, 150))
    xs = sorted(round(s.x0, 3) for s in fig.layout.shapes if s.type == "line" and s.x0 == s.x1)
    ys = sorted(round(s.y0, 3) for s in fig.layout.shapes if s.type == "line" and s.y0 == s.y1)
    assert xs == [0.8, 0.9] and ys == [0.1, 0.2]
    diag = [s for s in viz.entropy_map(x, y, np.where(x > 0.5, "suspect", "clean"), 0.2, 0.1, sigma3=0.1).layout.shapes
            if s.type == "line" and s.x0 != s.x1 and s.y0 != s.y1]
    assert len(diag) == 1  # the joint-tail boundary: the line x - y = t with 10 % of the points to its lower right
    t = diag[0].x0 - diag[0].y0
    assert diag[0].x1 - diag[0].y1 == pytest.approx(t) and np.mean(x - y > t) == pytest.approx(0.1, abs=0.021)
    got = sorted(int(v[0]) for tr in fig.data for v in tr.customdata)
    assert got == list(range(100, 150))
    sel = {"points": [{"customdata": [105]}, {"customdata": {"0": 101}}, {"x": 1}]}  # the browser sends both forms
    assert viz.selected_indices(sel) == [101, 105]
    big = viz.embedding_scatter(rng.random((viz.WEBGL_THRESHOLD + 1, 2)), np.arange(viz.WEBGL_THRESHOLD + 1),
                                np.full(viz.WEBGL_THRESHOLD + 1, "clean"))
    assert big.data[0].type == "scattergl"
    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    imgs[:2, -2:, -2:] = 255  # a corner patch on two "suspect" images
    v = viz.trigger_views(imgs, np.array([0, 0, 0, 1]), np.array([True, True, False, False]), 0)
    assert v["n_suspect"] == 2 and v["difference"][-1, -1].max() == 255 and v["difference"][0, 0].max() == 0


# ------------------------------------------------------------------------------------------------
# The audit verdict on the pages
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def verdict_runs(dash):
    """Two scored runs of the demo sample (no victim, no retraining): never poisoned, and BadNets 10 %."""
    from cgd.cli import main as cli
    from cgd.pipeline import RunConfig, run_pipeline

    ref = dash.data_root / "reference-10ep.safetensors"  # the demo's reference recipe, fewer epochs
    assert cli(["train", "--data", dash.spec, "--split", "test", "--trusted-fraction", "0.5", "--arch", "tiny-cnn",
                "--epochs", "10", "--device", "cpu", "--out", str(ref), "--quiet"]) == 0
    out = {}
    for name, attack in (("clean-run", {}), ("badnets-2k", {"attack": "badnets", "poison_rate": 0.1, "target": 3})):
        run = dash.runs_root / name
        cfg = RunConfig.from_flat(data=dash.spec, out=str(run), device="cpu", subset=2000, reference=f"classifier:{ref}",
                                  arch="tiny-cnn", suspicious_runs=1, suspicious_epochs=4, **attack)
        run_pipeline(cfg, stages=("data", "reference", "suspicious", "separate"), progress_bars=False)
        out[name] = run
    return out


def test_verdict_card_says_clean_on_a_clean_set_and_names_the_target_on_a_poisoned_one(dash, verdict_runs):
    for page in ("3_inspect", "4_separate"):
        at = _page(_app(verdict_runs["clean-run"]).run(), page)
        assert any("No sign of poisoning" in m.value for m in at.markdown), page
        assert any("lowest-ranked" in cap.value for cap in at.caption), page  # the tails are not called suspects
        assert not [m for m in at.metric if m.label.startswith("Suspect")] and _flagged(at) == "Lowest-ranked"
        at = _page(_app(verdict_runs["badnets-2k"]).run(), page)
        assert any("Poisoning found" in m.value for m in at.markdown), page
        assert _metric(at, "Target class") == "3: cat"
        assert _metric(at, "Attack family") == "dirty-label"
        assert _flagged(at) == "Suspect"
    verdict = json.loads((verdict_runs["badnets-2k"] / "verdict.json").read_text())
    assert verdict["poisoned"] and verdict["targets"] == [3]
    assert not json.loads((verdict_runs["clean-run"] / "verdict.json").read_text())["poisoned"]


def test_a_verdict_written_by_an_older_version_is_judged_again(verdict_runs, tmp_path):
    """An old run's verdict.json (another VERDICT_VERSION) must not be shown as today's judgement."""
    import shutil

    from cgd.runs import RunDir, write_json
    from cgd.verdict import VERDICT_VERSION, current_verdict

    run = RunDir(shutil.copytree(verdict_runs["badnets-2k"], tmp_path / "old"))
    now = current_verdict(run)
    assert now["version"] == VERDICT_VERSION and now["targets"] == [3]
    write_json(run.path("verdict.json"), {**now, "version": 1, "poisoned": False, "targets": [], "summary": "stale"})
    again = current_verdict(run)
    assert again["poisoned"] and again["targets"] == [3] and again["summary"] != "stale"
    # re-running a finished run (its scores reused) writes today's verdict into verdict.json and run.json
    from cgd.pipeline import RunConfig, run_pipeline

    run.update_run(verdict={**now, "version": 1, "summary": "stale"})
    cfg = RunConfig.from_dict(run.read_run()["config"]).updated({"out": str(run.root)})
    info = run_pipeline(cfg, stages=("data", "reference", "suspicious", "separate"), progress_bars=False)
    assert info["verdict"]["version"] == VERDICT_VERSION and info["verdict"]["targets"] == [3]
    assert run.read_verdict()["version"] == VERDICT_VERSION and run.read_verdict()["summary"] != "stale"


def test_a_symlinked_run_folder_leading_outside_the_runs_root_is_never_offered(dash, tmp_path):
    import _common as c

    outside = tmp_path / "elsewhere" / "secret-run"
    shutil.copytree(dash.run, outside)
    link = dash.runs_root / "evil-link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        names = [r.root.name for r in c.run_dirs()]
        assert dash.run.name in names and "evil-link" not in names
        at = _app()
        at.query_params["run"] = "evil-link"
        at.run()
        assert not at.exception
        assert "run" not in at.session_state or at.session_state["run"] != str(outside.resolve())
        at.selectbox(key="ds_source").set_value("run").run()
        assert not at.exception
        pick = [s for s in at.selectbox if s.label == "Run folder"]
        assert pick and all("evil-link" not in str(o) and "secret-run" not in str(o) for o in pick[0].options)
    finally:
        link.unlink()
