"""``serve`` is closed by default and stops cleanly: beyond loopback only with a login, no server file
reachable through the page, remote users limited to uploads and the owner's folders and source, and
the launcher passes SIGTERM on (or, killed outright, takes the app and its worker with it)."""
from __future__ import annotations

import http.cookiejar
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from helpers import ROOT, children, gone
from ui_helpers import api, free_port

sys.path.insert(0, ROOT)
from i2l_ext.contract import I2LError  # noqa: E402
from i2l_ext.images import check_readable  # noqa: E402
from i2l_ext.settings import Settings  # noqa: E402


def _listening(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _wait_listening(port, proc, log, timeout=120):
    deadline = time.monotonic() + timeout
    while not _listening(port):
        assert proc.poll() is None, open(log).read()[-3000:]
        assert time.monotonic() < deadline, open(log).read()[-3000:]
        time.sleep(0.3)


def test_a_bind_beyond_loopback_needs_a_login(tmp_path):
    port = free_port()
    p = subprocess.run([sys.executable, "-m", "i2l_ext", "serve", "--host", "0.0.0.0", "--port", str(port),
                        "--lora-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert p.returncode != 0 and "no login" in p.stderr and "--auth" in p.stderr
    assert not _listening(port)
    p = subprocess.run([sys.executable, "-m", "i2l_ext", "serve", "--host", "0.0.0.0", "--auth", "nopassword"],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert p.returncode != 0 and "USER:PASSWORD" in p.stderr


def test_remote_users_read_only_uploads_and_the_owners_folders(tmp_path):
    uploads, mine, other = tmp_path / "uploads", tmp_path / "mine", tmp_path / "other"
    for d in (uploads, mine, other):
        d.mkdir()
    (mine / "link").symlink_to(other)
    local = Settings(remote=False)
    check_readable(local, str(other / "a.png"), [str(uploads)])              # this computer only: anything
    remote = Settings(remote=True, image_dirs=(str(mine),))
    check_readable(remote, str(uploads / "a.png"), [str(uploads)])
    check_readable(remote, str(mine / "a.png"), [str(uploads)])
    for bad in (other / "a.png", mine / "link" / "a.png", mine / ".." / "other", "/etc"):
        with pytest.raises(I2LError) as e:
            check_readable(remote, str(bad), [str(uploads)])
        assert e.value.code == I2LError.NOT_ALLOWED


@pytest.fixture
def remote_app(ui_python, tmp_path, tiny_models, worker_python):
    lora = tmp_path / "Lora"
    lora.mkdir()
    (lora / "evil.preview.png").symlink_to("/etc/hostname")
    port = free_port()
    log = str(tmp_path / "app.log")
    proc = subprocess.Popen([ui_python, "-m", "i2l_ext", "serve", "--host", "0.0.0.0", "--port", str(port),
                             "--auth", "ann:s3cret", "--lora-dir", str(lora), "--models-dir", tiny_models,
                             "--python", worker_python], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=ROOT, GRADIO_ANALYTICS_ENABLED="False"))
    try:
        _wait_listening(port, proc, log)
        yield port, str(lora), log
    finally:
        proc.terminate()
        proc.wait(30)


def test_remote_page_asks_for_a_login_and_serves_no_server_file(remote_app):
    port, lora, log = remote_app
    base = f"http://127.0.0.1:{port}"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/config", timeout=10)
    assert e.value.code == 401
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with pytest.raises(urllib.error.HTTPError):
        opener.open(base + "/login", urllib.parse.urlencode({"username": "ann", "password": "wrong"}).encode(), timeout=10)
    opener.open(base + "/login", urllib.parse.urlencode({"username": "ann", "password": "s3cret"}).encode(), timeout=10)
    config = json.loads(opener.open(base + "/config", timeout=10).read())
    comps = {c.get("props", {}).get("elem_id"): c.get("props", {}) for c in config["components"]}
    assert comps["i2l_folder"]["visible"] is False                          # no server folder to name
    assert comps["i2l_models_source"]["interactive"] is False                # the owner's source, not theirs
    assert comps["i2l_models_mirror"]["interactive"] is False
    for path in (os.path.join(lora, "evil.preview.png"), "/etc/hostname", os.path.join(ROOT, "README.md"), "README.md"):
        with pytest.raises(urllib.error.HTTPError) as e:
            opener.open(base + "/file=" + path, timeout=10)
        assert e.value.code in (403, 404), path
    assert "with a login" in open(log).read()
    # the HTTP API asks for the same login (HTTP Basic)
    deadline = time.monotonic() + 30
    while "HTTP API is at" not in open(log).read():
        assert time.monotonic() < deadline, open(log).read()[-3000:]
        time.sleep(0.2)
    assert api(base, "GET", "/version")[0] == 401
    assert api(base, "GET", "/loras", auth=("ann", "wrong"))[0] == 401
    status, answer = api(base, "GET", "/version", auth=("ann", "s3cret"))
    assert status == 200 and answer["api"] == 1


def _fake_app_env(tmp_path, ui_python) -> str:
    """An app environment for the launcher: ``bin/python`` runs the test's gradio, stamped as made."""
    from i2l_ext.ui import appenv
    env = tmp_path / "app-env"
    (env / "bin").mkdir(parents=True)
    py = env / "bin" / "python"
    py.write_text(f'#!/bin/sh\nexec "{ui_python}" "$@"\n')
    py.chmod(0o755)
    (env / "i2l-app-stamp").write_text(appenv._wanted())
    return str(env)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_the_launcher_takes_the_app_and_its_worker_with_it(how, ui_python, tmp_path, tiny_models, worker_python):
    port = free_port()
    log = str(tmp_path / "launcher.log")
    env = dict(os.environ, PYTHONPATH=ROOT, I2L_APP_ENV=_fake_app_env(tmp_path, ui_python),
               GRADIO_ANALYTICS_ENABLED="False")
    launcher = subprocess.Popen([sys.executable, "-m", "i2l_ext", "serve", "--port", str(port), "--lora-dir",
                                 str(tmp_path / "Lora"), "--models-dir", tiny_models, "--python", worker_python],
                                cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, launcher, log)
        apps = children(launcher.pid)
        assert len(apps) == 1
        deadline = time.monotonic() + 30
        while not [w for w in children(apps[0])] and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = children(apps[0])                      # the standby worker the app started
        assert workers
        if how == "sigterm":
            launcher.send_signal(signal.SIGTERM)
            assert launcher.wait(30) == 0 or launcher.returncode is not None
            assert all(gone(p, 15) for p in apps + workers)
        else:
            launcher.kill()
            launcher.wait(10)
            assert gone(apps[0], 2.0)                     # the app goes with its launcher
            assert all(gone(p, 2.0) for p in workers)     # and its worker with the app
        assert not _listening(port)
    finally:
        launcher.kill()
