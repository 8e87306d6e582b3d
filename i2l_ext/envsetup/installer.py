"""Build, upgrade, verify and repair the worker environment.

Runs in the host's interpreter (install.py, the CLI, the tab's repair button) and only ever
calls the WORKER venv's own pip, so the host's venv is left exactly as it was.

Steps: create the venv -> link the WebUI's torch (a ``.pth`` file appended after the venv's own
site-packages) or install a torch of its own -> install the pinned packages -> verify by importing
torch, torchvision, transformers and diffsynth in the worker interpreter -> write the stamp.
The stamp is removed before anything changes and written only after the verify passed, so a
failed or interrupted install is never taken for a whole one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

from ..contract import I2LError, T, raw
from .layout import (EXT_ROOT, KEEP_ON_REBUILD, LOCK_NAME, LOG_NAME, PTH_NAME, REQUIREMENTS, SPECIAL_NAMES,
                     STAMP_NAME, STATUS_NAME, TORCH_NAMES, dist_infos, find_host_torch, host_torch_usable,
                     is_env_entry, now_iso, pid_alive, quick_state, read_json, read_requirements, repair_command, satisfies,
                     shared_dists, split_requirements, venv_python, wanted_key, worker_env_dir, write_json)

PREFIX = "[i2L env]"
WINDOWS_TORCH_INDEX = "https://download.pytorch.org/whl/cu128"   # PyPI has only CPU torch for Windows
VERIFY_MODULES = ("torch", "torchvision", "transformers", "diffsynth")
# Environment variables that would make pip or the worker interpreter look elsewhere than its venv.
_SCRUB_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONEXECUTABLE",
              "__PYVENV_LAUNCHER__", "VIRTUAL_ENV", "PIP_TARGET", "PIP_PREFIX", "PIP_USER", "PIP_ROOT",
              "PIP_REQUIRE_VIRTUALENV", "PIP_EDITABLE", "PIP_SRC", "PIP_UPGRADE_STRATEGY", "PIP_IGNORE_INSTALLED",
              "PIP_FORCE_REINSTALL", "PIP_NO_DEPS", "PIP_PYTHON")

_VERIFY_CODE = r"""
import importlib, json, sys
res = {"python": sys.executable, "prefix": sys.prefix, "modules": {}, "pins": []}
for name in %r:
    try:
        m = importlib.import_module(name)
        v = getattr(m, "__version__", "")
        if not v:                      # diffsynth has no __version__: ask its distribution
            try:
                import importlib.metadata
                v = importlib.metadata.version(name)
            except Exception:
                v = ""
        res["modules"][name] = {"ok": True, "version": str(v), "file": m.__file__}
    except BaseException as e:
        res["modules"][name] = {"ok": False, "error": "%%s: %%s" %% (type(e).__name__, e)}
try:
    import importlib.metadata as md
    from packaging.requirements import Requirement
    for line in json.loads(sys.argv[1]):
        r = Requirement(line)
        if r.marker is not None and not r.marker.evaluate():
            continue
        try:
            v = md.version(r.name)
        except md.PackageNotFoundError:
            res["pins"].append("%%s is not installed" %% r.name)
            continue
        if not r.specifier.contains(v, prereleases=True):
            res["pins"].append("%%s %%s does not match %%s" %% (r.name, v, r.specifier))
except BaseException as e:
    res["pins"].append("could not check the pins: %%r" %% (e,))
