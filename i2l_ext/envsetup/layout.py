"""Where the worker environment lives, what it should contain, and whether it is whole.

Standard library only, no subprocess, no heavy import: this module runs in every host process and
on every WebUI launch, so the "nothing changed" answer is a few stats and one small file read.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
import time

EXT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt")

DEFAULT_ENV_NAME = ".venv-worker"
STAMP_NAME = "i2l-env-stamp.json"      # written only after a complete, verified install
STATUS_NAME = "i2l-env-status.json"    # what the tab and `env status` read
LOG_NAME = "i2l-env-install.log"       # full output of the last install
LOCK_NAME = "i2l-env.lock"
PTH_NAME = "_i2l_worker_paths.pth"     # ext root + the WebUI's torch, after the venv's own packages
KEEP_ON_REBUILD = (STATUS_NAME, LOG_NAME, LOCK_NAME)
# What a rebuild may remove from the folder: a venv's own entries (POSIX and Windows) and ours
# (named "i2l-..."). A folder holding anything else is someone's files: a rebuild leaves it alone.
ENV_LAYOUT_NAMES = frozenset({"bin", "include", "lib", "lib64", "share", "etc", "man", "pyvenv.cfg",
                              "Scripts", "Include", "Lib", "Tcl"})


def is_env_entry(name: str) -> bool:
    """Whether an entry of the environment folder is the venv's or ours (a rebuild may remove it)."""
    return name in ENV_LAYOUT_NAMES or name.startswith("i2l-")

SCHEMA = 2                             # bump when the stamp's meaning changes (2: shared_dists)
TORCH_NAMES = ("torch", "torchvision")
SPECIAL_NAMES = ("pip",) + TORCH_NAMES


# ---------------------------------------------------------------------------------------------
# Paths


def worker_env_dir(ext_root: str | None = None, env_dir: str | None = None) -> str:
    """The worker environment folder: ``env_dir`` (the ``worker_env`` setting), else ``<ext root>/.venv-worker``."""
    d = env_dir or os.path.join(ext_root or EXT_ROOT, DEFAULT_ENV_NAME)
    return os.path.abspath(os.path.expanduser(d))


def is_windows_layout(windows: bool | None = None) -> bool:
    return (os.name == "nt") if windows is None else bool(windows)


def venv_python(env_dir: str, windows: bool | None = None) -> str:
    """The interpreter of a venv: ``Scripts\\python.exe`` on Windows, ``bin/python`` elsewhere."""
    if is_windows_layout(windows):
        return os.path.join(env_dir, "Scripts", "python.exe")
    return os.path.join(env_dir, "bin", "python")


def venv_site_packages(env_dir: str, version: tuple | None = None, windows: bool | None = None) -> str:
    """The venv's own site-packages for a CPython of ``version`` (default: this one)."""
    if is_windows_layout(windows):
        return os.path.join(env_dir, "Lib", "site-packages")
    major, minor = (version or sys.version_info)[:2]
    return os.path.join(env_dir, "lib", f"python{major}.{minor}", "site-packages")


def repair_command(env_dir: str | None = None, python: str | None = None, ext_root: str | None = None,
                   windows: bool | None = None) -> str:
    """The exact command that rebuilds the worker environment, for messages and the tab."""
    root = ext_root or EXT_ROOT
    py = python or sys.executable or "python"
    cd = 'cd /d "%s"' % root if is_windows_layout(windows) else 'cd "%s"' % root
    cmd = f'{cd} && "{py}" -m i2l_ext env repair'
    default = os.path.abspath(os.path.join(root, DEFAULT_ENV_NAME))
    if env_dir and os.path.abspath(env_dir) != default:
        cmd += f' --env "{env_dir}"'
    return cmd


# ---------------------------------------------------------------------------------------------
# Requirements and versions


