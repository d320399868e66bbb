"""`cgd dashboard` / cgd.serve: the repository's Streamlit settings wherever the server is started
from, loopback unless --allow-remote, and the dashboard's own check of the settings in force."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from cgd import serve

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".streamlit" / "config.toml"


def _config_keys() -> dict[str, object]:
    with open(CONFIG, "rb") as f:
        doc = tomllib.load(f)
    return {f"{section}.{k}": v for section, table in doc.items() for k, v in table.items()}


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))


# ------------------------------------------------------------------------------------------------
# streamlit_args
# ------------------------------------------------------------------------------------------------

def test_streamlit_args_pass_every_setting_of_the_config_file_and_the_host():
    argv = serve.streamlit_args("127.0.0.1", 8642)
    assert argv[1:4] == ["-m", "streamlit", "run"]
    assert Path(argv[4]).is_absolute() and Path(argv[4]) == ROOT / "dashboard" / "app.py" and Path(argv[4]).is_file()
    flags = _flags(argv)
    want = _config_keys()
    assert want and set(want) <= set(flags), set(want) - set(flags)
    assert flags["server.address"] == "127.0.0.1" and flags["server.port"] == "8642"  # forced over the file's
    for key, value in want.items():
        if key != "server.address":
            assert flags[key] == (str(value).lower() if isinstance(value, bool) else str(value)), key
    assert flags["server.enableXsrfProtection"] == "true" and flags["browser.gatherUsageStats"] == "false"


def test_every_flag_is_a_streamlit_option_and_the_file_is_read_at_each_call(tmp_path):
    from streamlit import config

    known = config.get_config_options()
    flags = _flags(serve.streamlit_args())
    assert set(flags) <= set(known), set(flags) - set(known)
    assert flags["server.address"] == "127.0.0.1"
    other = tmp_path / "config.toml"
    other.write_text('[server]\naddress = "0.0.0.0"\nmaxUploadSize = 5\n[theme.sidebar]\nprimaryColor = "#000000"\n')
    flags = _flags(serve.streamlit_args("::1", config=other))
    assert flags == {"server.address": "::1", "server.maxUploadSize": "5", "theme.sidebar.primaryColor": "#000000",
                     "server.port": "8501"}
    other.write_text("[server\n")
    with pytest.raises(ValueError, match="config.toml: not valid TOML"):
        serve.streamlit_args(config=other)


# ------------------------------------------------------------------------------------------------
# main / python -m cgd.serve
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "192.168.1.20", "dashboard.example.org"])
def test_main_refuses_a_non_loopback_host_without_allow_remote(host, capsys):
    assert serve.main(["--host", host, "--print-command"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing" in err and "--allow-remote" in err and "127.0.0.1" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_main_accepts_loopback_and_prints_the_command(host, capsys, monkeypatch):
    monkeypatch.delenv("CGD_DATA_ROOT", raising=False)
    monkeypatch.setenv("CGD_RUNS_ROOT", "some/runs")  # relative to the caller's folder: made absolute
    assert serve.main(["--host", host, "--port", "8765", "--print-command"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cd {ROOT} && env ")
    assert f"CGD_DATA_ROOT={ROOT / 'data'}" in out and f"CGD_RUNS_ROOT={Path('some/runs').resolve()}" in out
    assert f"--server.address={host}" in out and "--server.port=8765" in out and "CGD_ALLOW_REMOTE" not in out


def test_main_with_allow_remote_serves_anywhere_and_tells_the_app(capsys):
    assert serve.main(["--host", "0.0.0.0", "--allow-remote", "--print-command"]) == 0
    out = capsys.readouterr().out
    assert "--server.address=0.0.0.0" in out and "CGD_ALLOW_REMOTE=1" in out


def test_main_refuses_a_bad_port(capsys):
    assert serve.main(["--port", "70000", "--print-command"]) == 2
    assert "not a port" in capsys.readouterr().err


def test_python_m_cgd_serve_from_another_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CGD_")}
    r = subprocess.run([sys.executable, "-m", "cgd.serve", "--host", "0.0.0.0"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "cgd.serve", "--print-command"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--server.address=127.0.0.1" in r.stdout and str(ROOT / "dashboard" / "app.py") in r.stdout
    assert f"CGD_DATA_ROOT={ROOT / 'data'}" in r.stdout


# ------------------------------------------------------------------------------------------------
# check_server_settings: the settings Streamlit really uses
# ------------------------------------------------------------------------------------------------

_KEYS = ("server.address", "server.enableXsrfProtection", "browser.gatherUsageStats", "server.maxUploadSize")


@pytest.fixture
def st_config():
    """streamlit.config with the options this test changes put back afterwards."""
    from streamlit import config

    saved = {k: config.get_option(k) for k in _KEYS}
    yield config
    for k, v in saved.items():
        config.set_option(k, v)


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1", "::1"])
def test_check_server_settings_accepts_loopback(st_config, address, monkeypatch):
    monkeypatch.delenv("CGD_ALLOW_REMOTE", raising=False)
    st_config.set_option("server.address", address)
    assert serve.check_server_settings() is None


@pytest.mark.parametrize("address", ["0.0.0.0", "", None, "10.1.2.3"])
def test_check_server_settings_refuses_other_addresses(st_config, address, monkeypatch):
    monkeypatch.delenv("CGD_ALLOW_REMOTE", raising=False)
    st_config.set_option("server.address", address)
    msg = serve.check_server_settings()
    assert msg and "cgd dashboard" in msg and "CGD_ALLOW_REMOTE" in msg
    assert ("every network interface" in msg) == (not address)
    monkeypatch.setenv("CGD_ALLOW_REMOTE", "1")
    assert serve.check_server_settings() is None


def test_server_settings_warnings(st_config):
    for k, v in (("server.enableXsrfProtection", True), ("browser.gatherUsageStats", False), ("server.maxUploadSize", 200)):
        st_config.set_option(k, v)
    assert serve.server_settings_warnings() == []
    st_config.set_option("server.enableXsrfProtection", False)
    st_config.set_option("browser.gatherUsageStats", True)
    st_config.set_option("server.maxUploadSize", 4096)
    w = serve.server_settings_warnings()
    assert len(w) == 3 and "XSRF" in w[0] and "usage statistics" in w[1] and "4096 MB" in w[2]


def test_cgd_serve_does_not_import_streamlit():
    code = "import sys, cgd.serve; cgd.serve.streamlit_args(); print('streamlit' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


# ------------------------------------------------------------------------------------------------
# a real server
# ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback, or None."""
    cands = set()
    try:
        cands |= {ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the address of the default route (no packet sent)
        try:
            s.connect(("192.0.2.1", 9))
            cands.add(s.getsockname()[0])
        except OSError:
            pass
    cands = [a for a in cands if not serve.is_loopback(a) and a != "0.0.0.0"]
    return sorted(cands)[0] if cands else None


def test_real_server_from_another_folder_listens_on_loopback_only(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CGD_")}
    env["HOME"] = str(tmp_path)  # no ~/.streamlit of this machine's user
    p = subprocess.Popen([sys.executable, "-m", "cgd.serve", "--port", str(port)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0, ok = time.time(), False
        while time.time() - t0 < 60 and p.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as resp:
                    ok = resp.status == 200 and resp.read().strip() == b"ok"
                    break
            except OSError:
                time.sleep(0.3)
        assert ok, (p.poll(), p.stdout.read().decode() if p.poll() is not None else "")
        # the server is this very process (exec), in the repository root, with absolute data roots
        assert Path(os.readlink(f"/proc/{p.pid}/cwd")) == ROOT
        environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{p.pid}/environ").read_bytes().decode().split("\0") if "=" in kv)
        assert environ["CGD_DATA_ROOT"] == str(ROOT / "data") and environ["CGD_RUNS_ROOT"] == str(ROOT / "runs")
        cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes().decode().split("\0")
        assert "--server.address=127.0.0.1" in cmdline and "--browser.gatherUsageStats=false" in cmdline
        other = _non_loopback_address()
        if other:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
    finally:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_cgd_dashboard_passes_its_flags_through(capsys):
    """`cgd dashboard --port N --print-command` reaches the dashboard's own parser (argparse's
    REMAINDER used to hand the flags to the top-level parser: 'unrecognized arguments')."""
    from cgd.cli import main

    assert main(["dashboard", "--port", "8765", "--print-command"]) == 0
    out = capsys.readouterr().out
    assert "--server.port=8765" in out and "--server.address=127.0.0.1" in out
    assert main(["dashboard", "--host", "0.0.0.0"]) == 2
    assert "refusing to serve" in capsys.readouterr().err
    assert main(["cache", "ls"]) == 0
