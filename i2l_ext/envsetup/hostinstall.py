"""What ``install.py`` does when the WebUI runs it (in the WebUI's venv, at every launch).

It installs nothing into the WebUI's venv: it only checks (or builds) the worker's own venv.
Options come from, in order: install.py's own arguments, ``COMMANDLINE_ARGS`` (the WebUI's flags
set in webui-user), ``I2L_*`` environment variables, and the WebUI's settings file.

The WebUI captures install.py's output and prints it only when the script ends; to show a long
install live, lines also go straight to the console (``/dev/tty`` or ``CONOUT$``) when there is one
(``I2L_INSTALL_TTY=0`` turns that off).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

_TRUE = ("1", "true", "yes", "on")


def _flag_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="install.py", add_help=True,
                                description="Prepare Image to LoRA's worker environment (not the WebUI's venv).")
    p.add_argument("--skip-install", action="store_true")
    p.add_argument("--i2l-python", dest="i2l_python")
    p.add_argument("--i2l-worker-env", dest="i2l_worker_env")
    p.add_argument("--i2l-wheels", dest="i2l_wheels")
    p.add_argument("--i2l-offline", dest="i2l_offline", action="store_true")
    p.add_argument("--i2l-own-torch", dest="i2l_own_torch", action="store_true")
    p.add_argument("--index-url", dest="index_url")
    p.add_argument("--repair", action="store_true", help="rebuild the worker environment from scratch")
    p.add_argument("--quiet", action="store_true")
    return p


def parse_options(argv: list[str] | None = None, environ: dict | None = None) -> argparse.Namespace:
    environ = os.environ if environ is None else environ
    parser = _flag_parser()
    words = []
    try:
        words = shlex.split(environ.get("COMMANDLINE_ARGS", ""), posix=os.name != "nt")
    except ValueError:
        pass
    host, _ = parser.parse_known_args(words)
    own, _ = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    for k, v in vars(own).items():         # our own arguments win over the WebUI's flags
        if v not in (None, False):
            setattr(host, k, v)
    o = host
    o.skip_install = bool(o.skip_install) or environ.get("I2L_SKIP_INSTALL", "").lower() in _TRUE
    o.i2l_python = o.i2l_python or environ.get("I2L_PYTHON") or _setting("i2l_worker_python", environ) or None
    o.i2l_worker_env = o.i2l_worker_env or environ.get("I2L_WORKER_ENV") or None
    o.i2l_wheels = o.i2l_wheels or environ.get("I2L_WHEELS") or None
    o.i2l_offline = bool(o.i2l_offline) or environ.get("I2L_OFFLINE", "").lower() in _TRUE
    o.i2l_own_torch = bool(o.i2l_own_torch) or environ.get("I2L_OWN_TORCH", "").lower() in _TRUE
    o.index_url = o.index_url or environ.get("I2L_INDEX_URL") or environ.get("INDEX_URL") or None
    return o


def _setting(key: str, environ) -> str | None:
    """A value from the WebUI's settings file (``config.json`` in the WebUI folder, the cwd here)."""
    path = environ.get("I2L_WEBUI_CONFIG") or os.path.join(os.getcwd(), "config.json")
    if not os.path.isfile(path) or os.path.getsize(path) > 5_000_000:
        return None
    try:
        import json
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get(key)
        return value.strip() if isinstance(value, str) and value.strip() else None
    except (OSError, ValueError, AttributeError):
        return None


class Console:
    """Live lines to the terminal when there is one; a summary on stdout for the WebUI's log."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = None
        self.summary: list[str] = []
        self.live_stdout = False
        try:
            self.live_stdout = sys.stdout.isatty()
        except (AttributeError, ValueError):
            pass
        if not self.live_stdout and os.environ.get("I2L_INSTALL_TTY", "1").lower() not in ("0", "false", "no"):
            try:
                self.tty = open("CONOUT$" if os.name == "nt" else "/dev/tty", "w", encoding="utf-8",
                                errors="replace")
            except OSError:
                self.tty = None

    def line(self, msg: str) -> None:
        if self.quiet:
            return
        if self.live_stdout:
            _safe_print(msg, sys.stdout)
        elif self.tty is not None:
            try:
                self.tty.write(msg + "\n")
                self.tty.flush()
            except OSError:
                self.tty = None
                _safe_print(msg, sys.stdout)
        else:
            _safe_print(msg, sys.stdout)      # the WebUI shows it when install.py ends (or live if it runs live)

    def result(self, msg: str) -> None:
        """The outcome: always on stdout (what the WebUI keeps), and live when that is elsewhere."""
        if self.tty is not None and not self.quiet:
            try:
                self.tty.write(msg + "\n")
                self.tty.flush()
            except OSError:
                pass
        _safe_print(msg, sys.stdout)

    def close(self) -> None:
        if self.tty is not None:
            try:
                self.tty.close()
            except OSError:
                pass


def _safe_print(msg: str, stream) -> None:
    try:
        stream.write(msg + "\n")
    except UnicodeEncodeError:
        stream.write(msg.encode("ascii", "replace").decode("ascii") + "\n")
    try:
        stream.flush()
    except (OSError, ValueError):
        pass


def run_install(argv: list[str] | None = None) -> int:
    """0: ready, skipped, or the user's own interpreter; 1: the install failed (the WebUI goes on)."""
    opts = parse_options(argv)
    if opts.skip_install and not opts.repair:
        return 0
    from . import env_status, explicit_python
    if opts.i2l_python:
        py = explicit_python(opts.i2l_python)
        if not os.path.isfile(py):
            print(f"Image to LoRA: the worker interpreter {py} (--i2l-python / I2L_PYTHON / setting) does not "
                  "exist; the tab will report this until it is fixed.")
            return 1
        return 0                           # the user manages that environment
    from .installer import ensure_env
    console = Console(quiet=opts.quiet)
    try:
        st = ensure_env(reuse_host_torch=not opts.i2l_own_torch, wheels=opts.i2l_wheels, index_url=opts.index_url,
                        log=console.line, env_dir=opts.i2l_worker_env, rebuild=opts.repair,
                        offline=opts.i2l_offline)
    except KeyboardInterrupt:
        console.result("Image to LoRA: the worker environment install was interrupted; it is not used until "
                       f"repaired: {env_status(opts.i2l_worker_env)['repair_command']}")
        return 130
    finally:
        console.close()
    if st["ok"]:
        return 0
    console.result(f"Image to LoRA: {st['message']}")
    if st.get("log_path"):
        console.result(f"  Full log: {st['log_path']}")
    console.result(f"  To repair: {st['repair_command']}")
    return 1
