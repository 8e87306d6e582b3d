"""The standalone app: the same tab in a page of its own, for people without a WebUI."""
from __future__ import annotations

import os

from .. import i18n
from ..settings import Settings


def make_controller(cfg: Settings):
    from .tab import Controller
    os.makedirs(cfg.lora_dir, exist_ok=True)
    return Controller(cfg, None, host="standalone")


def serve(cfg: Settings, host: str = "127.0.0.1", port: int = 7870, open_browser: bool = False,
          auth: list | None = None) -> int:
    """The page on ``host:port``. Files reach the browser only as the tab's own outputs (gradio copies
    them into its cache): no folder of the server is served, and gradio 3's habit of serving the
    working folder finds an empty one."""
    import tempfile
    i18n.set_language(cfg.language)
    from . import compat, create_tab
    ctl = make_controller(cfg)
    demo = create_tab(ctl, standalone_assets=True)
    compat.queue(demo, 8)
    print(f"Image to LoRA: LoRAs go to {ctl.config.lora_dir}; models from {ctl.config.models_dir}", flush=True)
    if cfg.remote:
        print(f"Image to LoRA: serving {host}:{port} to other computers, with a login "
              f"({len(auth or [])} user(s)); the page reads images only from uploads"
              + (" and " + ", ".join(cfg.image_dirs) if cfg.image_dirs else ""), flush=True)
    os.chdir(tempfile.mkdtemp(prefix="i2l-app-"))
    ctl.service.standby()          # the worker's code imported while the page is being opened
    from ..lifetime import stop_on_sigterm
    stop_on_sigterm()              # SIGTERM closes the server like Ctrl-C, and the worker is stopped
    try:
        app, _, _ = demo.launch(server_name=host, server_port=port, inbrowser=open_browser, share=False,
                                show_api=False, auth=auth or None, prevent_thread_lock=True)
        try:
            from ..api import mount
            mount(app, ctl, auth, lambda: cfg.remote)   # the HTTP API at /i2l/v1, behind the same logins
            print(f"Image to LoRA: the HTTP API is at http://{host}:{port}/i2l/v1 (its page: /i2l/v1/docs)",
                  flush=True)
        except Exception as e:                          # the page works without it
            print(f"Image to LoRA: the HTTP API could not start: {e!r}", flush=True)
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        import signal
        for sig in (signal.SIGINT, signal.SIGTERM):   # a second Ctrl-C must not cut the worker's stop short
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (ValueError, OSError):
                pass
        ctl.service.shutdown()
    return 0
