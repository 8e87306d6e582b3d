"""The WebUI imports scripts/i2l_tab.py at start: it must be cheap and must not import torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for the WebUI's ``modules`` package with just what the script touches at import.
PROBE = textwrap.dedent("""
    import importlib.util, json, os, sys, time, types
    root, script = sys.argv[1], sys.argv[2]
    modules = types.ModuleType("modules"); modules.__path__ = []
    cb = types.ModuleType("modules.script_callbacks")
    cb.registered = {}
    cb.on_ui_tabs = lambda f: cb.registered.setdefault("ui_tabs", f)
    cb.on_ui_settings = lambda f: cb.registered.setdefault("ui_settings", f)
    cb.on_app_started = lambda f: cb.registered.setdefault("app_started", f)
    modules.script_callbacks = cb
    sys.modules["modules"], sys.modules["modules.script_callbacks"] = modules, cb
    before = set(sys.modules)
    sys.path.insert(0, root)                     # as the WebUI does while importing the script
    t0 = time.perf_counter()
    spec = importlib.util.spec_from_file_location("i2l_tab_script", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ms = (time.perf_counter() - t0) * 1000
    sys.path.remove(root)
    # after the import the extension folder is gone from sys.path; our modules must still load
    import i2l_ext.hosts, i2l_ext.library, i2l_ext.i18n
    new = sorted(set(sys.modules) - before)
    print(json.dumps({"ms": ms, "callbacks": sorted(cb.registered), "new": new,
                      "host": i2l_ext.hosts.detect_host()}))
""")


def run_probe():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", PROBE, ROOT,
                          os.path.join(ROOT, "scripts", "i2l_tab.py")], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=""), cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_import_is_cheap_and_registers_callbacks():
    times = []
    for _ in range(3):                  # best of three: the first run may pay for a cold disk
        info, _ = run_probe()
        times.append(info["ms"])
    assert info["callbacks"] == ["app_started", "ui_settings", "ui_tabs"]
    assert min(times) < 100, times


def test_no_torch_or_gradio_at_import():
    info, importtime = run_probe()
    heavy = [m for m in info["new"] if m.split(".")[0] in ("torch", "gradio", "diffsynth", "transformers",
                                                          "numpy", "PIL", "safetensors")]
    assert heavy == [], heavy
    assert info["host"] == "a1111"          # a WebUI without Forge's packages


# The tag names of AUTOMATIC1111's extension index (its tags.json).
INDEX_TAGS = {"script", "localization", "tab", "dropdown", "ads", "installed", "training", "models",
              "UI related", "prompting", "editing", "manipulations", "online", "animation", "query",
              "science", "extras"}


def test_index_entry_is_ready_for_the_extension_index():
    with open(os.path.join(ROOT, "index", "sd-webui-i2l.json"), encoding="utf-8") as f:
        entry = json.load(f)
    assert set(entry) == {"name", "url", "description", "tags"}       # `added` is the index's to fill in
    with open(os.path.join(ROOT, "i2l_ext", "locales", "en.json"), encoding="utf-8") as f:
        assert entry["name"] == json.load(f)["tab_title"]              # what the user then finds as a tab
    assert set(entry["tags"]) <= INDEX_TAGS and {"tab", "training"} <= set(entry["tags"])
    assert "online" not in entry["tags"]                               # downloads are one-time; jobs are local
    assert 40 < len(entry["description"]) < 250 and "\n" not in entry["description"]
    url = entry["url"]
    assert url.startswith("https://github.com/") and url.endswith(".git") and url.count("/") == 4, url
    # the WebUI clones it into extensions/<the URL's last part>: the folder the docs and tests name
    assert url.rsplit("/", 1)[1] == "sd-webui-i2l.git"
    origin = subprocess.run(["git", "-C", ROOT, "remote", "get-url", "origin"], capture_output=True, text=True)
    if origin.returncode == 0 and "github.com" in origin.stdout:         # a clone of the published repository
        published = origin.stdout.strip().replace("git@github.com:", "https://github.com/")
        assert url == (published if published.endswith(".git") else published + ".git")
