"""One settings module: flag > WebUI setting > environment > default, for every caller; README's
table is the module's own; no other code reads an ``I2L_*`` variable."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import types

import pytest

from helpers import ROOT

sys.path.insert(0, ROOT)
from i2l_ext import settings  # noqa: E402
from i2l_ext.settings import Context, resolve  # noqa: E402

PRODUCT = ["i2l_ext", "scripts", "preload.py", "install.py"]


def test_precedence_flag_setting_env_default(tmp_path):
    env = {"I2L_MODELS_DIR": str(tmp_path / "env"), "I2L_OFFLINE": "yes", "I2L_VRAM_LIMIT_GB": "6"}
    options = {"i2l_models_dir": str(tmp_path / "setting"), "i2l_vram_limit_gb": 8}
    st = resolve({"models_dir": str(tmp_path / "flag")}, option=options.get, environ=env)
    assert st.models_dir == str(tmp_path / "flag") and st.sources["models_dir"] == "flag"
    assert st.vram_limit_gb == 8 and st.sources["vram_limit_gb"] == "setting"
    assert st.offline is True and st.sources["offline"] == "env"
    assert st.keep_warm_minutes == 10 and st.sources["keep_warm_minutes"] == "default"
    st = resolve({}, option=options.get, environ=env)
    assert st.models_dir == str(tmp_path / "setting")
    st = resolve({}, option={}.get, environ=env)
    assert st.models_dir == str(tmp_path / "env") and st.vram_limit_gb == 6
    st = resolve({}, environ={}, context=Context(models_root=str(tmp_path / "webui" / "models"),
                                                 lora_dir=str(tmp_path / "webui" / "Lora")))
    assert st.models_dir == str(tmp_path / "webui" / "models" / "i2L")
    assert st.lora_dir == str(tmp_path / "webui" / "Lora")
    assert not st.given("models_dir") and not st.given("lora_dir")


def test_bad_values_are_ignored_and_said(tmp_path):
    st = resolve({}, environ={"I2L_VRAM_LIMIT_GB": "lots", "I2L_OFFLINE": "maybe", "I2L_KEEP": "x"})
    assert st.vram_limit_gb == 0 and st.offline is False
    assert {(s.name, where) for s, where, _, _ in st.problems} == {("vram_limit_gb", "env"), ("offline", "env")}
    assert resolve({}, option={"i2l_default_variant": "nope"}.get, environ={}).default_variant == "style"
    assert resolve({}, option={"i2l_language": "auto"}.get, environ={"I2L_LANG": "zh_CN"}).language == "zh_CN"
    assert resolve({}, environ={"I2L_VRAM_LIMIT_GB": "nan"}).vram_limit_gb == 0


def test_gpus_one_worker_each():
    assert resolve({}, environ={}).worker_devices == [None]                  # one worker, as the host sees
    assert resolve({"gpus": " 1, 0 "}, environ={}).worker_devices == ["1", "0"]
    assert resolve({}, environ={"I2L_GPUS": "0,CPU"}).worker_devices == ["0", "cpu"]
    for bad in ("0,0", "a", "-1", "0;1"):
        st = resolve({}, environ={"I2L_GPUS": bad})
        assert st.worker_devices == [None] and [s.name for s, *_ in st.problems] == ["gpus"], bad


def test_readme_table_is_the_modules_own():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert settings.markdown_table() in readme, "README's settings table: python -m i2l_ext settings --markdown"


def test_no_other_i2l_variable_in_product_code():
    names = {s.env for s in settings.SETTINGS if s.env}
    found = {}
    for top in PRODUCT:
        paths = [os.path.join(ROOT, top)] if top.endswith(".py") else [
            os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, top)) for f in fs
            if f.endswith((".py", ".js", ".sh"))]
        for p in paths:
            with open(p, encoding="utf-8") as f:
                for name in re.findall(r"(?<![A-Za-z0-9_])I2L_[A-Z0-9_]+", f.read()):
                    found.setdefault(name, set()).add(os.path.relpath(p, ROOT))
    unknown = {n: sorted(w) for n, w in found.items() if n not in names}
    assert unknown == {}
    readers = {p for n, w in found.items() for p in w if p != "i2l_ext/settings.py"}
    for p in readers:             # elsewhere they are only named in messages, never read
        with open(os.path.join(ROOT, p), encoding="utf-8") as f:
            assert not re.search(r"environ(\.get)?\(?\[?[\"']I2L_", f.read()), p


def test_cli_flags_and_environment_reach_the_command(tmp_path):
    env = dict(os.environ, I2L_MODELS_DIR=str(tmp_path / "env-models"), I2L_LORA_DIR=str(tmp_path / "env-lora"),
               PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "i2l_ext", "settings"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=60).stdout
    assert re.search(r"models_dir\s+%s\s+\(env\)" % re.escape(str(tmp_path / "env-models")), out)
    out = subprocess.run([sys.executable, "-m", "i2l_ext", "models", "path", "--models-dir", str(tmp_path / "m")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60).stdout
    assert out.strip() == str(tmp_path / "m")


def test_a_bad_flag_value_is_refused_by_the_command_line(capsys):
    """On the command line a bad number or GPU list stops the command with the reason (an
    environment value is ignored and said instead)."""
    from i2l_ext.cli import build_parser
    parser = build_parser()
    for argv, reason in ((["--gpus", "a"], "GPU numbers"), (["--gpus", "0,0"], "GPU numbers"),
                         (["--vram-limit", "-3"], "outside"), (["--vram-limit", "nan"], "finite")):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["make", "img.png"] + argv)
        assert e.value.code == 2 and reason in capsys.readouterr().err, argv
    a = parser.parse_args(["make", "img.png", "--gpus", "1, cpu", "--vram-limit", "8"])
    assert (a.gpus, a.vram_limit_gb) == ("1,cpu", 8.0)


def _fake_webui(monkeypatch, argv, data=None, labels=None, lora_dir="/webui/models/Lora"):
    """``modules.shared`` of a WebUI whose command line was parsed with our preload.py."""
    sys.path.insert(0, ROOT)
    import preload
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora-dir", default=lora_dir)
    preload.preload(parser)
    cmd_opts = parser.parse_args(argv)
    info = types.SimpleNamespace
    opts = types.SimpleNamespace(data=dict(data or {}), data_labels={k: info(default=v) for k, v in (labels or {}).items()})
    shared = types.SimpleNamespace(cmd_opts=cmd_opts, opts=opts)
    modules = types.ModuleType("modules")
    modules.shared = shared
    modules.paths = types.SimpleNamespace(models_path="/webui/models")
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    monkeypatch.setitem(sys.modules, "modules.paths", modules.paths)
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", types.ModuleType("modules.script_callbacks"))


def test_webui_flags_settings_and_environment(monkeypatch, tmp_path):
    from i2l_ext import hosts
    monkeypatch.delenv("I2L_MODELS_DIR", raising=False)
    monkeypatch.setenv("I2L_OFFLINE", "1")
    _fake_webui(monkeypatch, ["--i2l-models-dir", str(tmp_path / "m"), "--i2l-lora-dir", str(tmp_path / "l")],
                data={"i2l_models_dir": str(tmp_path / "setting"), "i2l_offline": False, "i2l_keep_warm_minutes": 3},
                labels={"i2l_models_dir": "", "i2l_offline": False, "i2l_keep_warm_minutes": 10})
    st = hosts.settings()
    assert st.models_dir == str(tmp_path / "m") and st.lora_dir == str(tmp_path / "l")     # the flags win
    assert st.offline is True            # the setting left at its default leaves it to the environment
    assert st.keep_warm_minutes == 3     # a setting the user changed
    _fake_webui(monkeypatch, [], data={"i2l_models_dir": ""}, labels={"i2l_models_dir": ""})
    st = hosts.settings()
    assert st.models_dir == "/webui/models/i2L" and st.lora_dir == "/webui/models/Lora"


def test_worker_settings_travel_as_arguments():
    st = resolve({}, environ={"I2L_VRAM_LIMIT_GB": "7.5", "I2L_RAM_LIMIT_GB": "32", "I2L_TRACE": "/tmp/t.txt"})
    assert st.worker_args() == ["--vram-limit-gb", "7.5", "--ram-limit-gb", "32", "--trace", "/tmp/t.txt"]
    assert resolve({}, environ={}).worker_args() == []


@pytest.mark.parametrize("name", [s.name for s in settings.SETTINGS if s.option])
def test_every_webui_setting_has_a_label_in_each_language(name):
    import json
    for lang in ("en", "zh_CN"):
        with open(os.path.join(ROOT, "i2l_ext", "locales", f"{lang}.json"), encoding="utf-8") as f:
            assert f"settings_{name}" in json.load(f), (lang, name)