_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: str = REQUIREMENTS) -> list[tuple[str, str]]:
    """``(canonical name, requirement line)`` for each requirement, comments and blanks dropped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
            if not line or line.startswith("-"):
                continue
            m = _NAME_RE.match(line)
            if m:
                out.append((canonical(m.group(1)), line))
    return out


def split_requirements(reqs: list[tuple[str, str]]) -> tuple[dict, list[str]]:
    """Special lines (pip, torch, torchvision) by name, and the lines pip gets as they are."""
    special, normal = {}, []
    for name, line in reqs:
        if name in SPECIAL_NAMES:
            special[name] = line[len(_NAME_RE.match(line).group(0)):].strip()
        else:
            normal.append(line)
    return special, normal


def pins_hash(path: str = REQUIREMENTS) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read().replace(b"\r\n", b"\n")).hexdigest()[:16]


def version_tuple(v: str) -> tuple:
    """``"2.9.1+cu128"`` -> ``(2, 9, 1)``; pre-releases count as the release before them."""
    v = v.strip().split("+", 1)[0]
    parts = []
    for p in v.split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group(0)))
        if m.end() != len(p):     # 2rc1: stop after the number
            break
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` meets a simple spec like ``>=2.6``, ``>=2.6,<3``, ``==2.9.*`` (markers ignored)."""
    spec = spec.split(";", 1)[0].strip()
    if not spec:
        return True
    have = version_tuple(version)
    for clause in spec.split(","):
        clause = clause.strip()
        m = re.match(r"(===|==|!=|>=|<=|~=|>|<)\s*(.+)$", clause)
        if not m:
            return False
        op, want = m.groups()
        if op in ("==", "!=", "===") and want.endswith(".*"):
            prefix = version_tuple(want[:-2])
            ok = have[:len(prefix)] == prefix or (have + (0,) * len(prefix))[:len(prefix)] == prefix
            if (op == "!=") == ok:
                return False
            continue
        w = version_tuple(want)
        if op == "~=":
            upper = w[:-1] if len(w) > 1 else w
            if not (have >= w and have[:len(upper)] == upper):
                return False
            continue
        ok = {"==": have == w, "===": have == w, "!=": have != w, ">=": have >= w,
              "<=": have <= w, ">": have > w, "<": have < w}[op]
        if not ok:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The host's torch, found without importing it


def _dist_version(site_dir: str, name: str, listing: list[str] | None = None) -> str | None:
    prefix = name.lower() + "-"
    try:
        names = listing if listing is not None else os.listdir(site_dir)
    except OSError:
        return None
    for n in names:
        low = n.lower()
        if low.startswith(prefix) and low.endswith(".dist-info"):
            v = n[len(prefix):-len(".dist-info")]
            if v and v[0].isdigit():
                return v
    return None


def _package_dir(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.dirname(os.path.abspath(list(spec.submodule_search_locations)[0]))


def find_host_torch() -> dict | None:
    """torch and torchvision in this interpreter's path: the folders holding them and their versions.

    Neither is imported: ``find_spec`` locates the package and the versions come from the
    ``*.dist-info`` folder names beside it (what pip sees).
    """
    torch_dir = _package_dir("torch")
    if not torch_dir:
        return None
    listing = os.listdir(torch_dir)
    info = {"torch_dir": torch_dir, "torch": _dist_version(torch_dir, "torch", listing),
            "torchvision_dir": None, "torchvision": None}
    tv_dir = _package_dir("torchvision")
    if tv_dir:
        info["torchvision_dir"] = tv_dir
        info["torchvision"] = _dist_version(tv_dir, "torchvision", listing if tv_dir == torch_dir else None)
    if info["torch"] is None:      # an odd install (source tree, egg): read torch/version.py
        try:
            with open(os.path.join(torch_dir, "torch", "version.py"), encoding="utf-8") as f:
                m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read())
            info["torch"] = m.group(1) if m else None
        except OSError:
            pass
    return info if info["torch"] else None


def host_torch_usable(host: dict | None, special: dict) -> tuple[bool, str]:
    """Whether the worker can run on the host's torch, and why not."""
    if not host:
        return False, "no torch in the WebUI's Python"
    need = special.get("torch", "")
    if not satisfies(host["torch"], need):
        return False, f"the WebUI's torch {host['torch']} is older than the worker needs ({need})"
    if host.get("torchvision") and not satisfies(host["torchvision"], special.get("torchvision", "")):
        return False, (f"the WebUI's torchvision {host['torchvision']} is older than the worker needs "
                       f"({special.get('torchvision')})")
    return True, f"reusing the WebUI's torch {host['torch']} from {host['torch_dir']}"


# ---------------------------------------------------------------------------------------------
# The stamp: what a complete install was made from


def base_python() -> str:
    return os.path.abspath(getattr(sys, "_base_executable", None) or sys.executable)