sys.stdout.write("\nI2L-VERIFY " + json.dumps(res) + "\n")
""" % (VERIFY_MODULES,)


class StepFailed(Exception):
    def __init__(self, step: str, message: str, command: list[str] | None = None, tail: str = "", rc: int | None = None):
        super().__init__(message)
        self.step, self.message, self.command, self.tail, self.rc = step, message, command, tail, rc


def quote_cmd(cmd: list[str]) -> str:
    if os.name == "nt":
        return subprocess.list2cmdline(cmd)
    import shlex
    return " ".join(shlex.quote(c) for c in cmd)


def clean_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}
    env.update(PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    if extra:
        env.update(extra)
    return env


def folder_size(path: str) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            total += st.st_size
    return total


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} GB"


_SIZE_RE = re.compile(r"\(([\d.]+)\s*([kKMG]i?B)\)")
_UNITS = {"kB": 1e3, "KB": 1e3, "KiB": 1024, "MB": 1e6, "MiB": 1024 ** 2, "GB": 1e9, "GiB": 1024 ** 3}
_PROGRESS_RE = re.compile(r"Progress (\d+) of (\d+|\?)")


_OUTSIDE_RE = re.compile(r"\s*(Attempting uninstall: |Found existing installation: |Not uninstalling \S+ at .*"
                          r", outside environment |Can't uninstall '[^']+'\. No files were found to uninstall)")


class PipOutput:
    """Turns pip's lines into live console lines: what it fetches, how big, how far along."""

    def __init__(self, log, interval: float = 2.0):
        self.log, self.interval = log, interval
        self.downloaded = 0.0          # bytes announced by "Downloading x (12.3 MB)"
        self.files = 0
        self.current = None
        self._last = 0.0

    def feed(self, line: str) -> None:
        m = _PROGRESS_RE.search(line)
        if m:
            done, total = int(m.group(1)), m.group(2)
            now = time.monotonic()
            complete = total != "?" and done >= int(total)
            if now - self._last >= self.interval or (complete and int(total) > 20e6):
                self._last = now
                what = self.current or "download"
                if total == "?" or not int(total):
                    self.log(f"{PREFIX}   {what}: {human(done)}")
                else:
                    self.log(f"{PREFIX}   {what}: {human(done)} of {human(int(total))} "
                             f"({100 * done / int(total):.0f}%)")
            return
        text = line.rstrip()
        if (not text or text.startswith("Ignoring ") or "\u2501" in text
                or (text.startswith("WARNING: Location '") and "is neither a file nor a directory" in text)):
            return                     # markers for other Pythons; pip's own bar; find-links it skips
        if _OUTSIDE_RE.match(text):
            # The WebUI's packages are visible to the worker's pip (for torch); pip "attempts" to
            # uninstall an older copy there and says it can't: nothing in the WebUI's venv changes,
            # but "Attempting uninstall: transformers" on the WebUI's console reads as if it did.
            return
        if text.startswith("ERROR: pip's dependency resolver does not currently take into account"):
            self.log(f"{PREFIX} Note: some packages of the WebUI's own venv ask for other versions than the "
                     "worker's (listed below). The WebUI's venv is not changed: the worker uses its own copies.")
            return
        if text.startswith("Requirement already satisfied:") and " (from " in text:
            head, _, rest = text.partition(" (from ")
            version = rest.rsplit("(", 1)[-1].rstrip(")") if rest.endswith(")") else ""
            text = f"{head} ({version})" if version else head
        if text.lstrip().startswith("Downloading "):
            self.files += 1
            name = text.strip().split()[1]
            self.current = os.path.basename(name.split("#")[0])
            s = _SIZE_RE.search(text)
            if s:
                self.downloaded += float(s.group(1)) * _UNITS.get(s.group(2), 1)
                text += f"   [{human(self.downloaded)} downloaded so far]"
        self.log(f"{PREFIX} {text}")


