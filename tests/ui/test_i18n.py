"""Every language ships every key, with the same {fields}; the tab's keys all exist."""
from __future__ import annotations

import glob
import json
import os
import re
import string

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCALES = os.path.join(ROOT, "i2l_ext", "locales")


def load(lang):
    with open(os.path.join(LOCALES, f"{lang}.json"), encoding="utf-8") as f:
        return json.load(f)


def fields(text):
    return {f for _, f, _, _ in string.Formatter().parse(text) if f}


def test_languages_match():
    en = load("en")
    for path in glob.glob(os.path.join(LOCALES, "*.json")):
        lang = os.path.basename(path)[:-5]
        other = load(lang)
        assert set(other) == set(en), (lang, set(en) ^ set(other))
        for k in en:
            assert fields(other[k]) == fields(en[k]), (lang, k)


def test_code_keys_exist():
    en = load("en")
    used = set()
    for path in glob.glob(os.path.join(ROOT, "i2l_ext", "ui", "*.py")) + [os.path.join(ROOT, "scripts", "i2l_tab.py")]:
        with open(path, encoding="utf-8") as f:
            used |= set(re.findall(r'\bt\("([a-z0-9_]+)"[,)]', f.read()))
    missing = sorted(k for k in used if k not in en)
    assert not missing, missing


def test_lookup_and_fallback(monkeypatch):
    import sys
    sys.path.insert(0, ROOT)
    from i2l_ext import i18n
    assert i18n.normalize("zh-CN") == "zh_CN" and i18n.normalize("zh_Hans") == "zh_CN"
    assert i18n.normalize("en_US.UTF-8") == "en" and i18n.normalize("auto") is None
    assert i18n.t("make", lang="zh_CN") == "生成 LoRA"
    assert i18n.t("images_count", lang="en", n=3) == "3 image(s) selected"
    assert i18n.t("no_such_key", lang="zh_CN") == "no_such_key"
    monkeypatch.setenv("I2L_LANG", "zh_CN")
    assert i18n.set_language(None) == "zh_CN"
    i18n.set_language("en")
