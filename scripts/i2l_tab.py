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

SECTION = ("i2l", "Image to LoRA")


def _config_refresh(cfg):
    """Re-read the settings that may change while the WebUI runs."""
    from i2l_ext import hosts
    cfg.lora_dir = hosts.lora_dir() or cfg.lora_dir
    cfg.models_dir = os.path.abspath(hosts.opt("i2l_models_dir", "") or cfg.models_dir)
    cfg.worker_python = hosts.opt("i2l_worker_python", "") or os.environ.get("I2L_WORKER_PYTHON") or None
    cfg.offline = bool(hosts.opt("i2l_offline", False))
    cfg.idle_timeout = 60.0 * float(hosts.opt("i2l_keep_warm_minutes", 10) or 0)
    cfg.keep_warm = cfg.idle_timeout > 0
    cfg.prewarm = bool(hosts.opt("i2l_prewarm", True))
    cfg.standby = bool(hosts.opt("i2l_standby", True))
    cfg.gpu_hold = float(hosts.opt("i2l_gpu_hold_seconds", 10) or 0)
    cfg.gpu_hold_gb = float(hosts.opt("i2l_gpu_hold_gb", 10) or 0)


def _make_controller():
    from i2l_ext import hosts
    from i2l_ext.config import default_config
    from i2l_ext.ui.tab import Controller
    host = hosts.detect_host()
    root = hosts.models_root()
    models_dir = os.environ.get("I2L_MODELS_DIR") or (os.path.join(root, "i2L") if root else None)
    cfg = default_config(host=host, lora_dir=hosts.lora_dir(), models_dir=models_dir)
    _config_refresh(cfg)
    return Controller(cfg, hosts.make_hooks(host), host=host, config_refresh=_config_refresh)


def get_controller():
    """The one controller of this WebUI process (it owns the worker). Reload UI runs this file again
    as a new module while the ``i2l_ext`` package stays imported, so the controller is kept there: a
    reload reuses it and its worker instead of starting a second worker beside the first."""
    from i2l_ext import hosts
    ctl = hosts.webui_controller(_make_controller)
    ctl.defaults.update(variant=hosts.opt("i2l_default_variant", "style"),
                        vram_profile=hosts.opt("i2l_vram_profile", "auto"),
                        key_format=hosts.opt("i2l_key_format", "diffusers"))
    return ctl


def on_ui_tabs():
    from i2l_ext import hosts, i18n
    i18n.set_language(hosts.host_language())
    from i2l_ext.ui import create_tab
    blocks = create_tab(get_controller())
    return [(blocks, i18n.t("tab_title"), "i2l_tab")]


def on_ui_settings():
    import gradio as gr
    from modules import shared
    from i2l_ext import hosts, i18n
    from i2l_ext.catalog import VARIANTS

    i18n.set_language(hosts.host_language())      # settings are built before the tab: same language
    t = i18n.t
    section = (SECTION[0], t("settings_section"))

    def add(key, default, label, component=None, args=None):
        info = shared.OptionInfo(default, label, component, args, section=section) if component else \
            shared.OptionInfo(default, label, section=section)
        shared.opts.add_option(key, info)

    add("i2l_models_dir", "", t("settings_models_dir"))
    add("i2l_worker_python", "", t("settings_worker_python"))
    add("i2l_language", "auto", t("settings_language"), gr.Radio, {"choices": ["auto"] + i18n.available()})
    add("i2l_default_variant", "style", t("settings_variant"), gr.Radio, {"choices": list(VARIANTS)})
    add("i2l_vram_profile", "auto", t("settings_vram"), gr.Radio, {"choices": ["auto", "gpu", "cpu_offload", "disk"]})
    add("i2l_key_format", "diffusers", t("settings_keys"), gr.Radio, {"choices": ["diffusers", "kohya"]})
    add("i2l_free_vram", True, t("settings_free_vram"))
    add("i2l_keep_warm_minutes", 10, t("settings_keep_warm"), gr.Slider, {"minimum": 0, "maximum": 120, "step": 1})
    add("i2l_prewarm", True, t("settings_prewarm"))
    add("i2l_standby", True, t("settings_standby"))
    add("i2l_start_with_webui", False, t("settings_start_with_webui"))
    add("i2l_gpu_hold_seconds", 10, t("settings_gpu_hold"), gr.Slider, {"minimum": 0, "maximum": 120, "step": 1})
    add("i2l_gpu_hold_gb", 10, t("settings_gpu_hold_gb"), gr.Slider, {"minimum": 0, "maximum": 80, "step": 1})
    add("i2l_offline", False, t("settings_offline"))


def on_app_started(demo, app):
    """Once the WebUI is up, in the background (its start is not held up): with "start with the
    WebUI" on, the worker starts and reads the default variant's weights; else, with the standby
    setting on (the default), a worker starts that only imports its code and waits, holding no
    GPU memory and no weights, so the first job skips those seconds."""
    from i2l_ext import hosts
    start, standby = hosts.opt("i2l_start_with_webui", False), hosts.opt("i2l_standby", True)
    if not start and not standby:
        return
    ctl = get_controller()
    ctl.refresh_config()
    if start:
        d = ctl.defaults
        ctl.service.prewarm(d.get("variant") or "style", None, d.get("vram_profile") or "auto")
    else:                       # finding the worker's Python and starting it: not in the WebUI's thread
        threading.Thread(target=ctl.service.standby, daemon=True, name="i2l-standby").start()


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
if hasattr(script_callbacks, "on_app_started"):
    script_callbacks.on_app_started(on_app_started)
