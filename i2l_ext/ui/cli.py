"""``python -m i2l_ext serve``: the tab as a standalone app on this computer."""
from __future__ import annotations


def cmd_serve(args) -> int:
    from . import appenv
    if not appenv.has_gradio():
        # No gradio here (a plain Python, or the worker's environment): run in the app's own one.
        import os
        import subprocess
        import sys
        from ..config import EXT_ROOT
        py = appenv.ensure_app_env()
        worker = args.worker_python
        if not worker:
            from ..envsetup import find_worker_python
            worker = find_worker_python()
        argv = [a for a in sys.argv[1:]]
        if "--python" not in argv:
            argv += ["--python", worker]
        env = dict(os.environ, PYTHONPATH=EXT_ROOT)
        return subprocess.call([py, "-m", "i2l_ext"] + argv, env=env)
    from .app import serve
    return serve(host=args.host, port=args.port, lora_dir=args.lora_dir, models_dir=args.models_dir,
                 worker_python=args.worker_python, offline=args.offline, lang=args.lang, open_browser=args.open)


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the tab as a standalone app in the browser",
                              description="Run the Image to LoRA tab as a standalone app (needs gradio).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=7870)
    p.add_argument("--lora-dir", help="where LoRAs go (default: the WebUI's models/Lora, else ~/.i2l/Lora)")
    p.add_argument("--models-dir", help="folder with the model files")
    p.add_argument("--python", dest="worker_python", help="Python interpreter of the worker environment")
    p.add_argument("--offline", action="store_true", default=None, help="never contact a model hub")
    p.add_argument("--lang", help="interface language: en or zh_CN (default: from the system)")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.set_defaults(func=cmd_serve)
