"""The Models panel in a real browser: downloads from a stand-in hub on 127.0.0.1 (tests/hubstub.py)
serving the tiny model set, with progress, Cancel in the middle of a file and a resumed download.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from ui_helpers import (click_run, name_state, open_tab, shot, start_app, stop_app, type_name, upload, wait_count,
                        wait_finished)

STYLE = "Qwen-Image-i2L-Style.safetensors"
MIRROR_LABEL = "A mirror (custom endpoint)"


@pytest.fixture(scope="module")
def hub(tiny_models):
    from hubstub import HubStub, repos_from_folder
    from i2l_ext import catalog
    with HubStub(repos_from_folder(tiny_models, [f.repo for f in catalog.FILES.values()])) as stub:
        yield stub


@pytest.fixture(scope="module")
def hub_app(ui_python, tmp_path_factory, worker_python, artifacts):
    """An app whose models folder starts empty (each test empties it again)."""
    d = str(tmp_path_factory.mktemp("hub-app"))
    models = os.path.join(d, "models")
    os.makedirs(models)
    env = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "I2L_OFFLINE": "0"}
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env[k] = ""
    a = start_app(ui_python, d, models, worker_python, artifacts, "hub", extra_env=env)
    a.models_dir = models
    yield a
    stop_app(a)


def reset_models(app, hub, tiny_models):
    """An empty models folder, but for the tiny set's marker (so downloaded tiny weights are
    recognised as such by the worker), and a stub with no faults left."""
    for n in os.listdir(app.models_dir):
        p = os.path.join(app.models_dir, n)
        shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
    shutil.copy(os.path.join(tiny_models, "i2l-tiny.json"), app.models_dir)
    hub.release.set()
    hub.stall_at.clear()
    hub.stalled.clear()
    hub.release.clear()


def model_files(models_dir) -> dict[str, int]:
    out = {}
    for dirpath, _, names in os.walk(models_dir):
        for n in names:
            full = os.path.join(dirpath, n)
            out[os.path.relpath(full, models_dir).replace(os.sep, "/")] = os.path.getsize(full)
    return out


def assert_nothing_partial(models_dir, hub):
    """Every file in place is whole and exactly the hub's; only ``.part`` files may be short."""
    for rel, size in model_files(models_dir).items():
        if rel.endswith(".part") or rel.startswith(".i2l") or rel == "i2l-tiny.json":
            continue
        org, name, path = rel.split("/", 2)
        want = hub.repos[f"{org}/{name}"][path]
        assert size == len(want), rel
        with open(os.path.join(models_dir, rel), "rb") as f:
            assert f.read() == want, rel


def open_models(page):
    if not page.is_visible("#i2l_download"):
        page.click("#i2l_models .label-wrap")
    page.wait_for_selector("#i2l_download", state="visible")


def choose(page, elem_id, label):
    """Pick ``label`` in a gradio Dropdown (3.41 and 4.40 render the same list)."""
    page.click(f"#{elem_id} input")
    page.click(f"#{elem_id} ul.options li:has-text('{label}')")
    page.wait_for_function("([id, label]) => window.i2l_app().querySelector('#' + id + ' input').value === label",
                           arg=[elem_id, label])


def use_mirror(page, hub):
    open_models(page)
    choose(page, "i2l_models_source", MIRROR_LABEL)
    page.fill("#i2l_models_mirror input, #i2l_models_mirror textarea", hub.url)


def dl_progress(page) -> dict:
    el = page.query_selector("#i2l_download_progress .i2l-progress")
    if el is None:
        return {"state": None, "fraction": 0.0}
    return {"state": el.get_attribute("data-state"), "fraction": float(el.get_attribute("data-fraction") or 0),
            "done": int(el.get_attribute("data-done") or 0), "text": el.inner_text()}


