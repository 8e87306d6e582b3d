"""Page helpers shared by the browser tests."""
from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    def __init__(self, url: str, lora_dir: str, proc: subprocess.Popen, log_path: str):
        self.url, self.lora_dir, self.proc, self.log_path = url, lora_dir, proc, log_path

    def files(self) -> list[str]:
        """Every file under the Lora folder, hidden and partial ones included."""
        out = []
        for dirpath, _, filenames in os.walk(self.lora_dir):
            out += [os.path.relpath(os.path.join(dirpath, f), self.lora_dir) for f in filenames]
        return sorted(out)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def start_app(python: str, tmp_dir: str, models_dir: str, worker_python: str, artifacts: str, tag: str,
              lang: str = "en", extra_env: dict | None = None) -> App:
    lora_dir = os.path.join(tmp_dir, "Lora")
    os.makedirs(lora_dir, exist_ok=True)
    port = free_port()
    log_path = os.path.join(artifacts, f"server-{tag}.log")
    env = dict(os.environ, PYTHONPATH=ROOT, I2L_LANG=lang, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False",
               HOME=os.environ.get("HOME", tmp_dir))
    env.update(extra_env or {})
    log = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen([python, "-m", "i2l_ext", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--lora-dir", lora_dir, "--models-dir", models_dir, "--python", worker_python,
                             "--lang", lang], cwd=tmp_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"the app exited with {proc.returncode}:\n" + open(log_path).read()[-3000:])
        try:
            with urllib.request.urlopen(url + "i2l/v1/version", timeout=2) as r:   # the page, then the API
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the app did not answer within 120 s:\n" + open(log_path).read()[-3000:])
        time.sleep(0.3)
    return App(url, lora_dir, proc, log_path)


def stop_app(app: App) -> None:
    app.proc.terminate()
    try:
        app.proc.wait(15)
    except subprocess.TimeoutExpired:
        app.proc.kill()
        app.proc.wait(5)


NAME_INPUT = "#i2l_name input, #i2l_name textarea"


def open_tab(page, app):
    page.goto(app.url)
    page.wait_for_selector("#i2l_run")
    page.wait_for_function("() => window.i2l_ready === true")
    # Let the page's load events finish: gradio 3 can drop an upload event fired while they run.
    page.wait_for_selector("#i2l_models_status .i2l-models", state="attached")
    page.wait_for_selector("#i2l_lib_info > div > div", state="attached")
    page.wait_for_timeout(300)


def shot(page, artifacts, name):
    page.screenshot(path=os.path.join(artifacts, f"{name}.png"), full_page=True)


def upload(page, paths):
    page.set_input_files("#i2l_upload input[type=file]", paths)


def wait_count(page, n, timeout=30_000):
    page.wait_for_selector(f"#i2l_count [data-count='{n}']", timeout=timeout)


def type_name(page, name):
    page.fill(NAME_INPUT, name)


def name_state(page, ok: bool, contains: str = "", timeout=15_000):
    """Wait for the as-you-type check to say ok / not ok (and mention ``contains``)."""
    page.wait_for_function(
        """([ok, contains]) => {
            const el = window.i2l_app().querySelector('#i2l_name_msg .i2l-name');
            return el && el.dataset.ok === ok && el.textContent.includes(contains);
        }""", arg=[str(int(ok)), contains], timeout=timeout)
    return page.inner_text("#i2l_name_msg .i2l-name")


def progress(page) -> dict:
    el = page.query_selector("#i2l_progress .i2l-progress")
    if el is None:
        return {"state": None}
    return {"state": el.get_attribute("data-state"), "phase": el.get_attribute("data-phase"),
            "fraction": float(el.get_attribute("data-fraction") or 0)}


def click_run(page) -> None:
    """Make LoRA, then wait until the progress line is this click's (its data-run changes), so the
    state read next is never the one an earlier click left."""
    before = page.eval_on_selector("#i2l_progress .i2l-progress", "e => e.dataset.run")
    page.click("#i2l_run")
    page.wait_for_function("b => { const el = window.i2l_app().querySelector('#i2l_progress .i2l-progress');"
                           " return el && el.dataset.run !== b; }", arg=before)


def wait_finished(page, timeout=300, on_poll=None) -> tuple[dict, list[dict]]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = progress(page)
        seen.append(p)
        if on_poll:
            on_poll(p)
        if p["state"] in ("done", "error", "cancelled"):
            return p, seen
        time.sleep(0.25)
    raise AssertionError(f"job did not finish in {timeout} s; last progress {seen[-1:]}")


def textbox_value(page, elem_id) -> str:
    return page.eval_on_selector(f"#{elem_id} input, #{elem_id} textarea", "e => e.value")


def make_lora(page, app, images, name):
    upload(page, images)
    wait_count(page, len(images))
    type_name(page, name)
    name_state(page, True, name)
    click_run(page)
    final, seen = wait_finished(page)
    assert final["state"] == "done", page.inner_text("#i2l_notice")
    return seen


def api(base: str, method: str, path: str, body=None, auth: tuple[str, str] | None = None,
        headers: dict | None = None) -> tuple[int, object]:
    """One call to the HTTP API under ``base`` (the server's URL): (status, the JSON answer or bytes)."""
    import base64
    import json
    import urllib.error
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base.rstrip("/") + "/i2l/v1" + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw, kind = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, raw, kind = e.code, e.read(), e.headers.get("content-type", "")
    return status, json.loads(raw) if "json" in kind else raw


def b64(path: str) -> str:
    import base64
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def api_wait(base: str, job_id: str, timeout: float = 240, auth=None) -> dict:
    """Poll ``GET /jobs/{id}`` until the job ends; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        status, job = api(base, "GET", f"/jobs/{job_id}", auth=auth)
        assert status == 200, job
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
