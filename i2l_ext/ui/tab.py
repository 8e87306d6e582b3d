"""The tab: one builder for the WebUI tab and the standalone app, gradio 3.41 and 4.40.

``Controller`` holds what outlives a page (the service, the host's hooks); ``build`` lays out the
components and wires the events. Host-only parts (Send to txt2img, the queue lock, Lora card
refresh) are present only when ``controller.host != "standalone"``.
"""
from __future__ import annotations

import html
import itertools
import os
import tempfile
import time

import gradio as gr

from .. import catalog, hosts, library
from ..contract import I2LError, T, Text
from ..i18n import t
from ..service import JobRequest, Service
from . import compat, panels

PHASES = ("start", "load", "encode", "decode", "merge", "write")
VRAM_PROFILES = ("auto", "gpu", "cpu_offload", "disk")
KEY_FORMATS = ("diffusers", "kohya")
THUMB = 320


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def error_html(code: str, message: Text, fix: Text | None = None) -> str:
    """An error as the tab shows it, in the tab's language."""
    return panels.error_html(I2LError(code, message, fix))


def notice_html(message: str, kind: str = "info") -> str:
    return f'<div class="i2l-notice i2l-notice-{esc(kind)}">{esc(message)}</div>'


def err_of(e: I2LError) -> str:
    return panels.error_html(e)