def wait_dl(page, states, timeout=60.0, on_poll=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        p = dl_progress(page)
        if on_poll:
            on_poll(p)
        if p["state"] in states:
            return p
        assert time.monotonic() < deadline, (states, p, page.inner_text("#i2l_download_progress"))
        time.sleep(0.2)


def ready(page, variant) -> str | None:
    el = page.query_selector(f"#i2l_models_status tr[data-variant='{variant}']")
    return el.get_attribute("data-ready") if el else None


def test_download_cancel_resume(page, hub_app, hub, tiny_models, artifacts):
    from i2l_ext.catalog import QWEN_I2L_REPO
    reset_models(hub_app, hub, tiny_models)
    size = len(hub.repos[QWEN_I2L_REPO][STYLE])
    half = size // 2
    hub.stall_at[STYLE] = half                  # the Style file hangs half way, as a stuck connection does
    open_tab(page, hub_app)
    assert ready(page, "style") == "0"
    use_mirror(page, hub)
    shot(page, artifacts, "30-models-panel")
    page.click("#i2l_download")

    seen = []
    deadline = time.monotonic() + 60
    while not hub.stalled.is_set():
        seen.append(dl_progress(page))
        assert time.monotonic() < deadline, seen[-1:]
        time.sleep(0.1)
    p = wait_dl(page, ("downloading",), on_poll=seen.append)
    page.wait_for_function("() => { const el = window.i2l_app().querySelector('#i2l_download_progress .i2l-progress');"
                           " return el && Number(el.dataset.done) > 0 && el.innerText.includes('%s'); }" % STYLE)
    p = dl_progress(page)
    assert 0 < p["fraction"] < 1, p
    # the files that arrived already count in the status table, while the download goes on
    page.wait_for_function("() => { const el = window.i2l_app().querySelector("
                           "\"#i2l_models_status tr[data-variant='style'] .i2l-missing-files\");"
                           " return el && !el.innerText.includes('SigLIP2') && !el.innerText.includes('DINOv3'); }")
    assert STYLE in p["text"] and "%" in p["text"]
    shot(page, artifacts, "31-models-downloading")

    t0 = time.monotonic()
    page.click("#i2l_download_cancel")
    p = wait_dl(page, ("cancelled", "error", "done"), timeout=30)
    took = time.monotonic() - t0
    assert p["state"] == "cancelled", p
    assert took < 10, took                      # a hung connection does not hold Cancel up
    shot(page, artifacts, "32-models-cancelled")
    files = model_files(hub_app.models_dir)
    style_rel = f"{QWEN_I2L_REPO}/{STYLE}"
    assert style_rel not in files               # nothing half-written where the weights belong
    assert files.get(style_rel + ".part") == half   # what arrived is kept, to resume from
    assert_nothing_partial(hub_app.models_dir, hub)
    assert ready(page, "style") == "0"

    hub.release.set()                           # the hung transfer may end now; the resume is a new request
    page.click("#i2l_download")
    page.wait_for_function("() => { const el = window.i2l_app().querySelector('#i2l_download_progress .i2l-progress');"
                           " return el && el.dataset.state !== 'cancelled'; }")
    fractions = []
    p = wait_dl(page, ("done", "error", "cancelled"), on_poll=lambda q: fractions.append(q["fraction"]))
    assert p["state"] == "done", p
    page.wait_for_selector("#i2l_models_status tr[data-variant='style'][data-ready='1']")
    shot(page, artifacts, "33-models-ready")
    assert hub.ranges(STYLE)[-1] == f"bytes={half}-"    # resumed, not started over
    files = model_files(hub_app.models_dir)
    assert files[style_rel] == size and not any(f.endswith(".part") for f in files)
    assert_nothing_partial(hub_app.models_dir, hub)
    with open(os.path.join(hub_app.models_dir, ".i2l-hub.json"), encoding="utf-8") as f:
        settings = json.load(f)
    assert settings["source"] == "custom" and settings["endpoint"] == hub.url


def test_weights_missing_offers_download_now(page, hub_app, hub, tiny_models, sample_images, artifacts):
    from i2l_ext import hub as hub_mod
    reset_models(hub_app, hub, tiny_models)
    # the source as `python -m i2l_ext models source custom --endpoint URL` leaves it; the page shows it
    hub_mod.save_settings(hub_app.models_dir, source="custom", endpoint=hub.url)
    open_tab(page, hub_app)
    upload(page, sample_images["images"][:2])
    wait_count(page, 2)
    type_name(page, "after_download")
    name_state(page, True, "after_download")
    assert not page.is_visible("#i2l_download_now")
    page.click("#i2l_run")
    page.wait_for_selector("#i2l_notice .i2l-error[data-code='weights_missing']")
    notice = page.inner_text("#i2l_notice")
    assert f"`python -m i2l_ext models download style --models-dir {hub_app.models_dir}`" in notice   # its own folder
    page.wait_for_selector("#i2l_download_now", state="visible")
    assert not page.is_visible("#i2l_download")             # the Models panel is still closed
    shot(page, artifacts, "34-weights-missing")
    before = len(hub.requests)

    page.click("#i2l_download_now")                          # one click: the panel's download, for Style
    page.wait_for_selector("#i2l_download", state="visible")  # the panel opened to show it
    page.wait_for_selector("#i2l_download_progress .i2l-progress[data-variant='style']")
    assert page.eval_on_selector("#i2l_models_variant input", "e => e.value") == "Style"
    assert page.eval_on_selector("#i2l_models_source input", "e => e.value") == MIRROR_LABEL
    p = wait_dl(page, ("done", "error", "cancelled"))
    assert p["state"] == "done", p
    page.wait_for_selector("#i2l_notice .i2l-notice-ok")
    assert "Make LoRA" in page.inner_text("#i2l_notice")
    page.wait_for_selector("#i2l_download_now", state="hidden")
    page.wait_for_selector("#i2l_models_status tr[data-variant='style'][data-ready='1']")
    assert len(hub.requests) > before                         # it came from the hub the settings name
    assert_nothing_partial(hub_app.models_dir, hub)
    shot(page, artifacts, "35-downloaded-now")

    click_run(page)                                    # and the job runs now
    final, _ = wait_finished(page)
    assert final["state"] == "done", page.inner_text("#i2l_notice")
    assert not page.is_visible("#i2l_download_now")
    assert "after_download.safetensors" in hub_app.files()


def test_download_now_is_offered_only_for_missing_weights(page, hub_app, hub, tiny_models, sample_images):
    reset_models(hub_app, hub, tiny_models)
    open_tab(page, hub_app)
    upload(page, sample_images["images"][:1])
    wait_count(page, 1)
    type_name(page, "missing_first")
    name_state(page, True, "missing_first")
    page.click("#i2l_run")
    page.wait_for_selector("#i2l_download_now", state="visible")
    type_name(page, "bad/name")                                # another error takes the offer away
    page.click("#i2l_run")
    page.wait_for_selector("#i2l_notice .i2l-error[data-code='bad_input']")
    page.wait_for_selector("#i2l_download_now", state="hidden")