class Installer:
    def __init__(self, env_dir: str, reuse_host_torch: bool = True, wheels: str | None = None,
                 index_url: str | None = None, torch_index_url: str | None = None, offline: bool = False,
                 log=print, requirements: str = REQUIREMENTS, python: str | None = None):
        self.env_dir = env_dir
        self.reuse_host_torch = reuse_host_torch
        self.wheels = os.path.abspath(wheels) if wheels else None
        self.index_url = index_url
        self.torch_index_url = torch_index_url
        self.offline = offline
        self.log = log or (lambda *_: None)
        self.requirements = requirements
        self.host_python = python or sys.executable
        self.py = venv_python(env_dir)
        self.status_path = os.path.join(env_dir, STATUS_NAME)
        self.log_path = os.path.join(env_dir, LOG_NAME)
        self.stamp_path = os.path.join(env_dir, STAMP_NAME)
        self._logf = None
        self._proc = None
        self.step = "prepare"
        self.downloaded = 0.0
        self.pip_raw_progress = False
        self._t0 = time.monotonic()

    # -- output -----------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        self._write_log(msg)
        self.log(msg)

    def _write_log(self, msg: str) -> None:
        if self._logf:
            try:
                self._logf.write(msg.rstrip("\n") + "\n")
                self._logf.flush()
            except (OSError, ValueError):
                pass

    def set_step(self, step: str, text: str) -> None:
        self.step = step
        self._write_log(f"# step {step} at +{time.monotonic() - self._t0:.1f} s")
        self.say(f"{PREFIX} {text}")
        self.write_status(state="installing", ok=False, step=step, message=text)

    def write_status(self, **fields) -> None:
        data = {"env_dir": self.env_dir, "log_path": self.log_path, "repair_command": repair_command(self.env_dir),
                "pid": os.getpid(), "updated": now_iso(), "error": None, "step": self.step}
        data.update(fields)
        try:
            write_json(self.status_path, data)
        except OSError:
            pass

    # -- processes --------------------------------------------------------------------------

    def run(self, cmd: list[str], step: str, parse_pip: bool = False, timeout: float | None = None,
            capture: bool = False) -> str:
        self._write_log(f"$ {quote_cmd(cmd)}")
        out = PipOutput(self.log) if parse_pip else None
        lines = []
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=clean_env(), cwd=self.env_dir,
                                          text=True, encoding="utf-8", errors="replace", bufsize=1)
        except OSError as e:
            raise StepFailed(step, f"could not run {cmd[0]}: {e}", cmd) from e
        start = time.monotonic()
        try:
            for line in self._proc.stdout:
                lines.append(line)
                if len(lines) > 4000 and not capture:
                    del lines[:2000]
                if _PROGRESS_RE.search(line) is None:
                    self._write_log(line)
                if out is not None:
                    out.feed(line)
                if timeout and time.monotonic() - start > timeout:
                    self._proc.kill()
                    raise StepFailed(step, f"timed out after {timeout:.0f} s", cmd, "".join(lines[-20:]))
            rc = self._proc.wait()
        finally:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if out is not None:
            self.downloaded += out.downloaded
        text = "".join(lines)
        if rc != 0:
            raise StepFailed(step, f"exit code {rc}", cmd, _error_tail(lines), rc)
        return text

    def pip_cmd(self, *args: str, use_index: bool = True) -> list[str]:
        cmd = [self.py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--prefer-binary"]
        if self.pip_raw_progress:
            cmd += ["--progress-bar", "raw"]
        if self.wheels:
            cmd += ["--no-index", "--find-links", self.wheels]
        elif self.index_url and use_index:
            cmd += ["--index-url", self.index_url]
        return cmd + list(args)

    # -- the steps --------------------------------------------------------------------------

    def ensure(self, rebuild: bool = False, prior: tuple = ("missing", "")) -> dict:
        t0 = time.monotonic()
        reqs = read_requirements(self.requirements)
        special, normal = split_requirements(reqs)
        host = find_host_torch()
        use_host, why = host_torch_usable(host, special) if self.reuse_host_torch else (
            False, "reusing the WebUI's torch is turned off")
        key = wanted_key(self.env_dir, self.reuse_host_torch, self.requirements, host=host)
        state, reason = prior
        old_key = (read_json(self.stamp_path + ".prev") or {}).get("key") or {}
        need_rebuild = (rebuild or not os.path.isfile(self.py) or state == "damaged"
                        or any(old_key.get(k) not in (None, key[k]) for k in ("python", "base_python", "torch_mode",
                                                                            "env_dir")))
        if not os.path.isfile(self.py) and state == "missing":
            what = "Setting up"
        elif need_rebuild:
            what = "Rebuilding"
        else:
            what = "Updating"
        self.say(f"{PREFIX} {what} the Image to LoRA worker environment in {self.env_dir}"
                 + (f" ({reason})" if reason and state != "missing" else ""))
        self.say(f"{PREFIX} torch: {why}" + ("" if use_host else "; installing a torch of its own "
                 "(about 2.5 GB to download for a CUDA build)"))
        if self.offline and not self.wheels:
            raise StepFailed("prepare", "offline mode is on and no wheel folder was given "
                             "(set I2L_WHEELS or --i2l-wheels to a folder of wheels)")
        if self.wheels and not os.path.isdir(self.wheels):
            raise StepFailed("prepare", f"the wheel folder {self.wheels} does not exist")

        if need_rebuild:
            self.create_venv()
        else:
            self.set_step("check", "Checking the existing venv")
        info = self.venv_info()
        self.write_pth(info["purelib"], host if use_host else None)
        self.bootstrap_pip(special.get("pip"))
        if not use_host:
            self.install_torch(special, info["purelib"])
        cons = self.write_constraints(info["purelib"], host if use_host else None)
        self.install_packages(normal, cons)
        result = self.verify(normal, use_host, host, info["purelib"])
        self.record_code()
        return self.finish(key, info, use_host, host, result, t0)

    def record_code(self) -> None:
        """List the code files a job uses, so the worker's cold starts read them ahead (best effort)."""
        self.set_step("warm-up", "Listing the files the worker loads, for faster cold starts")
        code = ("import sys; sys.path.insert(0, %r); from i2l_ext.worker.main import record_code_main; "
                "sys.exit(record_code_main())" % EXT_ROOT)
        try:
            self.run([self.py, "-c", code], "warm-up", timeout=600)
        except StepFailed as e:
            self.say(f"{PREFIX} (skipped listing the worker's files: {e.message})")

    def create_venv(self) -> None:
        self.set_step("create", f"Creating the venv with {sys.version.split()[0]} ({self.host_python})")
        # The folder may be a link to another disk (the user's choice): the venv is made where it
        # points, and the link stays (venv itself refuses a linked folder).
        real = os.path.realpath(self.env_dir)
        names = [n for n in os.listdir(real) if n not in KEEP_ON_REBUILD]
        foreign = sorted(n for n in names if not is_env_entry(n))
        if foreign:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            where = real if real == self.env_dir else f"{self.env_dir} (a link to {real})"
            raise StepFailed("create", f"{where} holds files that are not part of a Python environment "
                             f"({shown}); nothing in it was removed. Point I2L_WORKER_ENV at a new or "
                             "empty folder, or move those files out and install again")
        for name in names:
            p = os.path.join(real, name)
            try:
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.remove(p)
            except OSError as e:
                raise StepFailed("create", f"could not remove the old environment ({e}); if a worker is still "
                                 "running, stop it (or close the WebUI) first") from e
        cmd = [self.host_python, "-m", "venv", real]
        try:
            self.run(cmd, "create")
        except StepFailed as e:
            e.message += ("; this Python cannot make venvs (on Debian/Ubuntu: apt install python3-venv), "
                          "or point --i2l-python at a Python that has diffsynth installed")
            raise
        if not os.path.isfile(self.py):
            raise StepFailed("create", f"the venv was created but {self.py} is missing", cmd)

    def venv_info(self) -> dict:
        code = "import sys, sysconfig, json; print(json.dumps({'purelib': sysconfig.get_paths()['purelib'], " \
               "'version': list(sys.version_info[:3]), 'prefix': sys.prefix}))"
        text = self.run([self.py, "-c", code], self.step)
        try:
            return json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise StepFailed(self.step, f"the venv's interpreter gave no answer: {text[-300:]}") from e

    def write_pth(self, purelib: str, host: dict | None) -> None:
        lines = [EXT_ROOT]
        if host:
            for d in (host["torch_dir"], host.get("torchvision_dir")):
                if d and d not in lines:
                    lines.append(d)
        with open(os.path.join(purelib, PTH_NAME), "w", encoding="utf-8") as f:
            f.write("# Written by Image to LoRA's installer: the extension, then the WebUI's torch.\n")
            f.write("\n".join(lines) + "\n")

    def bootstrap_pip(self, spec: str | None) -> None:
        text = self.run([self.py, "-m", "pip", "--version"], self.step)
        m = re.search(r"pip (\S+)", text)
        version = m.group(1) if m else "0"
        if spec and not satisfies(version, spec):
            self.set_step("pip", f"Upgrading the venv's pip {version} ({spec})")
            try:
                self.run(self.pip_cmd(f"pip{spec}"), "pip", parse_pip=True)
                version = re.search(r"pip (\S+)", self.run([self.py, "-m", "pip", "--version"], "pip")).group(1)
            except StepFailed as e:
                self.say(f"{PREFIX} (could not upgrade pip: {e.message}; going on with pip {version})")
        self.pip_raw_progress = satisfies(version, ">=24.1")

    def install_torch(self, special: dict, purelib: str) -> None:
        specs = [f"{n}{special.get(n, '')}" for n in TORCH_NAMES]
        self.set_step("torch", "Installing torch and torchvision into the worker venv: " + " ".join(specs))
        extra = []
        url = self.torch_index_url or (WINDOWS_TORCH_INDEX if os.name == "nt" else None)
        if url and not self.wheels:
            extra = ["--extra-index-url", url]
            self.say(f"{PREFIX}   torch index: {url}")
        self.run(self.pip_cmd(*extra, *specs), "torch", parse_pip=True)

    def write_constraints(self, purelib: str, host: dict | None) -> str:
        """Hold torch where it is while the other packages install (never a second download)."""
        lines = []
        for name in TORCH_NAMES:
            v = None
            if host:
                v = host.get(name)
            else:
                for n in dist_infos(purelib):
                    if n.lower().startswith(name + "-"):
                        v = n[len(name) + 1:-len(".dist-info")]
            if v:
                lines.append(f"{name}=={v}")
        path = os.path.join(self.env_dir, "i2l-constraints.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def install_packages(self, normal: list[str], constraints: str) -> None:
        path = os.path.join(self.env_dir, "i2l-requirements.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(normal) + "\n")
        self.set_step("packages", "Installing diffsynth and what it needs (pinned in i2l_ext/envsetup/requirements.txt)")
        self.run(self.pip_cmd("-r", path, "-c", constraints), "packages", parse_pip=True)

    def verify(self, normal: list[str], use_host: bool, host: dict | None, purelib: str) -> dict:
        self.set_step("verify", "Checking that the worker imports torch, torchvision, transformers and diffsynth")
        text = self.run([self.py, "-c", _VERIFY_CODE, json.dumps(normal)], "verify", timeout=900)
        res = None
        for line in reversed(text.splitlines()):
            if line.startswith("I2L-VERIFY "):
                res = json.loads(line[len("I2L-VERIFY "):])
                break
        if res is None:
            raise StepFailed("verify", "the import check printed no result", tail=text[-2000:])
        bad = [f"{n}: {m.get('error')}" for n, m in res["modules"].items() if not m.get("ok")]
        bad += res.get("pins") or []
        torch_file = (res["modules"].get("torch") or {}).get("file") or ""
        if torch_file:
            where = host["torch_dir"] if use_host else purelib
            if not _under(torch_file, where):
                bad.append(f"torch was loaded from {torch_file}, not from "
                           + (f"the WebUI's {where}" if use_host else "the worker venv"))
        if bad:
            err = StepFailed("verify", "the worker environment does not import cleanly: " + "; ".join(bad[:6]),
                             tail="\n".join(bad))
            err.torch_broken = any(b.startswith(("torch:", "torchvision:")) for b in bad)
            raise err
        for n, m in res["modules"].items():
            self.say(f"{PREFIX}   {n} {m.get('version')}  ({m.get('file')})")
        return res

    def finish(self, key: dict, info: dict, use_host: bool, host: dict | None, res: dict, t0: float) -> dict:
        self.set_step("stamp", "Recording the finished install")
        checks = [self.py] + [m["file"] for m in res["modules"].values() if m.get("file")]
        torch = {"mode": "host" if use_host else "own", "version": res["modules"]["torch"].get("version"),
                 "path": os.path.dirname(os.path.dirname(res["modules"]["torch"]["file"]))}
        env_bytes = folder_size(self.env_dir)
        shared = []
        if use_host and host:
            pinned = {name for name, _line in read_requirements(self.requirements)} - set(SPECIAL_NAMES)
            shared = shared_dists(info["purelib"], [host.get("torch_dir"), host.get("torchvision_dir")], pinned)
        stamp = {"complete": True, "key": key, "python_exe": self.py, "site_packages": info["purelib"],
                 "dists": dist_infos(info["purelib"]), "check_paths": checks, "torch": torch,
                 "shared_dists": shared,
                 "versions": {n: m.get("version") for n, m in res["modules"].items()},
                 "installed": now_iso(), "seconds": round(time.monotonic() - t0, 1), "bytes": env_bytes,
                 "downloaded": int(self.downloaded)}
        write_json(self.stamp_path, stamp)
        try:
            os.remove(self.stamp_path + ".prev")
        except OSError:
            pass
        msg = (f"Worker environment ready in {time.monotonic() - t0:.0f} s: {human(env_bytes)} on disk, "
               f"{human(self.downloaded)} downloaded; torch {torch['version']} "
               + ("reused from the WebUI (not downloaded again)" if use_host else "installed in the worker venv"))
        self.write_status(state="ready", ok=True, step="done", message=msg, torch=torch, python=self.py)
        self.say(f"{PREFIX} {msg}")
        return stamp


def _under(path: str, folder: str) -> bool:
    p = os.path.normcase(os.path.realpath(path))
    f = os.path.normcase(os.path.realpath(folder)).rstrip(os.sep) + os.sep
    return p.startswith(f)


def _error_tail(lines: list[str], n: int = 15) -> str:
    """The lines that explain a pip failure (ERROR: ... and what follows), else the last ones."""
    idx = [i for i, l in enumerate(lines) if l.lstrip().startswith(("ERROR", "error:", "Traceback"))]
    pick = lines[idx[0]:idx[0] + n] if idx else lines[-n:]
    return "".join(l for l in pick if not _PROGRESS_RE.search(l)).rstrip()


# ---------------------------------------------------------------------------------------------


def _take_lock(env_dir: str) -> str:
    path = os.path.join(env_dir, LOCK_NAME)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and pid_alive(pid):
                raise I2LError(I2LError.ENVIRONMENT, T("m_env_other_install", pid=pid), T("m_env_other_install_fix"))
            try:
                os.remove(path)
            except OSError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    raise I2LError(I2LError.ENVIRONMENT, T("m_env_lock", path=path), T("m_os_fix"))


def failure_text(err: StepFailed, env_dir: str) -> str:
    lines = [f"Image to LoRA: setting up the worker environment failed at step '{err.step}': {err.message}."]
    if err.command:
        lines.append(f"  Failed command: {quote_cmd(err.command)}")
    if err.tail:
        lines += ["  " + l for l in err.tail.splitlines()[-12:]]
    if err.step in ("pip", "torch", "packages") and ("connection" in (err.tail or "").lower()
                                                    or "no matching distribution" in (err.tail or "").lower()):
        lines.append("  No network, or a blocked index? Set PIP_INDEX_URL (or the WebUI's INDEX_URL) to a mirror, "
                     "or give a folder of wheels with I2L_WHEELS / --i2l-wheels (see README, 'Offline').")
    lines.append(f"  Full log: {os.path.join(env_dir, LOG_NAME)}")
    lines.append(f"  To repair: {repair_command(env_dir)}")
    lines.append("  The WebUI starts as usual; the Image to LoRA tab shows this error until the environment is repaired.")
    return "\n".join(lines)


def ensure_env(reuse_host_torch: bool = True, wheels: str | None = None, index_url: str | None = None,
               log=print, env_dir: str | None = None, rebuild: bool = False, offline: bool | None = None,
               verify: bool = False, torch_index_url: str | None = None, requirements: str = REQUIREMENTS,
               raise_on_error: bool = False) -> dict:
    """Make the worker environment whole and return its status dict.

    Nothing changed -> a stat and a small read, no subprocess, no pip. Pins, Python or the WebUI's
    torch changed -> upgrade once in place. Missing, damaged or ``rebuild`` -> build from scratch.
    A failure is written to ``<env>/i2l-env-status.json`` and returned (``ok: False``) or raised
    (``raise_on_error``) as ``I2LError(ENVIRONMENT)`` with the repair command.
    """
    from . import env_status
    env_dir = worker_env_dir(env_dir=env_dir)
    offline = bool(offline)
    if not rebuild and not verify:
        key = wanted_key(env_dir, reuse_host_torch, requirements)
        state, _reason, _stamp = quick_state(env_dir, key)
        if state == "ready":
            return env_status(env_dir)
    prior = quick_state(env_dir, wanted_key(env_dir, reuse_host_torch, requirements))[:2]
    os.makedirs(env_dir, exist_ok=True)
    lock = _take_lock(env_dir)
    inst = Installer(env_dir, reuse_host_torch=reuse_host_torch, wheels=wheels, index_url=index_url,
                     torch_index_url=torch_index_url, offline=offline, log=log, requirements=requirements)
    try:
        inst._logf = open(inst.log_path, "w", encoding="utf-8")
        inst._write_log(f"# Image to LoRA worker environment install, {now_iso()}, host python {sys.executable}")
        # From here on the environment may change: it is not whole until the stamp is written again.
        if os.path.exists(inst.stamp_path):
            os.replace(inst.stamp_path, inst.stamp_path + ".prev")
        inst.write_status(state="installing", ok=False, step="prepare", message="Starting")
        try:
            inst.ensure(rebuild=rebuild, prior=prior)
        except StepFailed as e:
            if getattr(e, "torch_broken", False) and reuse_host_torch:
                inst.say(f"{PREFIX} The WebUI's torch does not work in the worker ({e.message}); "
                         "rebuilding with a torch of its own.")
                inst.reuse_host_torch = False
                inst.ensure(rebuild=True)
            elif e.step == "verify" and not rebuild:
                inst.say(f"{PREFIX} {e.message}; rebuilding the environment from scratch.")
                inst.ensure(rebuild=True)
            else:
                raise
    except StepFailed as e:
        text = failure_text(e, env_dir)
        inst._write_log(text)
        inst.log(text)
        inst.write_status(state="failed", ok=False, step=e.step, error=e.message, message=text.splitlines()[0],
                          command=quote_cmd(e.command) if e.command else None, details=e.tail)
        if raise_on_error:
            raise I2LError(I2LError.ENVIRONMENT, T("m_env_install_failed", step=e.step, error=raw(e.message)),
                           T("m_run_command", command=repair_command(env_dir)), details=text) from e
    except KeyboardInterrupt:
        inst.write_status(state="interrupted", ok=False, error="interrupted",
                          message="The install was interrupted; the environment is not used until it is repaired.")
        inst.log(f"{PREFIX} Interrupted. To finish the install: {repair_command(env_dir)}")
        raise
    except OSError as e:
        text = failure_text(StepFailed(inst.step, str(e)), env_dir)
        inst.log(text)
        inst.write_status(state="failed", ok=False, step=inst.step, error=str(e), message=text.splitlines()[0])
        if raise_on_error:
            raise I2LError(I2LError.ENVIRONMENT, T("m_env_install_failed", step=inst.step, error=raw(e)),
                           T("m_run_command", command=repair_command(env_dir))) from e
    finally:
        if inst._logf:
            inst._logf.close()
        try:
            os.remove(lock)
        except OSError:
            pass
    return env_status(env_dir)
