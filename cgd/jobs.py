"""Background jobs on a run folder: ``cgd`` CLI commands run detached, so they outlive the caller.

The dashboard starts every long step (scoring, suspicious-model training, UMAP, retraining) here:

>>> from cgd import jobs
>>> jobs.start_job("runs/demo", "separate", config={"sigma1": 0.2})   # python -m cgd separate --out runs/demo --quiet
>>> jobs.job_status("runs/demo").state                                  # starting | running | done | failed | stopped | died | idle
>>> jobs.stop_job("runs/demo")                                          # STOP file, then SIGTERM to the job's process group

A job is ``python -m cgd COMMAND --out RUN --quiet`` (optionally preceded by setup commands, for
example training the demo's reference classifier), started in a new session (its own process
group) with stdout and stderr appended to ``RUN/job.log``. ``RUN/job.json`` records the pid, its
start time (to tell it from a reused pid), the commands and when it started. Progress and results
are what the pipeline writes into the run folder (``status.json``, ``metrics.csv``, ...), so any
number of readers (page reruns, a refreshed browser, another tab) can follow one job.

Only one job runs on a run folder at a time: :func:`start_job` raises
:class:`~cgd.runs.RunLockedError` while the folder's lock is held or a job it started is alive.
Starting is serialised by ``RUN/.job.lock`` (an flock held around check, spawn and the write of
``job.json``), so of two starts at the same moment exactly one spawns and ``job.json`` names it.
:func:`stop_job` signals only the recorded pid while it still has its recorded start time, and a
process group only when the OS says that pid leads it (never a group number read from a file).
The runner records a failure even on a full disk: when the atomic write of ``status.json`` fails it
overwrites the file in place within the space it already holds.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .runs import RunDir, RunLockedError, read_json, utcnow, write_json

__all__ = ["WEB_JOB_ENV", "JobStatus", "wait_job", "progress_fraction", "progress_text", "start_job", "write_config", "job_status", "stop_job", "is_running", "tail_log", "cgd_command",
           "LOG_NAME", "JOB_NAME", "ACTIVE_STATES"]

LOG_NAME = "job.log"
JOB_NAME = "job.json"
START_LOCK_NAME = ".job.lock"  # held by start_job around check-and-spawn
ACTIVE_STATES = ("starting", "running")
# "1" in the environment of the jobs the dashboard starts: their reference may come only from the data,
# runs and cache folders, and hub (hf-hub:) or folder (local-dir:) model names are refused (cgd.pipeline)
WEB_JOB_ENV = "CGD_WEB_JOB"
_CHILDREN: dict[int, subprocess.Popen] = {}  # jobs this process started: polled to reap them and read exit codes


def _as_run(run: str | os.PathLike | RunDir) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir(Path(run))


_NO_QUIET = ("export", "status", "stop")  # cgd subcommands without a --quiet flag


def cgd_command(command: str, run: str | os.PathLike | RunDir, *args: str, python: str | None = None) -> list[str]:
    """``[python, -m, cgd, command, --out, RUN, --quiet, *args]`` with RUN made absolute."""
    root = _as_run(run).root.resolve()
    quiet = [] if command in _NO_QUIET else ["--quiet"]
    return [python or sys.executable, "-m", "cgd", command, "--out", str(root), *quiet, *args]


# ------------------------------------------------------------------------------------------------
# Process facts
# ------------------------------------------------------------------------------------------------

def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell it from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2:].split()
    return rest[19] if len(rest) > 19 else None


def _alive(pid: int | None, start: str | None = None) -> bool:
    """True while ``pid`` runs (not a zombie) and, when given, still has start time ``start``."""
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    proc = Path(f"/proc/{pid}/stat")
    if proc.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            stat = proc.read_text()
        except OSError:
            return False
        rest = stat[stat.rfind(")") + 2:].split()
        if rest and rest[0] in ("Z", "X"):
            return False
        return start is None or (len(rest) > 19 and rest[19] == start)
    try:  # no /proc: signal 0 tells whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_holder_pid(run: RunDir) -> int | None:
    try:
        txt = run.path(".lock").read_text().strip()
    except OSError:
        return None
    parts = txt.split()
    return int(parts[1]) if len(parts) == 2 and parts[0] == "pid" and parts[1].isdigit() else None


def _is_runner(pid: int) -> bool:
    """True when ``pid`` runs this module's job runner (``python -m cgd.jobs``); True without /proc."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return False
    return b"cgd.jobs" in argv


