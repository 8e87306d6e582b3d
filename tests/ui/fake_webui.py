"""A WebUI-shaped page for testing the extension's host glue without a real WebUI.

It provides the few pieces of ``modules`` the extension touches (script_callbacks, shared with
opts/cmd_opts/state, call_queue.queue_lock, paths, sd_models, devices) and the built-in Lora
extension's ``networks``, imports ``scripts/i2l_tab.py`` the way a WebUI does (extension folder on
sys.path only during the import), renders the tab beside a txt2img tab (prompt box, Generate
guarded by the queue lock, Interrupt, the hidden Lora refresh button) and serves it. Every host
call is appended to ``$FAKE_WEBUI_LOG`` as a JSON line, for the test to read.

The WebUI's command line is ``FAKE_WEBUI_ARGS``, parsed as a WebUI does: its own ``--lora-dir``
plus the flags the extension's preload.py adds.

Usage: python tests/ui/fake_webui.py ROOT PORT   (env: FAKE_WEBUI_LOG, FAKE_WEBUI_ARGS, I2L_PYTHON, ...)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
import types

ROOT, PORT = sys.argv[1], int(sys.argv[2])
LOG = os.environ["FAKE_WEBUI_LOG"]
WEBUI = os.environ["FAKE_WEBUI_ROOT"]


def record(event, **kw):
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": event, "t": time.time(), **kw}) + "\n")


def module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


PRESET = json.loads(os.environ.get("FAKE_WEBUI_OPTS") or "{}")     # settings as a config.json would have them


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, section=None, **kw):
        self.default, self.label, self.component, self.section = default, label, component, section


class Options:
    def __init__(self):
        self.data = {}
        self.data_labels = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, PRESET.get(key, info.default))
        record("add_option", key=key, section=list(info.section or []), default_type=type(info.default).__name__)

    def __getattr__(self, key):
        if key in ("data", "data_labels"):
            raise AttributeError(key)
        if key in self.data:
            return self.data[key]
        if key == "localization":
            return os.environ.get("FAKE_WEBUI_LOCALIZATION", "None")
        raise AttributeError(key)


class State:
    interrupted = False
    job = ""

    def begin(self, job="(unknown)"):
        self.interrupted, self.job = False, job
        record("state.begin", job=job)

    def end(self):
        record("state.end", job=self.job)
        self.job = ""

    def interrupt(self):
        self.interrupted = True
        record("state.interrupt")


def parse_cmd_opts():
    """The WebUI's flags (the one the Lora extension adds) and the extension's, from preload.py."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora-dir", default=os.path.join(WEBUI, "models", "Lora"))
    parser.add_argument("--api-auth", default=None)                # the WebUI's logins, as it spells them
    parser.add_argument("--gradio-auth", default=None)
    parser.add_argument("--gradio-auth-path", default=None)
    parser.add_argument("--listen", action="store_true")
    spec = importlib.util.spec_from_file_location("preload", os.path.join(ROOT, "preload.py"))
    preload = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preload)
    preload.preload(parser)
    return parser.parse_args(shlex.split(os.environ.get("FAKE_WEBUI_ARGS", "")))


callbacks = {}
modules = module("modules", __path__=[])
module("modules.script_callbacks", on_ui_tabs=lambda f: callbacks.setdefault("ui_tabs", f),
       on_ui_settings=lambda f: callbacks.setdefault("ui_settings", f),
       on_app_started=lambda f: callbacks.setdefault("app_started", f),
       on_after_component=lambda f: callbacks.setdefault("after_component", f))
shared = module("modules.shared", opts=Options(), OptionInfo=OptionInfo, state=State(),
                cmd_opts=parse_cmd_opts())


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import QueueLock  # noqa: E402

queue_lock = QueueLock()
module("modules.call_queue", queue_lock=queue_lock)
module("modules.paths", models_path=os.path.join(WEBUI, "models"))


class FakeModel:
    """A checkpoint on the GPU (FAKE_WEBUI_NO_MODEL=1: none loaded, as on a WebUI with no checkpoint)."""
    device = "cuda:0"


def unload_model_weights(m=None):
    m.device = "cpu"
    record("unload_model_weights")


def send_model_to_device(m):
    m.device = "cuda:0"
    record("send_model_to_device")


module("modules.sd_models", unload_model_weights=unload_model_weights, send_model_to_device=send_model_to_device,
       model_data=types.SimpleNamespace(sd_model=None if os.environ.get("FAKE_WEBUI_NO_MODEL") else FakeModel()))
module("modules.devices", torch_gc=lambda: record("torch_gc"))
for sub in ("script_callbacks", "shared", "call_queue", "paths", "sd_models", "devices"):
    setattr(modules, sub, sys.modules["modules." + sub])
module("networks", list_available_networks=lambda: record("list_available_networks"))

