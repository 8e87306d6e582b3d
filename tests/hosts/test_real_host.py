"""The extension inside a real WebUI (AUTOMATIC1111, Forge, Forge Neo, reForge), driven in Chromium.

Opt-in: it runs only when given a WebUI checkout that already has this extension in its
``extensions/`` folder (see tests/hosts/README.md); otherwise every test here is skipped.

    I2L_HOST_ROOT    the WebUI folder (the one with launch.py)
    I2L_HOST_PYTHON  the WebUI's interpreter (e.g. <root>/venv/bin/python)
    I2L_HOST_ARGS    extra launch flags, e.g. "--skip-torch-cuda-test --use-cpu all --no-half" (A1111 on a
                     CPU), "--cpu" (Forge Neo), "--always-cpu" (Forge)

The host is started with ``launch.py --port <free port>`` on 127.0.0.1 (no --listen), with a settings
file of its own in a temporary folder (nothing of ours saved in it: the WebUI's own config.json is
left alone), and with the extension's flags ``--i2l-models-dir`` (the tiny random-weight model set)
and ``--i2l-lora-dir`` (a temporary folder), as a user puts them in COMMANDLINE_ARGS. The tests run in
order on one page: the tab renders and names the flag's models folder, the settings section is there
(its models folder setting empty), a tiny job writes ``<the flag's Lora folder>/<name>.safetensors``
with its card and preview, Send to txt2img puts ``<lora:name:1>`` into the txt2img prompt; at the end
the host's whole process group is killed and the worker it started must be gone 5 s later.

More environment: I2L_HOST_START_TIMEOUT (seconds, default 900: a first launch builds the worker
environment), I2L_HOST_EXTENSION (the extension folder inside the host, found by itself otherwise),
I2L_TINY_MODELS (a tiny model set to reuse), I2L_CHROMIUM, I2L_ARTIFACTS (screenshots and the host's
log go to ``<artifacts>/hosts/<host folder name>/``).
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import time
import urllib.request

import pytest
from helpers import chromium, make_image

HOST_ROOT = os.environ.get("I2L_HOST_ROOT", "")
HOST_PYTHON = os.environ.get("I2L_HOST_PYTHON", "")
HOST_ARGS = shlex.split(os.environ.get("I2L_HOST_ARGS", ""))
START_TIMEOUT = float(os.environ.get("I2L_HOST_START_TIMEOUT", "900"))
JOB_TIMEOUT = 600.0
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAB_TITLE = "Image to LoRA"          # the tab's and the settings section's English title

pytestmark = pytest.mark.skipif(
    not (HOST_ROOT and HOST_PYTHON),
    reason="needs a real WebUI with this extension installed: set I2L_HOST_ROOT and I2L_HOST_PYTHON "
           "(and I2L_HOST_ARGS); see tests/hosts/README.md")

# Clicks a top-level tab by its title, in gradio 3 and 4 alike (both put the tab buttons in a
# .tab-nav that is a direct child of #tabs).
CLICK_TAB_JS = """(title) => {
    const app = window.gradioApp ? gradioApp() : document;
    const tabs = app.querySelector('#tabs');
    if (!tabs) return false;
    const nav = Array.from(tabs.querySelectorAll('.tab-nav')).find(n => n.parentElement === tabs) || tabs;
    const b = Array.from(nav.querySelectorAll('button')).find(b => b.textContent.trim() === title);
    if (!b) return false;
    b.click();
    return true;
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_pids(ext_dir: str) -> set[int]:
    """Worker processes running from this extension folder."""
    pids = set()
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(os.path.join(d, "cmdline"), "rb") as f:
                cmd = f.read().split(b"\0")
            if b"i2l_ext.worker" in cmd and os.path.realpath(os.readlink(os.path.join(d, "cwd"))) == \
                    os.path.realpath(ext_dir):
                pids.add(int(os.path.basename(d)))
        except OSError:
            continue
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _safetensors_metadata(path: str) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)).get("__metadata__") or {}


