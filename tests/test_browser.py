"""End to end in a real browser: serve the dashboard, walk the built-in demo from the Dataset page
through scoring, inspection, separation and retraining, and save a screenshot of every page under
test-output/screenshots/.

Needs Playwright (pip) and a Chromium binary (Debian: ``apt-get install chromium``; or set
CGD_CHROMIUM); skips with the reason otherwise. Slow (several minutes on a 2-core CPU): marked
``browser``; run with ``pytest -m browser tests/test_browser.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "test-output" / "screenshots"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
JOB_TIMEOUT_S = 900


def _chromium() -> str | None:
    for c in (os.environ.get("CGD_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium")):
        if c and Path(c).is_file():
            return c
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    if _chromium() is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set CGD_CHROMIUM)")
    if not (ROOT / "assets" / "demo" / "cifar10").is_dir():
        pytest.skip("the demo sample assets/demo/cifar10 is absent")
    base = tmp_path_factory.mktemp("browser")
    env = {**os.environ, "CGD_DATA_ROOT": str(base / "data"), "CGD_RUNS_ROOT": str(base / "runs"),
           "CGD_CACHE": str(base / "cache"), "PYTHONUNBUFFERED": "1"}
    port = _free_port()
    log = open(base / "streamlit.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"),
                             "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 60:
                    pytest.fail(f"streamlit did not start:\n{(base / 'streamlit.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}", base
    finally:
        # stop any job the walk left running, then the server
        from cgd import jobs

        for run in (base / "runs").glob("*"):
            if (run / "job.json").exists() and jobs.job_status(run).active:
                jobs.stop_job(run, grace_s=2.0, kill_after_s=3.0)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS)
        pg = browser.new_page(viewport={"width": 1440, "height": 1000})
        yield pg
        browser.close()


def settle(pg, quiet: int = 3, timeout: float = 120.0) -> None:
    """Wait until the page stops changing (no skeletons or spinners, same text for ``quiet`` s)."""
    last, same, t0 = None, 0, time.time()
    while time.time() - t0 < timeout:
        time.sleep(1.0)
        txt = pg.inner_text("body")
        busy = pg.locator("[data-testid='stSkeleton'], [data-testid='stSpinner']").count()
        same = same + 1 if (txt == last and busy == 0) else 0
        last = txt
        if same >= quiet:
            return


def shot(pg, name: str) -> Path:
    """Full-height screenshot (Streamlit scrolls inside its main container, so grow the viewport)."""
    pg.mouse.move(1, 1)  # no hover tooltip in the picture
    settle(pg, quiet=2)
    h = pg.evaluate("() => { const m = document.querySelector('[data-testid=\"stMain\"]'); return m ? m.scrollHeight : 1000 }")
    pg.set_viewport_size({"width": 1440, "height": int(min(max(1000, h + 40), 8000))})
    settle(pg, quiet=2)
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    pg.set_viewport_size({"width": 1440, "height": 1000})
    return path


def no_exception(pg) -> None:
    n = pg.locator("[data-testid='stException']").count()
    assert n == 0, pg.locator("[data-testid='stException']").first.inner_text()


def wait_text(pg, text: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    pg.get_by_text(text, exact=False).first.wait_for(timeout=timeout_s * 1000)


def set_number(pg, label: str, value) -> None:
    box = pg.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    settle(pg, quiet=2)


def nav(pg, title: str) -> None:
    """Follow the sidebar's link to page ``title``; the address then names the page and the run."""
    pg.locator("[data-testid='stSidebar'] [data-testid='stPageLink']").get_by_text(title, exact=True).click()
    pg.locator("h1", has_text=title).first.wait_for(timeout=60_000)
    settle(pg)
    no_exception(pg)
    assert f"/{title.lower()}?" in pg.url and "run=" in pg.url, pg.url


def slider_keys(pg, label: str, key: str, times: int = 1) -> None:
    """Move a Streamlit slider with the keyboard (its thumb has role=slider and the widget's label)."""
    thumb = pg.locator("[data-testid='stSlider']", has_text=label).get_by_role("slider").first
    thumb.focus()
    for _ in range(times):
        thumb.press(key)
    settle(pg, quiet=2)


def body(pg) -> str:
    return pg.inner_text("body")


