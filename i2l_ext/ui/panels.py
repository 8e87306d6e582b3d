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
from ..contract import I2LError, T, Text
from ..i18n import t
from . import compat


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def say(text) -> str:
    """A message (``Text``) in the tab's language; plain strings as they are."""
    return text.render() if isinstance(text, Text) else str(text or "")


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# -- worker environment ---------------------------------------------------------------------------
def env_state(ctl) -> tuple[bool, str]:
    """(ok, banner html). A worker interpreter chosen by the user that exists counts as ok."""
    env = _module("i2l_ext.envsetup")
    if env is None or not hasattr(env, "env_status"):
        return True, ""
    try:
        st = env.env_status(explicit=ctl.config.worker_python or None)
    except Exception as e:       # never let a check break the tab
        st = {"ok": False, "message": str(e), "error": "", "repair_command": ""}
    if st.get("ok"):
        return True, ""
    cmd = st.get("repair_command") or "python -m i2l_ext env repair"
    detail = say(st["text"]) if st.get("text") is not None else str(st.get("message") or "")
    return False, (f'<div class="i2l-banner" data-ok="0" data-state="{esc(st.get("state", ""))}">'
                   f'<b>{esc(t("env_not_ok"))}</b> {esc(detail)}'
                   f'<div class="i2l-fix">{esc(t("env_fix"))} <code>{esc(cmd)}</code></div></div>')


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
                ctl.service.stop_standby()      # it runs from the environment about to be rebuilt
                env.repair_env(log=lambda *m: lines.append(" ".join(str(x) for x in m)))
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
            msg = say(e.text) if isinstance(e, I2LError) else str(e)
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
    """One row per variant: key, label, ready, missing file titles, bytes to download."""
    hub = _module("i2l_ext.hub")
    rows = []
    if hub is not None and hasattr(hub, "models_status"):
        try:
            for st in hub.models_status(ctl.config.models_dir, list(ctl.config.search_dirs)):
                missing = [r for r in st.get("roles", []) if not r.get("present")]
                rows.append({"key": st["variant"], "label": st.get("label", st["variant"]),
                             "ready": bool(st.get("complete")), "missing": [catalog.FILES[r["role"]].label for r in missing],
                             "bytes": int(st.get("missing_bytes") or 0)})
            return rows
        except Exception:
            rows = []
    for v in catalog.VARIANTS.values():
        missing = catalog.missing_roles(v, ctl.config.models_dir)
        rows.append({"key": v.key, "label": v.label, "ready": not missing,
                     "missing": [catalog.FILES[m].label for m in missing],
                     "bytes": sum(catalog.FILES[m].approx_bytes for m in missing)})
    return rows


def models_html(ctl) -> str:
    rows = []
    for r in _status_rows(ctl):
        if r["ready"]:
            state = f'<span class="i2l-ok">&#10003; {esc(t("models_ready"))}</span>'
        else:
            state = (f'<span class="i2l-missing">{esc(t("models_missing", size=catalog.human_size(r["bytes"])))}</span>'
                     f'<div class="i2l-missing-files">{esc(", ".join(say(m) for m in r["missing"]))}</div>')
        rows.append(f'<tr data-variant="{esc(r["key"])}" data-ready="{int(r["ready"])}"><th>{esc(r["label"])}</th>'
                    f"<td>{state}</td></tr>")
    head = f'<thead><tr><th>{esc(t("models_col_variant"))}</th><th>{esc(t("models_col_files"))}</th></tr></thead>'
    return (f'<div class="i2l-models">{tiny_mark_html(ctl)}<div class="i2l-models-dir">{esc(t("models_dir"))} '
            f'<code>{esc(ctl.config.models_dir)}</code></div><table>{head}<tbody>{"".join(rows)}</tbody></table></div>')


def tiny_mark_html(ctl) -> str:
    """A clear mark when the models folder holds the tiny random-weight test set."""
    if not catalog.holds_tiny_set(ctl.config.models_dir):
        return ""
    return f'<div class="i2l-tiny-mark" data-tiny="1">{esc(t("tiny_mark"))}</div>'



