"""Every language ships every key, with the same {fields}; the keys the tab uses all exist (the back
end's messages are tests/test_contract.py's); messages are translated; and a job seen on a zh_CN
page (progress, log, result, errors) shows no English."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import string
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCALES = os.path.join(ROOT, "i2l_ext", "locales")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def load(lang):
    with open(os.path.join(LOCALES, f"{lang}.json"), encoding="utf-8") as f:
        return json.load(f)


def fields(text):
    return {f for _, f, _, _ in string.Formatter().parse(text) if f}


GRAMMAR = {"s"}



def _make(page, variant, name):
    """Pick the variant, name the LoRA (checked free) and press Make LoRA."""
    from ui_helpers import name_state, type_name
    page.check(f"#i2l_variant input[value='{variant}']")
    type_name(page, name)
    name_state(page, True, name)
    page.click("#i2l_run")

def test_languages_match():
    en = load("en")
    for path in glob.glob(os.path.join(LOCALES, "*.json")):
        lang = os.path.basename(path)[:-5]
        other = load(lang)
        assert set(other) == set(en), (lang, set(en) ^ set(other))
        for k in en:
            # a translation may leave out only what is English grammar ({s}: a plural ending)
            assert fields(en[k]) - GRAMMAR <= fields(other[k]) <= fields(en[k]), (lang, k)


def used_keys() -> set[str]:
    """Keys the code looks up: literal ``t("key")`` calls, and the families built from a prefix."""
    from i2l_ext import catalog, hub
    used = set()
    for path in glob.glob(os.path.join(ROOT, "i2l_ext", "ui", "*.py")) + [os.path.join(ROOT, "scripts", "i2l_tab.py")]:
        with open(path, encoding="utf-8") as f:
            used |= set(re.findall(r'\bt\("([a-z0-9_]+)"[,)]', f.read()))
    phases = ("start", "load", "encode", "decode", "merge", "write")
    profiles = ("auto", "gpu", "cpu_offload", "disk")
    used |= {f"phase_{p}" for p in phases} | {f"vram_{p}" for p in profiles} | {"keys_diffusers", "keys_kohya"}
    used |= {f"variant_{v}" for v in catalog.VARIANTS} | {f"source_{n}" for n in hub.SOURCE_NAMES}
    used |= {f"m_file_{r}" for r in catalog.FILES}
    return used


def test_code_keys_exist_in_every_language():
    for path in glob.glob(os.path.join(LOCALES, "*.json")):
        table = load(os.path.basename(path)[:-5])
        missing = sorted(k for k in used_keys() if k not in table)
        assert not missing, (path, missing)


def test_file_titles_are_the_catalogs():
    from i2l_ext import catalog
    en = load("en")
    for role, mf in catalog.FILES.items():
        assert en[f"m_file_{role}"] == mf.title, role


NAMES_OK = {"m_file_bias", "source_huggingface"}      # names only: the same in every language


def test_messages_are_translated():
    en, zh = load("en"), load("zh_CN")
    cjk = re.compile(r"[\u4e00-\u9fff]")
    for key, text in en.items():
        if key.startswith(("m_", "profile_", "fetch_", "source_")) or key in ("download_now", "seconds", "result_rank"):
            if key in NAMES_OK:
                continue
            words = sum(c.isalpha() for lit, _, _, _ in string.Formatter().parse(text) for c in lit)
            if not any(not c.isspace() for lit, _, _, _ in string.Formatter().parse(text) for c in lit):
                continue                                   # only fields: nothing to translate
            assert cjk.search(zh[key]) if words >= 4 else zh[key] != text, (key, zh[key])


def test_lookup_and_fallback(monkeypatch):
    from i2l_ext import i18n
    assert i18n.normalize("zh-CN") == "zh_CN" and i18n.normalize("zh_Hans") == "zh_CN"
    assert i18n.normalize("en_US.UTF-8") == "en" and i18n.normalize("auto") is None
    assert i18n.t("make", lang="zh_CN") == "生成 LoRA"
    assert i18n.t("images_count", lang="en", n=3) == "3 image(s) selected"
    assert i18n.t("no_such_key", lang="zh_CN") == "no_such_key"
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_MESSAGES", raising=False)
    assert i18n.set_language(None) == "zh_CN"             # the system's locale when no setting says
    i18n.set_language("en")


# -- a zh_CN page, in a browser ------------------------------------------------------------------------
# Words that are names (of models, formats, programs, units) and may stand in a Chinese sentence.
NAMES = {"LoRA", "Style", "Coarse", "Fine", "Bias", "SigLIP2", "G384", "DINOv3", "Qwen2", "VL", "i2L", "GPU", "CPU",
         "CUDA", "VRAM", "RAM", "B", "KB", "MB", "GB", "TB", "pid", "torch", "diffsynth", "cpu", "cuda", "float32",
         "bfloat16", "safetensors", "EXIF", "PNG", "JPEG", "WebP", "Pillow", "WebUI", "ModelScope", "Hugging", "Face",
         "API", "Windows", "Lora", "DiffSynth", "SHA", "Qwen", "Image", "Z", "Omni", "Base", "Turbo", "CFG", "Forge",
         "Neo", "ComfyUI", "SD", "Next", "diffusers"}


def english_words(text: str) -> list[str]:
    """Latin words in ``text`` that are not names, paths, commands, numbers or LoRA tags."""
    text = re.sub(r"`[^`]*`", " ", text)                              # commands
    text = re.sub(r"“[^”]*”|'[^']*'", " ", text)                       # quoted names (the user's)
    text = re.sub(r"<lora:[^>]*>", " ", text)
    text = re.sub(r"https?://\S+", " ", text)
    text = re.sub(r"\S*[/\\]\S*", " ", text)                           # paths
    text = re.sub(r"[\w.-]*_[\w.-]*", " ", text)                       # identifiers and the test's names
    text = re.sub(r"\S+\.(safetensors|png|json|jpg|jpeg|webp)\b", " ", text)
    text = re.sub(r"\b\d+x\d+\b", " ", text)                           # 1024x1024
    text = re.sub(r"\b[0-9a-f]{12,}\b", " ", text)                     # hashes
    words = re.findall(r"[A-Za-z][A-Za-z0-9]*", text)
    return [w for w in words if w not in NAMES and not re.fullmatch(r"[0-9.]+", w)]


# What the tab writes (not gradio's own status timers around it).
SHOWN = ("#i2l_progress .i2l-progress", "#i2l_notice .i2l-error, #i2l_notice .i2l-notice", "#i2l_result_info .i2l-result",
         "#i2l_name_msg .i2l-name", "#i2l_download_now", "#i2l_download_progress .i2l-progress, #i2l_download_progress .i2l-error",
         "#i2l_models_status .i2l-models")


def page_texts(page) -> dict[str, str]:
    out = {}
    for sel in SHOWN:
        texts = [el.inner_text() for el in page.query_selector_all(sel) if el.is_visible()]
        if texts:
            out[sel] = "\n".join(texts)
    out["#i2l_log"] = page.eval_on_selector("#i2l_log textarea", "e => e.value")
    return out


def assert_chinese(page, where: str, seen: dict | None = None):
    texts = page_texts(page)
    if seen is not None:
        for k, v in texts.items():
            seen.setdefault(k, set()).add(v)
    bad = {k: english_words(v) for k, v in texts.items() if english_words(v)}
    assert not bad, (where, bad, texts)


@pytest.fixture(scope="module")
def zh_models(tiny_models, tmp_path_factory):
    """The tiny set with the Coarse decoder missing (an error the host finds) and the Fine decoder cut
    short (one the worker finds)."""
    from i2l_ext.catalog import FILES
    d = str(tmp_path_factory.mktemp("zh-models"))
    for dirpath, _, names in os.walk(tiny_models):
        for n in names:
            src = os.path.join(dirpath, n)
            dst = os.path.join(d, os.path.relpath(src, tiny_models))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if n == "i2l-tiny.json":
                shutil.copy(src, dst)
            else:
                os.symlink(src, dst)
    os.unlink(FILES["coarse"].local_path(d))
    fine = FILES["fine"].local_path(d)
    os.unlink(fine)
    with open(os.path.join(tiny_models, os.path.relpath(fine, d)), "rb") as f:
        data = f.read()
    with open(fine, "wb") as f:
        f.write(data[: len(data) // 2])
    return d


@pytest.fixture(scope="module")
def zh_app(ui_python, tmp_path_factory, zh_models, worker_python, artifacts):
    from helpers import slow_worker
    from ui_helpers import start_app, stop_app
    python, env = slow_worker(worker_python, 1)                                  # a job long enough to watch
    a = start_app(ui_python, str(tmp_path_factory.mktemp("zh-app")), zh_models, python, artifacts, "zh",
                  lang="zh_CN", extra_env=env)
    yield a
    stop_app(a)


def test_english_detector():
    assert english_words("正在加载 SigLIP2-G384 图像编码器 · 12 秒") == []
    assert english_words("已写入 /tmp/x/a.safetensors（1.2 MB）。`python -m i2l_ext models download style`") == []
    assert english_words("Loading SigLIP2-G384 image encoder") == ["Loading", "image", "encoder"]


def test_a_job_on_a_chinese_page_shows_no_english(page, zh_app, sample_images, artifacts):
    from ui_helpers import click_run, name_state, open_tab, progress, shot, type_name, upload, wait_count, wait_finished
    open_tab(page, zh_app)
    seen: dict = {}
    upload(page, sample_images["images"][:2])
    wait_count(page, 2)
    type_name(page, "bad/name")
    name_state(page, False)
    assert_chinese(page, "name check", seen)
    type_name(page, "zh_style")
    name_state(page, True, "zh_style")

    # a job that works: progress while it runs, the log, the result
    click_run(page)
    polls = []
    final, _ = wait_finished(page, on_poll=lambda p: (polls.append(p), assert_chinese(page, f"running {p}", seen)))
    assert final["state"] == "done", page_texts(page)
    assert any(p["state"] == "running" for p in polls)
    page.wait_for_selector("#i2l_result", state="visible")
    assert_chinese(page, "done", seen)
    log = page.eval_on_selector("#i2l_log textarea", "e => e.value")
    assert "正在加载" in log and "已写入" in log, log
    assert "微型随机权重模型" in page.inner_text("#i2l_result_info")      # the worker's warning, translated
    shot(page, artifacts, "40-zh-done")

    # an error the worker finds (the Fine decoder is cut short)
    _make(page, "fine", "zh_fine")
    page.wait_for_function("() => window.i2l_app().querySelector('#i2l_progress .i2l-progress').dataset.state !== 'done'")
    final, _ = wait_finished(page, on_poll=lambda p: assert_chinese(page, f"running fine {p}", seen))
    assert final["state"] == "error"
    page.wait_for_selector("#i2l_notice .i2l-error[data-code='weights_invalid']")
    assert "不完整" in page.inner_text("#i2l_notice")
    assert_chinese(page, "worker error", seen)
    shot(page, artifacts, "41-zh-worker-error")

    # an error the host finds before the job starts (the Coarse decoder is missing), with its offer
    _make(page, "coarse", "zh_coarse")
    page.wait_for_selector("#i2l_notice .i2l-error[data-code='weights_missing']")
    page.wait_for_selector("#i2l_download_now", state="visible")
    assert page.inner_text("#i2l_download_now").strip() == "立即下载"
    time.sleep(0.5)
    assert_chinese(page, "weights missing", seen)
    assert progress(page)["state"] in ("idle", "error")
    shot(page, artifacts, "42-zh-weights-missing")
    page.click("#i2l_models .label-wrap")                   # the Models panel names the missing files
    page.wait_for_selector("#i2l_models_status tr[data-variant='coarse'][data-ready='0'] .i2l-missing-files")
    assert "Coarse 解码器" in page.inner_text("#i2l_models_status")
    assert_chinese(page, "models panel", seen)
    assert sorted(os.listdir(zh_app.lora_dir)) == ["zh_style.json", "zh_style.preview.png", "zh_style.safetensors"]
