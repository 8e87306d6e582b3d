"""User-facing text of the tab, by key, in English and Simplified Chinese.

``t("key", **fields)`` looks the key up in the current language (``locales/<lang>.json``), falls
back to English, then to the key itself, and fills ``{fields}``. Adding a language is adding one
JSON file with the same keys. The language comes from ``set_language`` (the ``language`` setting),
else the system locale.
"""
from __future__ import annotations

import json
import locale
import os

LOCALES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "locales")
DEFAULT = "en"
_cache: dict[str, dict] = {}
_lang: str | None = None


def available() -> list[str]:
    try:
        return sorted(f[:-5] for f in os.listdir(LOCALES_DIR) if f.endswith(".json"))
    except OSError:
        return [DEFAULT]


def normalize(lang: str | None) -> str | None:
    """Map a locale name ('zh-CN', 'zh_Hans', 'zh_CN.UTF-8', 'en_US') to a shipped language."""
    if not lang:
        return None
    s = lang.split(".")[0].replace("-", "_").lower()
    if s in ("", "auto", "none", "c", "posix"):
        return None
    if s.startswith("zh"):
        return "zh_CN"
    if s.startswith("en"):
        return "en"
    for have in available():
        if have.lower() == s or have.lower().split("_")[0] == s.split("_")[0]:
            return have
    return None


def detect() -> str:
    for cand in (os.environ.get("LC_ALL"), os.environ.get("LC_MESSAGES"), os.environ.get("LANG")):
        lang = normalize(cand)
        if lang:
            return lang
    try:
        lang = normalize(locale.getlocale()[0])
    except (ValueError, TypeError):
        lang = None
    return lang or DEFAULT


def set_language(lang: str | None) -> str:
    global _lang
    _lang = normalize(lang) or detect()
    return _lang


def language() -> str:
    return _lang or set_language(None)


def _table(lang: str) -> dict:
    if lang not in _cache:
        try:
            with open(os.path.join(LOCALES_DIR, f"{lang}.json"), encoding="utf-8") as f:
                _cache[lang] = json.load(f)
        except (OSError, ValueError):
            _cache[lang] = {}
    return _cache[lang]


def has(key: str, lang: str = DEFAULT) -> bool:
    return key in _table(lang)


def t(key: str, lang: str | None = None, **fields) -> str:
    lang = lang or language()
    text = _table(lang).get(key)
    if text is None:
        text = _table(DEFAULT).get(key, key)
    if fields:
        try:
            return text.format(**fields)
        except (KeyError, IndexError, ValueError):
            return text
    return text