def _progress_html(p: dict | None, variant: str | None) -> str:
    if not p:
        return ""
    done, total = p.get("done") or p.get("bytes") or 0, p.get("total") or 0
    pct = int(100 * done / total) if total else 0
    state = p.get("state", "running")
    label = catalog.VARIANTS[variant].label if variant in catalog.VARIANTS else (variant or "")
    text = f"{label}: {catalog.human_size(done)} / {catalog.human_size(total)} ({pct}%)"
    if state == "downloading":
        if p.get("speed"):
            text += f" · {t('speed', size=catalog.human_size(p['speed']))}"
        if p.get("eta"):
            text += f" · {t('eta', s=int(p['eta']))}"
    err = p.get("error")
    tail = ""
    if state == "error" and isinstance(err, I2LError):
        tail = error_html(err)
    elif p.get("message"):
        text += f" · {say(p['message'])}"
    return (f'<div class="i2l-progress" data-state="{esc(state)}" data-variant="{esc(variant or "")}" '
            f'data-done="{int(done)}" data-total="{int(total)}" data-fraction="{(done / total if total else 0):.3f}">'
            f'<div class="i2l-bar i2l-bar-{esc(state)}"><div class="i2l-bar-fill" style="width:{pct}%"></div></div>'
            f'<div class="i2l-progress-text">{esc(text)}</div></div>{tail}')


def error_html(err: I2LError) -> str:
    """An ``I2LError`` as the tab shows errors, in the tab's language."""
    message, fix_text = err.render()
    fix = f'<div class="i2l-fix">{esc(t("fix_label"))} {esc(fix_text)}</div>' if fix_text else ""
    return (f'<div class="i2l-error" data-code="{esc(err.code)}"><div class="i2l-error-msg">'
            f'{esc(message)}</div>{fix}</div>')


def _source_choices():
    hub = _module("i2l_ext.hub")
    if hub is None or not hasattr(hub, "SOURCE_NAMES"):
        return [], None
    labels = getattr(hub, "LABELS", {})
    out = []
    for n in hub.SOURCE_NAMES:
        label = t(f"source_{n}")
        out.append((labels.get(n, n) if label == f"source_{n}" else label, n))
    return out, hub