def _has_open(pid: int, path: Path) -> bool:
    """True when ``pid`` has ``path`` open (the run's lock holder does); True without /proc."""
    fd_dir = Path(f"/proc/{pid}/fd")
    if not Path("/proc/self/fd").is_dir():
        return True
    target = str(path.resolve())
    try:
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd) == target:
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def _led_group(pid: int | None, start: str | None) -> int | None:
    """The process group that ``pid`` leads, as the OS reports it, while ``pid`` runs with start
    time ``start``; None when it is gone, is another process, or is not its group's leader (then
    only the pid itself may be signalled). Never trusts a group number from a file."""
    if not pid or not _alive(pid, start):
        return None
    try:
        pgid = os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None
    return pgid if pgid == pid else None


def _signal_job(pid: int, start: str | None, sig: int, group: bool) -> None:
    """Send ``sig`` to job ``pid`` (checked to still be the process started at ``start``): to the
    group it leads when ``group`` and the OS confirms it leads one, else to the pid alone."""
    if not _alive(pid, start):
        return
    pgid = _led_group(pid, start) if group else None
    try:
        if pgid:
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------
# Status
# ------------------------------------------------------------------------------------------------

@dataclass
class JobStatus:
    """What a reader needs to draw a job: state, stage progress, speed, ETA, errors.

    state: ``idle`` (never ran), ``starting`` (process up, pipeline not reporting yet), ``running``,
    ``done``, ``failed``, ``stopped``, ``died`` (process gone without a final status: killed or
    crashed; see the log). progress: fraction in [0, 1] of the current stage. rate: items per
    second (``unit`` = img, epoch, ...). eta_s: seconds left in the current stage, or None.
    """

    state: str = "idle"
    stage: str = ""
    progress: float = 0.0
    rate: float | None = None
    unit: str = ""
    eta_s: float | None = None
    elapsed_s: float | None = None
    done: int | None = None
    total: int | None = None
    error: str | None = None
    message: str | None = None
    command: str = ""
    pid: int | None = None
    started: str | None = None
    updated_at: str | None = None
    returncode: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def is_running(run: str | os.PathLike | RunDir) -> bool:
    """True while a job started by :func:`start_job` is alive or any process holds the run's lock."""
    r = _as_run(run)
    job = read_json(r.path(JOB_NAME), {}) or {}
    return _alive(job.get("pid"), job.get("proc_start")) or r.is_locked()


def job_status(run: str | os.PathLike | RunDir) -> JobStatus:
    """The state of the latest job on ``run``, from job.json, status.json and the process table."""
    r = _as_run(run)
    try:
        job = read_json(r.path(JOB_NAME), {}) or {}
    except ValueError:
        job = {}
    st = r.read_status()
    pid = job.get("pid")
    alive = _alive(pid, job.get("proc_start"))
    child = _CHILDREN.get(pid) if pid else None
    rc = child.returncode if child is not None else job.get("returncode")
    known = {"state", "stage", "progress", "rate", "unit", "eta_s", "elapsed_s", "done", "total", "error", "message",
             "updated_at", "pid"}
    out = JobStatus(stage=st.get("stage", ""), progress=float(st.get("progress") or 0.0), rate=st.get("rate"),
                    unit=st.get("unit", ""), eta_s=st.get("eta_s"), elapsed_s=st.get("elapsed_s"), done=st.get("done"),
                    total=st.get("total"), error=st.get("error"), message=st.get("message"),
                    command=job.get("label", ""), pid=pid, started=job.get("started"), updated_at=st.get("updated_at"),
                    returncode=rc, extra={k: v for k, v in st.items() if k not in known})
    state = st.get("state")
    fresh = bool(st) and (not job.get("started") or (st.get("updated_at") or "") >= job["started"])
    if alive:
        out.state = "running" if fresh and state in ("running", "done", "failed", "stopped") else "starting"
        if out.state == "starting":
            out.stage, out.progress, out.rate, out.eta_s, out.error = job.get("phase", ""), 0.0, None, None, None
    elif state in ("done", "failed", "stopped") and fresh:
        out.state = state
        if state == "done" and rc not in (None, 0):  # a later step of the job failed
            out.state, out.error = "failed", out.error or f"a step exited with status {rc}; see job.log"
    elif job and rc == 0:
        out.state = "done"  # a job whose commands write no status (e.g. cgd export)
    elif job:
        out.state = "died" if (state in ("running", "queued") or not fresh) else (state or "died")
        if out.state == "died":
            last = [ln for ln in tail_log(r, 40).splitlines() if ln.strip()]
            errs = [ln for ln in last if ln.startswith("cgd: error:") or "Error" in ln]
            out.error = (errs[-1] if errs else (last[-1] if last else "the job ended without reporting a result"))
    elif state in ("running", "queued") and r.is_locked():
        out.state = "running"  # a job started outside the dashboard (cgd CLI)
    elif state:
        out.state = state if state in ("done", "failed", "stopped") else "idle"
    return out


