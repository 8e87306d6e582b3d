"""The gradio tab, shared by the WebUI extension and the standalone app (``python -m i2l_ext serve``).

Imports gradio; import it only where gradio is installed (a WebUI, the app's own environment).
"""
from __future__ import annotations

import os

from ..settings import EXT_ROOT

JS_PATH = os.path.join(EXT_ROOT, "javascript", "i2l.js")
CSS_PATH = os.path.join(EXT_ROOT, "style.css")


def read_asset(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def create_tab(controller, standalone_assets: bool = False):
    """A ``gr.Blocks`` holding the tab. ``standalone_assets`` adds the page script and style
    (a WebUI loads ``javascript/*.js`` and ``style.css`` itself)."""
    import gradio as gr

    from . import compat, tab
    kwargs = {"analytics_enabled": False}
    if standalone_assets:
        from ..i18n import t
        kwargs.update(title=t("app_title"), css=read_asset(CSS_PATH))
    with gr.Blocks(**kwargs) as blocks:
        if standalone_assets:
            gr.HTML(f'<h2 class="i2l-app-title">{t("app_title")}</h2>', elem_id="i2l_app_title")
        loaders = tab.build(controller)
        if standalone_assets:
            code = read_asset(JS_PATH)
            blocks.load(None, None, None, **compat.js("() => {\n" + code + "\n;return [];}"))
        for fn, inputs, outputs in loaders:
            blocks.load(fn, inputs, outputs)
    return blocks