def test_demo_walkthrough(server, page):
    url, base = server
    pg = page
    pg.goto(url)
    wait_text(pg, "Training images", 120)
    settle(pg)
    no_exception(pg)
    from cgd import demo

    n_train = sum(1 for _ in (demo.DEMO_DATA / "train").rglob("*.png"))
    assert f"{n_train:,}" in body(pg)  # the whole demo sample is offered
    # a 2,000-image share keeps the walk short; every other setting is the demo's default
    set_number(pg, "Use at most N training images (0 = all)", 2000)
    name = pg.get_by_label("Run name", exact=True)
    name.fill("browser-demo")
    name.press("Enter")
    settle(pg, quiet=2)
    shot(pg, "1_dataset")

    # Score: the demo reference classifier (no CLIP weights offline) and the demo's models, unchanged
    pg.get_by_role("button", name="Create run and continue").click()
    wait_text(pg, "Reference model", 120)
    settle(pg)
    no_exception(pg)
    assert pg.get_by_text("Demo reference classifier", exact=False).count() >= 1
    assert "run=browser-demo" in pg.url  # the run is kept in the address
    pg.get_by_role("button", name="Start scoring").click()
    wait_text(pg, "is running on", 120)
    time.sleep(3)
    shot(pg, "2_score_running")
    # a reload while the job runs keeps the run and its job panel
    pg.reload()
    wait_text(pg, "Reference model", 120)
    settle(pg, quiet=1)
    assert "No run selected" not in body(pg)
    assert "browser-demo" in body(pg)
    wait_text(pg, "Next: inspect the scores")
    settle(pg)
    no_exception(pg)
    shot(pg, "2_score_done")
    run = base / "runs" / "browser-demo"
    assert (run / "scores.parquet").is_file()

    # Inspect: the verdict card, every tab; compute the UMAP in the background; select on the entropy map
    nav(pg, "Inspect")
    assert "Poisoned" in body(pg) or "poisoned" in body(pg)
    shot(pg, "3_inspect_entropies")
    pg.get_by_role("tab", name="Entropy map").click()
    settle(pg)
    plot = pg.locator("[data-testid='stPlotlyChart']").nth(1)
    plot.scroll_into_view_if_needed()
    box = plot.locator(".nsewdrag").first.bounding_box()
    if box:  # lasso-select a wedge of the suspect corner (low model rank)
        x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
        pg.mouse.move(x0 + 2, y0 + h - 2)
        pg.mouse.down()
        for fx, fy in ((0.98, 0.98), (0.98, 0.75), (0.02, 0.75), (0.02, 0.99)):
            pg.mouse.move(x0 + w * fx, y0 + h * fy, steps=8)
        pg.mouse.up()
        wait_text(pg, "selected", 60)  # the thumbnail grid of the selection
        settle(pg)
        no_exception(pg)
    shot(pg, "3_inspect_entropy_map")
    pg.get_by_role("tab", name="UMAP").click()
    settle(pg)
    pg.get_by_role("button", name="Compute UMAP").click()
    wait_text(pg, "UMAP (umap-learn", 600)
    settle(pg)
    no_exception(pg)
    shot(pg, "3_inspect_umap")
    pg.get_by_role("tab", name="Per class").click()
    shot(pg, "3_inspect_per_class")
    pg.get_by_role("tab", name="Trigger view").click()
    shot(pg, "3_inspect_trigger")

    # Separate: an unsaved threshold survives a reload (kept as a draft), then save; exports say where they went
    nav(pg, "Separate")
    slider_keys(pg, "suspect margin", "ArrowRight", 2)
    assert "Unsaved" in body(pg)
    pg.reload()
    wait_text(pg, "suspect margin", 120)
    settle(pg)
    assert "Restored the thresholds" in body(pg) and "Unsaved" in body(pg)
    slider_keys(pg, "suspect margin", "ArrowLeft", 2)
    pg.get_by_role("tab", name="Detection").click()
    settle(pg)
    shot(pg, "4_separate")
    pg.get_by_role("button", name="Save separation and exports").click()
    wait_text(pg, "Exports written", 300)
    settle(pg)
    no_exception(pg)
    ex = run / "exports"
    assert str(ex) in body(pg)  # the page says where the files are
    assert "file paths are relative to" in body(pg)  # an image folder's exports carry the file paths
    import pandas as pd

    sus = pd.read_csv(ex / "suspect_indices.csv")  # plain CSV, provenance beside it
    assert {"index", "file"} <= set(sus.columns) and len(sus) > 0
    assert (ex / "provenance.json").is_file()
    pg.get_by_role("tab", name="Threshold sweep").click()
    shot(pg, "4_separate_saved")

    # Retrain 1: a learning rate too small to change anything: the page must say the repair failed
    nav(pg, "Retrain")
    set_number(pg, "Learning rate", 1e-6)
    set_number(pg, "Epochs", 1)
    pg.get_by_role("button", name="Start retraining").click()
    wait_text(pg, "is running on", 120)
    pg.locator("[data-testid='stMetricLabel']", has_text="Epoch").first.wait_for(timeout=600_000)
    time.sleep(2)
    shot(pg, "5_retrain_running")
    wait_text(pg, "Before and after repair")
    settle(pg)
    no_exception(pg)
    assert "Repair failed: the backdoor is still active" in body(pg)
    assert "backdoor still active" in body(pg)  # the checkpoint's download is labelled so
    shot(pg, "5_retrain_failed")
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["outcome"]["status"] in ("backdoor_remains", "failed")
    assert "repaired" not in summary["outcome"]["label"].lower()

    # Retrain 2: back to the default recipe (the page starts from the run's last settings), which repairs it
    from cgd.config import RetrainConfig

    pg.reload()
    wait_text(pg, "Start retraining", 120)
    settle(pg)
    assert "run=browser-demo" in pg.url and "/retrain" in pg.url
    pg.get_by_text("Hyperparameters", exact=True).click()
    settle(pg, quiet=2)
    set_number(pg, "Learning rate", RetrainConfig().lr)
    set_number(pg, "Epochs", RetrainConfig().epochs)
    pg.get_by_role("button", name="Start retraining").click()
    wait_text(pg, "is running on", 120)
    wait_text(pg, "Repair worked")
    settle(pg)
    no_exception(pg)
    shot(pg, "5_retrain_done")
    assert (run / "models" / "repaired.safetensors").is_file()
    assert json.loads((run / "run.json").read_text())["summary"]["outcome"]["status"] == "repaired"
    rows = [r for r in (run / "metrics.csv").read_text().splitlines() if r and not r.startswith("#")]
    assert len(rows) >= 1 + 2  # header, epoch 0 (before repair), at least one epoch
