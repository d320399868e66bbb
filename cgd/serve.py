"""Serve the dashboard with the repository's settings, wherever it is started from.

Streamlit reads its settings from ``./.streamlit/config.toml`` of the *current* folder and from
``~/.streamlit``, so ``streamlit run /abs/path/dashboard/app.py`` started elsewhere silently drops
the repository's ``.streamlit/config.toml``: it listens on every interface, with usage statistics
on. ``cgd dashboard`` (this module's :func:`main`) passes every setting of that file as an explicit
``--section.option=value`` flag, serves on loopback unless told otherwise, and runs from the
repository root::

    cgd dashboard                          # http://127.0.0.1:8501, loopback only
    cgd dashboard --port 8600
    cgd dashboard --host 0.0.0.0 --allow-remote   # other machines may connect: put authentication in front
    cgd dashboard --print-command          # show what would run, start nothing
    python -m cgd.serve ...                # the same without the cgd entry point

:func:`check_server_settings` is the dashboard's own start-up check of the settings Streamlit
really uses, for when it was started some other way. Nothing here imports Streamlit at module
level (cgd never needs Streamlit); :func:`check_server_settings` imports ``streamlit.config`` only
when called without a getter.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["REPO_ROOT", "APP", "CONFIG", "DEFAULT_HOST", "DEFAULT_PORT", "repo_settings", "streamlit_args",
           "serve_env", "is_loopback", "check_server_settings", "server_settings_warnings", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = REPO_ROOT / "dashboard" / "app.py"
CONFIG = REPO_ROOT / ".streamlit" / "config.toml"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501
ALLOW_REMOTE_ENV = "CGD_ALLOW_REMOTE"  # "1": the dashboard may serve on a non-loopback address


def repo_settings(path: str | os.PathLike = CONFIG) -> dict[str, Any]:
    """The settings of ``.streamlit/config.toml`` as ``{"section.option": value}`` (nested tables
    such as ``[theme.sidebar]`` become ``theme.sidebar.option``). Read at every call, so the file
    stays the one source."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ModuleNotFoundError("reading .streamlit/config.toml needs Python 3.11+ or `pip install tomli`") from None
    path = Path(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: the dashboard's Streamlit settings are missing; "
                                "restore .streamlit/config.toml from the repository") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    out: dict[str, Any] = {}

    def walk(prefix: str, table: dict) -> None:
        for k, v in table.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                walk(key, v)
            elif not prefix:
                raise ValueError(f"{path}: {k!r} is outside any [section]; Streamlit settings are section.option")
            else:
                out[key] = v

    walk("", doc)
    return out


def _flag_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def streamlit_args(host: str = DEFAULT_HOST, port: int | None = None, python: str | None = None,
                   config: str | os.PathLike = CONFIG, app: str | os.PathLike = APP) -> list[str]:
    """``[python, -m, streamlit, run, <abs app.py>, --section.option=value, ...]``: every setting
    of ``config`` as an explicit flag, with ``server.address`` forced to ``host`` and
    ``server.port`` to ``port`` (default: the file's, else 8501). Lists become repeated flags."""
    settings = repo_settings(config)
    settings["server.address"] = host
    settings["server.port"] = int(port if port is not None else settings.get("server.port", DEFAULT_PORT))
    argv = [python or sys.executable, "-m", "streamlit", "run", str(Path(app).resolve())]
    for key, value in settings.items():
        for v in (value if isinstance(value, list) else [value]):
            argv.append(f"--{key}={_flag_value(v)}")
    return argv