def wanted_key(env_dir: str, reuse_host_torch: bool = True, requirements: str = REQUIREMENTS,
               host: dict | None = "detect") -> dict:
    """Everything the environment depends on; a stamp with a different key is stale."""
    special, _ = split_requirements(read_requirements(requirements))
    if host == "detect":
        host = find_host_torch()
    use_host, _why = host_torch_usable(host, special) if reuse_host_torch else (False, "")
    key = {
        "schema": SCHEMA,
        "pins": pins_hash(requirements),
        "python": "%s %d.%d.%d" % (sys.implementation.name, *sys.version_info[:3]),
        "base_python": base_python(),
        "torch_mode": "host" if use_host else "own",
        "host_torch": None,
        "env_dir": os.path.abspath(env_dir),
        "ext_root": EXT_ROOT,
    }
    if use_host:
        key["host_torch"] = {k: host.get(k) for k in ("torch_dir", "torch", "torchvision_dir", "torchvision")}
    return key


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def write_json(path: str, data: dict) -> None:
    """Atomic: a reader never sees half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dist_infos(site_dir: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(site_dir) if n.endswith(".dist-info"))
    except OSError:
        return []


def _dist_name(dist_info: str) -> str:
    return canonical(dist_info[:-len(".dist-info")].rsplit("-", 1)[0])


def shared_dists(site_dir: str, host_dirs: list[str], names: set[str]) -> list[str]:
    """The WebUI's ``.dist-info`` folders of pinned packages the worker takes from there.

    With the WebUI's torch reused, the WebUI's site-packages is on the worker's path (after the
    worker's own), and pip installs a pinned package into the worker only when the WebUI's copy has
    another version. The ones it took from the WebUI are recorded, so that a later change there
    (another extension, a WebUI update) makes the environment out of date instead of silently
    running the worker with versions it was never installed with.
    """
    own = {_dist_name(n) for n in dist_infos(site_dir)}
    out = []
    for d in dict.fromkeys(p for p in host_dirs if p):
        for n in dist_infos(d):
            name = _dist_name(n)
            if name in names and name not in own:
                out.append(os.path.join(d, n))
                own.add(name)                   # the first one on the path is the one imported
    return out


def shared_change(stamp: dict) -> str | None:
    """Why the packages taken from the WebUI no longer hold (``None`` when they do): stats only."""
    gone = [os.path.basename(p)[:-len(".dist-info")] for p in stamp.get("shared_dists") or ()
            if not os.path.isdir(p)]
    if gone:
        return ("packages it takes from the WebUI's environment changed there (%s)"
                % ", ".join(gone[:4]) + (" ..." if len(gone) > 4 else ""))
    return None


def check_whole(env_dir: str, stamp: dict | None) -> str | None:
    """Why a stamped environment is not whole (``None`` when it is): stats and one listdir only."""
    if not stamp or not stamp.get("complete"):
        return "not set up (no completed install)"
    py = stamp.get("python_exe") or venv_python(env_dir)
    if not os.path.isfile(py):
        return f"its interpreter {py} is missing"
    site = stamp.get("site_packages")
    if site and stamp.get("dists") is not None and dist_infos(site) != stamp["dists"]:
        return "its installed packages changed since the last install"
    for p in stamp.get("check_paths") or ():
        if not os.path.exists(p):
            return f"{p} is missing"
    return None


def quick_state(env_dir: str, key: dict | None = None) -> tuple[str, str, dict | None]:
    """``(state, reason, stamp)`` with state ``ready`` | ``missing`` | ``outdated`` | ``damaged``.

    Without ``key`` only the pins are compared (the host's torch is judged by install.py).
    """
    stamp = read_json(os.path.join(env_dir, STAMP_NAME))
    if not stamp:
        return "missing", "not set up (no completed install)", None
    if key is not None:
        old = stamp.get("key") or {}
        diff = [k for k in key if old.get(k) != key[k]]
        if diff:
            return "outdated", "changed since the last install: " + ", ".join(diff), stamp
    elif (stamp.get("key") or {}).get("pins") != pins_hash() or (stamp.get("key") or {}).get("schema") != SCHEMA:
        return "outdated", "the pinned requirements changed since the last install", stamp
    changed = shared_change(stamp)
    if changed:
        return "outdated", changed, stamp
    why = check_whole(env_dir, stamp)
    if why:
        return "damaged", why, stamp
    return "ready", "", stamp


# ---------------------------------------------------------------------------------------------
# Processes and locks


def pid_alive(pid: int) -> bool:
    if not pid or pid <= 0:
        return False
    if os.name == "nt":
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)      # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259                                # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