# Import the script as a WebUI does.
sys.path.insert(0, ROOT)
spec = importlib.util.spec_from_file_location("i2l_tab", os.path.join(ROOT, "scripts", "i2l_tab.py"))
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
sys.path.remove(ROOT)
for m in list(sys.modules):
    if m.split(".")[0] in ("torch",):
        record("torch_imported")

import gradio as gr  # noqa: E402

callbacks["ui_settings"]()


def made(component, elem_id):
    """What the WebUI does for every component it makes (its after-component hook)."""
    if "after_component" in callbacks:
        callbacks["after_component"](component, elem_id=elem_id)
    return component


# txt2img, built before the extensions' tabs as in the WebUI: the prompt, Generate, and the script
# menu with an X/Y/Z plot whose X axis the weight sweep sets.
with gr.Blocks(analytics_enabled=False) as txt2img_interface:
    prompt = gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=3)
    with gr.Row():
        gen = gr.Button("Generate", elem_id="txt2img_generate")
        interrupt = gr.Button("Interrupt", elem_id="txt2img_interrupt")
        refresh = gr.Button("refresh", elem_id="txt2img_lora_extra_refresh_internal", visible=True)
    out = gr.Textbox(label="out", elem_id="txt2img_out")
    refresh_count = gr.Textbox(value="0", label="refreshes", elem_id="txt2img_refresh_count")
    # the script's title as AUTOMATIC1111 spells it (gradio 4 run) and as Forge Classic does (gradio 3 run)
    xyz_title = "X/Y/Z plot" if int(gr.__version__.split(".")[0]) >= 4 else "X/Y/Z Plot"
    script_list = made(gr.Dropdown(label="Script", elem_id="script_list", choices=["None", xyz_title],
                                   value="None", type="index"), "script_list")
    with gr.Column(visible=False, elem_id="fake_xyz") as xyz_group:
        x_type = made(gr.Dropdown(label="X type", elem_id="script_txt2img_xyz_plot_x_type",
                                  choices=["Nothing", "Seed", "Prompt S/R"], value="Seed", type="index"),
                      "script_txt2img_xyz_plot_x_type")
        x_values = made(gr.Textbox(label="X values", elem_id="script_txt2img_xyz_plot_x_values", lines=1),
                        "script_txt2img_xyz_plot_x_values")
    script_list.change(lambda i: gr.update(visible=i == 1), script_list, xyz_group)

tabs = callbacks["ui_tabs"]()
record("ui_tabs", tabs=[[t[1], t[2]] for t in tabs])
HOST_JS = """
window.gradioApp = function () {
    const elems = document.getElementsByTagName('gradio-app');
    const elem = elems.length ? elems[0] : document;
    return elem.shadowRoot ? elem.shadowRoot : elem;
};
window.updateInput = function (target) {
    target.dispatchEvent(new Event('input', {bubbles: true}));
};
window.switch_to_txt2img = function () {
    gradioApp().querySelector('#tabs').querySelectorAll('button')[0].click();
};
"""


def generate(prompt):
    with queue_lock:                       # what the WebUI's wrap_gradio_gpu_call does
        record("txt2img", prompt=prompt)
        return f"generated at {time.time():.3f}"


def refreshed(n):
    record("lora_cards_refresh")
    return str(int(n or 0) + 1)


with open(os.path.join(ROOT, "style.css"), encoding="utf-8") as f:
    css = f.read()
with open(os.path.join(ROOT, "javascript", "i2l.js"), encoding="utf-8") as f:
    page_js = f.read()

with gr.Blocks(css=css, title="fake webui") as demo:
    with gr.Tabs(elem_id="tabs"):
        with gr.TabItem("txt2img", id="txt2img", elem_id="tab_txt2img"):
            txt2img_interface.render()
        for blocks, title, elem_id in tabs:
            with gr.TabItem(title, id=elem_id, elem_id=f"tab_{elem_id}"):
                blocks.render()
    gen.click(generate, prompt, out)
    interrupt.click(lambda: shared.state.interrupt(), None, None, queue=False)
    refresh.click(refreshed, refresh_count, refresh_count, queue=False)
    kw = {"js": None} if int(gr.__version__.split(".")[0]) >= 4 else {"_js": None}
    key = next(iter(kw))
    demo.load(None, None, None, **{key: "() => {\n" + HOST_JS + page_js + "\n; return []; }"})

if int(gr.__version__.split(".")[0]) >= 4:
    demo.queue(default_concurrency_limit=8)
else:
    demo.queue(concurrency_count=8)
app, _, _ = demo.launch(server_name="127.0.0.1", server_port=PORT, prevent_thread_lock=True, show_api=False)
if "app_started" in callbacks:             # as the WebUI does once its app exists
    callbacks["app_started"](demo, app)
    record("app_started")
record("ready")
demo.block_thread()
