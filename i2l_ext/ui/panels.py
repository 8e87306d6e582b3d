"""Side panels of the tab: the worker-environment banner (with Repair) and the Models panel.

Both use modules other parts of the project provide (``i2l_ext.envsetup``, ``i2l_ext.hub``); when
one of them is missing the panel says so instead of failing the whole tab.
"""
from __future__ import annotations

import html
import importlib
import threading
import time

import gradio as gr

from .. import catalog
from ..errors import I2LError
from ..i18n import t
from . import compat


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# -- worker environment ---------------------------------------------------------------------------
def env_state(ctl) -> tuple[bool, str]:
    """(ok, banner html). A configured worker interpreter that exists counts as ok."""
    env = _module("i2l_ext.envsetup")
    if env is None or not hasattr(env, "env_status"):
        return True, ""
    try:
        kwargs = {}
        if ctl.config.worker_python:
            kwargs["python"] = ctl.config.worker_python
        try:
            st = env.env_status(**kwargs)
        except TypeError:
            st = env.env_status()
    except Exception as e:       # never let a check break the tab
        st = {"ok": False, "error": str(e), "repair_command": ""}
    if st.get("ok"):
        return True, ""
    cmd = st.get("repair_command") or "python -m i2l_ext env repair"
    return False, (f'<div class="i2l-banner" data-ok="0"><b>{esc(t("env_not_ok"))}</b> '
                   f'{esc(st.get("error") or "")}<div class="i2l-fix">{esc(t("env_fix"))} <code>{esc(cmd)}</code></div></div>')


def env_banner_loaders(ctl, banner, row, repair_btn, log):
    def load():
        ok, text = env_state(ctl)
        return text, compat.update(visible=not ok)

    def repair():
        env = _module("i2l_ext.envsetup")
        if env is None or not hasattr(env, "repair_env"):
            yield compat.update(), compat.update(), t("env_repair_missing")
            return
        lines: list[str] = []
        box: dict = {}

        def work():
            try:
                env.repair_env(log=lambda m: lines.append(str(m)))
            except Exception as e:
                box["error"] = e
            finally:
                box["done"] = True
        threading.Thread(target=work, daemon=True, name="i2l-env-repair").start()
        while not box.get("done"):
            time.sleep(0.5)
            yield compat.update(), compat.update(), "\n".join(lines[-300:])
        ok, text = env_state(ctl)
        if "error" in box:
            e = box["error"]
            msg = e.message if isinstance(e, I2LError) else str(e)
            lines.append(t("env_repair_failed", error=msg))
        yield text, compat.update(visible=not ok), "\n".join(lines[-300:])

    repair_btn.click(repair, None, [banner, row, log], **compat.event_kwargs(concurrent=True))
    return [(load, None, [banner, row])]


# -- models ---------------------------------------------------------------------------------------
class Downloads:
    """The one download running (per process), shared by every page."""
    task = None
    variant = None


def _status_rows(ctl) -> list[dict]:
    """One row per variant: key, label, missing file titles, bytes to download."""
    hub = _module("i2l_ext.hub")
    rows = []
    status = None
    if hub is not None and hasattr(hub, "models_status"):
        try:
            status = hub.models_status(ctl.config.models_dir, list(ctl.config.search_dirs))
        except Exception:
            status = None
    for v in catalog.VARIANTS.values():
        row = {"key": v.key, "label": v.label, "missing": [], "bytes": 0}
        info = status.get(v.key) if isinstance(status, dict) else None
        if isinstance(info, dict):
            missing = info.get("missing") or info.get("missing_roles") or []
            row["missing"] = [catalog.FILES[m].title if m in catalog.FILES else str(m) for m in missing]
            row["bytes"] = int(info.get("missing_bytes") or info.get("bytes") or
                               sum(catalog.FILES[m].approx_bytes for m in missing if m in catalog.FILES))
            row["ready"] = bool(info.get("ready", not missing))
        else:
            try:
                ctl.service.resolve_files(v.key, None)
                row["ready"] = True
            except I2LError:
                missing = catalog.missing_roles(v, ctl.config.models_dir)
                row["missing"] = [catalog.FILES[m].title for m in missing]
                row["bytes"] = sum(catalog.FILES[m].approx_bytes for m in missing)
                row["ready"] = False
            except Exception:
                row["ready"] = False
        rows.append(row)
    return rows


