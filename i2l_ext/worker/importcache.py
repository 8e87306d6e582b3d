"""A saved copy of transformers' map of its model modules, so a cold worker need not rebuild it.

``import transformers`` walks every folder of ``transformers/models`` and reads each of its ~1,700
module files to learn which names each defines (``define_import_structure``): most of the second
that importing transformers takes, with the same answer every time for the installed version.
``install()`` adds a finder that, once ``transformers.utils.import_utils`` has run, wraps its
``define_import_structure`` so the answer for the models folder comes from a JSON file (beside the
code list of ``warmstart``); the key is the folder's path and the modification times of the folder
and of transformers' ``__init__.py`` (an upgrade or reinstall changes them). A missing, stale or
unreadable file is rebuilt by transformers' own function and written for the next start. Every
other call goes to the original. ``PATHS``, when set, replaces the files to try (``[]``: no cache).
"""
from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import threading

NAME = "i2l-transformers-models.json"
TARGET = "transformers.utils.import_utils"
_lock = threading.Lock()
state = {"hits": 0, "misses": 0, "writes": 0}
PATHS: list[str] | None = None


def cache_paths() -> list[str]:
    if PATHS is not None:
        return list(PATHS)
    from .warmstart import saved_file_paths
    return saved_file_paths(NAME)


def _key(folder: str, prefix) -> str | None:
    try:
        init = os.path.join(os.path.dirname(folder), "__init__.py")
        return f"{os.path.realpath(folder)}|{prefix}|{os.stat(folder).st_mtime_ns}|{os.stat(init).st_mtime_ns}"
    except OSError:
        return None


def _read() -> dict:
    for path in cache_paths():
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict) and isinstance(data.get("entries"), dict):
                return data["entries"]
        except (OSError, ValueError):
            continue
    return {}


def _write(entries: dict) -> None:
    for path in cache_paths():
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"entries": entries}, f)
            os.replace(tmp, path)
            state["writes"] += 1
            return
        except OSError:
            continue


def _encode(structure: dict) -> list:
    return [[sorted(backends), {m: sorted(names) for m, names in modules.items()}]
            for backends, modules in structure.items()]


def _decode(rows: list) -> dict:
    return {frozenset(backends): {m: set(names) for m, names in modules.items()} for backends, modules in rows}


def _wrap(original):
    def define_import_structure(module_path, prefix=None):
        folder = str(module_path)
        if os.path.isfile(folder):
            folder = os.path.dirname(folder)
        key = None
        if os.path.basename(folder) == "models" and os.path.basename(os.path.dirname(folder)) == "transformers":
            key = _key(folder, prefix)
        if key is None:
            return original(module_path, prefix)
        with _lock:
            saved = _read()
            rows = saved.get(key)
            if isinstance(rows, list):
                try:
                    got = _decode(rows)
                    state["hits"] += 1
                    return got
                except (TypeError, ValueError):
                    pass
            result = original(module_path, prefix)
            state["misses"] += 1
            entries = {k: v for k, v in saved.items() if k.split("|")[:2] != key.split("|")[:2]}
            entries[key] = _encode(result)
            _write(entries)
            return result
    define_import_structure._i2l_original = original
    return define_import_structure


class _Finder:
    """Finds ``transformers.utils.import_utils`` as usual and patches it right after it runs."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            original = getattr(module, "define_import_structure", None)
            if callable(original) and not hasattr(original, "_i2l_original"):
                module.define_import_structure = _wrap(original)
        spec.loader.exec_module = exec_module
        uninstall()
        return spec


_finder = _Finder()


def install() -> None:
    """Before transformers is imported (no-op after, or with ``PATHS == []``)."""
    if "transformers" in sys.modules or TARGET in sys.modules or not cache_paths():
        return
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    try:
        sys.meta_path.remove(_finder)
    except ValueError:
        pass
