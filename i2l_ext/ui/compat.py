"""The few places where gradio 3.41 and 4.40 differ, in one module.

Everything else in the tab is written against the API the two versions share.
"""
from __future__ import annotations

import os

import gradio as gr

GRADIO_VERSION = getattr(gr, "__version__", "0")
GR4 = int(GRADIO_VERSION.split(".")[0] or 0) >= 4


def update(**kwargs):
    """``gr.update`` (``Component.update`` is gone on 4.x)."""
    return gr.update(**kwargs)


def js(code: str | None) -> dict:
    """Keyword for a client-side function on an event: ``_js`` on 3.x, ``js`` on 4.x."""
    if not code:
        return {}
    return {"js": code} if GR4 else {"_js": code}


def event_kwargs(concurrent: bool = False, **extra) -> dict:
    """Let an event run beside others (4.x allows one run per event by default)."""
    kw = dict(extra)
    if concurrent and GR4:
        kw["concurrency_limit"] = None
    return kw


def queue(blocks, concurrency: int = 8):
    """The queue every event goes through; no direct HTTP calls around it (on 3.41 those could also
    claim any client address)."""
    if GR4:
        return blocks.queue(default_concurrency_limit=concurrency, api_open=False)
    return blocks.queue(concurrency_count=concurrency, api_open=False)


def file_path(f) -> str | None:
    """A path from a gr.File value: an object with ``.name`` (3.x), a str (4.x) or a dict."""
    if f is None:
        return None
    if isinstance(f, str):
        return f
    if isinstance(f, dict):
        return f.get("path") or f.get("name")
    for attr in ("path", "name"):
        v = getattr(f, attr, None)
        if isinstance(v, str):
            return v
    return None


def file_paths(value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        value = [value]
    return [p for p in (file_path(v) for v in value) if p and os.path.exists(p)]


def file_component(**kwargs):
    """A multi-file drop zone; 3.x wants ``type="file"``, 4.x ``type="filepath"``."""
    kwargs.setdefault("file_count", "multiple")
    kwargs["type"] = "filepath" if GR4 else "file"
    return gr.File(**kwargs)


def dropdown(pairs, value=None, **kwargs):
    """A Dropdown of ``(label, value)`` pairs. 4.x takes the pairs as they are; 3.41 knows only
    strings (it would show and return the pair's text), so there it lists the labels and a handler
    maps what it receives back with ``dropdown_value``."""
    pairs = list(pairs)
    if GR4:
        return gr.Dropdown(choices=pairs, value=value, **kwargs)
    return gr.Dropdown(choices=[label for label, _ in pairs], value=dropdown_label(pairs, value), **kwargs)


def dropdown_label(pairs, value):
    return next((label for label, v in pairs if v == value), value)


def dropdown_value(pairs, received):
    """The value of the pair a Dropdown from ``dropdown`` sent (its label on 3.41, its value on 4.x)."""
    for label, v in pairs:
        if received == v:
            return v
    for label, v in pairs:
        if received == label:
            return v
    return received


def dropdown_set(pairs, value):
    """An update that selects ``value`` in a Dropdown from ``dropdown``."""
    return gr.update(value=value if GR4 else dropdown_label(pairs, value))


def select_index(evt) -> int | None:
    """The index from a gr.SelectData (an int, or [row, col] for tables)."""
    if evt is None:
        return None
    idx = getattr(evt, "index", None)
    if isinstance(idx, (list, tuple)):
        idx = idx[0] if idx else None
    return idx if isinstance(idx, int) else None