def models_html(ctl) -> str:
    rows = []
    for r in _status_rows(ctl):
        if r["ready"]:
            state = f'<span class="i2l-ok">&#10003; {esc(t("models_ready"))}</span>'
        else:
            state = (f'<span class="i2l-missing">{esc(t("models_missing", size=catalog.human_size(r["bytes"])))}</span>'
                     f'<div class="i2l-missing-files">{esc(", ".join(r["missing"]))}</div>')
        rows.append(f'<tr data-variant="{esc(r["key"])}" data-ready="{int(r["ready"])}"><th>{esc(r["label"])}</th>'
                    f"<td>{state}</td></tr>")
    return (f'<div class="i2l-models"><div class="i2l-models-dir">{esc(t("models_dir"))} '
            f'<code>{esc(ctl.config.models_dir)}</code></div><table>{"".join(rows)}</table></div>')


def _progress_html(p: dict | None, variant: str | None) -> str:
    if not p:
        return ""
    done, total = p.get("bytes") or 0, p.get("total") or 0
    pct = int(100 * done / total) if total else 0
    speed = p.get("speed") or 0
    eta = p.get("eta")
    text = f"{variant or ''}: {catalog.human_size(done)} / {catalog.human_size(total)} ({pct}%)"
    if speed:
        text += f" · {catalog.human_size(speed)}/s"
    if eta:
        text += f" · {t('eta', s=int(eta))}"
    if p.get("error"):
        text += f" · {p['error']}"
    return (f'<div class="i2l-progress" data-state="{esc(p.get("state", "running"))}"><div class="i2l-bar">'
            f'<div class="i2l-bar-fill" style="width:{pct}%"></div></div><div class="i2l-progress-text">{esc(text)}</div></div>')


def _start_task(hub, variant: str, ctl):
    cls = hub.DownloadTask
    for kwargs in ({"variant": variant, "models_dir": ctl.config.models_dir},):
        try:
            task = cls(**kwargs)
            break
        except TypeError:
            task = cls(variant, ctl.config.models_dir)
            break
    start = getattr(task, "start", None)
    if callable(start) and not getattr(task, "is_alive", lambda: False)():
        start()
    return task


def models_panel(ctl):
    with gr.Accordion(t("models_title"), open=False, elem_id="i2l_models"):
        status = gr.HTML("", elem_id="i2l_models_status")
        with gr.Row():
            which = gr.Dropdown(choices=[(v.label, v.key) for v in catalog.VARIANTS.values()], value="style",
                                label=t("models_variant"), elem_id="i2l_models_variant")
            dl_btn = gr.Button(t("download"), elem_id="i2l_download", size="sm")
            dl_cancel = gr.Button(t("cancel_download"), elem_id="i2l_download_cancel", size="sm")
            refresh = gr.Button(t("refresh"), elem_id="i2l_models_refresh", size="sm")
        dl_progress = gr.HTML("", elem_id="i2l_download_progress")

    def download(variant):
        hub = _module("i2l_ext.hub")
        if hub is None or not hasattr(hub, "DownloadTask"):
            yield compat.update(), f'<div class="i2l-error">{esc(t("hub_missing"))}</div>'
            return
        task = Downloads.task
        if task is not None and getattr(task, "is_alive", lambda: False)():
            yield compat.update(), f'<div class="i2l-error">{esc(t("download_busy"))}</div>'
            return
        try:
            task = _start_task(hub, variant, ctl)
        except I2LError as e:
            yield compat.update(), f'<div class="i2l-error">{esc(e.message)} {esc(e.fix)}</div>'
            return
        Downloads.task, Downloads.variant = task, variant
        while getattr(task, "is_alive", lambda: False)():
            try:
                p = task.progress()
            except Exception:
                p = None
            yield compat.update(), _progress_html(p, variant)
            time.sleep(1.0)
        p = None
        try:
            p = task.progress()
        except Exception:
            pass
        err = getattr(task, "error", None)
        tail = f'<div class="i2l-error">{esc(getattr(err, "message", err))}</div>' if err else ""
        yield models_html(ctl), _progress_html(p, variant) + tail

    def cancel():
        task = Downloads.task
        if task is not None:
            try:
                task.cancel()
            except Exception:
                pass
        return compat.update()

    dl_btn.click(download, [which], [status, dl_progress], **compat.event_kwargs(concurrent=True))
    dl_cancel.click(cancel, None, None, queue=False)
    refresh.click(lambda: models_html(ctl), None, status)
    return [(lambda: models_html(ctl), None, [status])]
