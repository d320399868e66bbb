"""Job bookkeeping under failure: a full disk at the end of a job, two starts at the same moment,
and a job.json that names another process group. Real processes, real files, a real full disk
(a tiny tmpfs in a private mount namespace) where the machine allows one."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cgd import jobs
from cgd.runs import RunDir, RunLockedError, write_json

ROOT = Path(__file__).resolve().parents[1]


def _wait_inactive(run: Path, timeout: float = 60.0) -> jobs.JobStatus:
    return jobs.wait_job(run, timeout, poll_s=0.1)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------------------------
# 1a: a full disk late in a job
# ------------------------------------------------------------------------------------------------

# a step that reports "running", then fails the way a job does on a full disk
_STEP = ("import sys; from cgd.runs import RunDir; "
         "RunDir(sys.argv[1]).write_status('running', 'retrain', 0.5, rate=12.5, unit='epoch', eta_s=30.0); "
         "print('OSError: [Errno 28] No space left on device', flush=True); sys.exit(1)")


def _writer_module():
    """The module whose atomic_write_bytes every JSON write of cgd goes through."""
    return sys.modules[jobs.write_json.__module__]


def test_failure_is_recorded_when_the_atomic_write_hits_a_full_disk(tmp_path, monkeypatch):
    """The runner's failure record falls back to an in-place overwrite when writing a temp file
    fails with ENOSPC; job.json still gets the exit status; no temp file is left behind."""
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    write_json(run.path(jobs.JOB_NAME), {"label": "retraining", "pid": os.getpid(), "started": "2000-01-01T00:00:00+00:00",
                                         "argv": [["python", "-m", "cgd", "retrain"]] * 3, "phase": "starting"})
    real = _writer_module().atomic_write_bytes

    def full_disk(path, data):
        path = Path(path)
        if path.parent == run.root:  # only the run folder is "full"
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_bytes(data[:7])  # what a writer manages before ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return real(path, data)

    monkeypatch.setattr(_writer_module(), "atomic_write_bytes", full_disk)
    rc = jobs._run_chain(str(run.root), [[sys.executable, "-c", _STEP, str(run.root)]])
    assert rc == 1
    st = json.loads(run.status_json.read_text())
    assert st["state"] == "failed" and st["stage"] == "retrain" and "exited with status 1" in st["error"]
    job = json.loads(run.path(jobs.JOB_NAME).read_text())
    assert job["returncode"] == 1 and job["label"] == "retraining"
    assert not list(run.root.glob(".*.tmp*"))


def test_status_is_emptied_when_nothing_fits(tmp_path, monkeypatch):
    """When even the in-place record cannot be written, status.json is cut to nothing rather than
    left saying "running"; the reader then shows the dead job as died."""

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    write_json(run.path(jobs.JOB_NAME), {"label": "scoring", "pid": _dead_pid(), "started": "2000-01-01T00:00:00+00:00"})
    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_writer_module(), "atomic_write_bytes", full_disk)
    monkeypatch.setattr(jobs, "_overwrite_in_place", lambda *a, **k: False)
    assert jobs._run_chain(str(run.root), [[sys.executable, "-c", _STEP, str(run.root)]]) == 1
    assert run.status_json.read_bytes() == b""
    s = jobs.job_status(run)
    assert s.state == "died" and not s.active


def test_dead_job_whose_status_says_running_reads_as_died(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    write_json(run.path(jobs.JOB_NAME), {"label": "scoring", "pid": _dead_pid(), "started": "2000-01-01T00:00:00+00:00"})
    run.write_status("running", "reference", 0.4)
    s = jobs.job_status(run)
    assert s.state == "died" and not s.active


_FULL_DISK_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from pathlib import Path
    mnt = Path(sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    from cgd import jobs
    run = mnt / "run"
    fill = ("import sys; from cgd.runs import RunDir; "
            "RunDir(sys.argv[1]).write_status('running', 'retrain', 0.5, rate=1.0, unit='epoch', eta_s=9.0)\\n"
            "f = open(sys.argv[2], 'wb')\\n"
            "try:\\n"
            "    while True: f.write(b'x' * 4096); f.flush()\\n"
            "except OSError as e: print('step:', e, file=sys.stderr); sys.exit(1)")
    jobs.start_job(run, "status", pre=[[sys.executable, "-c", fill, str(run), str(mnt / "filler")]], label="demo job")
    t0 = time.time()
    while jobs.job_status(run).active and time.time() - t0 < 60:
        time.sleep(0.1)
    s = jobs.job_status(run)
    print(json.dumps({"raw": (run / "status.json").read_text(), "state": s.state, "error": s.error,
                      "job": json.loads((run / "job.json").read_text()), "avail": os.statvfs(mnt).f_bavail}))
""")


