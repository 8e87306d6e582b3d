"""The standalone app: the same tab in a page of its own, for people without a WebUI."""
from __future__ import annotations

import os

from .. import i18n
from ..settings import Settings


def make_controller(cfg: Settings):
    from .tab import Controller
    os.makedirs(cfg.lora_dir, exist_ok=True)
    return Controller(cfg, None, host="standalone")


def serve(cfg: Settings, host: str = "127.0.0.1", port: int = 7870, open_browser: bool = False) -> int:
    i18n.set_language(cfg.language)
    from . import compat, create_tab
    ctl = make_controller(cfg)
    demo = create_tab(ctl, standalone_assets=True)
    compat.queue(demo, 8)
    print(f"Image to LoRA: LoRAs go to {ctl.config.lora_dir}; models from {ctl.config.models_dir}", flush=True)
    ctl.service.standby()          # the worker's code imported while the page is being opened
    try:
        demo.launch(server_name=host, server_port=port, inbrowser=open_browser, share=False, show_api=False,
                    allowed_paths=[ctl.config.lora_dir], prevent_thread_lock=False)
    except KeyboardInterrupt:
        pass
    finally:
        ctl.service.shutdown()
    return 0