class ModelsPanel:
    """The Models accordion: what is present per variant, and one download at a time (shared by
    every page). ``download`` is also what the tab's "Download now" runs after a job found weights
    missing; it yields ``Step``s, which each caller shows in its own components."""

    class Step:
        def __init__(self, progress: str, finished: bool = False, ok: bool = False, error=None, started=False,
                     arrived: bool = False, p: dict | None = None):
            self.progress, self.finished, self.ok, self.error, self.started = progress, finished, ok, error, started
            self.p = p                    # the download's progress snapshot (None before it started)
            self.arrived = arrived        # a file was put in place since the last step: the status changed

    def __init__(self, ctl):
        self.ctl = ctl
        self.source_choices, hub = _source_choices()
        current, endpoint = None, ""
        if hub is not None:
            try:
                settings = hub.load_settings(ctl.config.models_dir)
                current, endpoint = settings.get("source"), settings.get("endpoint") or ""
            except Exception:
                pass
        self.variants = [(v.label, v.key) for v in catalog.VARIANTS.values()]
        has_hub = bool(self.source_choices)
        with gr.Accordion(t("models_title"), open=False, elem_id="i2l_models") as self.accordion:
            self.status = gr.HTML("", elem_id="i2l_models_status")
            with gr.Row():
                self.which = compat.dropdown(self.variants, "style", label=t("models_variant"),
                                             elem_id="i2l_models_variant")
                # Where other computers reach the page, the download source is the owner's to choose
                # (`python -m i2l_ext models source` on the server): shown, not changeable.
                owner = not ctl.config.remote
                self.source = compat.dropdown(self.source_choices, current if has_hub else None,
                                              label=t("models_source"), elem_id="i2l_models_source", visible=has_hub,
                                              interactive=owner)
                self.mirror = gr.Textbox(value=endpoint, label=t("models_mirror"), placeholder="https://hf-mirror.com",
                                         elem_id="i2l_models_mirror", lines=1, max_lines=1, visible=has_hub,
                                         interactive=owner)
            with gr.Row():
                dl_btn = gr.Button(t("download"), elem_id="i2l_download", size="sm", variant="primary")
                dl_cancel = gr.Button(t("cancel_download"), elem_id="i2l_download_cancel", size="sm")
                refresh = gr.Button(t("refresh"), elem_id="i2l_models_refresh", size="sm")
            self.progress = gr.HTML("", elem_id="i2l_download_progress")

        def panel_download(variant, source_name, mirror_url):
            for step in self.download(variant, None, source_name, mirror_url):
                yield (self.html() if step.finished or step.arrived else compat.update()), step.progress

        dl_btn.click(panel_download, [self.which, self.source, self.mirror], [self.status, self.progress],
                     **compat.event_kwargs(concurrent=True, show_progress="hidden"))
        dl_cancel.click(self.cancel, None, None, queue=False)
        refresh.click(self.html, None, self.status)

    def loaders(self):
        return [(self.load, None, [self.status, self.source, self.mirror])]

    def load(self):
        """On page load: the status, and the source remembered for the models folder (the command
        line's `models source` may have changed it since the page was built)."""
        self.ctl.refresh_config()
        source, mirror = compat.update(), compat.update()
        hub = _module("i2l_ext.hub")
        if hub is not None and self.source_choices:
            try:
                settings = hub.load_settings(self.ctl.config.models_dir)
                source = compat.dropdown_set(self.source_choices, settings.get("source"))
                mirror = compat.update(value=settings.get("endpoint") or "")
            except Exception:
                pass
        return self.html(), source, mirror

    def html(self) -> str:
        self.ctl.refresh_config()       # the models folder may have changed in the WebUI's settings
        return models_html(self.ctl)

    def download(self, variant, bias, source_name, mirror_url):
        """Start downloading what ``variant`` lacks and follow it to the end."""
        variant = compat.dropdown_value(self.variants, variant) or "style"
        source_name = compat.dropdown_value(self.source_choices, source_name)
        hub = _module("i2l_ext.hub")
        if hub is None or not hasattr(hub, "DownloadTask"):
            err = I2LError(I2LError.INTERNAL, T("hub_missing"))
            yield self.Step(error_html(err), finished=True, error=err)
            return
        task = Downloads.task
        if task is not None and task.is_alive():
            err = I2LError(I2LError.BUSY, T("download_busy"), T("fix_busy"))
            yield self.Step(error_html(err), finished=True, error=err)
            return
        ctl = self.ctl
        ctl.refresh_config()            # download into the folder the settings name now
        try:
            src = None
            if ctl.config.remote:
                source_name = None               # the owner's remembered source, whatever the page sent
            if source_name:
                mirror_url = (mirror_url or "").strip()
                src = hub.get_source(source_name, mirror_url or None)
                hub.save_settings(ctl.config.models_dir, source=source_name,
                                  endpoint=mirror_url if source_name == "custom" else None)
            task = hub.DownloadTask(ctl.config.models_dir, variant, bias=bias, source=src,
                                    search_dirs=list(ctl.config.search_dirs), offline=ctl.config.offline).start()
        except I2LError as e:
            yield self.Step(error_html(e), finished=True, error=e)
            return
        Downloads.task, Downloads.variant = task, variant
        p = task.progress()
        yield self.Step(_progress_html(p, variant), started=True, p=p)
        index = p.get("file_index")
        while not task.wait(0.5):
            p = task.progress()
            yield self.Step(_progress_html(p, variant), arrived=p.get("file_index") != index, p=p)
            index = p.get("file_index")
        p = task.progress()
        yield self.Step(_progress_html(p, variant), finished=True, ok=task.error is None, error=task.error, p=p)

    @staticmethod
    def cancel():
        task = Downloads.task
        if task is not None:
            task.cancel()
