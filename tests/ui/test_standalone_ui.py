"""The standalone app in a real browser, with real jobs on the tiny model set."""
from __future__ import annotations

import os
import time

from ui_helpers import (click_run, make_lora, name_state, open_tab, progress, shot, textbox_value, type_name, upload,
                        wait_count, wait_finished)
from helpers import read_header


def test_make_lora(page, app, sample_images, artifacts):
    open_tab(page, app)
    shot(page, artifacts, "01-empty")
    # What a newcomer sees first, at 1000 px: the images, the name beside Make LoRA, a Cancel that is
    # off while nothing runs, and a mark that these models are the tiny test set.
    page.set_viewport_size({"width": 1280, "height": 1000})
    for sel in ("#i2l_thumbs", "#i2l_name", "#i2l_run", "#i2l_add"):
        box = page.locator(sel).bounding_box()
        assert box and box["y"] + box["height"] <= 1000, sel
    assert not page.is_visible("#i2l_upload")                     # one place for images: the gallery
    assert page.is_disabled("#i2l_cancel")
    assert page.locator("#i2l_tiny_mark [data-tiny='1']").count() == 1
    page.set_viewport_size({"width": 1400, "height": 1600})
    upload(page, sample_images["images"])
    wait_count(page, 3)
    thumbs = page.query_selector_all("#i2l_thumbs .thumbnail-item")
    assert len(thumbs) == 3
    thumbs[1].click()                                     # remove one thumbnail
    page.wait_for_selector("#i2l_count [data-selected='img1.png']")
    page.click("#i2l_remove")
    wait_count(page, 2)
    captions = page.eval_on_selector_all("#i2l_thumbs .thumbnail-item", "es => es.map(e => e.innerText.trim())")
    assert captions == ["img0.png", "img2.png"]
    type_name(page, "ui_style")
    name_state(page, True, "ui_style.safetensors")
    page.click("#i2l_advanced .label-wrap")
    page.fill("#i2l_activation input, #i2l_activation textarea", "ui style")
    page.fill("#i2l_max_rank input", "4")                # the rank cap: 2 images give rank 8
    shot(page, artifacts, "02-form")

    click_run(page)
    page.wait_for_function("() => !window.i2l_app().querySelector('#i2l_cancel').disabled")   # on while it runs
    running_shot = []

    def poll(p):
        if p["state"] == "running" and p.get("phase") not in (None, "start") and not running_shot:
            shot(page, artifacts, "03-progress")
            running_shot.append(p)

    final, seen = wait_finished(page, on_poll=poll)
    assert final["state"] == "done", page.inner_text("#i2l_notice")
    states = [s["state"] for s in seen]
    assert "running" in states                            # progress was shown while it ran
    fractions = [s["fraction"] for s in seen if s["state"] in ("running", "done")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert len({s["phase"] for s in seen if s["state"] == "running"}) >= 2
    assert textbox_value(page, "i2l_log").strip()         # the live log

    page.wait_for_selector("#i2l_result", state="visible")
    assert textbox_value(page, "i2l_result_prompt") == "<lora:ui_style:1>"
    info = page.inner_text("#i2l_result_info")
    assert os.path.join(app.lora_dir, "ui_style.safetensors") in info
    assert "MB" in info or "KB" in info
    assert "rank 4" in info
    page.wait_for_selector("#i2l_result_preview img")
    assert not page.is_visible("#i2l_send")                # host-only button hidden in the app
    assert not page.is_visible("#i2l_send_sweep")
    assert page.is_disabled("#i2l_cancel")                 # off again once it is over
    assert page.inner_text("#i2l_copy").strip() == "Copy prompt"
    page.click("#i2l_copy")
    page.wait_for_function("() => window.i2l_lastCopied === '<lora:ui_style:1>'", timeout=10_000)
    name_state(page, False, "is made")                     # the name is taken now, by this LoRA: news, not an error
    assert page.query_selector("#i2l_name_msg .i2l-name-made") and not page.query_selector("#i2l_name_msg .i2l-name-bad")
    type_name(page, "ui_style2")                           # typing gives the usual check back
    name_state(page, True, "ui_style2.safetensors")
    type_name(page, "ui_style")
    name_state(page, False, "already exists")
    page.wait_for_function("() => [...(window.i2l_app().querySelectorAll('#i2l_lib_gallery .thumbnail-item'))]"
                           ".some(e => e.innerText.includes('ui_style.safetensors'))")
    shot(page, artifacts, "04-result")
    assert app.files() == ["ui_style.json", "ui_style.preview.png", "ui_style.safetensors"]
    header = read_header(os.path.join(app.lora_dir, "ui_style.safetensors"))
    assert header.pop("__metadata__")["i2l.max_rank"] == "4"
    assert {v["shape"][0] for k, v in header.items() if k.endswith("lora_A.weight")} == {4}


def test_invalid_name(page, app, sample_images, artifacts):
    open_tab(page, app)
    upload(page, sample_images["images"][:1])
    wait_count(page, 1)
    before = app.files()
    type_name(page, "bad/name")
    msg = name_state(page, False, "bad_name")               # says what is wrong and suggests a fix
    assert "/" in msg
    type_name(page, "con")
    name_state(page, False, "reserved")
    type_name(page, "bad:name?")
    name_state(page, False, "bad_name_")
    page.click("#i2l_run")
    page.wait_for_selector("#i2l_notice .i2l-error[data-code='bad_input']")
    assert "Fix" in page.inner_text("#i2l_notice")
    assert "Ready" not in page.inner_text("#i2l_progress")   # the error takes the "Ready" line's place
    shot(page, artifacts, "05-invalid-name")
    with open(os.path.join(app.lora_dir, "taken.safetensors"), "wb") as f:
        f.write(b"x")
    type_name(page, "taken")
    name_state(page, False, "already exists")
    os.unlink(os.path.join(app.lora_dir, "taken.safetensors"))
    assert app.files() == before


def test_z_image_from_the_tab(page, app, sample_images, artifacts):
    """The variants come grouped by the base model they serve; kohya names, which no Z-Image loader
    reads, are refused with the reason before anything runs; then a Z-Image LoRA is made."""
    open_tab(page, app)
    groups = page.eval_on_selector_all("#i2l_variant_info .i2l-family", "es => es.map(e => e.dataset.family)")
    assert groups == ["qwen-image", "z-image"]
    assert "CFG" in page.inner_text("#i2l_variant_info .i2l-family[data-family='z-image']")
    before = app.files()
    upload(page, sample_images["images"][:1])
    wait_count(page, 1)
    page.click("#i2l_variant label:has-text('Z-Image Style')")
    type_name(page, "ui_z")
    page.click("#i2l_advanced .label-wrap")
    page.click("#i2l_keys label:has-text('kohya')")
    page.click("#i2l_run")
    page.wait_for_selector("#i2l_notice .i2l-error[data-code='bad_input']")
    assert "cannot be written with 'kohya'" in page.inner_text("#i2l_notice")
    assert app.files() == before
    page.click("#i2l_keys label:has-text('diffusers')")
    click_run(page)
    final, _ = wait_finished(page)
    assert final["state"] == "done", page.inner_text("#i2l_notice")
    meta = read_header(os.path.join(app.lora_dir, "ui_z.safetensors"))["__metadata__"]
    assert meta["i2l.variant"] == "z-image" and meta["modelspec.architecture"] == "Z-Image/lora"
    shot(page, artifacts, "05-z-image")


def test_non_image_upload(page, app, sample_images, artifacts):
    open_tab(page, app)
    upload(page, [sample_images["text"], sample_images["images"][0]])
    wait_count(page, 1)
    page.wait_for_selector("#i2l_notice .i2l-error[data-code='bad_input']")
    text = page.inner_text("#i2l_notice")
    assert "notes.txt" in text and "PNG" in text
    shot(page, artifacts, "06-non-image")


def test_paste_image(page, app, artifacts):
    open_tab(page, app)
    page.evaluate("""async () => {
        const c = document.createElement('canvas'); c.width = 320; c.height = 240;
        const g = c.getContext('2d'); g.fillStyle = '#3a7'; g.fillRect(0, 0, 320, 240);
        const blob = await new Promise(r => c.toBlob(r, 'image/png'));
        const dt = new DataTransfer(); dt.items.add(new File([blob], 'pasted.png', {type: 'image/png'}));
        document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));
    }""")
    wait_count(page, 1)
    captions = page.eval_on_selector_all("#i2l_thumbs .thumbnail-item", "es => es.map(e => e.innerText.trim())")
    assert captions == ["pasted.png"]
    # dropped onto the gallery that shows them
    page.evaluate("""async () => {
        const c = document.createElement('canvas'); c.width = 300; c.height = 300;
        const blob = await new Promise(r => c.toBlob(r, 'image/png'));
        const dt = new DataTransfer(); dt.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
        const zone = window.i2l_app().querySelector('#i2l_thumbs');
        zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""")
    wait_count(page, 2)
    captions = page.eval_on_selector_all("#i2l_thumbs .thumbnail-item", "es => es.map(e => e.innerText.trim())")
    assert captions == ["pasted.png", "dropped.png"]


def test_library_rename_delete(page, app, sample_images, artifacts):
    open_tab(page, app)
    make_lora(page, app, sample_images["images"][:1], "lib_a")
    page.click("#i2l_lib_refresh")
    item = page.locator("#i2l_lib_gallery .thumbnail-item", has_text="lib_a.safetensors")
    item.wait_for()
    item.click()
    page.wait_for_selector("#i2l_lib_info [data-relpath='lib_a.safetensors']")
    assert textbox_value(page, "i2l_lib_prompt") == "<lora:lib_a:1>"
    assert "style" in page.inner_text("#i2l_lib_info")
    page.fill("#i2l_lib_new_name input, #i2l_lib_new_name textarea", "bad/name")
    page.click("#i2l_lib_rename")
    page.wait_for_selector("#i2l_lib_info .i2l-error")
    page.fill("#i2l_lib_new_name input, #i2l_lib_new_name textarea", "lib_b")
    page.click("#i2l_lib_rename")
    page.wait_for_selector("#i2l_lib_info [data-relpath='lib_b.safetensors']")
    files = app.files()
    assert {"lib_b.safetensors", "lib_b.json", "lib_b.preview.png"} <= set(files)
    assert not any(f.startswith("lib_a") for f in files)
    shot(page, artifacts, "07-library-renamed")

    page.click("#i2l_lib_delete")                         # asks first
    page.wait_for_selector("#i2l_lib_confirm", state="visible")
    shot(page, artifacts, "08-library-confirm-delete")
    page.click("#i2l_lib_delete_no")
    page.wait_for_selector("#i2l_lib_confirm", state="hidden")
    assert "lib_b.safetensors" in app.files()
    page.click("#i2l_lib_delete")
    page.wait_for_selector("#i2l_lib_confirm", state="visible")
    page.click("#i2l_lib_delete_yes")
    page.wait_for_selector("#i2l_lib_confirm", state="hidden")
    page.wait_for_function("() => !window.i2l_app().querySelector('#i2l_lib_gallery').innerText.includes('lib_b')")
    assert not any(f.startswith("lib_b") for f in app.files())


def test_cancel_mid_run_and_queue(browser, slow_app, sample_images, artifacts):
    """Two pages: the second page's job waits in the queue with its place shown; each page's Cancel
    stops its own job only (a queued one at once); the queued job starts when the first ends."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1600})
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    open_tab(page, slow_app)
    upload(page, sample_images["images"])
    wait_count(page, 3)
    type_name(page, "cancel_me")
    name_state(page, True, "cancel_me")
    shot(page, artifacts, "09-zh-form")
    click_run(page)
    deadline = time.monotonic() + 240
    while True:                                            # the worker pauses before writing
        p = progress(page)
        if p["state"] == "running" and p["phase"] in ("decode", "merge") or p["fraction"] >= 0.75:
            break
        assert p["state"] not in ("done", "error", "cancelled"), page.inner_text("#i2l_notice")
        assert time.monotonic() < deadline, p
        time.sleep(0.3)
    time.sleep(1.0)

    other = ctx.new_page()                                 # a second click, from another page
    open_tab(other, slow_app)
    upload(other, sample_images["images"][:1])
    wait_count(other, 1, timeout=60_000)
    type_name(other, "second")
    name_state(other, True, "second")
    click_run(other)
    other.wait_for_selector("#i2l_progress .i2l-progress[data-state='queued'][data-ahead='0']")
    assert "排队" in other.inner_text("#i2l_progress")        # "queued: next", in the page's language
    assert not other.is_disabled("#i2l_cancel")            # a queued job can be cancelled
    shot(other, artifacts, "10-zh-queued")
    other.click("#i2l_cancel")
    other.wait_for_selector("#i2l_progress .i2l-progress[data-state='cancelled']", timeout=5_000)
    assert progress(page)["state"] == "running"             # the other page's job is untouched
    click_run(other)                                       # queued again
    other.wait_for_selector("#i2l_progress .i2l-progress[data-state='queued']")

    shot(page, artifacts, "11-zh-running")
    t0 = time.monotonic()
    page.click("#i2l_cancel")
    final, _ = wait_finished(page, timeout=30)
    took = time.monotonic() - t0
    assert final["state"] == "cancelled"
    assert took < 10, took
    shot(page, artifacts, "12-zh-cancelled")
    other.wait_for_function("() => { const el = window.i2l_app().querySelector('#i2l_progress .i2l-progress');"
                            " return el && el.dataset.state !== 'queued'; }", timeout=60_000)   # its turn now
    assert progress(other)["state"] in ("starting", "running")
    other.click("#i2l_cancel")
    final, _ = wait_finished(other, timeout=30)
    assert final["state"] == "cancelled"
    time.sleep(1.0)
    assert slow_app.files() == []                          # nothing left, partial files included
    ctx.close()