class Controller:
    """State shared by every page: one service, so one job at a time across all of them."""

    def __init__(self, config, hooks=None, host: str = "standalone", settings_source=None):
        self.host = host
        self.standalone = host == "standalone"
        self.service = Service(config, hooks)
        self.settings_source = settings_source   # host: the settings in force, read again before each job
        self._runs = itertools.count(1)           # each Make click's number, on its progress (data-run)

    @property
    def config(self):
        return self.service.config

    def refresh_config(self) -> None:
        if self.settings_source is not None:
            try:
                self.service.config = self.settings_source()
            except Exception:
                pass

    # -- inputs ------------------------------------------------------------------------------
    def add_images(self, files, current):
        from .. import images as images_mod
        current = list(current or [])
        problems = []
        for p in compat.file_paths(files):
            try:
                self.check_readable(p)
                images_mod.inspect_images([p])
            except I2LError as e:
                problems.append(e)
                continue
            if p not in current:
                current.append(p)
        if len(current) > images_mod.MAX_IMAGES:
            problems.append(I2LError(I2LError.BAD_INPUT, T("err_too_many", n=len(current), max=images_mod.MAX_IMAGES),
                                     T("fix_too_many")))
            current = current[: images_mod.MAX_IMAGES]
        notice = "".join(err_of(e) for e in problems)
        return None, current, self.thumbs(current), notice, self.count_text(current)

    @staticmethod
    def thumbs(paths):
        return [(p, os.path.basename(p)) for p in paths]

    @staticmethod
    def count_text(paths, selected: int | None = None) -> str:
        n = len(paths or [])
        sel, extra = "", ""
        if selected is not None and 0 <= selected < n:
            sel = os.path.basename(paths[selected])
            extra = f' &middot; {esc(t("image_selected", name=sel))}'
        return f'<div class="i2l-count" data-count="{n}" data-selected="{esc(sel)}">{esc(t("images_count", n=n))}{extra}</div>'

    def select_image(self, current, evt: gr.SelectData):
        idx = compat.select_index(evt)
        return idx, self.count_text(current, idx)

    def remove_image(self, current, index):
        current = list(current or [])
        if index is not None and 0 <= index < len(current):
            current.pop(index)
        return current, self.thumbs(current), None, self.count_text(current)

    def clear_images(self):
        return [], [], None, self.count_text([]), ""

    def prewarm(self, variant, vram, bias):
        """When the tab opens or the variant changes: start the worker and begin reading weights,
        so the click finds them (nothing happens while a job runs or when weights are missing)."""
        self.refresh_config()
        if getattr(self.config, "prewarm", True):
            self.service.prewarm(variant or "style", bias_choice(variant, bias),
                                 vram or "auto")

    def check_name(self, name, subfolder, overwrite):
        name = (name or "").strip("\n")
        if not name:
            return f'<div class="i2l-name i2l-name-empty">{esc(t("name_hint"))}</div>'
        self.refresh_config()
        problem = self.service.check_name(name, subfolder or "", bool(overwrite))
        if problem:
            from ..output import suggest_name
            hint = suggest_name(name)
            extra = f' {esc(t("name_try", name=hint))}' if hint != name else ""
            return f'<div class="i2l-name i2l-name-bad" data-ok="0">&#10007; {esc(problem.render())}{extra}</div>'
        folder = os.path.join(self.config.lora_dir, *[p for p in (subfolder or "").replace("\\", "/").split("/") if p])
        target = os.path.join(folder, name + ".safetensors")
        key = "name_ok_overwrite" if overwrite and os.path.exists(target) else "name_ok"
        return f'<div class="i2l-name i2l-name-ok" data-ok="1">&#10003; {esc(t(key, path=target))}</div>'

    # -- the job -----------------------------------------------------------------------------
    def progress_html(self, job=None, run: int = 0) -> str:
        """The progress line; `run` numbers the Make click it belongs to, so a page (and a test)
        tells this click's state from the one before it."""
        if job is None:
            return (f'<div class="i2l-progress" data-state="idle" data-run="{run}" data-fraction="0">'
                    f'{esc(t("progress_idle"))}</div>')
        state, phase, frac, msg = job.state, job.phase, job.fraction, job.message
        secs = time.time() - job.started
        if state == "queued":
            msg = T("queued_next") if job.ahead == 0 else T("queued_msg", n=job.ahead)
        elif state == "cancelled":
            msg = T("cancelled_msg")
        elif state == "error" and job.error is not None:
            msg = job.error.text
        msg = msg.render()
        cur = PHASES.index(phase) if phase in PHASES else 0
        steps = []
        for i, p in enumerate(PHASES):
            cls = "done" if (i < cur or state == "done") else "current" if i == cur else "todo"
            steps.append(f'<span class="i2l-phase i2l-phase-{cls}" data-phase="{p}">{esc(t("phase_" + p))}</span>')
        pct = int(round(frac * 100))
        return (f'<div class="i2l-progress" data-state="{esc(state)}" data-phase="{esc(phase)}" '
                f'data-run="{run}" data-ahead="{job.ahead if state == "queued" else ""}" data-fraction="{frac:.3f}"><div class="i2l-phases">{"".join(steps)}</div>'
                f'<div class="i2l-bar i2l-bar-{esc(state)}"><div class="i2l-bar-fill" style="width:{pct}%"></div></div>'
                f'<div class="i2l-progress-text"><b>{pct}%</b> &middot; {esc(msg)} &middot; '
                f'{esc(t("seconds", s=f"{secs:.0f}"))}</div></div>')

    @staticmethod
    def log_text(job) -> str:
        return "\n".join(job.log_lines())

    def result_info_html(self, r) -> str:
        rows = [(t("result_path"), f"<code>{esc(r.path)}</code>"),
                (t("result_size"), esc(catalog.human_size(r.bytes))),
                (t("result_tensors"), esc(t("result_rank", keys=r.keys, rank=r.rank))),
                (t("result_images"), esc(r.images)),
                (t("result_time"), esc(t("seconds", s=f"{float(r.seconds or 0):.1f}")))]
        body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
        warn = "".join(f'<div class="i2l-warning">{esc(w.render())}</div>' for w in r.warnings)
        note = ""
        family = catalog.VARIANTS[r.variant].family if r.variant in catalog.VARIANTS else None
        if family is not None and not self.standalone and not hosts.can_use_lora(self.host, family):
            note = (f'<div class="i2l-note">{esc(t("host_cannot_use", host=hosts.host_label(self.host), family=family.label, generators=", ".join(family.generators)))}</div>')
        return f'<div class="i2l-result" data-path="{esc(r.path)}"><table>{body}</table>{warn}{note}</div>'

    def check_readable(self, path: str) -> None:
        from ..images import check_readable
        check_readable(self.config, path, [os.environ.get("GRADIO_TEMP_DIR")
                                           or os.path.join(tempfile.gettempdir(), "gradio")])

    def request(self, images, folder, variant, name, subfolder, overwrite, weight, activation, description,
                vram_profile, key_format, bias, max_rank) -> JobRequest:
        """The job the form asks for; the rank cap's 0 or empty box means no cap."""
        paths = list(images or [])
        if folder and folder.strip():
            paths.append(os.path.expanduser(folder.strip()))
        for p in paths:
            self.check_readable(p)
        return JobRequest(images=paths, name=(name or "").strip(), variant=variant or "style",
                          bias=bias_choice(variant, bias), subfolder=(subfolder or "").strip(),
                          overwrite=bool(overwrite), key_format=key_format or "diffusers",
                          vram_profile=vram_profile or "auto", preferred_weight=float(weight if weight is not None else 1.0),
                          activation_text=activation or "", description=description or "",
                          max_rank=int(max_rank) if max_rank else None)

    def run(self, images, folder, variant, name, subfolder, overwrite, weight, activation, description,
            vram_profile, key_format, bias, max_rank):
        """Generator for the Make button: streams progress, the log and finally the result."""
        keep = compat.update()
        hidden = compat.update(visible=False)

        off = compat.update(interactive=False)
        n = next(self._runs)

        def prog(job=None):
            return self.progress_html(job, run=n)

        def out(notice=keep, progress=keep, log=keep, result_vis=keep, preview=keep, info=keep, prompt=keep,
                name_msg=keep, lib=keep, fetch=hidden, missing=None, cancel=off, job_id=keep):
            # fetch / missing: the "Download now" offer, made only when the job found weights missing;
            # cancel: the Cancel button, usable only while this page's job is queued or runs;
            # job_id: that job, for Cancel
            return [notice, progress, log, result_vis, preview, info, prompt, name_msg, lib, fetch, missing, cancel,
                    job_id]

        def failed(e: I2LError, **kw):
            # an error found before the job starts takes the place of the "Ready" line
            kw.setdefault("progress", f'<div class="i2l-progress" data-state="error" data-run="{n}" data-fraction="0"></div>')
            if e.code != I2LError.WEIGHTS_MISSING:
                return out(notice=err_of(e), **kw)
            v = catalog.get_variant(req.variant)
            missing = {"variant": v.key, "bias": v.bias_default if req.bias is None else bool(req.bias)}
            return out(notice=err_of(e), fetch=compat.update(visible=True), missing=missing, **kw)

        self.refresh_config()
        try:
            req = self.request(images, folder, variant, name, subfolder, overwrite, weight, activation, description,
                               vram_profile, key_format, bias, max_rank)
        except I2LError as e:
            yield failed(e)
            return
        if not req.images:
            yield failed(I2LError(I2LError.BAD_INPUT, T("err_no_images"), T("fix_no_images")))
            return
        problem = self.service.check_name(req.name, req.subfolder, req.overwrite)
        if problem:
            yield failed(I2LError(I2LError.BAD_INPUT, problem, T("fix_name")))
            return
        try:
            job = self.service.start(req)       # queued behind other pages' jobs when workers are busy
        except I2LError as e:
            yield failed(e)
            return
        on = compat.update(interactive=True)
        yield out(notice="", progress=prog(job), log="", result_vis=hidden, cancel=on, job_id=job.id)
        shown = 0
        while True:
            finished = job.wait(0.5)
            if len(job.log) != shown or not finished:
                shown = len(job.log)
                yield out(progress=prog(job), log=self.log_text(job), cancel=on if not finished else off)
            if finished:
                break
        log_text = self.log_text(job)
        name_msg = self.check_name(req.name, req.subfolder, False)
        if job.state == "done":
            r = job.result
            # the name is now taken by this job's own LoRA: said as news, not as a mistake
            name_msg = (f'<div class="i2l-name i2l-name-made" data-ok="0">&#10003; '
                        f'{esc(t("name_made", name=r.name or req.name))}</div>')
            if not self.standalone:
                hosts.refresh_loras()
            preview = r.preview
            yield out(notice=notice_html(t("done_msg", name=r.name or req.name), "ok"),
                      progress=prog(job), log=log_text, result_vis=compat.update(visible=True),
                      preview=preview if preview and os.path.exists(preview) else None,
                      info=self.result_info_html(r), prompt=r.prompt, name_msg=name_msg,
                      lib=self.library_gallery())
        elif job.state == "cancelled":
            yield out(notice=notice_html(t("cancelled_msg"), "warn"), progress=prog(job),
                      log=log_text, name_msg=name_msg)
        else:
            e = job.error or I2LError(I2LError.INTERNAL, T("err_unknown"))
            yield failed(e, progress=prog(job), log=log_text, name_msg=name_msg)

    def fetch_missing(self, models, missing, source_name, mirror_url):
        """Generator for "Download now" after a job found weights missing: the Models panel's own
        download, for the variant (and Bias choice) that job needed, followed in the panel and,
        briefly, in the notice; once the files are here the notice says the job can run again."""
        keep = compat.update()

        def out(status=keep, progress=keep, which=keep, accordion=keep, notice=keep, fetch=keep):
            return [status, progress, which, accordion, notice, fetch]

        if not missing:
            yield out(fetch=compat.update(visible=False))
            return
        variant = missing.get("variant") or "style"
        label = catalog.VARIANTS[variant].label if variant in catalog.VARIANTS else variant
        for step in models.download(variant, missing.get("bias"), source_name, mirror_url):
            p = step.p or {}
            pct = int(100 * (p.get("done") or 0) / p["total"]) if p.get("total") else 0
            running = notice_html(t("fetch_running", variant=label, pct=pct), "info")
            if step.started:
                yield out(progress=step.progress, which=compat.dropdown_set(models.variants, variant),
                          accordion=compat.update(open=True), notice=running, fetch=compat.update(visible=False))
            elif not step.finished:
                yield out(status=models.html() if step.arrived else keep, progress=step.progress, notice=running)
            elif step.ok:
                yield out(status=models.html(), progress=step.progress,
                          notice=notice_html(t("fetch_done", variant=label), "ok"), fetch=compat.update(visible=False))
            else:
                e = step.error or I2LError(I2LError.INTERNAL, T("err_unknown"))
                notice = (notice_html(t("fetch_cancelled", variant=label), "warn") if e.code == I2LError.CANCELLED
                          else err_of(e))
                yield out(status=models.html(), progress=step.progress, accordion=compat.update(open=True),
                          notice=notice, fetch=compat.update(visible=True))

    @staticmethod
    def sweep(prompt):
        """Updates for the host's script menu, X type and X values: X/Y/Z plot, Prompt S/R, the weights."""
        import re
        m = re.fullmatch(r"<lora:(.+):[^:>]*>", (prompt or "").strip())
        if not m:
            return compat.update(), compat.update(), compat.update()
        _, values = hosts.sweep_values(m.group(1))
        script_list, x_type, _ = hosts.sweep_components() or (None, None, None)
        return (compat.update(value=hosts.sweep_choice(script_list, hosts.XYZ_TITLE)),
                compat.update(value=hosts.sweep_choice(x_type, hosts.PROMPT_SR)),
                compat.update(value=values))

    def cancel(self, job_id):
        """Cancel: this page's job (queued or running), never another page's."""
        if job_id and self.service.cancel(job_id):
            return notice_html(t("cancelling"), "warn")
        return notice_html(t("nothing_to_cancel"), "info")

    # -- library -----------------------------------------------------------------------------
    def entries(self):
        return library.list_loras(self.config.lora_dir)

    def library_gallery(self):
        return [((e.preview or _placeholder()), e.relpath) for e in self.entries()]

    def library_refresh(self):
        es = self.entries()
        gallery = [((e.preview or _placeholder()), e.relpath) for e in es]
        return (gallery, [e.relpath for e in es], None, self.entry_html(None), "", "",
                compat.update(visible=False))

    def entry_html(self, e) -> str:
        if e is None:
            n = len(self.entries())
            return f'<div class="i2l-lib-empty" data-count="{n}">{esc(t("lib_pick" if n else "lib_empty"))}</div>'
        created = e.created or time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime))
        rows = [(t("result_path"), f"<code>{esc(e.path)}</code>"), (t("result_size"), esc(catalog.human_size(e.bytes))),
                (t("lib_variant"), esc(e.variant)), (t("result_images"), esc(e.images)), (t("lib_created"), esc(created))]
        if e.card.get("activation text"):
            rows.append((t("activation_text"), esc(e.card["activation text"])))
        sha = e.image_sha256
        if sha:
            rows.append((t("lib_sources"), "<br>".join(f"<code>{esc(s[:16])}</code>" for s in sha[:16])))
        body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
        return f'<div class="i2l-lib-entry" data-relpath="{esc(e.relpath)}"><table>{body}</table></div>'

    def library_select(self, relpaths, evt: gr.SelectData):
        idx = compat.select_index(evt)
        relpaths = relpaths or []
        if idx is None or idx >= len(relpaths):
            return None, self.entry_html(None), "", "", compat.update(visible=False)
        try:
            e = library.find(self.config.lora_dir, relpaths[idx])
        except I2LError as err:
            return None, err_of(err), "", "", compat.update(visible=False)
        return e.relpath, self.entry_html(e), e.prompt, e.name, compat.update(visible=False)

    def library_rename(self, relpath, new_name):
        if not relpath:
            return (compat.update(), compat.update(), relpath, error_html(I2LError.BAD_INPUT, T("lib_pick")),
                    compat.update(), compat.update())
        try:
            e = library.rename(self.config.lora_dir, relpath, new_name)
        except I2LError as err:
            return compat.update(), compat.update(), relpath, err_of(err), compat.update(), compat.update()
        if not self.standalone:
            hosts.refresh_loras()
        gallery, rels, *_ = self.library_refresh()
        return gallery, rels, e.relpath, notice_html(t("lib_renamed", name=e.name), "ok") + self.entry_html(e), e.prompt, e.name

    def library_delete(self, relpath):
        if not relpath:
            return (compat.update(), compat.update(), None, error_html(I2LError.BAD_INPUT, T("lib_pick")), "", "",
                    compat.update(visible=False))
        try:
            library.delete(self.config.lora_dir, relpath)
        except I2LError as err:
            return compat.update(), compat.update(), relpath, err_of(err), compat.update(), compat.update(), \
                compat.update(visible=False)
        if not self.standalone:
            hosts.refresh_loras()
        gallery, rels, *_ = self.library_refresh()
        return gallery, rels, None, notice_html(t("lib_deleted", name=relpath), "ok"), "", "", compat.update(visible=False)

    def delete_ask(self, relpath):
        if not relpath:
            return compat.update(visible=False), error_html(I2LError.BAD_INPUT, T("lib_pick"))
        return (compat.update(visible=True),
                f'<div class="i2l-confirm-text">{esc(t("lib_confirm_delete", name=relpath))}</div>')