def progress_fraction(s: JobStatus) -> float | None:
    """The current stage's progress in [0, 1], or None when the stage reports none (a job that has
    not reported yet, or a step such as UMAP that gives no progress): show elapsed time instead of 0 %."""
    if s.state == "starting" or (not s.total and s.progress <= 0.0):
        return None
    return min(max(float(s.progress), 0.0), 1.0)


def _elapsed(s: JobStatus) -> float | None:
    if s.elapsed_s is not None and s.state == "running" and s.total:
        return float(s.elapsed_s)
    if not s.started:
        return None
    from datetime import datetime, timezone

    try:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(s.started)).total_seconds()
    except ValueError:
        return None


def _duration(sec: float) -> str:
    sec = int(round(max(sec, 0.0)))
    h, rem = divmod(sec, 3600)
    m, x = divmod(rem, 60)
    return f"{h}:{m:02d}:{x:02d}" if h else f"{m}:{x:02d}"


def progress_text(s: JobStatus) -> str:
    """One line for a progress bar: stage, done / total, percent, rate, ETA -- or, where the stage
    reports no progress, the time elapsed (never a frozen "0 %")."""
    frac = progress_fraction(s)
    parts = [s.stage or s.state or "starting"]
    if frac is None:
        el = _elapsed(s)
        parts.append(f"{_duration(el)} elapsed" if el is not None else "working")
        if s.state == "running":
            parts.append("no progress reported by this step")
        return " · ".join(parts)
    if s.total:
        parts.append(f"{s.done or 0:,} / {s.total:,} {s.unit or ''}".strip())
    parts.append(f"{100 * frac:.0f} %")
    if s.rate:
        unit = {"img": "images"}.get(s.unit, s.unit or "items")
        if s.rate >= 100:
            parts.append(f"{s.rate:,.0f} {unit}/s")
        elif s.rate >= 1:
            parts.append(f"{s.rate:,.1f} {unit}/s")
        else:
            parts.append(f"{1 / s.rate:,.1f} s per {s.unit or 'item'}")
    if s.eta_s is not None:
        parts.append(f"ETA {_duration(s.eta_s)}")
    return " · ".join(parts)


