"""``python -m i2l_ext serve``: the tab as a standalone app on this computer."""
from __future__ import annotations

import argparse

from .. import settings
from ..contract import I2LError, T, raw


def cmd_serve(args) -> int:
    from .. import lifetime
    from . import appenv
    lifetime.exit_with_parent(args.exit_with)       # started by a launcher: never outlive it
    remote = not settings.is_loopback(args.host)
    cfg = settings.from_args(args, remote=remote)
    auth = read_auth(args.auth, args.auth_file)     # checked before anything starts
    if remote and not auth:
        raise I2LError(I2LError.NOT_ALLOWED, T("m_serve_needs_auth", host=args.host), T("m_serve_needs_auth_fix"))
    if not appenv.has_gradio():
        # No gradio here (a plain Python, or the worker's environment): run in the app's own one.
        import os
        import subprocess
        import sys
        py = appenv.ensure_app_env(cfg.app_env)
        worker = cfg.worker_python
        if not worker:
            from ..envsetup import find_worker_python
            worker = find_worker_python(env_dir=cfg.worker_env)
        argv = [a for a in sys.argv[1:]]
        if "--python" not in argv:
            argv += ["--python", worker]
        argv += ["--exit-with", str(os.getpid())]
        env = dict(os.environ, PYTHONPATH=settings.EXT_ROOT)
        app = subprocess.Popen([py, "-m", "i2l_ext"] + argv, env=env)
        lifetime.forward_signals(app)              # Ctrl-C and SIGTERM reach the app, which stops its worker
        while True:
            try:
                return app.wait()
            except KeyboardInterrupt:
                continue
    from .app import serve
    return serve(cfg, host=args.host, port=args.port, open_browser=args.open, auth=auth)


def read_auth(pairs: list[str] | None, path: str | None) -> list[tuple[str, str]]:
    """``user:password`` pairs from ``--auth`` and from the lines of ``--auth-file``."""
    lines = list(pairs or [])
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                lines += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except OSError as e:
            raise I2LError(I2LError.BAD_INPUT, T("m_auth_file", path=path, error=raw(e.strerror or e))) from None
    out = []
    for line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise I2LError(I2LError.BAD_INPUT, T("m_auth_bad"), T("m_auth_bad_fix"))
        out.append((user, password))
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the tab as a standalone app in the browser",
                              description="Run the Image to LoRA tab as a standalone app (needs gradio).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only; "
                   "any other needs --auth or --auth-file)")
    p.add_argument("--auth", action="append", metavar="USER:PASSWORD", help="a login for the page (repeatable)")
    p.add_argument("--auth-file", metavar="FILE", help="a file of logins, one USER:PASSWORD a line")
    p.add_argument("--port", type=int, default=7870)
    for name in ("lora_dir", "models_dir", "worker_python", "worker_env", "offline", "language", "vram_limit_gb",
                 "image_dirs", "gpus"):
        settings.add_cli_flag(p, name)
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.add_argument("--exit-with", type=int, default=0, help=argparse.SUPPRESS)   # the launcher's pid
    p.set_defaults(func=cmd_serve)