_PLACEHOLDER = None


def _placeholder() -> str:
    """A plain tile for a LoRA without a preview (the gallery needs an image)."""
    global _PLACEHOLDER
    if _PLACEHOLDER is None or not os.path.exists(_PLACEHOLDER):
        import tempfile
        from PIL import Image
        path = os.path.join(tempfile.gettempdir(), "i2l-no-preview.png")
        Image.new("RGB", (64, 64), (60, 60, 60)).save(path)
        _PLACEHOLDER = path
    return _PLACEHOLDER


def bias_choice(variant, bias):
    """The Bias box counts for the variants that merge their family's Bias LoRA by default
    (Coarse + Fine); for the others the variant's own default stands (None)."""
    v = catalog.VARIANTS.get(variant or "")
    return bool(bias) if v is not None and v.has_bias and v.bias_default else None


def variant_choices():
    return [(v.label, v.key) for v in catalog.VARIANTS.values()]


def variants_md() -> str:
    """The variants grouped by the base model they serve, each group saying where its LoRAs load."""
    groups = []
    for family, variants in catalog.variants_by_family():
        lines = []
        for v in variants:
            purpose = t(f"variant_{v.key}")
            if purpose == f"variant_{v.key}":
                purpose = v.purpose
            lines.append(f'<li data-variant="{esc(v.key)}"><b>{esc(v.label)}</b>: {esc(purpose)} '
                         f'<span class="i2l-variant-meta">{esc(t("variant_meta", size=catalog.human_size(v.download_bytes()), vram=v.vram_gb, low=v.low_vram_gb))}</span></li>')
        head = t("family_heading", family=family.label, generators=", ".join(family.generators))
        note = t(f"family_note_{family.key}")
        note = f'<div class="i2l-family-note">{esc(note)}</div>' if note != f"family_note_{family.key}" else ""
        groups.append(f'<div class="i2l-family" data-family="{esc(family.key)}"><div class="i2l-family-head">'
                      f'{esc(head)}</div><ul class="i2l-variants">{"".join(lines)}</ul>{note}</div>')
    return "".join(groups)


