"""``python -m i2l_ext serve``: the tab as a standalone app on this computer."""
from __future__ import annotations

from .. import settings


def cmd_serve(args) -> int:
    from . import appenv
    cfg = settings.from_args(args)
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
        env = dict(os.environ, PYTHONPATH=settings.EXT_ROOT)
        return subprocess.call([py, "-m", "i2l_ext"] + argv, env=env)
    from .app import serve
    return serve(cfg, host=args.host, port=args.port, open_browser=args.open)


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the tab as a standalone app in the browser",
                              description="Run the Image to LoRA tab as a standalone app (needs gradio).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=7870)
    for name in ("lora_dir", "models_dir", "worker_python", "worker_env", "offline", "language", "vram_limit_gb"):
        settings.add_cli_flag(p, name)
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.set_defaults(func=cmd_serve)
