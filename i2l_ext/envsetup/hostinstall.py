"""What ``install.py`` does when the WebUI runs it (in the WebUI's venv, at every launch).

It installs nothing into the WebUI's venv: it only checks (or builds) the worker's own venv.
Its settings come from ``i2l_ext.settings`` like everyone's: install.py's own arguments and the
WebUI's flags (``COMMANDLINE_ARGS``, set in webui-user), then the WebUI's settings file (the one
``--ui-settings-file`` names, else ``config.json``), then the environment, then the defaults.

The WebUI captures install.py's output and prints it only when the script ends; to show a long
install live, lines also go straight to the console (``/dev/tty`` or ``CONOUT$``) when there is one
(the ``install_tty`` setting turns that off).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from .. import settings as settings_mod


def _flag_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="install.py", add_help=True,
                                description="Prepare Image to LoRA's worker environment (not the WebUI's venv).")
    for s in settings_mod.SETTINGS:
        if s.flag:
            p.add_argument(s.flag, dest=s.name, **({"action": "store_true", "default": None} if s.kind == "bool"
                                                    else {"default": None}))
    p.add_argument("--index-url", dest="index_url", default=None)
    p.add_argument("--ui-settings-file", dest="ui_settings_file", default=None)
    p.add_argument("--repair", action="store_true", help="rebuild the worker environment from scratch")
    p.add_argument("--quiet", action="store_true")
    return p


def parse_options(argv: list[str] | None = None, environ: dict | None = None,
                  cwd: str | None = None) -> tuple[settings_mod.Settings, argparse.Namespace]:
    """(the settings in force, install.py's own options ``repair`` and ``quiet``)."""
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
    config = _settings_file(host.ui_settings_file or "config.json", cwd)
    flags = {s.name: getattr(host, s.name, None) for s in settings_mod.SETTINGS}
    st = settings_mod.resolve(flags, option=config.get, environ=environ)
    return st, host


def _settings_file(path: str, cwd: str | None = None) -> dict:
    """The WebUI's settings file (relative to the WebUI folder, the cwd here), or {}."""
    path = os.path.join(cwd or os.getcwd(), path)
    try:
        if os.path.getsize(path) > 5_000_000:
            return {}
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class Console:
    """Live lines to the terminal when there is one; a summary on stdout for the WebUI's log."""

    def __init__(self, quiet: bool = False, tty: bool = True):
        self.quiet = quiet
        self.tty = None
        self.summary: list[str] = []
        self.live_stdout = False
        try:
            self.live_stdout = sys.stdout.isatty()
        except (AttributeError, ValueError):
            pass
        if not self.live_stdout and tty:
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
    st, opts = parse_options(argv)
    if st.skip_install and not opts.repair:
        return 0
    from . import env_status, explicit_python
    if st.worker_python:
        py = explicit_python(st.worker_python)
        if not os.path.isfile(py):
            print(f"Image to LoRA: the worker interpreter {py} (--i2l-python, the setting, or I2L_PYTHON) does "
                  "not exist; the tab will report this until it is fixed.")
            return 1
        return 0                           # the user manages that environment
    from .installer import ensure_env
    console = Console(quiet=opts.quiet, tty=st.install_tty)
    try:
        res = ensure_env(reuse_host_torch=not st.own_torch, wheels=st.wheels, index_url=st.index_url,
                         torch_index_url=st.torch_index_url, log=console.line, env_dir=st.worker_env,
                         rebuild=opts.repair, offline=st.offline)
    except KeyboardInterrupt:
        console.result("Image to LoRA: the worker environment install was interrupted; it is not used until "
                       f"repaired: {env_status(st.worker_env)['repair_command']}")
        return 130
    finally:
        console.close()
    if res["ok"]:
        return 0
    console.result(f"Image to LoRA: {res['message']}")
    if res.get("log_path"):
        console.result(f"  Full log: {res['log_path']}")
    console.result(f"  To repair: {res['repair_command']}")
    return 1