def wait_job(run: str | os.PathLike | RunDir, timeout: float, poll_s: float = 1.0) -> JobStatus:
    """Block until the run's job is no longer active; return its final status. Raises TimeoutError
    (with the job's state and the end of its log) when it is still active after ``timeout`` seconds."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        s = job_status(run)
        if not s.active:
            return s
        time.sleep(poll_s)
    raise TimeoutError(f"job on {_as_run(run).root} still {job_status(run).state} after {timeout:.0f} s:\n{tail_log(run, 40)}")


def tail_log(run: str | os.PathLike | RunDir, lines: int = 30) -> str:
    """The last ``lines`` lines of ``RUN/job.log`` ('' when absent)."""
    p = _as_run(run).path(LOG_NAME)
    if not p.is_file():
        return ""
    with open(p, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64 * 1024))
        data = f.read().decode("utf-8", errors="replace")
    return "\n".join(data.splitlines()[-lines:])


# ------------------------------------------------------------------------------------------------
# Start / stop
# ------------------------------------------------------------------------------------------------

def write_config(run: str | os.PathLike | RunDir, config: dict[str, Any]) -> dict:
    """Write ``config`` (RunConfig fields) over the run's recorded config in ``run.json`` and return
    the merged config; the CLI reads it as its base. Creates the run folder when absent."""
    run = _as_run(run)
    run.root.mkdir(parents=True, exist_ok=True)
    from .pipeline import RunConfig

    info = run.read_run()
    base = info.get("config") or {}
    names = set(RunConfig().to_dict())
    unknown = set(config) - names
    if unknown:
        raise ValueError(f"unknown run settings {sorted(unknown)}; expected RunConfig fields")
    merged = RunConfig.from_dict({**RunConfig().to_dict(), **base, **config, "out": str(run.root.resolve())}).to_dict()
    if not info:
        info = {"created": utcnow(), "format": "cgd-run-1"}
    info["config"] = merged
    write_json(run.run_json, info)
    return merged


def start_job(run: str | os.PathLike | RunDir, command: str, config: dict[str, Any] | None = None,
              args: Sequence[str] = (), pre: Sequence[Sequence[str]] = (), label: str | None = None,
              python: str | None = None, env: dict[str, str] | None = None, phase: str | None = None) -> JobStatus:
    """Start ``cgd COMMAND --out RUN --quiet ARGS`` detached; return its first status.

    config: RunConfig fields written into ``RUN/run.json`` first (the CLI reads the recorded config
    and reuses every finished stage whose inputs did not change). pre: full argv lists run before
    the command, in order, stopping at the first failure (e.g. training a reference classifier).
    phase: what to show while the job has not reported yet (default "preparing" / "starting").
    Raises RunLockedError when a job is already running on ``run``.
    """
    r = _as_run(run)
    r.root.mkdir(parents=True, exist_ok=True)
    with _start_lock(r):  # check, spawn and job.json as one step: of two starts at once, one spawns
        return _start_locked(r, command, config, args, pre, label, python, env, phase)


@contextmanager
def _start_lock(run: RunDir, wait_s: float = 30.0) -> Iterator[None]:
    """Hold ``RUN/.job.lock`` (flock; released if this process dies) while a job is started.

    A second start waits for the first to finish spawning (a fraction of a second), then sees its
    job alive and is refused; after ``wait_s`` it gives up with RunLockedError."""
    f = open(run.path(START_LOCK_NAME), "a+")
    try:
        t_end = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > t_end:
                    raise RunLockedError(f"run folder {run.root} is busy: another job is being started on it; "
                                         "wait for it or stop it first") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    finally:
        f.close()


def _start_locked(r: RunDir, command: str, config: dict[str, Any] | None, args: Sequence[str],
                  pre: Sequence[Sequence[str]], label: str | None, python: str | None, env: dict[str, str] | None,
                  phase: str | None) -> JobStatus:
    if is_running(r):
        holder = (read_json(r.path(JOB_NAME), {}) or {}).get("label") or "another job"
        raise RunLockedError(f"run folder {r.root} is busy ({holder} is running); wait for it or stop it first")
    merged = write_config(r, config) if config else (r.read_run().get("config") or {})
    r.path("STOP").unlink(missing_ok=True)
    if command == "run" and "--data" not in args and merged.get("data"):
        args = ["--data", str(merged["data"]), *args]  # `cgd run` insists on --data even when run.json has it
    main = cgd_command(command, r, *args, python=python)
    argvs = [list(map(str, a)) for a in pre] + [main]
    # a small runner runs the steps in order and records a failing step's exit status in the run folder
    argv = [python or sys.executable, "-m", "cgd.jobs", json.dumps({"run": str(r.root.resolve()), "argvs": argvs})]
    label = label or f"cgd {command}"
    started = utcnow()
    log = open(r.path(LOG_NAME), "ab")
    log.write(f"\n=== {started} {label}: {' '.join(main)} ===\n".encode())
    log.flush()
    penv = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, env=penv, cwd=os.getcwd())
    finally:
        log.close()
    _CHILDREN[proc.pid] = proc
    write_json(r.path(JOB_NAME), {"label": label, "command": command, "argv": argvs, "pid": proc.pid,
                                  "pgid": proc.pid, "proc_start": _proc_start(proc.pid), "started": started,
                                  "phase": phase or ("preparing" if pre else "starting"), "log": LOG_NAME})
    return job_status(r)


def _wait_dead(pid: int, start: str | None, seconds: float) -> bool:
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        if not _alive(pid, start):
            return True
        time.sleep(0.1)
    return not _alive(pid, start)


def stop_job(run: str | os.PathLike | RunDir, grace_s: float = 5.0, kill_after_s: float = 5.0) -> str:
    """Stop the job on ``run``: write ``RUN/STOP`` (the pipeline checks it between batches and
    chunks), wait ``grace_s``, then SIGTERM the job's process group, then SIGKILL after
    ``kill_after_s``. Returns a one-line account of what happened."""
    r = _as_run(run)
    job = read_json(r.path(JOB_NAME), {}) or {}
    pid, start = job.get("pid"), job.get("proc_start")
    # the recorded pid is the job only while it runs the job runner and, where /proc tells start
    # times, has the recorded one
    own = bool(pid) and _alive(pid, start) and _is_runner(pid) and (start is not None or _proc_start(pid) is None)
    # the group to clean up at the end: the one the job leads as the OS says now (job.json's "pgid"
    # is informational only: an edited file must not make us signal another process group)
    group = _led_group(pid, start) if own else None
    if not own:
        pid, start = _lock_holder_pid(r), None  # a job started from the command line: that pid only
        if not (pid and r.is_locked() and _alive(pid) and _has_open(pid, r.path(".lock"))):
            return "no job is running on this run folder"
    r.path("STOP").touch()
    how = "stopped at the next checkpoint"
    if not _wait_dead(pid, start, grace_s):
        how = f"did not stop within {grace_s:.0f} s; terminated"
        _signal_job(pid, start, signal.SIGTERM, group=own)
        if not _wait_dead(pid, start, kill_after_s):
            how = "killed (did not react to SIGTERM)"
            _signal_job(pid, start, signal.SIGKILL, group=own)
            _wait_dead(pid, start, 2.0)
    # the job's children (the pipeline holding the run's lock) may take a moment longer to exit
    t_end = time.monotonic() + kill_after_s
    while r.is_locked() and time.monotonic() < t_end:
        time.sleep(0.1)
    if r.is_locked() and group:
        holder = _lock_holder_pid(r)  # kill the group only while the lock holder is verifiably in it
        try:
            if holder and _alive(holder) and os.getpgid(holder) == group:
                os.killpg(group, signal.SIGKILL)
                time.sleep(0.5)
        except (ProcessLookupError, PermissionError):
            pass
    st = r.read_status()
    if st.get("state") in ("running", "queued") or (job.get("started") and (st.get("updated_at") or "") < job["started"]):
        r.write_status("stopped", st.get("stage", ""), float(st.get("progress") or 0.0), message=f"stop requested: {how}")
    if job:
        job["stopped"] = utcnow()
        write_json(r.path(JOB_NAME), job)
    return f"job {how}"


def _last_error(run: RunDir) -> str | None:
    lines = [ln.strip() for ln in tail_log(run, 40).splitlines() if ln.strip() and not ln.startswith(("---", "==="))]
    errs = [ln for ln in lines if ln.startswith("cgd: error:") or ln.startswith("cgd ") and "error" in ln]
    return (errs or lines or [None])[-1]


def _say(msg: str) -> None:
    """A line to job.log (the runner's stdout); a full disk must not stop the bookkeeping."""
    try:
        print(msg, flush=True)
    except OSError:
        pass


def _overwrite_in_place(path: Path, obj: dict, shrink: str | None = None) -> bool:
    """Write ``obj`` as compact JSON over ``path`` without allocating: the bytes go into the space
    the file already holds (its allocated blocks), then the file is cut to length. For a full
    disk, where the atomic temp-file write fails. ``shrink`` names a string field that is cut to
    fit; returns False when the record does not fit or the write fails.

    Not atomic: a reader in between sees invalid JSON, which reads as no status."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        stt = os.fstat(fd)
        room = max(stt.st_size, stt.st_blocks * 512)
        obj = dict(obj)
        data = json.dumps(obj, separators=(",", ":"), default=str).encode()
        if len(data) > room and shrink and isinstance(obj.get(shrink), str):
            over = len(data) - room
            obj[shrink] = obj[shrink][:max(0, len(obj[shrink]) - over - 3)] + "..."
            data = json.dumps(obj, separators=(",", ":"), default=str).encode()
        if len(data) > room:
            return False
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            pos += os.pwrite(fd, view[pos:], pos)
        os.ftruncate(fd, len(data))
        try:
            os.fsync(fd)
        except OSError:
            pass
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _write_record(run: RunDir, path: Path, obj: dict, shrink: str | None = None, last_resort_empty: bool = False) -> str:
    """Write ``obj`` to ``path`` atomically; on OSError (full disk, quota) overwrite in place; as a
    last resort (``last_resort_empty``) cut the file to 0 bytes, which frees space and reads as
    "no record" (a stale "running" must not outlive the job). Returns "atomic", "in place",
    "emptied" or "failed"."""
    try:
        write_json(path, obj)
        return "atomic"
    except OSError as e:
        path.with_name(f".{path.name}.tmp{os.getpid()}").unlink(missing_ok=True)  # the partial temp file
        _say(f"--- could not write {path.name} ({e.strerror or e}); writing a small record in its place")
    if _overwrite_in_place(path, obj, shrink):
        return "in place"
    if last_resort_empty:
        try:
            os.truncate(path, 0)
            return "emptied"
        except OSError:
            pass
    return "failed"


def _run_chain(run_root: str, argvs: list[list[str]]) -> int:
    """Run each argv in turn (in the job's own process group), stopping at the first failure; a
    failing step that left no failure in status.json gets one, and job.json records the exit status.

    Robust to a full disk: every write falls back to an in-place overwrite (:func:`_write_record`),
    so status.json never keeps saying "running" after the job ended. A step that failed while
    another process holds the run's lock (it lost the folder to a job started elsewhere) leaves
    status.json alone: that status is the other job's."""
    run = RunDir(run_root)
    rc = 0
    for argv in argvs:
        _say(f"--- {' '.join(argv)}")
        started = utcnow()
        rc = subprocess.call(argv)
        if rc != 0:
            _say(f"--- exited with status {rc}; later steps skipped")
            st = run.read_status()
            reported = st.get("state") in ("failed", "stopped") and (st.get("updated_at") or "") >= started
            if not reported and run.is_locked():
                _say("--- the run folder is held by another job; its status is left alone")
            elif not reported:
                step = " ".join(a for a in argv[2:4] if not a.startswith("-")) or argv[0]
                try:
                    full = os.statvfs(run.root).f_bavail == 0
                except OSError:
                    full = False
                where = f" (the disk holding {run.root} is full)" if full else ""
                error = f"{step} exited with status {rc}{where}: {_last_error(run) or 'see job.log'}"
                record = {"state": "failed", "stage": st.get("stage", ""), "progress": float(st.get("progress") or 0.0),
                          "updated_at": utcnow(), "pid": os.getpid(), "error": error}
                _write_record(run, run.status_json, record, shrink="error", last_resort_empty=True)
            break
    try:
        job = read_json(run.path(JOB_NAME), {}) or {}
    except (OSError, ValueError):
        job = {}
    if job.get("pid") == os.getpid():
        job["returncode"] = rc
        job["finished"] = utcnow()
        _write_record(run, run.path(JOB_NAME), job)
    return rc


if __name__ == "__main__":  # python -m cgd.jobs '{"run": RUN, "argvs": [[argv...], ...]}'
    _spec = json.loads(sys.argv[1])
    sys.exit(_run_chain(_spec["run"], _spec["argvs"]))
