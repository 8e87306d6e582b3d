"""The HTTP API, ``/i2l/v1``: the same routes on a WebUI's app (at its start) and on ``serve``'s.

A FastAPI application of its own, mounted at ``/i2l/v1`` on the host's app, so its error shape, its
login check and its OpenAPI page (``/i2l/v1/docs``) touch nothing of the host's. Jobs go through the
tab's ``Service`` and wait in the same queue as the tab's. Images arrive as base64 in the request;
no route takes a folder or a file path of the server.

Who may call it: the logins the host was given (the WebUI's ``--api-auth``, else ``--gradio-auth``;
``serve``'s ``--auth``) as HTTP Basic; with none, callers on this computer only when the server can
be reached from others (then a login is required).
"""
# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations as objects.
import base64
import binascii
import os
import secrets
import shutil
import tempfile
import threading
from typing import Callable, List, Optional

from . import __version__, catalog, library
from .contract import I2LError, JobRequest, T, Text, bad_input
from .images import MAX_IMAGES
from .settings import is_loopback

PREFIX = "/i2l/v1"
API_VERSION = 1
MAX_IMAGE_BYTES = 50 * 1024 * 1024          # one image, decoded
IMAGE_KINDS = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"))   # and WebP: RIFF....WEBP

STATUS = {I2LError.BAD_INPUT: 400, I2LError.NOT_ALLOWED: 403, I2LError.NAME_TAKEN: 409,
          I2LError.WEIGHTS_MISSING: 409, I2LError.WEIGHTS_INVALID: 409, I2LError.QUEUE_FULL: 429}
NOT_FOUND = "not_found"     # an unknown job or LoRA: the HTTP meaning, not a job's error code


def _models():
    """The request and answer shapes (pydantic 1 and 2 alike), made when the API is first mounted."""
    from pydantic import BaseModel

    class JobIn(BaseModel):
        images: List[str]                   # base64 PNG, JPEG or WebP (a data: URL prefix is fine)
        name: str
        variant: str = "style"
        bias: Optional[bool] = None         # Coarse + Fine: merge the Bias LoRA (default: the variant's)
        weight: float = 1.0                 # the card's preferred weight, and the <lora:name:weight> text
        activation_text: str = ""
        description: str = ""
        subfolder: str = ""                 # inside the Lora folder
        key_format: Optional[str] = None    # diffusers | kohya (default: the setting)
        vram_profile: Optional[str] = None  # auto | gpu | cpu_offload | disk (default: the setting)
        overwrite: bool = False
        max_rank: Optional[int] = None      # the rank cap: a smaller file, less detail (default: none)

    class ErrorOut(BaseModel):
        code: str
        message: str
        fix: str = ""

    class ResultOut(BaseModel):
        name: str
        path: str
        bytes: int
        rank: int
        keys: int
        images: int
        seconds: float
        prompt: str                         # <lora:name:weight>
        preview_url: Optional[str] = None
        warnings: List[str] = []

    class JobOut(BaseModel):
        id: str
        state: str                          # queued | starting | running | done | failed | cancelled
        position: Optional[int] = None      # queued: jobs ahead of it
        phase: str
        progress: float                     # 0..1
        message: str
        log: List[str]
        result: Optional[ResultOut] = None
        error: Optional[ErrorOut] = None

    class VariantOut(BaseModel):
        id: str
        title: str
        base_model: str
        download_bytes: int
        ready: bool
        missing: List[str]                  # files still to fetch (python -m i2l_ext models download <id>)

    class ModelFileOut(BaseModel):
        role: str
        title: str
        present: bool
        bytes: int                          # on disk
        expected_bytes: int
        missing: List[str]

    class LoraOut(BaseModel):
        name: str                           # the path inside the Lora folder, without .safetensors
        file: str
        bytes: int
        variant: str
        images: int
        created: str
        prompt: str
        preview_url: Optional[str] = None

    class RenameIn(BaseModel):
        name: str

    return {k: v for k, v in locals().items() if isinstance(v, type)}


