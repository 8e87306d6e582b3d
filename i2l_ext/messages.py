"""Messages from the back end (the worker, the service, downloads, checks) in the tab's language.

The worker and the host modules speak English: the protocol carries phases, error codes and
English ``message`` / ``fix`` texts, never a language. Each of those texts has a key in
``locales/en.json`` whose English template it follows, e.g. ``"m_loading": "Loading {title}"``.
``localize`` finds the key a message was made from by matching it against those templates and
gives the same message in the current language from ``locales/<lang>.json``, the fields filled in
with the values the English carried.

Field values are user data (names, paths, sizes) and stay as they are, except fields that hold
text of the back end themselves (``{title}``, ``{error}``, ...), which are localized in turn, and
those that name a fixed choice (``{profile}``), which are looked up under their own keys. A
message of several lines that no template covers whole is localized line by line. Text no
template matches is shown as it came. ``tests/ui/test_i18n.py`` checks that every message the
code can produce has a template and that every template is translated.
"""
from __future__ import annotations

import re
import string

from . import i18n

# Fields whose value is itself back-end text (localized in turn).
NESTED = frozenset({"title", "error", "reason", "fix", "size", "source", "what", "problem", "hint"})
# Fields whose value names one of a few choices, each with a key of its own.
CHOICES = {"profile": "profile_{}"}
# A template is matched against only with enough text of its own outside the fields: this many
# letters, or this many other characters ("- {title}: {repo}/{path} ({size})", "Fix: {fix}").
MIN_LETTERS = 4
MIN_CHARS = 4

_compiled: tuple[dict, list] | None = None


class Template:
    __slots__ = ("key", "regex", "letters", "chars", "fields")

    def __init__(self, key: str, text: str):
        self.key = key
        parts, self.fields, letters, chars = [], [], 0, 0
        for literal, field, _, _ in string.Formatter().parse(text):
            parts.append(re.escape(literal))
            letters += sum(c.isalpha() for c in literal)
            chars += sum(not c.isspace() for c in literal)
            if field is not None:
                if field in self.fields:
                    parts.append(f"(?P={field})")
                else:
                    self.fields.append(field)
                    parts.append(f"(?P<{field}>.*?)")
        self.letters, self.chars = letters, chars
        self.regex = re.compile("".join(parts))


def _templates() -> list[Template]:
    global _compiled
    table = i18n._table(i18n.DEFAULT)
    if _compiled is None or _compiled[0] is not table:
        out = []
        for key, text in table.items():
            try:
                tpl = Template(key, text)
            except (ValueError, re.error):
                continue
            if tpl.letters >= MIN_LETTERS or tpl.chars >= MIN_CHARS:
                out.append(tpl)
        out.sort(key=lambda tp: (-tp.letters, -tp.chars))      # the most specific template wins
        _compiled = (table, out)
    return _compiled[1]


def match(text: str) -> tuple[str, dict] | None:
    """(key, fields) of the English template ``text`` follows, or None."""
    if not text or "\n" in text:
        return None
    for tpl in _templates():
        m = tpl.regex.fullmatch(text)
        if m is not None:
            return tpl.key, m.groupdict()
    return None


def localize(text, lang: str | None = None) -> str:
    """``text`` (English, from the back end) in ``lang`` (default: the tab's language)."""
    if text is None:
        return ""
    text = str(text)
    lang = lang or i18n.language()
    if lang == i18n.DEFAULT or not text.strip():
        return text
    return _localize(text, lang)


def _localize(text: str, lang: str) -> str:
    found = match(text)
    if found is None:
        if "\n" in text:
            return "\n".join(_localize(line, lang) if line.strip() else line for line in text.split("\n"))
        stripped = text.strip()
        if stripped != text and stripped:            # an indented line of a list
            lead = text[: len(text) - len(text.lstrip())]
            return lead + _localize(stripped, lang) + text[len(text.rstrip()):]
        return text
    key, fields = found
    for name, value in fields.items():
        if name in CHOICES:
            choice = CHOICES[name].format(value)
            fields[name] = i18n.t(choice, lang) if choice in i18n._table(i18n.DEFAULT) else value
        elif name in NESTED:
            fields[name] = _localize(value, lang)
    return i18n.t(key, lang, **fields)


def localize_error(err) -> dict:
    """An ``I2LError`` or its dict, with ``message`` and ``fix`` in the tab's language."""
    d = err.to_dict() if hasattr(err, "to_dict") else dict(err or {})
    d["message"] = localize(d.get("message", ""))
    d["fix"] = localize(d.get("fix", ""))
    return d


def localize_log_line(line: str) -> str:
    """A job log line, ``[HH:MM:SS] message``, with its message localized."""
    m = re.match(r"(\[\d\d:\d\d:\d\d\] )(.*)", line or "", re.S)
    if m is None:
        return localize(line)
    return m.group(1) + localize(m.group(2))