class Host:
    def __init__(self, tmp: str, artifacts: str):
        self.root = os.path.abspath(HOST_ROOT)
        self.artifacts = artifacts
        self.ext_dir = self._find_extension()
        # Where LoRAs go: --i2l-lora-dir, or with I2L_HOST_LORA_FLAG=host the WebUI's own --lora-dir
        self.lora_flag = "--lora-dir" if os.environ.get("I2L_HOST_LORA_FLAG") == "host" else "--i2l-lora-dir"
        self.lora_dir = os.path.join(tmp, "flag-Lora")
        os.makedirs(self.lora_dir)
        self.models_dir = os.environ.get("I2L_TINY_MODELS") or os.path.join(tmp, "tiny-models")
        self.settings_file = os.path.join(tmp, "config.json")
        settings = {}
        uid = self._version_uid()
        if uid:
            settings["VERSION_UID"] = uid
        with open(self.settings_file, "w", encoding="utf-8") as f:
            json.dump(settings, f)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = os.path.join(artifacts, "host.log")
        self.workers_before = _worker_pids(self.ext_dir)
        self.proc: subprocess.Popen | None = None
        self.log = None
        self.ready_s: float | None = None

    def _version_uid(self) -> str | None:
        """Forge Neo stops at launch, waiting for Enter, when an existing settings file lacks its
        ``VERSION_UID`` (modules/launch_utils.py: verify_version); the settings file made here carries it."""
        import re
        try:
            with open(os.path.join(self.root, "modules", "launch_utils.py"), encoding="utf-8") as f:
                m = re.search(r"^VERSION_UID\s*(?::[^=\n]*)?=\s*[\"']([^\"']+)[\"']", f.read(), re.M)
        except OSError:
            return None
        return m.group(1) if m else None

    def _find_extension(self) -> str:
        ext = os.environ.get("I2L_HOST_EXTENSION")
        if not ext:
            found = sorted(glob.glob(os.path.join(self.root, "extensions", "*", "scripts", "i2l_tab.py")))
            if not found:
                pytest.fail(f"no Image to LoRA extension in {self.root}/extensions (git clone it there first)")
            ext = os.path.dirname(os.path.dirname(found[0]))
        return os.path.abspath(ext)

    def start(self) -> None:
        args = [HOST_PYTHON, "launch.py", "--port", str(self.port), "--ui-settings-file", self.settings_file,
                "--i2l-models-dir", self.models_dir, self.lora_flag, self.lora_dir, *HOST_ARGS]
        env = {k: v for k, v in os.environ.items() if not k.startswith("I2L_")}      # the flags alone decide
        env.update(GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        self.log = open(self.log_path, "w", encoding="utf-8", errors="replace")     # closed by stop()
        self.log.write("$ " + shlex.join(args) + "\n")
        self.log.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(args, cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the WebUI exited with {self.proc.returncode} before its UI answered:\n" + self.log_tail())
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > START_TIMEOUT:
                pytest.fail(f"the WebUI did not answer on {self.url} within {START_TIMEOUT:.0f} s:\n" + self.log_tail())
            time.sleep(1)
        self.ready_s = time.monotonic() - t0

    def make_tiny_models(self) -> None:
        """The tiny model set, made by the worker environment the host's launch prepared."""
        if os.path.exists(os.path.join(self.models_dir, "i2l-tiny.json")):
            return
        py = os.path.join(self.ext_dir, ".venv-worker", "bin", "python")
        if not os.path.exists(py):
            py = os.path.join(self.ext_dir, ".venv-worker", "Scripts", "python.exe")
        if not os.path.exists(py):
            pytest.fail(f"the launch did not build the worker environment in {self.ext_dir}/.venv-worker "
                        "(did install.py run? --skip-install skips it):\n" + self.log_tail())
        subprocess.run([py, "-m", "i2l_ext", "tiny-models", self.models_dir], cwd=self.ext_dir, check=True,
                       capture_output=True, timeout=600)

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def log_tail(self, n: int = 4000) -> str:
        return self.log_text()[-n:]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the host's whole process group: SIGTERM, then SIGKILL."""
        if self.proc is not None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                if self.proc.poll() is not None and not self._group_alive():
                    break
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and (self.proc.poll() is None or self._group_alive()):
                    time.sleep(0.2)
        if self.log is not None and not self.log.closed:
            self.log.close()

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def new_workers(self) -> set[int]:
        return {p for p in _worker_pids(self.ext_dir) - self.workers_before if _alive(p)}


@pytest.fixture(scope="module")
def artifacts() -> str:
    base = os.environ.get("I2L_ARTIFACTS") or os.path.join(ROOT, "test-artifacts")
    d = os.path.join(base, "hosts", os.path.basename(os.path.abspath(HOST_ROOT)) or "webui")
    os.makedirs(d, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def host(tmp_path_factory, artifacts):
    if not os.path.isfile(os.path.join(HOST_ROOT, "launch.py")):
        pytest.fail(f"I2L_HOST_ROOT={HOST_ROOT} has no launch.py")
    if not os.path.exists(HOST_PYTHON):
        pytest.fail(f"I2L_HOST_PYTHON={HOST_PYTHON} does not exist")
    h = Host(str(tmp_path_factory.mktemp("host")), artifacts)
    try:
        h.start()
        h.make_tiny_models()
        yield h
    finally:
        h.stop()
        for pid in h.new_workers():          # only a worker this host started, should one outlive it
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        name = _made.pop("name", None)
        for suffix in (".safetensors", ".json", ".preview.png"):
            if name and os.path.exists(os.path.join(h.lora_dir, name + suffix)):
                os.remove(os.path.join(h.lora_dir, name + suffix))


@pytest.fixture(scope="module")
def page(host):
    with chromium() as browser:
        ctx = browser.new_context(viewport={"width": 1400, "height": 1400})
        pg = ctx.new_page()
        pg.set_default_timeout(60_000)
        pg.on("pageerror", lambda e: _page_errors.append(str(e)))
        pg.goto(host.url)
        _wait_ui(pg)
        # Some WebUI builds reload the page once shortly after the first load: let that happen first.
        pg.wait_for_timeout(3000)
        _wait_ui(pg)
        yield pg


def _wait_ui(pg) -> None:
    pg.wait_for_selector("#tabs", state="attached", timeout=180_000)
    pg.wait_for_function("() => window.i2l_ready === true && typeof window.gradioApp === 'function'",
                         timeout=180_000)


def _tab(pg, title: str) -> None:
    assert pg.evaluate(CLICK_TAB_JS, title), f"no top-level tab titled {title!r}"


def _to_txt2img(pg) -> None:
    pg.evaluate("() => window.switch_to_txt2img()")
    pg.wait_for_selector("#txt2img_prompt textarea", state="visible")


def _shot(pg, artifacts, name) -> None:
    pg.screenshot(path=os.path.join(artifacts, f"{name}.png"), full_page=True)


def _progress(pg) -> dict:
    el = pg.query_selector("#i2l_progress .i2l-progress")
    if el is None:
        return {"state": None}
    return {"state": el.get_attribute("data-state"), "fraction": float(el.get_attribute("data-fraction") or 0)}


_made: dict = {}
_page_errors: list = []


def test_tab_renders(page, host, artifacts):
    _tab(page, TAB_TITLE)
    page.wait_for_selector("#i2l_run", state="visible")
    page.wait_for_selector("#i2l_upload input[type=file]", state="attached")
    page.wait_for_selector("#i2l_models_status .i2l-models", state="attached", timeout=60_000)
    page.wait_for_selector("#i2l_lib_info > div > div", state="attached")
    assert page.query_selector("#i2l_send") is not None          # the WebUI-only Send to txt2img
    assert host.models_dir in page.inner_text("#i2l_models_status")     # the flag reached the tab
    _shot(page, artifacts, "01-tab")


def test_settings_section(page, host, artifacts):
    _tab(page, "Settings")
    page.wait_for_selector("#settings_i2l", state="attached")
    for key in ("i2l_models_dir", "i2l_worker_python", "i2l_language", "i2l_vram_profile", "i2l_free_vram",
                "i2l_keep_warm_minutes", "i2l_prewarm", "i2l_standby", "i2l_offline"):
        assert page.query_selector(f"#setting_{key}") is not None, key
    value = page.eval_on_selector("#setting_i2l_models_dir textarea, #setting_i2l_models_dir input", "e => e.value")
    assert value == ""                                       # no setting saved: the flag decides
    # Show the section (its button sits in the settings' own tab list) for the screenshot.
    page.evaluate("""(title) => {
        const b = Array.from(gradioApp().querySelectorAll('#settings button')).find(b => b.textContent.trim() === title);
        if (b) b.click();
    }""", TAB_TITLE)
    page.wait_for_timeout(500)
    _shot(page, artifacts, "02-settings")


def test_job_writes_lora(page, host, artifacts, tmp_path):
    images = [make_image(tmp_path / f"img{i}.png", size=(96 + 16 * i, 64), color=(40 * i, 120, 200 - 30 * i))
              for i in range(2)]
    name = f"i2l_host_test_{int(time.time())}"
    _tab(page, TAB_TITLE)
    page.wait_for_selector("#i2l_run", state="visible")
    page.set_input_files("#i2l_upload input[type=file]", [str(p) for p in images])
    page.wait_for_selector("#i2l_count [data-count='2']")
    page.fill("#i2l_name input, #i2l_name textarea", name)
    page.wait_for_selector("#i2l_name_msg .i2l-name[data-ok='1']")
    page.click("#i2l_run")
    _made["name"] = name
    deadline = time.monotonic() + JOB_TIMEOUT
    while _progress(page)["state"] not in ("done", "error", "cancelled"):
        assert time.monotonic() < deadline, f"no result in {JOB_TIMEOUT:.0f} s: {_progress(page)}"
        time.sleep(0.5)
    _shot(page, artifacts, "03-job-done")
    assert _progress(page)["state"] == "done", page.inner_text("#i2l_notice") + "\n" + host.log_tail()
    path = page.get_attribute("#i2l_result_info .i2l-result", "data-path")
    assert os.path.abspath(path) == os.path.join(host.lora_dir, name + ".safetensors")
    for suffix in (".safetensors", ".json", ".preview.png"):
        assert os.path.getsize(os.path.join(host.lora_dir, name + suffix)) > 0, suffix
    meta = _safetensors_metadata(path)
    assert meta.get("modelspec.architecture") == "Qwen-Image/lora"
    with open(os.path.join(host.lora_dir, name + ".json"), encoding="utf-8") as f:
        card = json.load(f)
    assert "preferred weight" in card and "sd version" in card
    assert page.input_value("#i2l_result_prompt input, #i2l_result_prompt textarea") == f"<lora:{name}:1>"


def test_send_to_txt2img(page, host, artifacts):
    name = _made.get("name")
    if not name or not os.path.exists(os.path.join(host.lora_dir, name + ".safetensors")):
        pytest.skip("no LoRA was made (see test_job_writes_lora)")
    _to_txt2img(page)
    page.fill("#txt2img_prompt textarea", "a photo of a cat")
    _tab(page, TAB_TITLE)
    page.wait_for_selector("#i2l_send", state="visible")
    page.click("#i2l_send")
    page.wait_for_selector("#txt2img_prompt textarea", state="visible")        # switched to txt2img
    page.wait_for_function("(t) => gradioApp().querySelector('#txt2img_prompt textarea').value.includes(t)",
                           arg=f"<lora:{name}:1>", timeout=10_000)
    assert page.input_value("#txt2img_prompt textarea") == f"a photo of a cat, <lora:{name}:1>"
    _shot(page, artifacts, "04-sent-to-txt2img")


def test_send_with_a_weight_sweep(page, host, artifacts):
    """The host's own X/Y/Z plot set to Prompt S/R over the weights, the prompt given <lora:name:1>."""
    name = _made.get("name")
    if not name or not os.path.exists(os.path.join(host.lora_dir, name + ".safetensors")):
        pytest.skip("no LoRA was made (see test_job_writes_lora)")
    _to_txt2img(page)
    page.fill("#txt2img_prompt textarea", "a photo of a cat")
    _tab(page, TAB_TITLE)
    page.wait_for_selector("#i2l_send_sweep", state="visible")
    page.click("#i2l_send_sweep")
    page.wait_for_selector("#txt2img_prompt textarea", state="visible")
    page.wait_for_function("(t) => gradioApp().querySelector('#txt2img_prompt textarea').value.includes(t)",
                           arg=f"<lora:{name}:1>", timeout=10_000)
    values = ", ".join(f"<lora:{name}:{w}>" for w in ("1", "0.25", "0.5", "0.75", "1.25"))
    page.wait_for_function("(v) => gradioApp().querySelector('#script_txt2img_xyz_plot_x_values textarea').value === v",
                           arg=values, timeout=10_000)
    shown = "e => e.innerText + ' ' + [...e.querySelectorAll('input')].map(i => i.value).join(' ')"
    # Forge Classic titles the script "X/Y/Z Plot"
    assert "x/y/z plot" in page.eval_on_selector("#txt2img_script_container #script_list", shown).lower()
    assert "Prompt S/R" in page.eval_on_selector("#script_txt2img_xyz_plot_x_type", shown)
    assert page.is_visible("#script_txt2img_xyz_plot_x_values")      # the script's fields are shown
    _shot(page, artifacts, "05-weight-sweep")


def test_http_api_on_the_webuis_app(host, tmp_path):
    """/i2l/v1 on the WebUI's own app: its version, the variants with the tiny set ready, and a job
    from base64 images that lands in the Lora folder the flags give."""
    import base64

    def call(method, path, body=None):
        req = urllib.request.Request(host.url + "i2l/v1" + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())

    assert call("GET", "/version")[1]["api"] == 1
    assert next(v for v in call("GET", "/variants")[1] if v["id"] == "style")["ready"] is True
    img = make_image(tmp_path / "api.png", size=(96, 64), color=(200, 90, 40))
    name = f"i2l_api_test_{int(time.time())}"
    with open(img, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    status, job = call("POST", "/jobs", {"images": [data], "name": name})
    assert status == 202
    deadline = time.monotonic() + JOB_TIMEOUT
    while job["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
        job = call("GET", f"/jobs/{job['id']}")[1]
    assert job["state"] == "done", job
    assert os.path.abspath(job["result"]["path"]) == os.path.join(host.lora_dir, name + ".safetensors")
    assert call("DELETE", f"/loras/{name}")[0] == 200
    assert not os.path.exists(os.path.join(host.lora_dir, name + ".safetensors"))


def test_no_error_from_the_extension_in_the_host(page, host):
    assert not [e for e in _page_errors if "i2l" in e.lower()], _page_errors
    log = host.log_text()
    bad = [block for block in log.split("Traceback (most recent call last):")[1:]
           if host.ext_dir in block or "i2l_ext" in block]
    assert not bad, "tracebacks from the extension in the host's log:\n" + "\n---\n".join(b[:2000] for b in bad)


def test_host_killed_and_its_worker_leaves_within_5_s(host):
    workers = host.new_workers()
    assert workers, "the WebUI started no worker"
    os.killpg(host.proc.pid, signal.SIGKILL)            # the WebUI's whole process group, outright
    host.proc.wait(30)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "the worker outlived its WebUI by more than 5 s"
    host.stop()