class Api:
    """The routes over one controller (its ``service``, ``config`` and ``refresh_config``)."""

    def __init__(self, controller, logins: list[tuple[str, str]] | None, local_only: Callable[[], bool]):
        self.ctl = controller
        self.logins = [(u.encode(), p.encode()) for u, p in (logins or [])]
        self.local_only = local_only      # no logins and others can reach the server: refuse them
        self._tmp: dict[str, str] = {}    # job id -> the folder its decoded images are in

    @property
    def service(self):
        return self.ctl.service

    # -- who may call --------------------------------------------------------------------------
    def allowed(self, request, credentials) -> None:
        if self.logins:
            if credentials is not None:
                user, password = credentials.username.encode(), credentials.password.encode()
                if any(secrets.compare_digest(user, u) & secrets.compare_digest(password, p) for u, p in self.logins):
                    return
            raise _Unauthorized()
        client = request.client.host if request.client else ""
        if self.local_only() and not is_loopback(client):
            raise I2LError(I2LError.NOT_ALLOWED, T("m_api_needs_login"), T("m_api_needs_login_fix"))

    # -- jobs ------------------------------------------------------------------------------------
    def submit(self, body):
        self.ctl.refresh_config()
        cfg = self.service.config
        if not isinstance(body.images, list) or not body.images:
            raise bad_input(T("err_no_images"), T("m_api_images_fix"))
        if len(body.images) > MAX_IMAGES:             # before any is decoded and written to disk
            raise bad_input(T("err_too_many", n=len(body.images), max=MAX_IMAGES), T("m_api_images_fix"))
        folder = tempfile.mkdtemp(prefix="i2l-api-")
        try:
            paths = [_write_image(folder, i, data) for i, data in enumerate(body.images)]
            req = JobRequest(images=paths, name=body.name.strip(), variant=body.variant, bias=body.bias,
                             subfolder=body.subfolder.strip(), overwrite=bool(body.overwrite),
                             key_format=body.key_format or cfg.key_format,
                             vram_profile=body.vram_profile or cfg.vram_profile,
                             preferred_weight=body.weight, activation_text=body.activation_text,
                             description=body.description, max_rank=body.max_rank)
            job = self.service.start(req)      # checks it all: the name, the images, the model files
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._tmp[job.id] = folder
        threading.Thread(target=self._clean_after, args=(job,), daemon=True, name=f"i2l-api-{job.id}").start()
        return job

    def _clean_after(self, job) -> None:
        job.wait()
        shutil.rmtree(self._tmp.pop(job.id, ""), ignore_errors=True)

    def job(self, job_id: str):
        job = self.service.job(job_id)
        if job is None:
            raise _NotFound(T("m_api_no_job", id=job_id))
        return job

    def lora(self, name: str):
        rel = name if name.endswith(".safetensors") else name + ".safetensors"
        try:
            return library.find(self.service.config.lora_dir, rel)
        except I2LError as e:
            if e.code == I2LError.OUTPUT or e.code == I2LError.BAD_INPUT:
                raise _NotFound(T("m_api_no_lora", name=name)) from None
            raise


class _Unauthorized(Exception):
    pass


class _NotFound(Exception):
    def __init__(self, text: Text):
        super().__init__(text.key)
        self.text = text




def _write_image(folder: str, i: int, data) -> str:
    """One base64 image into ``folder``; refuses anything that is not PNG, JPEG or WebP by its bytes."""
    if not isinstance(data, str):
        raise bad_input(T("m_api_bad_image", n=i + 1), T("m_api_images_fix"))
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise bad_input(T("m_api_image_too_big", n=i + 1, mb=MAX_IMAGE_BYTES >> 20))
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_input(T("m_api_bad_image", n=i + 1), T("m_api_images_fix")) from None
    ext = next((e for magic, e in IMAGE_KINDS if raw.startswith(magic)), None)
    if ext is None and raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        ext = ".webp"
    if ext is None:
        raise bad_input(T("m_api_bad_image", n=i + 1), T("m_api_images_fix"))
    path = os.path.join(folder, f"image{i + 1:02d}{ext}")
    with open(path, "wb") as f:
        f.write(raw)
    return path


