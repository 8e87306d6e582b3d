"""The English messages the code can send to the tab, read from the source (for tests/ui/test_i18n.py).

Finds the texts given to ``I2LError``/``bad_input`` (message and fix), to progress and non-debug
log calls, to the ``message`` of a download's progress, appended to lists of notes, warnings,
problems or lines, assigned to ``message``/``fix``/``size``, and returned by the name checks. A
text is turned into samples: the literal parts as written, each computed part replaced by
``DYN``; a conditional gives a sample per branch. Lines made only of computed parts are left out
(they carry other messages, checked where those are made).
"""
from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DYN = "\x00"

# Modules whose messages reach the tab: the job (service, worker), its checks, downloads, the library.
MODULES = ["service.py", "supervisor.py", "catalog.py", "output.py", "images.py", "library.py",
           "hub/download.py", "hub/remote.py", "hub/sources.py", "hub/task.py", "envsetup/__init__.py",
           "worker/main.py", "worker/engine.py", "worker/weights.py", "worker/streaming.py", "worker/vram.py",
           "worker/warmstart.py", "worker/lightimport.py", "worker/tiny.py", "lora_format.py"]
LISTS = {"notes", "warnings", "problems", "lines"}
ASSIGNED = {"message", "fix", "size", "REPAIR_HINT"}
# Functions whose returned texts are messages (or parts of them, like a source's label).
CHECKS = {"name_problem", "subfolder_problem", "check_name", "_check_digest", "label"}


def _name(func) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def samples(node) -> list[str] | None:
    """Possible texts of ``node`` (computed parts as DYN); None when it is not a text at all."""
    if isinstance(node, ast.Constant):
        return [node.value] if isinstance(node.value, str) else None
    if isinstance(node, ast.JoinedStr):
        outs = [""]
        for v in node.values:
            if isinstance(v, ast.Constant):
                outs = [o + v.value for o in outs]
            else:
                inner = samples(v.value) if isinstance(v, ast.FormattedValue) else None
                if inner is not None and len(inner) <= 4 and DYN not in "".join(inner):
                    outs = [o + i for o in outs for i in inner]
                else:
                    outs = [o + DYN for o in outs]
        return outs
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = samples(node.left), samples(node.right)
        if left is None and right is None:
            return None
        return [a + b for a in (left or [DYN]) for b in (right or [DYN])]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        left = samples(node.left)
        if left is None:
            return None
        return [re.sub(r"%[-0-9.]*[sdrf]", DYN, x) for x in left]
    if isinstance(node, ast.IfExp):
        a, b = samples(node.body), samples(node.orelse)
        if a is None and b is None:
            return None
        return (a or []) + (b or [])
    return None


def _texts(node):
    s = samples(node)
    return [x for x in s or [] if x.replace(DYN, "").strip()]


def messages(path: str) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found: list[tuple[int, str]] = []

    def add(node):
        found.extend((node.lineno, t) for t in _texts(node))

    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name in CHECKS:
            for r in ast.walk(fn):
                if isinstance(r, ast.Return) and r.value is not None:
                    add(r.value)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ASSIGNED:
            add(node.value)
        if not isinstance(node, ast.Call):
            continue
        name, args = _name(node.func), node.args
        if name == "I2LError":
            for a in args[1:3]:
                add(a)
            for k in node.keywords:
                if k.arg in ("message", "fix"):
                    add(k.value)
        elif name == "offline_error" and args:
            add(args[0])
        elif name == "bad_input":
            for a in args[:2]:
                add(a)
        elif name in ("progress", "_progress") and len(args) >= 4:
            add(args[3])
        elif name in ("log", "_log") and len(args) == 2:
            if not (isinstance(args[0], ast.Constant) and args[0].value == "debug"):
                add(args[1])
        elif name == "append" and isinstance(node.func, ast.Attribute) and _name(node.func.value) in LISTS and args:
            add(args[0])
        elif name == "set":
            for k in node.keywords:
                if k.arg == "message":
                    add(k.value)
        elif name == "send" and args and isinstance(args[0], ast.Dict):
            d = {k.value: v for k, v in zip(args[0].keys, args[0].values) if isinstance(k, ast.Constant)}
            level = d.get("level")
            if "message" in d and not (isinstance(level, ast.Constant) and level.value == "debug"):
                add(d["message"])
    return found


def all_messages() -> list[tuple[str, int, str]]:
    out = []
    for rel in MODULES:
        path = os.path.join(ROOT, "i2l_ext", *rel.split("/"))
        if os.path.exists(path):
            out += [(rel, line, text) for line, text in messages(path)]
    return out


def lines_to_check(text: str, min_letters: int = 4) -> list[str]:
    """The lines of a sample a template must cover (computed parts as '7'). A line with fewer
    letters of its own than ``min_letters`` carries no words to translate."""
    out = []
    for line in text.split("\n"):
        if sum(c.isalpha() for c in line.replace(DYN, "")) < min_letters:
            continue
        out.append(line.strip().replace(DYN, "7"))
    return out
