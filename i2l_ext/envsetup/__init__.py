"""The worker's own Python environment.

diffsynth needs transformers 5.x, which no WebUI venv can take unharmed, so the worker runs in a
venv of its own (``<extension>/.venv-worker`` by default). ``install.py`` builds it at launch and
changes nothing in the WebUI's venv; when the WebUI's torch is recent enough it is reused (its
site-packages folder is appended to the worker venv's path) instead of downloaded a second time.

Public API (standard library only, importable in any host):

- ``worker_env_dir(ext_root=None)``: where the environment lives.
- ``venv_python(env_dir, windows=None)``: ``Scripts\\python.exe`` or ``bin/python``.
- ``find_worker_python(explicit=None)``: the interpreter to start the worker with, or
  ``I2LError(ENVIRONMENT)`` naming the repair command; a half-built environment is never returned.
- ``env_status()``: a dict for the tab and the CLI (``ok``, ``state``, ``message``, ``error``,
  ``repair_command``, ``log_path``, ...).
- ``ensure_env(...)``: make the environment whole; a stat and a small read when nothing changed.
- ``repair_env(...)``: rebuild it from scratch.
"""
from __future__ import annotations

import os
import shutil

from ..contract import I2LError, T, raw
from .layout import (EXT_ROOT, LOG_NAME, REQUIREMENTS, STATUS_NAME, STAMP_NAME, pid_alive, quick_state,
                     read_json, repair_command, venv_python, worker_env_dir)

__all__ = ["worker_env_dir", "venv_python", "find_worker_python", "env_status", "ensure_env", "repair_env",
           "repair_command", "explicit_python", "EXT_ROOT", "REQUIREMENTS"]

def explicit_python(explicit: str | None = None) -> str | None:
    """The interpreter the user chose (the ``worker_python`` setting), resolved; None if none."""
    cand = (explicit or "").strip()
    if not cand:
        return None
    if os.sep not in cand and (os.altsep is None or os.altsep not in cand):
        found = shutil.which(cand)
        if found:
            return found
    return os.path.abspath(os.path.expanduser(cand))


def env_status(env_dir: str | None = None, explicit: str | None = None) -> dict:
    """Where the worker environment stands, without starting anything (stats and small reads)."""
    env_dir = worker_env_dir(env_dir=env_dir)
    log_path = os.path.join(env_dir, LOG_NAME)
    out = {"ok": False, "state": "missing", "message": "", "error": None, "failed_step": None,
           "env_dir": env_dir, "python": None, "torch": None, "log_path": log_path if os.path.exists(log_path) else None,
           "repair_command": repair_command(env_dir), "updated": None}
    chosen = explicit_python(explicit)
    if chosen:
        ok = os.path.isfile(chosen)
        text = T("m_env_external", path=chosen) if ok else T("m_env_external_missing", path=chosen)
        out.update(ok=ok, state="external", python=chosen, text=text, message=text.render("en"),
                   error=None if ok else "interpreter missing")
        return out
    status = read_json(os.path.join(env_dir, STATUS_NAME)) or {}
    state, reason, stamp = quick_state(env_dir)
    out["updated"] = status.get("updated")
    if stamp:
        out["torch"] = stamp.get("torch")
        out["python"] = stamp.get("python_exe")
    if status.get("state") == "installing" and state != "ready":
        if pid_alive(int(status.get("pid") or 0)):
            state, reason = "installing", f"step: {status.get('step') or '?'}"
        else:
            state, reason = "interrupted", ""
    elif state == "missing" and status.get("state") == "failed":
        state, reason = "failed", status.get("error") or ""
        out["failed_step"] = status.get("step")
    elif state == "missing" and status.get("state") == "interrupted":
        state, reason = "interrupted", ""
    out["state"] = state
    out["ok"] = state == "ready"
    key = f"m_env_{state}"
    if state == "failed" and out["failed_step"]:
        key += "_step"
    if reason and state not in ("ready", "missing"):
        key += "_reason"
    text = T(key, step=out["failed_step"] or "", reason=raw(reason))
    out["text"], out["message"] = text, text.render("en")
    if not out["ok"]:
        out["error"] = reason or out["message"]
        out["python"] = out["python"] if state != "missing" else None
    return out


def find_worker_python(explicit: str | None = None, env_dir: str | None = None) -> str:
    """The worker's interpreter: the user's choice (the ``worker_python`` setting) or the environment
    install.py built in ``env_dir`` (the ``worker_env`` setting), when that is complete. Raises
    ``I2LError(ENVIRONMENT)``."""
    chosen = explicit_python(explicit)
    if chosen:
        if os.path.isfile(chosen):
            return chosen
        raise I2LError(I2LError.ENVIRONMENT, T("m_env_interp_missing", path=chosen),
                       T("m_env_interp_fix"))
    st = env_status(env_dir)
    if st["ok"]:
        return st["python"]
    if st["state"] == "installing":
        fix = T("m_env_wait")
    elif st["state"] == "outdated":
        fix = T("m_env_restart_or", command=st["repair_command"].replace(" env repair", " env setup"))
    elif st.get("log_path") and st["state"] in ("failed", "interrupted"):
        fix = T("m_env_run_repair_log", command=st["repair_command"], log=st["log_path"])
    else:
        fix = T("m_env_run_repair", command=st["repair_command"])
    raise I2LError(I2LError.ENVIRONMENT, st["text"], fix, details=st.get("error") or "")


def ensure_env(reuse_host_torch: bool = True, wheels: str | None = None, index_url: str | None = None,
               log=print, env_dir: str | None = None, **kw) -> dict:
    """Make the worker environment whole; returns ``env_status()``-like dict. See ``installer.ensure_env``."""
    from .installer import ensure_env as _ensure
    return _ensure(reuse_host_torch=reuse_host_torch, wheels=wheels, index_url=index_url, log=log,
                   env_dir=env_dir, **kw)


def repair_env(reuse_host_torch: bool = True, wheels: str | None = None, index_url: str | None = None,
               log=print, env_dir: str | None = None, **kw) -> dict:
    """Rebuild the worker environment from scratch (the tab's and the CLI's repair action)."""
    kw["rebuild"] = True
    return ensure_env(reuse_host_torch=reuse_host_torch, wheels=wheels, index_url=index_url, log=log,
                      env_dir=env_dir, **kw)