def build(ctl: Controller):
    """Lay out the tab inside the current ``gr.Blocks`` context."""
    host_only = not ctl.standalone
    with gr.Column(elem_id="i2l_root", elem_classes=["i2l-root"]):
        env_banner = gr.HTML("", elem_id="i2l_env_banner")
        with gr.Row(visible=False, elem_id="i2l_env_row") as env_row:
            repair_btn = gr.Button(t("repair_env"), elem_id="i2l_repair_env", size="sm")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, elem_id="i2l_inputs"):
                # One place for images: the gallery that shows them takes drops and pastes (the page
                # script hands them to this upload box, kept in the page but not shown) and "Add images".
                upload = compat.file_component(label=t("upload_label"), elem_id="i2l_upload",
                                               elem_classes=["i2l-hidden-upload"])
                images_state = gr.State([])
                selected_image = gr.State(None)
                thumbs = gr.Gallery(label=t("thumbs_label"), elem_id="i2l_thumbs", columns=6, height=240,
                                    allow_preview=False, show_label=True)
                with gr.Row(elem_id="i2l_image_buttons"):
                    add_btn = gr.Button(t("add_images"), elem_id="i2l_add", size="sm")
                    remove_btn = gr.Button(t("remove_selected"), elem_id="i2l_remove", size="sm")
                    clear_btn = gr.Button(t("clear_images"), elem_id="i2l_clear", size="sm")
                count = gr.HTML(ctl.count_text([]), elem_id="i2l_count")
                variant = gr.Radio(choices=variant_choices(), value=ctl.config.default_variant, label=t("variant_label"),
                                   elem_id="i2l_variant")
                gr.HTML(variants_md(), elem_id="i2l_variant_info")
                with gr.Accordion(t("advanced"), open=False, elem_id="i2l_advanced"):
                    folder = gr.Textbox(label=t("folder_label"), placeholder=t("folder_placeholder"),
                                        elem_id="i2l_folder", visible=not ctl.config.remote or bool(ctl.config.image_dirs),
                                        lines=1, max_lines=1)
                    subfolder = gr.Textbox(label=t("subfolder_label"), placeholder=t("subfolder_placeholder"),
                                           elem_id="i2l_subfolder", lines=1, max_lines=1)
                    with gr.Row():
                        weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label=t("weight_label"), elem_id="i2l_weight")
                        activation = gr.Textbox(label=t("activation_text"), elem_id="i2l_activation", lines=1,
                                                max_lines=1)
                    description = gr.Textbox(label=t("description_label"), elem_id="i2l_description", lines=2)
                    vram = gr.Radio(choices=[(t(f"vram_{p}"), p) for p in VRAM_PROFILES], value=ctl.config.vram_profile,
                                    label=t("vram_label"), elem_id="i2l_vram")
                    key_format = gr.Radio(choices=[(t(f"keys_{k}"), k) for k in KEY_FORMATS],
                                          value=ctl.config.key_format, label=t("keys_label"), elem_id="i2l_keys")
                    max_rank = gr.Number(value=0, precision=0, label=t("rank_cap_label"), info=t("rank_cap_info"),
                                         elem_id="i2l_max_rank")
                    with gr.Row():
                        bias = gr.Checkbox(value=True, label=t("bias_label"), elem_id="i2l_bias")
                        overwrite = gr.Checkbox(value=False, label=t("overwrite_label"), elem_id="i2l_overwrite")
            with gr.Column(scale=2, elem_id="i2l_run_col"):
                tiny_mark = gr.HTML(panels.tiny_mark_html(ctl), elem_id="i2l_tiny_mark")
                name = gr.Textbox(label=t("name_label"), placeholder="my_style", elem_id="i2l_name", lines=1, max_lines=1)
                name_msg = gr.HTML(ctl.check_name("", "", False), elem_id="i2l_name_msg")
                with gr.Row():
                    run_btn = gr.Button(t("make"), variant="primary", elem_id="i2l_run")
                    cancel_btn = gr.Button(t("cancel"), variant="stop", elem_id="i2l_cancel", interactive=False)
                notice = gr.HTML("", elem_id="i2l_notice")
                with gr.Row(visible=False, elem_id="i2l_fetch_row") as fetch_row:
                    fetch_btn = gr.Button(t("download_now"), variant="primary", elem_id="i2l_download_now", size="sm")
                missing_state = gr.State(None)
                job_state = gr.State(None)          # this page's job, for Cancel
                progress = gr.HTML(ctl.progress_html(), elem_id="i2l_progress")
                log = gr.Textbox(label=t("log_label"), lines=8, max_lines=8, interactive=False, elem_id="i2l_log")
                with gr.Column(visible=False, elem_id="i2l_result") as result_col:
                    gr.HTML(f'<h3 class="i2l-result-title">{esc(t("result_title"))}</h3>')
                    result_preview = gr.Image(label=t("preview_label"), interactive=False, type="filepath",
                                              elem_id="i2l_result_preview", height=256)
                    result_info = gr.HTML("", elem_id="i2l_result_info")
                    result_prompt = gr.Textbox(label=t("prompt_label"), interactive=False, elem_id="i2l_result_prompt",
                                               lines=1, max_lines=1)
                    with gr.Row():
                        copy_btn = gr.Button(t("copy_prompt"), elem_id="i2l_copy", size="sm")
                        send_btn = gr.Button(t("send_txt2img"), elem_id="i2l_send", size="sm", visible=host_only)
                        sweep_btn = gr.Button(t("send_sweep"), elem_id="i2l_send_sweep", size="sm",
                                              visible=host_only and hosts.sweep_ready())
        models = panels.ModelsPanel(ctl)
        with gr.Accordion(t("lib_title"), open=True, elem_id="i2l_library"):
            lib_rel = gr.State([])
            lib_sel = gr.State(None)
            with gr.Row():
                lib_refresh = gr.Button(t("refresh"), elem_id="i2l_lib_refresh", size="sm")
            lib_gallery = gr.Gallery(label=t("lib_gallery"), elem_id="i2l_lib_gallery", columns=6, height=260,
                                     allow_preview=False)
            lib_info = gr.HTML(ctl.entry_html(None), elem_id="i2l_lib_info")
            lib_prompt = gr.Textbox(label=t("prompt_label"), interactive=False, elem_id="i2l_lib_prompt", lines=1,
                                    max_lines=1)
            with gr.Row():
                lib_send = gr.Button(t("send_txt2img"), elem_id="i2l_lib_send", size="sm", visible=host_only)
                lib_sweep = gr.Button(t("send_sweep"), elem_id="i2l_lib_send_sweep", size="sm",
                                      visible=host_only and hosts.sweep_ready())
                lib_copy = gr.Button(t("copy_prompt"), elem_id="i2l_lib_copy", size="sm")
                lib_new_name = gr.Textbox(label=t("lib_new_name"), elem_id="i2l_lib_new_name", lines=1, max_lines=1)
                lib_rename = gr.Button(t("rename"), elem_id="i2l_lib_rename", size="sm")
                lib_delete = gr.Button(t("delete"), elem_id="i2l_lib_delete", size="sm", variant="stop")
            with gr.Row(visible=False, elem_id="i2l_lib_confirm") as confirm_row:
                confirm_text = gr.HTML("", elem_id="i2l_lib_confirm_text")
                confirm_yes = gr.Button(t("delete_yes"), elem_id="i2l_lib_delete_yes", variant="stop", size="sm")
                confirm_no = gr.Button(t("delete_no"), elem_id="i2l_lib_delete_no", size="sm")

    # -- events ----------------------------------------------------------------------------------
    upload.upload(ctl.add_images, [upload, images_state], [upload, images_state, thumbs, notice, count],
                  show_progress="minimal")
    thumbs.select(ctl.select_image, [images_state], [selected_image, count])
    remove_btn.click(ctl.remove_image, [images_state, selected_image], [images_state, thumbs, selected_image, count])
    clear_btn.click(ctl.clear_images, None, [images_state, thumbs, selected_image, count, notice])
    for comp in (name, subfolder, overwrite):
        comp.change(ctl.check_name, [name, subfolder, overwrite], name_msg, queue=False, show_progress="hidden")

    run_inputs = [images_state, folder, variant, name, subfolder, overwrite, weight, activation, description, vram,
                  key_format, bias, max_rank]
    run_outputs = [notice, progress, log, result_col, result_preview, result_info, result_prompt, name_msg, lib_gallery,
                   fetch_row, missing_state, cancel_btn, job_state]
    run_evt = run_btn.click(ctl.run, run_inputs, run_outputs,
                            **compat.event_kwargs(concurrent=True, show_progress="hidden"))
    if host_only:
        # The host's Lora cards, refreshed by the page where the host can do it now.
        cards_ok = gr.Checkbox(value=False, visible=False, elem_id="i2l_cards_ok")

        def refresh_cards_after(evt):
            evt.then(lambda: hosts.lora_cards_refreshable(ctl.host), None, cards_ok, queue=False).then(
                None, [cards_ok], None,
                **compat.js("(ok) => { if (ok && window.i2l_refreshLoraCards) i2l_refreshLoraCards(); return []; }"))

        refresh_cards_after(run_evt)
    run_evt.then(ctl.library_refresh, None, [lib_gallery, lib_rel, lib_sel, lib_info, lib_prompt, lib_new_name,
                                             confirm_row])
    cancel_btn.click(ctl.cancel, [job_state], notice, queue=False)
    def fetch(missing, source_name, mirror_url):
        yield from ctl.fetch_missing(models, missing, source_name, mirror_url)

    fetch_btn.click(fetch, [missing_state, models.source, models.mirror],
                    [models.status, models.progress, models.which, models.accordion, notice, fetch_row],
                    **compat.event_kwargs(concurrent=True, show_progress="hidden"))

    copy_js = "(p) => { if (window.i2l_copy) i2l_copy(p, '%s'); return []; }"
    send_js = "(p) => { if (window.i2l_sendToTxt2img) i2l_sendToTxt2img(p); return []; }"
    copy_btn.click(None, [result_prompt], None, **compat.js(copy_js % "i2l_copy"))
    lib_copy.click(None, [lib_prompt], None, **compat.js(copy_js % "i2l_lib_copy"))
    send_btn.click(None, [result_prompt], None, **compat.js(send_js))
    lib_send.click(None, [lib_prompt], None, **compat.js(send_js))
    host_xyz = hosts.sweep_components() if host_only else None
    if host_xyz:
        # The host's own X/Y/Z plot, set to Prompt S/R over the sweep's weights; then the prompt
        # gets <lora:name:1> and txt2img comes to the front. One Generate compares the weights.
        sweep_js = ("(p) => { if (window.i2l_sendToTxt2img && p) "
                    "i2l_sendToTxt2img(p.replace(/:[^:>]*>$/, ':1>')); return []; }")
        for button, prompt in ((sweep_btn, result_prompt), (lib_sweep, lib_prompt)):
            button.click(ctl.sweep, [prompt], host_xyz, queue=False).then(None, [prompt], None, **compat.js(sweep_js))

    lib_outputs = [lib_gallery, lib_rel, lib_sel, lib_info, lib_prompt, lib_new_name, confirm_row]
    lib_refresh.click(ctl.library_refresh, None, lib_outputs)
    lib_gallery.select(ctl.library_select, [lib_rel], [lib_sel, lib_info, lib_prompt, lib_new_name, confirm_row])
    rename_evt = lib_rename.click(ctl.library_rename, [lib_sel, lib_new_name],
                                  [lib_gallery, lib_rel, lib_sel, lib_info, lib_prompt, lib_new_name])
    lib_delete.click(ctl.delete_ask, [lib_sel], [confirm_row, confirm_text])
    confirm_no.click(lambda: compat.update(visible=False), None, confirm_row)
    delete_evt = confirm_yes.click(ctl.library_delete, [lib_sel], lib_outputs[:-1] + [confirm_row])
    if host_only:
        for evt in (rename_evt, delete_evt):
            refresh_cards_after(evt)

    for comp in (variant, vram):
        comp.change(ctl.prewarm, [variant, vram, bias], None, queue=False, show_progress="hidden")

    loaders = [(ctl.library_refresh, None, lib_outputs), (lambda: panels.tiny_mark_html(ctl), None, tiny_mark)]
    add_btn.click(None, None, None, **compat.js("() => { if (window.i2l_pickFiles) i2l_pickFiles(); return []; }"))
    if host_only:
        # In a WebUI the page loads with txt2img in front: the worker starts only when this tab is
        # opened (javascript/i2l.js clicks this hidden button), never merely because the page loaded.
        prewarm_btn = gr.Button("prewarm", visible=False, elem_id="i2l_prewarm")
        prewarm_btn.click(ctl.prewarm, [variant, vram, bias], None, queue=False, show_progress="hidden")
    else:
        loaders.append((ctl.prewarm, [variant, vram, bias], None))
    loaders += panels.env_banner_loaders(ctl, env_banner, env_row, repair_btn, log)
    loaders += models.loaders()
    return loaders