def serve_env(base: dict[str, str] | None = None, allow_remote: bool = False) -> dict[str, str]:
    """The server's environment: ``base`` (default os.environ) with CGD_DATA_ROOT and CGD_RUNS_ROOT
    defaulting to the repository's ``data/`` and ``runs/`` as absolute paths, and CGD_ALLOW_REMOTE=1
    when ``allow_remote``."""
    env = dict(os.environ if base is None else base)
    env.setdefault("CGD_DATA_ROOT", str(REPO_ROOT / "data"))
    env.setdefault("CGD_RUNS_ROOT", str(REPO_ROOT / "runs"))
    for k in ("CGD_DATA_ROOT", "CGD_RUNS_ROOT"):  # relative ones meant the caller's folder, not the repo's
        env[k] = str(Path(env[k]).expanduser().resolve())
    if allow_remote:
        env[ALLOW_REMOTE_ENV] = "1"
    return env


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and loopback IPs (127.0.0.0/8, ::1). An empty or missing address is
    every interface to Streamlit; any other name could resolve anywhere: both are not loopback."""
    if not host:
        return False
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _getter(get_option: Callable[[str], Any] | None) -> Callable[[str], Any]:
    if get_option is not None:
        return get_option
    from streamlit import config  # the dashboard's process only

    return config.get_option


def check_server_settings(get_option: Callable[[str], Any] | None = None) -> str | None:
    """The dashboard's start-up check of the address Streamlit really serves on: a message to show
    (then stop) when it is not loopback and CGD_ALLOW_REMOTE is not "1", else None.

    get_option: reads a Streamlit option (default ``streamlit.config.get_option``)."""
    get = _getter(get_option)
    address = get("server.address")
    if is_loopback(address) or os.environ.get(ALLOW_REMOTE_ENV) == "1":
        return None
    where = "every network interface" if not address else f"address {address!r}"
    return (f"This dashboard is serving on {where}, so other machines can reach it, and it was not started "
            f"with `cgd dashboard` (which uses the repository's settings). Stop it and run `cgd dashboard` "
            f"(loopback only; share it through an SSH tunnel), or start it with `cgd dashboard --host HOST "
            f"--allow-remote` (or set {ALLOW_REMOTE_ENV}=1) if other machines are meant to connect.")


def server_settings_warnings(get_option: Callable[[str], Any] | None = None,
                             config: str | os.PathLike = CONFIG) -> list[str]:
    """Settings Streamlit really uses that differ from the repository's for the worse: XSRF
    protection off, usage statistics on, a larger upload limit. One line each, [] when none."""
    get = _getter(get_option)
    out = []
    if not get("server.enableXsrfProtection"):
        out.append("XSRF protection is off (server.enableXsrfProtection): another web page open in this browser "
                   "could send uploads to the dashboard. Start it with `cgd dashboard`.")
    if get("browser.gatherUsageStats"):
        out.append("Streamlit usage statistics are on (browser.gatherUsageStats). Start it with `cgd dashboard`.")
    try:
        limit = repo_settings(config).get("server.maxUploadSize")
    except (OSError, ValueError):
        limit = None
    size = get("server.maxUploadSize")
    if limit is not None and size is not None and size > limit:
        out.append(f"The upload limit is {size} MB (server.maxUploadSize), above the repository's {limit} MB. "
                   "Start it with `cgd dashboard`.")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cgd dashboard",
        description="Serve the dashboard with the repository's .streamlit/config.toml, from any folder. "
                    "Loopback only unless --allow-remote.")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}; a non-loopback one needs --allow-remote)")
    p.add_argument("--port", type=int, default=None, help=f"port (default the config's server.port, else {DEFAULT_PORT})")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host: other machines can connect (put authentication in front)")
    p.add_argument("--print-command", action="store_true", help="print the command that would run and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """``cgd dashboard [--host H] [--port P] [--allow-remote] [--print-command]``: exec Streamlit
    with the repository's settings, in the repository root. Returns 2 (after a one-line message)
    for a non-loopback host without --allow-remote or a bad port; otherwise does not return (the
    process becomes the server), except with --print-command (0)."""
    args = build_parser().parse_args(argv)
    if not is_loopback(args.host) and not args.allow_remote:
        shown = args.host or "every interface"
        print(f"cgd dashboard: refusing to serve on {shown}, which other machines can reach; serve on 127.0.0.1 "
              f"(the default) and share through an SSH tunnel, or add --allow-remote if that is what you mean",
              file=sys.stderr)
        return 2
    if args.port is not None and not 1 <= args.port <= 65535:
        print(f"cgd dashboard: --port {args.port} is not a port number (1-65535)", file=sys.stderr)
        return 2
    if not APP.is_file():
        print(f"cgd dashboard: {APP} is missing; `cgd dashboard` needs the repository checkout "
              "(pip install -e .), not only the installed library", file=sys.stderr)
        return 2
    try:
        cmd = streamlit_args(args.host, args.port)
    except (OSError, ValueError) as e:
        print(f"cgd dashboard: {e}", file=sys.stderr)
        return 2
    env = serve_env(allow_remote=args.allow_remote)
    if args.print_command:
        cgd_env = [f"{k}={env[k]}" for k in ("CGD_DATA_ROOT", "CGD_RUNS_ROOT", ALLOW_REMOTE_ENV) if k in env]
        print(f"cd {shlex.quote(str(REPO_ROOT))} && env {shlex.join(cgd_env)} {shlex.join(cmd)}")
        return 0
    os.chdir(REPO_ROOT)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)  # the server replaces this process: signals reach Streamlit directly
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