def _lang(request) -> str:
    return "zh_CN" if request.headers.get("accept-language", "").lower().startswith("zh") else "en"


def make_app(controller, logins: list[tuple[str, str]] | None = None,
             local_only: Callable[[], bool] = lambda: False):
    """The API as an app of its own, to mount at ``PREFIX``."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    M = _models()
    api = Api(controller, logins, local_only)
    basic = HTTPBasic(auto_error=False)

    def guard(request: Request, credentials: Optional[HTTPBasicCredentials] = Depends(basic)):
        api.allowed(request, credentials)

    app = FastAPI(title="Image to LoRA API", version=f"{API_VERSION}.0 (extension {__version__})",
                  docs_url="/docs", redoc_url=None, openapi_url="/openapi.json", dependencies=[Depends(guard)])

    def error(request, status: int, code: str, text: Text, fix: Text | None = None, headers=None):
        lang = _lang(request)
        body = {"code": code, "message": text.render(lang), "fix": fix.render(lang) if fix else ""}
        return JSONResponse({"error": body}, status_code=status, headers=headers)

    @app.exception_handler(I2LError)
    async def on_error(request: Request, e: I2LError):
        return error(request, STATUS.get(e.code, 500), e.code, e.text, e.fix_text)

    @app.exception_handler(_NotFound)
    async def on_not_found(request: Request, e: _NotFound):
        return error(request, 404, NOT_FOUND, e.text)

    @app.exception_handler(_Unauthorized)
    async def on_unauthorized(request: Request, e: _Unauthorized):
        return error(request, 401, I2LError.NOT_ALLOWED, T("m_api_login"), T("m_api_login_fix"),
                     headers={"WWW-Authenticate": 'Basic realm="Image to LoRA"'})

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return error(request, 400, I2LError.BAD_INPUT, T("m_api_bad_field", field=where, problem=first.get("msg", "")))

    def job_out(request: Request, job):
        lang = _lang(request)
        state = "failed" if job.state == "error" else job.state
        result = error_out = None
        if job.state == "done" and job.result is not None:
            r = job.result
            result = M["ResultOut"](name=r.name or "", path=r.path, bytes=int(r.bytes or 0), rank=int(r.rank or 0),
                                    keys=int(r.keys or 0), images=int(r.images or 0), seconds=float(r.seconds or 0),
                                    prompt=r.prompt or "",
                                    preview_url=f"{PREFIX}/jobs/{job.id}/preview" if r.preview else None,
                                    warnings=[w.render(lang) for w in r.warnings])
        elif job.error is not None:
            fix = job.error.fix_text
            error_out = M["ErrorOut"](code=job.error.code, message=job.error.text.render(lang),
                                      fix=fix.render(lang) if fix else "")
        return M["JobOut"](id=job.id, state=state, position=api.service.position(job), phase=job.phase,
                           progress=round(float(job.fraction), 4), message=job.message.render(lang),
                           log=job.log_lines(lang, last=20), result=result, error=error_out)

    def lora_out(e):
        name = e.relpath[: -len(".safetensors")]
        return M["LoraOut"](name=name, file=e.relpath, bytes=e.bytes, variant=e.variant, images=e.images,
                            created=e.created, prompt=e.prompt,
                            preview_url=f"{PREFIX}/loras/{name}/preview" if e.preview else None)

    @app.get("/version")
    def version():
        """The API's and the extension's versions."""
        return {"api": API_VERSION, "version": __version__}

    @app.get("/variants", response_model=List[M["VariantOut"]])
    def variants():
        """Each variant, what it is for, and whether its model files are here."""
        cfg = api.service.config
        out = []
        for v in catalog.VARIANTS.values():
            missing = catalog.missing_roles(v, cfg.models_dir, search_dirs=tuple(cfg.search_dirs))
            out.append(M["VariantOut"](id=v.key, title=v.label, base_model=v.base_model or v.family.label,
                                       download_bytes=v.download_bytes(), ready=not missing,
                                       missing=[catalog.FILES[r].title for r in missing]))
        return out

    @app.get("/models", response_model=List[M["ModelFileOut"]])
    def models():
        """Every model file a variant needs: here or not, its size."""
        from .hub.status import role_status
        cfg = api.service.config
        return [M["ModelFileOut"](role=s["role"], title=s["title"], present=s["present"], bytes=s["bytes"],
                                  expected_bytes=s["expected_bytes"], missing=[m["path"] for m in s["missing"]])
                for s in (role_status(r, cfg.models_dir, tuple(cfg.search_dirs)) for r in catalog.FILES)]

    @app.post("/jobs", status_code=202, response_model=M["JobOut"])
    def submit(request: Request, body: M["JobIn"]):
        """Queue a job; answers at once with its id and place in the queue."""
        return job_out(request, api.submit(body))

    @app.get("/jobs", response_model=List[M["JobOut"]])
    def jobs(request: Request):
        """Queued, running and recent jobs (from the tab too), oldest first."""
        return [job_out(request, j) for j in api.service.jobs()]

    @app.get("/jobs/{job_id}", response_model=M["JobOut"])
    def job(request: Request, job_id: str):
        """A job's state, progress, log tail, and its result or error."""
        return job_out(request, api.job(job_id))

    @app.post("/jobs/{job_id}/cancel", response_model=M["JobOut"])
    def cancel(request: Request, job_id: str):
        """Cancel a queued job (at once) or a running one (within a second)."""
        j = api.job(job_id)
        j.cancel()
        j.wait(10)
        return job_out(request, j)

    @app.get("/jobs/{job_id}/preview", response_class=Response)
    def job_preview(job_id: str):
        """The made LoRA's preview (PNG)."""
        j = api.job(job_id)
        path = j.result.preview if j.state == "done" and j.result is not None else None
        if not path or not os.path.isfile(path):
            raise _NotFound(T("m_api_no_preview"))
        return FileResponse(path, media_type="image/png")

    @app.get("/loras", response_model=List[M["LoraOut"]])
    def loras():
        """The LoRAs made here, newest first (what the tab's library lists)."""
        return [lora_out(e) for e in library.list_loras(api.service.config.lora_dir)]

    @app.get("/loras/{name:path}/preview", response_class=Response)
    def lora_preview(name: str):
        e = api.lora(name)
        if not e.preview:
            raise _NotFound(T("m_api_no_preview"))
        return FileResponse(e.preview, media_type="image/png")

    @app.patch("/loras/{name:path}", response_model=M["LoraOut"])
    def rename(name: str, body: M["RenameIn"]):
        """Rename a LoRA with its card and preview (never over another file)."""
        e = api.lora(name)
        return lora_out(library.rename(api.service.config.lora_dir, e.relpath, body.name))

    @app.delete("/loras/{name:path}")
    def delete(name: str):
        """Delete a LoRA made here, with its card and preview."""
        e = api.lora(name)
        removed = library.delete(api.service.config.lora_dir, e.relpath)
        return {"deleted": [os.path.basename(p) for p in removed]}

    return app


def mount(app, controller, logins: list[tuple[str, str]] | None = None,
          local_only: Callable[[], bool] = lambda: False) -> None:
    """Mount the API at ``PREFIX`` on ``app`` (a WebUI's or serve's FastAPI app), once."""
    if any(getattr(r, "path", None) == PREFIX for r in app.router.routes):
        return
    app.mount(PREFIX, make_app(controller, logins, local_only))


def webui_logins() -> list[tuple[str, str]]:
    """The WebUI's ``--api-auth``, else its ``--gradio-auth`` (and ``--gradio-auth-path``) logins,
    each a comma-separated list of ``user:password`` as the WebUI reads them."""
    from .ui.cli import read_auth
    try:
        from modules import shared
        o = shared.cmd_opts
    except Exception:
        return []
    text = getattr(o, "api_auth", None)
    if not text:
        parts = [getattr(o, "gradio_auth", None) or ""]
        path = getattr(o, "gradio_auth_path", None)
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                parts += [line.strip() for line in f]
        text = ",".join(p for p in parts if p)
    return read_auth([item.strip() for item in (text or "").split(",") if item.strip()], None)
