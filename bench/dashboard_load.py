"""Load test: many dashboard sessions browsing one run at once, over the real Streamlit protocol.

Starts ``streamlit run dashboard/app.py`` headless on a loopback port (or uses ``--url``), then
opens ``--sessions`` concurrent clients. Each client is what a browser tab does, minus drawing:
it fetches the page HTML over HTTP, opens the ``/_stcore/stream`` WebSocket, and for ``--rounds``
rounds asks the server to run each page (a ``rerun_script`` BackMsg with the page name and
``?run=NAME``), waiting for ``script_finished``. A *page load* is the time from the request to
``script_finished``: the script ran and every element of the page reached the client.

Between page loads a client pauses a seeded random think time (``--think LO,HI`` seconds; ``0``
gives the worst case, every session hammering the server back to back). Any page that shows an
exception, or a load that does not finish within ``--timeout``, counts as a failure.

    python bench/dashboard_load.py --runs-root RUNS --run NAME --sessions 20 --rounds 3

Prints per-page and overall latency (median, p95, max), failures, and appends one JSON line to
``bench/results/dashboard_load.jsonl``. Nothing here is asserted by the unit tests except through
``tests/test_load.py`` (marked slow), which runs it on a generated 50,000-sample run.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAGES = ["dataset", "score", "inspect", "separate", "retrain"]
DEFAULT_PAGE = "dataset"  # served at the app's root URL: requested with an empty page name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(runs_root: Path, data_root: Path, port: int, log_path: Path) -> subprocess.Popen:
    """The dashboard as users start it, bound to 127.0.0.1, with its roots set by environment."""
    env = dict(os.environ, CGD_RUNS_ROOT=str(runs_root), CGD_DATA_ROOT=str(data_root),
               STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    log = open(log_path, "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"), "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port), "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with code {proc.returncode} before it answered")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url}/_stcore/health did not answer within {timeout:.0f} s")


def _rerun_msg(page: str, query: str) -> bytes:
    from streamlit.proto.BackMsg_pb2 import BackMsg

    m = BackMsg()
    m.rerun_script.query_string = query
    m.rerun_script.page_name = "" if page == DEFAULT_PAGE else page
    m.rerun_script.page_script_hash = ""
    return m.SerializeToString()


async def _load_page(ws, page: str, query: str, timeout: float) -> dict:
    """Ask for one page run; read messages until it finishes. Returns timing and what came back."""
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    t0 = time.perf_counter()
    await ws.send(_rerun_msg(page, query))
    n_msgs, n_bytes, errors = 0, 0, []
    while True:
        left = timeout - (time.perf_counter() - t0)
        if left <= 0:
            return {"page": page, "seconds": time.perf_counter() - t0, "ok": False, "error": "timeout",
                    "messages": n_msgs, "bytes": n_bytes}
        try:
            raw = await asyncio.wait_for(ws.recv(), timeout=left)
        except asyncio.TimeoutError:
            continue
        n_msgs += 1
        n_bytes += len(raw)
        msg = ForwardMsg.FromString(raw)
        kind = msg.WhichOneof("type")
        if kind == "delta" and msg.delta.WhichOneof("type") == "new_element":
            el = msg.delta.new_element
            if el.WhichOneof("type") == "exception":
                errors.append(f"{el.exception.type}: {el.exception.message[:200]}")
        elif kind == "page_not_found":
            errors.append(f"page not found: {page}")
        elif kind == "script_finished":
            status = msg.script_finished
            if status == ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                continue  # the page asked for a rerun (e.g. after picking the run); keep reading
            dt = time.perf_counter() - t0
            ok = status == ForwardMsg.FINISHED_SUCCESSFULLY and not errors
            return {"page": page, "seconds": dt, "ok": ok, "error": "; ".join(errors) or None,
                    "messages": n_msgs, "bytes": n_bytes}


async def _session(i: int, url: str, run: str, rounds: int, think: tuple[float, float], timeout: float,
                   seed: int, t_start: float) -> list[dict]:
    import websockets

    rng = random.Random(seed * 1000 + i)
    out: list[dict] = []
    await asyncio.sleep(rng.uniform(0, max(think[1], 0.2)))  # sessions arrive spread over the first think time
    t0 = time.perf_counter()
    html = await asyncio.to_thread(lambda: urllib.request.urlopen(url + "/", timeout=timeout).read())
    html_s = time.perf_counter() - t0
    ws_url = url.replace("http://", "ws://") + "/_stcore/stream"
    async with websockets.connect(ws_url, subprotocols=["streamlit"], max_size=None, open_timeout=timeout,
                                  ping_interval=None) as ws:
        query = f"run={run}" if run else ""
        for r in range(rounds):
            for page in PAGES:
                res = await _load_page(ws, page, query, timeout)
                res.update(session=i, round=r, at=time.perf_counter() - t_start)
                if r == 0 and page == PAGES[0]:
                    res["html_seconds"] = html_s
                    res["html_bytes"] = len(html)
                    res["first_load_seconds"] = html_s + res["seconds"]
                out.append(res)
                if think[1] > 0:
                    await asyncio.sleep(rng.uniform(*think))
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[k]


def summarise(results: list[dict]) -> dict:
    by_page: dict[str, dict] = {}
    for page in PAGES + ["all"]:
        rs = [r for r in results if page == "all" or r["page"] == page]
        secs = [r["seconds"] for r in rs]
        if not secs:
            continue
        by_page[page] = {"loads": len(secs), "median_s": statistics.median(secs), "p95_s": _pct(secs, 0.95),
                         "max_s": max(secs), "failures": sum(not r["ok"] for r in rs),
                         "mean_kb": statistics.mean(r["bytes"] for r in rs) / 1024}
    first = [r["first_load_seconds"] for r in results if "first_load_seconds" in r]
    return {"pages": by_page,
            "first_load": {"median_s": statistics.median(first), "max_s": max(first)} if first else {},
            "errors": sorted({r["error"] for r in results if r["error"]})[:10]}


async def _run_all(url: str, run: str, sessions: int, rounds: int, think: tuple[float, float], timeout: float,
                   seed: int) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    per = await asyncio.gather(*[_session(i, url, run, rounds, think, timeout, seed, t0) for i in range(sessions)])
    return [r for rs in per for r in rs], time.perf_counter() - t0


def run_load_test(url: str, run: str, sessions: int = 20, rounds: int = 3, think: tuple[float, float] = (1.0, 3.0),
                  timeout: float = 60.0, seed: int = 0) -> dict:
    """Drive ``sessions`` concurrent clients against a served dashboard; returns the summary dict."""
    results, wall = asyncio.run(_run_all(url, run, sessions, rounds, think, timeout, seed))
    summary = summarise(results)
    summary.update(sessions=sessions, rounds=rounds, think=list(think), wall_s=wall, loads=len(results))
    return summary


def _print(summary: dict) -> None:
    print(f"{summary['sessions']} sessions x {summary['rounds']} rounds x {len(PAGES)} pages = {summary['loads']} page loads "
          f"in {summary['wall_s']:.1f} s (think time {summary['think'][0]:g}-{summary['think'][1]:g} s)")
    print(f"{'page':<10} {'loads':>6} {'median s':>9} {'p95 s':>7} {'max s':>7} {'fail':>5} {'KiB':>8}")
    for page, s in summary["pages"].items():
        print(f"{page:<10} {s['loads']:>6} {s['median_s']:>9.3f} {s['p95_s']:>7.3f} {s['max_s']:>7.3f} "
              f"{s['failures']:>5} {s['mean_kb']:>8.1f}")
    if summary.get("first_load"):
        fl = summary["first_load"]
        print(f"first load (HTML + first page): median {fl['median_s']:.3f} s, max {fl['max_s']:.3f} s")
    for e in summary["errors"]:
        print("error:", e)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-root", help="runs folder for the dashboard it starts (CGD_RUNS_ROOT)")
    p.add_argument("--data-root", default=None, help="data folder for the dashboard it starts (default: runs root)")
    p.add_argument("--run", default="", help="run folder name under the runs root, opened with ?run=NAME")
    p.add_argument("--url", default=None, help="an already served dashboard (default: start one on a free port)")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--think", default="1,3", help="LO,HI seconds of random pause between page loads; 0 = none")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a page load counts as failed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    think = tuple(float(x) for x in a.think.split(",")) if a.think != "0" else (0.0, 0.0)
    if len(think) != 2 or think[0] > think[1]:
        p.error("--think takes LO,HI with LO <= HI, or 0")
    proc = None
    if a.url is None:
        if not a.runs_root:
            p.error("give --runs-root (to start a dashboard) or --url (to use a served one)")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        results_dir = Path(a.results)
        results_dir.mkdir(parents=True, exist_ok=True)
        runs_root = Path(a.runs_root).resolve()
        proc = start_server(runs_root, Path(a.data_root or runs_root).resolve(), port, results_dir / "dashboard_load.server.log")
    else:
        url = a.url.rstrip("/")
    try:
        wait_healthy(url, proc=proc)
        # one warm-up load (imports, first reads of the run's arrays) before the clock starts
        run_load_test(url, a.run, sessions=1, rounds=1, think=(0.0, 0.0), timeout=a.timeout * 3, seed=a.seed)
        summary = run_load_test(url, a.run, a.sessions, a.rounds, think, a.timeout, a.seed)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    _print(summary)
    sys.path.insert(0, str(ROOT / "bench"))
    import common  # the speed benchmarks' helpers: hardware facts, versions, result lines
    import torch

    record = {"hardware": common.hardware(torch.device("cpu")), "versions": common.versions(),
              "settings": {k: v for k, v in vars(a).items()}, **summary}
    common.append_result("dashboard_load", record, a.results)
    return 0 if all(s["failures"] == 0 for s in summary["pages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
