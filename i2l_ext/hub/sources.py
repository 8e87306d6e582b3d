"""Where model files come from (ModelScope, its international site, Hugging Face, a mirror) and the
remembered choice.

The choice lives in a small JSON file in the models folder (``.i2l-hub.json``), so the tab and the
command line share it whenever they share the models folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from urllib.parse import quote, urlparse

from ..contract import I2LError, T, raw

SETTINGS_NAME = ".i2l-hub.json"

MODELSCOPE = "modelscope"
MODELSCOPE_INTL = "modelscope-intl"
HUGGINGFACE = "huggingface"
CUSTOM = "custom"

ENDPOINTS = {
    MODELSCOPE: "https://www.modelscope.cn",
    MODELSCOPE_INTL: "https://www.modelscope.ai",
    HUGGINGFACE: "https://huggingface.co",
}
LABELS = {
    MODELSCOPE: "ModelScope (modelscope.cn, China)",
    MODELSCOPE_INTL: "ModelScope international (modelscope.ai)",
    HUGGINGFACE: "Hugging Face (huggingface.co)",
    CUSTOM: "A mirror (custom endpoint)",
}
SOURCE_NAMES = (MODELSCOPE, MODELSCOPE_INTL, HUGGINGFACE, CUSTOM)

DEFAULT_SETTINGS = {"source": MODELSCOPE, "endpoint": "", "api": "", "search_dirs": [], "use_hub_caches": False}


@dataclass(frozen=True)
class Source:
    name: str       # modelscope | modelscope-intl | huggingface | custom
    api: str        # "modelscope" or "huggingface": which HTTP API the endpoint speaks
    endpoint: str   # scheme://host[/prefix], no trailing slash

    @property
    def revision(self) -> str:
        return "master" if self.api == MODELSCOPE else "main"

    @property
    def label(self) -> str:
        if self.name == CUSTOM:
            return f"mirror {self.endpoint} ({'ModelScope' if self.api == MODELSCOPE else 'Hugging Face'} API)"
        return f"{LABELS[self.name].split(' (')[0]} ({self.endpoint})"

    def list_url(self, repo: str) -> str:
        if self.api == MODELSCOPE:
            return f"{self.endpoint}/api/v1/models/{repo}/repo/files?Revision={self.revision}&Recursive=true"
        return f"{self.endpoint}/api/models/{repo}/tree/{self.revision}?recursive=true"

    def file_url(self, repo: str, path: str) -> str:
        if self.api == MODELSCOPE:
            return (f"{self.endpoint}/api/v1/models/{repo}/repo?Revision={self.revision}"
                    f"&FilePath={quote(path, safe='')}")
        return f"{self.endpoint}/{repo}/resolve/{self.revision}/{quote(path, safe='/')}"

    def to_dict(self) -> dict:
        return {"name": self.name, "api": self.api, "endpoint": self.endpoint, "label": self.label}


def _clean_endpoint(url: str) -> str:
    url = url.strip().rstrip("/")
    if url and "://" not in url:
        url = "https://" + url
    p = urlparse(url)
    if p.scheme not in ("http", "https") or not p.netloc:
        raise I2LError(I2LError.BAD_INPUT, T("m_not_http", url=url),
                       T("m_mirror_example"))
    return url


def _guess_api(endpoint: str) -> str:
    return MODELSCOPE if "modelscope" in (urlparse(endpoint).hostname or "") else HUGGINGFACE


def get_source(name: str | None = None, endpoint: str | None = None, api: str | None = None,
               settings: dict | None = None) -> Source:
    """The source to use: explicit arguments first, then the remembered settings, then ModelScope.

    An endpoint without a name means a mirror; a mirror speaks the Hugging Face API (as hf-mirror
    style mirrors do) unless ``api`` says ``modelscope`` or its host name says so."""
    settings = settings or {}
    if name is None and endpoint is None:
        name, endpoint, api = settings.get("source") or MODELSCOPE, settings.get("endpoint") or None, api or settings.get("api") or None
    name = (name or (CUSTOM if endpoint else MODELSCOPE)).strip().lower()
    aliases = {"ms": MODELSCOPE, "modelscope-cn": MODELSCOPE, "modelscope.cn": MODELSCOPE, "intl": MODELSCOPE_INTL,
               "modelscope.ai": MODELSCOPE_INTL, "modelscope-ai": MODELSCOPE_INTL, "hf": HUGGINGFACE,
               "hugging-face": HUGGINGFACE, "huggingface.co": HUGGINGFACE, "mirror": CUSTOM}
    name = aliases.get(name, name)
    if name not in SOURCE_NAMES:
        raise I2LError(I2LError.BAD_INPUT, T("m_unknown_source", name=name), T("m_choose_one_of", choices=", ".join(SOURCE_NAMES)))
    if api:
        api = {"hf": HUGGINGFACE, "ms": MODELSCOPE}.get(api.lower(), api.lower())
        if api not in (HUGGINGFACE, MODELSCOPE):
            raise I2LError(I2LError.BAD_INPUT, T("m_unknown_api", name=api), T("m_use_api"))
    if name == CUSTOM:
        if not endpoint:
            raise I2LError(I2LError.BAD_INPUT, T("m_custom_needs"),
                           T("m_custom_needs_fix"))
        endpoint = _clean_endpoint(endpoint)
        return Source(CUSTOM, api or _guess_api(endpoint), endpoint)
    default_api = HUGGINGFACE if name == HUGGINGFACE else MODELSCOPE
    # A named hub with an endpoint: the same API at another address (a mirror of that hub).
    return Source(name, default_api, _clean_endpoint(endpoint) if endpoint else ENDPOINTS[name])


# -- remembered settings -----------------------------------------------------------------------------
def settings_path(models_dir: str) -> str:
    return os.path.join(models_dir, SETTINGS_NAME)


def load_settings(models_dir: str) -> dict:
    out = dict(DEFAULT_SETTINGS, search_dirs=[])
    try:
        with open(settings_path(models_dir), encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            out.update({k: v for k, v in data.items() if k in DEFAULT_SETTINGS})
    except (OSError, ValueError):
        pass
    return out


def save_settings(models_dir: str, **changes) -> dict:
    """Remember a choice (``source``, ``endpoint``, ``api``, ``search_dirs``, ``use_hub_caches``).
    Checks a source before writing it."""
    s = load_settings(models_dir)
    unknown = set(changes) - set(DEFAULT_SETTINGS)
    if unknown:
        raise I2LError(I2LError.BAD_INPUT, T("m_unknown_setting", names=", ".join(sorted(unknown))))
    s.update({k: v for k, v in changes.items() if v is not None})
    if "source" in changes or "endpoint" in changes:
        src = get_source(s["source"], s["endpoint"] or None, s["api"] or None)
        s["source"] = src.name
        s["endpoint"] = src.endpoint if (src.name == CUSTOM or src.endpoint != ENDPOINTS.get(src.name)) else ""
    s["search_dirs"] = [str(d) for d in s.get("search_dirs") or []]
    os.makedirs(models_dir, exist_ok=True)
    tmp = settings_path(models_dir) + f".{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(s, f, indent=1)
    os.replace(tmp, settings_path(models_dir))
    return s


def search_dirs_for(models_dir: str, extra=(), settings: dict | None = None) -> list[str]:
    """Where to look for files besides the models folder: ``extra``, the remembered folders,
    ``DIFFSYNTH_MODEL_BASE_PATH`` when set, and the Hugging Face and ModelScope caches when turned on
    (``models search-dirs --hub-caches``)."""
    from ..catalog import default_search_dirs
    s = load_settings(models_dir) if settings is None else settings
    dirs = [str(d) for d in extra or ()] + list(s.get("search_dirs") or [])
    base = os.environ.get("DIFFSYNTH_MODEL_BASE_PATH")
    if base and os.path.isdir(base):
        dirs.append(base)
    if s.get("use_hub_caches", False):
        dirs += default_search_dirs()
    out, seen = [], {os.path.normcase(os.path.abspath(models_dir))}
    for d in dirs:
        key = os.path.normcase(os.path.abspath(os.path.expanduser(d)))
        if key not in seen:
            seen.add(key)
            out.append(os.path.abspath(os.path.expanduser(d)))
    return out