def test_real_full_disk_leaves_a_failed_status(tmp_path):
    """A real job on a real full filesystem (a 256 KiB tmpfs, mounted in a private mount namespace
    of a child process: nothing outside it sees the mount): the step fills the disk and fails, and
    status.json still ends as "failed" with the reason."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged mount namespaces on this machine (unshare -rm)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["unshare", "-rm", sys.executable, "-c", _FULL_DISK_SCRIPT, str(mnt)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    if "mount" in r.stderr and r.returncode != 0 and "Traceback" in r.stderr and "tmpfs" in r.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["avail"] == 0  # the disk really was full
    raw = json.loads(out["raw"])
    assert raw["state"] == "failed" and "exited with status 1" in raw["error"], out
    assert out["state"] == "failed" and out["job"]["returncode"] == 1, out


# ------------------------------------------------------------------------------------------------
# 1b: two starts at the same moment
# ------------------------------------------------------------------------------------------------

def test_two_simultaneous_starts_spawn_one_job_and_job_json_names_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_write_config = jobs.write_config

    def slow_write_config(*a, **k):  # widen the window between "is a job running?" and the spawn
        time.sleep(0.4)
        return real_write_config(*a, **k)

    monkeypatch.setattr(jobs, "write_config", slow_write_config)
    barrier = threading.Barrier(2)
    results: list = [None, None]

    def start(i: int) -> None:
        barrier.wait()
        try:
            results[i] = jobs.start_job(run, "status", config={"seed": i}, label=f"job {i}",
                                        pre=[[sys.executable, "-c", "import time; time.sleep(1.5)"]])
        except Exception as e:  # noqa: BLE001 - shown by the assertion below
            results[i] = e

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [r for r in results if isinstance(r, jobs.JobStatus)]
    lost = [r for r in results if isinstance(r, RunLockedError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert "busy" in str(lost[0])
    log = (run / jobs.LOG_NAME).read_text()
    assert log.count("\n=== ") == 1, log  # one job was spawned
    job = json.loads((run / jobs.JOB_NAME).read_text())
    assert job["pid"] == won[0].pid and job["label"] == won[0].command
    s = _wait_inactive(run)
    assert s.state == "done" and s.pid == won[0].pid, (s, jobs.tail_log(run))


def test_a_failed_step_leaves_another_jobs_status_alone(tmp_path):
    """A job step that failed because another process holds the run folder (a job started from
    the command line in between) must not write "failed" over that job's status."""
    run = RunDir(tmp_path / "run")
    with run.lock():
        run.write_status("running", "reference", 0.3)
        before = run.status_json.read_text()
        assert jobs._run_chain(str(run.root), [[sys.executable, "-c", "import sys; sys.exit(2)"]]) == 2
        assert run.status_json.read_text() == before


# ------------------------------------------------------------------------------------------------
# 1c: stop_job signals only the job
# ------------------------------------------------------------------------------------------------

def _runner(run: Path, new_session: bool) -> subprocess.Popen:
    """A real job runner (python -m cgd.jobs) whose one step sleeps."""
    spec = json.dumps({"run": str(run), "argvs": [["sleep", "60"]]})
    return subprocess.Popen([sys.executable, "-m", "cgd.jobs", spec], start_new_session=new_session, cwd=ROOT,
                            stdout=subprocess.DEVNULL)


def _wait_runner_up(p: subprocess.Popen) -> None:
    if not Path(f"/proc/{p.pid}/task/{p.pid}/children").exists():
        time.sleep(1.0)
        return
    t0 = time.time()
    while time.time() - t0 < 30:
        kids = Path(f"/proc/{p.pid}/task/{p.pid}/children")
        if kids.exists() and kids.read_text().strip():
            return
        time.sleep(0.05)


def test_stop_does_not_signal_a_process_group_named_only_in_job_json(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)  # another live process group
    job = _runner(run, new_session=True)
    try:
        _wait_runner_up(job)
        write_json(run / jobs.JOB_NAME, {"label": "edited", "pid": job.pid, "pgid": victim.pid,
                                         "proc_start": jobs._proc_start(job.pid), "started": jobs.utcnow()})
        msg = jobs.stop_job(run, grace_s=0.3, kill_after_s=3.0)
        assert "terminated" in msg or "killed" in msg
        time.sleep(0.2)
        assert victim.poll() is None, "stop_job signalled the process group named in job.json"
        assert job.wait(10) is not None  # the job itself (and its group) was stopped
    finally:
        for p in (victim, job):
            if p.poll() is None:
                p.kill()
                p.wait()


_NON_LEADER_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from pathlib import Path
    from cgd import jobs
    from cgd.runs import write_json
    run = Path(sys.argv[1])
    spec = json.dumps({"run": str(run), "argvs": [["sleep", "60"]]})
    job = subprocess.Popen([sys.executable, "-m", "cgd.jobs", spec], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # in OUR group
    time.sleep(1.0)
    kids = Path(f"/proc/{job.pid}/task/{job.pid}/children")
    step = [int(k) for k in kids.read_text().split()] if kids.exists() else []
    write_json(run / "job.json", {"label": "edited", "pid": job.pid, "pgid": os.getpgid(0),
                                  "proc_start": jobs._proc_start(job.pid), "started": jobs.utcnow()})
    msg = jobs.stop_job(run, grace_s=0.3, kill_after_s=3.0)
    rc = job.wait(10)
    for k in step:  # the runner's step, orphaned (only the runner itself was signalled)
        try:
            os.kill(k, 9)
        except ProcessLookupError:
            pass
    print(json.dumps({"survived": True, "msg": msg, "job_rc": rc}), flush=True)
""")


def test_stop_signals_only_the_pid_when_the_job_leads_no_group(tmp_path):
    """A job pid that is not its group's leader gets signalled alone, never its group (here the
    group of the process calling stop_job, run in a session of its own so nothing else is at risk)."""
    run = tmp_path / "run"
    run.mkdir()
    r = subprocess.run([sys.executable, "-c", _NON_LEADER_SCRIPT, str(run)], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, start_new_session=True)
    assert r.stdout.strip(), f"the caller of stop_job was killed (rc {r.returncode}): {r.stderr[-2000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["survived"] and out["job_rc"] is not None


def test_stop_refuses_a_live_pid_that_is_not_a_job_runner(tmp_path):
    """job.json naming some other live process (right start time and all) stops nothing."""
    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        write_json(run / jobs.JOB_NAME, {"label": "edited", "pid": other.pid, "pgid": other.pid,
                                         "proc_start": jobs._proc_start(other.pid), "started": jobs.utcnow()})
        assert jobs.stop_job(run, grace_s=0.2, kill_after_s=0.5) == "no job is running on this run folder"
        time.sleep(0.2)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
