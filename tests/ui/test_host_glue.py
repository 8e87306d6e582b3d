"""The extension inside a WebUI-shaped page (tests/ui/fake_webui.py): the script registers the
tab and settings, jobs take the host's queue lock and call its hooks, Interrupt stops a job,
Send to txt2img fills the prompt and switches tab, and the Lora cards are refreshed."""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

import pytest

from helpers import children, gone, slow_worker
from ui_helpers import ROOT, api, api_wait, b64, click_run, free_port, name_state, progress, shot, type_name, upload, wait_count, wait_finished


class FakeWebUI:
    def __init__(self, python, tmp_dir, tiny_models, worker_python, artifacts, pause, opts=None, args="",
                 env=None):
        self.root = os.path.join(tmp_dir, "webui")
        self.lora_dir = os.path.join(self.root, "models", "Lora")
        os.makedirs(self.lora_dir)
        self.log_path = os.path.join(tmp_dir, "host-calls.jsonl")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        python_for_worker, shim_env = slow_worker(worker_python, pause) if pause else (worker_python, {})
        env = dict(os.environ, PYTHONPATH="", FAKE_WEBUI_LOG=self.log_path, FAKE_WEBUI_ROOT=self.root,
                   I2L_PYTHON=python_for_worker, I2L_MODELS_DIR=tiny_models, I2L_LANG="en",
                   GRADIO_ANALYTICS_ENABLED="False", FAKE_WEBUI_OPTS=json.dumps(opts or {}), FAKE_WEBUI_ARGS=args,
                   **shim_env, **(env or {}))
        self.out = open(os.path.join(artifacts, "fake-webui.log"), "w")
        self.proc = subprocess.Popen([python, os.path.join(ROOT, "tests", "ui", "fake_webui.py"), ROOT, str(port)],
                                     cwd=self.root, env=env, stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, open(self.out.name).read()[-3000:]
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "fake WebUI did not start"
            time.sleep(0.3)
        while "ready" not in self.events():          # its app-started callbacks have run (the API is on)
            assert self.proc.poll() is None and time.monotonic() < deadline, open(self.out.name).read()[-3000:]
            time.sleep(0.1)

    def calls(self) -> list[dict]:
        with open(self.log_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def events(self) -> list[str]:
        return [c["event"] for c in self.calls()]

    def workers(self) -> list[int]:
        """The worker processes this WebUI started."""
        return children(self.proc.pid, b"i2l_ext.worker")

    def files(self):
        return sorted(os.listdir(self.lora_dir))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()


@pytest.fixture(scope="module")
def webui(ui_python, tmp_path_factory, tiny_models, worker_python, artifacts):
    w = FakeWebUI(ui_python, str(tmp_path_factory.mktemp("webui")), tiny_models, worker_python, artifacts, pause=4)
    yield w
    w.stop()


def open_our_tab(page, webui):
    page.goto(webui.url)
    page.wait_for_selector("#tabs")
    page.click("#tabs button:has-text('Image to LoRA')")
    page.wait_for_selector("#i2l_run", state="visible")
    page.wait_for_function("() => window.i2l_ready === true")
    page.wait_for_selector("#i2l_lib_info > div > div", state="attached")
    page.wait_for_timeout(500)


def test_registers_tab_and_settings(webui):
    ev = webui.calls()
    assert [c for c in ev if c["event"] == "ui_tabs"][0]["tabs"] == [["Image to LoRA", "i2l_tab"]]
    keys = {c["key"] for c in ev if c["event"] == "add_option"}
    assert {"i2l_models_dir", "i2l_worker_python", "i2l_language", "i2l_vram_profile", "i2l_free_vram"} <= keys
    assert all(c["section"][0] == "i2l" for c in ev if c["event"] == "add_option")
    # defaults of plain types: A1111 builds its settings API's pydantic model from them at start
    assert {c["default_type"] for c in ev if c["event"] == "add_option"} <= {"str", "bool", "int", "float"}
    assert "torch_imported" not in webui.events()
    assert "app_started" in webui.events()
    assert "i2l_standby" in keys
    # By default a standby worker starts once the WebUI is up: its code only, no weights named.
    deadline = time.monotonic() + 30
    while not webui.workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    started = webui.workers()
    assert len(started) == 1
    args = worker_args(started[0])
    assert b"--standby" in args and b"--prefetch" not in args


def worker_args(pid) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


def test_standby_setting_off_starts_no_worker_with_the_webui(ui_python, tmp_path, tiny_models, worker_python):
    w = FakeWebUI(ui_python, str(tmp_path), tiny_models, worker_python, str(tmp_path), pause=0,
                  opts={"i2l_standby": False})
    try:
        assert "app_started" in w.events()
        time.sleep(3)
        assert w.workers() == []          # nothing until the tab is opened
    finally:
        w.stop()


def test_start_with_the_webui_setting_starts_the_worker_at_once(ui_python, tmp_path, tiny_models, worker_python,
                                                                  artifacts):
    """Settings → "Also start the worker when the WebUI starts": the worker runs (and reads the
    default variant's weights) before anyone opens the page."""
    w = FakeWebUI(ui_python, str(tmp_path), tiny_models, worker_python, str(tmp_path), pause=0,
                  opts={"i2l_start_with_webui": True})
    try:
        deadline = time.monotonic() + 60
        while not w.workers() and time.monotonic() < deadline:
            time.sleep(0.2)
        started = w.workers()
        assert len(started) == 1
        assert b"--prefetch" in worker_args(started[0])              # it reads the weights too
    finally:
        w.stop()
    assert all(gone(pid, 20) for pid in started)      # the WebUI gone: its worker goes too


def test_job_in_host(page, webui, sample_images, artifacts):
    open_our_tab(page, webui)
    upload(page, sample_images["images"][:2])
    wait_count(page, 2)
    type_name(page, "host_lora")
    name_state(page, True, os.path.join(webui.lora_dir, "host_lora.safetensors"))
    standby = webui.workers()
    click_run(page)
    # while the job runs, a txt2img Generate waits for the queue lock
    deadline = time.monotonic() + 120
    while progress(page)["state"] != "running":
        assert progress(page)["state"] not in ("done", "error", "cancelled"), page.inner_text("#i2l_notice")
        assert time.monotonic() < deadline, page.inner_text("#i2l_notice")
        time.sleep(0.2)
    page.click("#tabs button:has-text('txt2img')")
    page.click("#txt2img_generate")
    t_click = time.time()
    page.click("#tabs button:has-text('Image to LoRA')")
    final, _ = wait_finished(page)
    assert final["state"] == "done", page.inner_text("#i2l_notice")
    assert page.is_visible("#i2l_send")                    # host-only button shown
    shot(page, artifacts, "20-host-result")
    assert webui.files() == ["host_lora.json", "host_lora.preview.png", "host_lora.safetensors"]
    assert webui.workers() == standby and len(standby) == 1     # the standby from the start did the job
    time.sleep(1.0)
    calls = webui.calls()
    ev = [c["event"] for c in calls]
    begin = ev.index("state.begin")
    assert ev.index("torch_gc") > begin                    # VRAM freed before the job (A1111 path)
    assert begin < ev.index("unload_model_weights") < ev.index("send_model_to_device") < ev.index("state.end")
    assert "state.end" in ev[begin:]
    assert "list_available_networks" in ev                  # host Lora list refreshed
    end_t = next(c["t"] for c in calls if c["event"] == "state.end")
    gen = [c for c in calls if c["event"] == "txt2img"]
    assert gen and gen[0]["t"] >= end_t - 0.5 and gen[0]["t"] > t_click + 1.0   # waited for the job
    # the page clicked the hidden Lora refresh button
    page.click("#tabs button:has-text('txt2img')")
    page.wait_for_function("() => gradioApp().querySelector('#txt2img_refresh_count input, "
                           "#txt2img_refresh_count textarea').value !== '0'")
    page.click("#tabs button:has-text('Image to LoRA')")
    page.fill("#txt2img_prompt textarea", "") if page.is_visible("#txt2img_prompt textarea") else None
    page.click("#i2l_send")                                # Send to txt2img: appends and switches
    page.wait_for_selector("#txt2img_prompt textarea", state="visible")
    page.wait_for_function("() => gradioApp().querySelector('#txt2img_prompt textarea').value"
                           ".includes('<lora:host_lora:1>')")
    shot(page, artifacts, "21-host-sent-to-txt2img")

    # Send with a weight sweep: the host's own X/Y/Z plot, set to Prompt S/R over the weights
    page.evaluate("() => { gradioApp().querySelector('#txt2img_prompt textarea').value = 'a cat'; "
                  "updateInput(gradioApp().querySelector('#txt2img_prompt textarea')); }")
    page.click("#tabs button:has-text('Image to LoRA')")
    assert page.is_visible("#i2l_send_sweep")
    page.click("#i2l_send_sweep")
    page.wait_for_selector("#fake_xyz", state="visible")         # the script's own change shows its fields
    page.wait_for_function("() => gradioApp().querySelector('#txt2img_prompt textarea').value"
                           " === 'a cat, <lora:host_lora:1>'")
    values = "<lora:host_lora:1>, <lora:host_lora:0.25>, <lora:host_lora:0.5>, <lora:host_lora:0.75>, " \
             "<lora:host_lora:1.25>"
    page.wait_for_function("(v) => gradioApp().querySelector('#script_txt2img_xyz_plot_x_values textarea').value === v",
                           arg=values)
    assert "x/y/z plot" in page.eval_on_selector("#script_list", "e => e.innerText + ' ' + "      # either spelling
                                                 "[...e.querySelectorAll('input')].map(i => i.value).join(' ')").lower()
    assert "Prompt S/R" in page.eval_on_selector("#script_txt2img_xyz_plot_x_type", "e => e.innerText + ' ' + "
                                                 "[...e.querySelectorAll('input')].map(i => i.value).join(' ')")
    shot(page, artifacts, "22-host-weight-sweep")


def test_interrupt_stops_job(page, webui, sample_images, artifacts):
    open_our_tab(page, webui)
    before = webui.files()
    upload(page, sample_images["images"][:1])
    wait_count(page, 1)
    type_name(page, "interrupted")
    name_state(page, True, "interrupted")
    click_run(page)
    deadline = time.monotonic() + 120
    while True:
        p = progress(page)
        if p["state"] == "running" and p["fraction"] >= 0.75:
            break
        assert p["state"] not in ("done", "error", "cancelled") and time.monotonic() < deadline, p
        time.sleep(0.1)
    page.click("#tabs button:has-text('txt2img')")
    t0 = time.monotonic()
    page.click("#txt2img_interrupt")
    page.click("#tabs button:has-text('Image to LoRA')")
    final, _ = wait_finished(page, timeout=30)
    assert final["state"] == "cancelled"
    assert time.monotonic() - t0 < 10
    time.sleep(0.5)
    assert webui.files() == before                          # nothing left behind
    shot(page, artifacts, "22-host-interrupted")


def test_api_in_the_webui_follows_its_login(ui_python, tmp_path, tiny_models, worker_python, artifacts,
                                            sample_images):
    """The API on the WebUI's own app (on_app_started), behind its --api-auth; a job through it runs
    as the tab's do (the WebUI shown busy meanwhile) and lands in the WebUI's Lora folder."""
    w = FakeWebUI(ui_python, str(tmp_path), tiny_models, worker_python, artifacts, pause=0,
                  args="--api-auth ann:s3cret")
    try:
        assert api(w.url, "GET", "/version")[0] == 401
        assert api(w.url, "GET", "/version", auth=("ann", "nope"))[0] == 401
        status, job = api(w.url, "POST", "/jobs", {"images": [b64(p) for p in sample_images["images"][:2]],
                                                   "name": "from_api"}, auth=("ann", "s3cret"))
        assert status == 202, job
        job = api_wait(w.url, job["id"], auth=("ann", "s3cret"))
        assert job["state"] == "done", job
        assert w.files() == ["from_api.json", "from_api.preview.png", "from_api.safetensors"]
        ev = w.events()
        assert ev.index("state.begin") < ev.index("state.end")          # the WebUI showed the job as busy
    finally:
        w.stop()
