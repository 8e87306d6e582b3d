"""WebUI glue for Image to LoRA: registers the tab and its settings section.

Kept tiny on purpose: importing this file imports only the ``i2l_ext`` package marker (no
gradio work, no torch). The tab itself is built inside the ``on_ui_tabs`` callback.
"""
import os
import sys
import threading

_EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXT_ROOT not in sys.path:
    # The WebUI puts the extension folder on sys.path only while importing this file; the
    # package is imported now so its submodules stay importable later.
    sys.path.insert(0, _EXT_ROOT)
    import i2l_ext  # noqa: F401
    sys.path.remove(_EXT_ROOT)
else:
    import i2l_ext  # noqa: F401

from modules import script_callbacks  # noqa: E402

SECTION = "i2l"


def _make_controller():
    from i2l_ext import hosts
    from i2l_ext.ui.tab import Controller
    host = hosts.detect_host()
    return Controller(hosts.settings(), hosts.make_hooks(host), host=host, settings_source=hosts.settings)


def get_controller():
    """The one controller of this WebUI process (it owns the worker). Reload UI runs this file again
    as a new module while the ``i2l_ext`` package stays imported, so the controller is kept there: a
    reload reuses it and its worker instead of starting a second worker beside the first."""
    from i2l_ext import hosts
    return hosts.webui_controller(_make_controller)


def on_ui_tabs():
    from i2l_ext import i18n
    ctl = get_controller()
    ctl.refresh_config()
    i18n.set_language(ctl.config.language)
    from i2l_ext.ui import create_tab
    blocks = create_tab(ctl)
    return [(blocks, i18n.t("tab_title"), "i2l_tab")]


def on_ui_settings():
    """Settings -> Image to LoRA: every setting of ``i2l_ext.settings`` that has a WebUI setting."""
    import gradio as gr
    from modules import shared
    from i2l_ext import hosts, i18n, settings

    i18n.set_language(hosts.settings().language)      # settings are built before the tab: same language
    section = (SECTION, i18n.t("settings_section"))
    for s in settings.SETTINGS:
        if not s.option:
            continue
        label = i18n.t("settings_" + s.name)
        if s.name == "language":
            info = shared.OptionInfo("auto", label, gr.Radio, {"choices": ["auto"] + i18n.available()}, section=section)
        elif s.kind == "choice":
            info = shared.OptionInfo(s.default, label, gr.Radio, {"choices": list(s.choices)}, section=section)
        elif s.slider:
            lo, hi, step = s.slider
            info = shared.OptionInfo(s.default, label, gr.Slider, {"minimum": lo, "maximum": hi, "step": step},
                                     section=section)
        elif s.kind == "bool":
            info = shared.OptionInfo(bool(s.default), label, section=section)
        else:                   # a folder or an interpreter: empty leaves it to the flag, environment, default
            info = shared.OptionInfo("", label, section=section)
        shared.opts.add_option(s.option, info)


def on_app_started(demo, app):
    """Once the WebUI is up: the HTTP API on its app; then, in the background (its start is not held
    up): with "start with the
    WebUI" on, the worker starts and reads the default variant's weights; else, with the standby
    setting on (the default), a worker starts that only imports its code and waits, holding no
    GPU memory and no weights, so the first job skips those seconds."""
    ctl = get_controller()
    ctl.refresh_config()
    cfg = ctl.config
    if app is not None:         # the HTTP API at /i2l/v1, behind the WebUI's own logins
        from i2l_ext import api, hosts
        api.mount(app, ctl, api.webui_logins(), hosts.reachable_from_others)
    if cfg.start_with_webui:
        ctl.service.prewarm(cfg.default_variant, None, cfg.vram_profile)
    elif cfg.standby:           # finding the worker's Python and starting it: not in the WebUI's thread
        threading.Thread(target=ctl.service.standby, daemon=True, name="i2l-standby").start()


def on_after_component(component, **kwargs):
    """txt2img's script menu and X/Y/Z plot fields, for "Send with a weight sweep"."""
    elem_id = kwargs.get("elem_id")
    if elem_id and elem_id.startswith("script_"):
        from i2l_ext import hosts
        hosts.remember_component(component, elem_id)


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
if hasattr(script_callbacks, "on_app_started"):
    script_callbacks.on_app_started(on_app_started)
if hasattr(script_callbacks, "on_after_component"):
    script_callbacks.on_after_component(on_after_component)
