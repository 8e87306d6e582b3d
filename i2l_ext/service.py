"""Running jobs, one at a time, on a worker that stays warm between them.

The tab, the CLI and the standalone app all go through ``Service``. It checks the request in
the calling process (names, folders, images, weights) so mistakes are reported at once, then
hands the job to the worker and turns what comes back into ``Job`` state and events.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field

from . import catalog, images as images_mod, output
from .settings import Settings
from .errors import I2LError
from .supervisor import WorkerProcess

# Share of the progress bar given to each phase (the worker reports steps within a phase).
PHASE_SPAN = {"start": (0.0, 0.05), "load": (0.05, 0.45), "encode": (0.45, 0.75), "decode": (0.75, 0.92),
              "merge": (0.92, 0.95), "write": (0.95, 1.0)}


@dataclass
class JobRequest:
    images: list[str]
    name: str
    variant: str = "style"
    bias: bool | None = None
    subfolder: str = ""
    overwrite: bool = False
    key_format: str = "diffusers"
    vram_profile: str = "auto"
    preferred_weight: float = 1.0
    activation_text: str = ""
    description: str = ""


class HostHooks:
    """What a host does around a job. The default (standalone, CLI) does nothing."""

    def before_job(self, settings) -> None:
        pass

    def after_job(self) -> None:
        pass

    def interrupted(self) -> bool:
        return False

    def sd_version(self) -> str:
        return "Unknown"

    def needs_gpu_after_job(self) -> bool:
        """True when ``after_job`` puts the host's own models back on the GPU at once: the worker
        then parks its kept layers first."""
        return False


@dataclass
class Job:
    request: JobRequest
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "starting"          # starting | running | done | error | cancelled
    phase: str = "start"
    fraction: float = 0.0
    message: str = "Starting"
    log: list[str] = field(default_factory=list)
    result: dict | None = None
    error: I2LError | None = None
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self._events: list[dict] = []
        self._cond = threading.Condition()
        self._cancel = threading.Event()

    # -- producer side -----------------------------------------------------------------------
    def _emit(self, event: dict) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def _progress(self, phase: str, step: int, total: int, message: str) -> None:
        lo, hi = PHASE_SPAN.get(phase, (self.fraction, self.fraction))
        frac = lo + (hi - lo) * (step / total if total else 0.0)
        self.phase, self.fraction, self.message = phase, max(self.fraction, min(frac, 1.0)), message
        self._emit({"type": "progress", "phase": phase, "step": step, "total": total,
                    "fraction": self.fraction, "message": message})

    def _log(self, level: str, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        self.log.append(line)
        del self.log[:-500]
        self._emit({"type": "log", "level": level, "message": message})

    def _finish(self, state: str, result: dict | None = None, error: I2LError | None = None) -> None:
        self.state, self.result, self.error = state, result, error
        if state == "done":
            self.fraction, self.message = 1.0, "Done"
            self._emit({"type": "result", "result": result})
        else:
            self.message = error.message if error else state
            self._emit({"type": "error", "error": error.to_dict() if error else None, "state": state})

    # -- consumer side -----------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.state in ("done", "error", "cancelled")

    def events(self, timeout: float | None = None):
        """Every event from the start, then live ones, until the job ends (or ``timeout`` passes idle)."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events):
                    if self.finished:
                        return
                    if not self._cond.wait(timeout):
                        return
                batch = self._events[i:]
                i = len(self._events)
            for ev in batch:
                yield ev
                if ev["type"] in ("result", "error"):
                    return

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self.finished:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def cancel(self) -> None:
        self._cancel.set()


class Service:
    def __init__(self, config: Settings, hooks: HostHooks | None = None):
        self.config = config
        self.hooks = hooks or HostHooks()
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._worker: WorkerProcess | None = None
        self._idle_timer: threading.Timer | None = None
        self._wlock = threading.RLock()      # held while the worker starts or is asked something
        self._standby: WorkerProcess | None = None   # a worker started ahead of need (``standby``)
        self._job_thread: threading.Thread | None = None
        self._closed = False

    # -- checks the tab runs as the user types -------------------------------------------------
    def check_name(self, name: str, subfolder: str = "", overwrite: bool = False) -> str | None:
        problem = output.name_problem(name)
        if problem:
            return problem
        problem = output.subfolder_problem(subfolder)
        if problem:
            return problem
        taken = output.existing_outputs(self.config.lora_dir, name, subfolder)
        if taken and not overwrite:
            return f"A LoRA named '{name}' already exists ({os.path.basename(taken[0])})."
        return None

    def resolve_files(self, variant: str, bias: bool | None) -> dict[str, list[str]]:
        v = catalog.get_variant(variant)
        resolver = getattr(catalog, "resolve_files", None)
        if resolver is not None:
            return resolver(v, self.config.models_dir, bias=bias, search_dirs=tuple(self.config.search_dirs))
        files = {r: catalog.FILES[r].resolve(self.config.models_dir) for r in v.needed_roles(bias)}
        missing = [r for r, p in files.items() if not p]
        if missing:
            lines = [f"{catalog.FILES[r].title}: {catalog.FILES[r].local_path(self.config.models_dir)}" for r in missing]
            raise I2LError(I2LError.WEIGHTS_MISSING, "Model files are missing:\n" + "\n".join(lines),
                           f"Download them: python -m i2l_ext models download {v.key}")
        return files

    # -- jobs ----------------------------------------------------------------------------------
    @property
    def current(self) -> Job | None:
        return self._job

    @property
    def busy(self) -> bool:
        return self._job is not None and not self._job.finished

    def start(self, req: JobRequest) -> Job:
        with self._lock:
            if self.busy:
                raise I2LError(I2LError.BUSY, "Another LoRA is being made right now.",
                               "Wait for it to finish, or cancel it.")
            job = Job(request=req)
            spec, plan = self._prepare(job)       # raises before anything runs
            self._job = job
            self._cancel_idle_timer()
        t = threading.Thread(target=self._run, args=(job, spec, plan), daemon=True, name=f"i2l-job-{job.id}")
        self._job_thread = t
        t.start()
        return job

    def run(self, req: JobRequest) -> Job:
        job = self.start(req)
        job.wait()
        return job

    def cancel(self) -> bool:
        job = self._job
        if job is None or job.finished:
            return False
        job.cancel()
        return True

    def _prepare(self, job: Job) -> tuple[dict, output.OutputPlan]:
        req = job.request
        variant = catalog.get_variant(req.variant)
        if req.key_format not in ("diffusers", "kohya"):
            raise I2LError(I2LError.BAD_INPUT, f"Unknown key format '{req.key_format}'.", "Use diffusers or kohya.")
        if req.vram_profile not in ("auto", "gpu", "cpu_offload", "disk"):
            raise I2LError(I2LError.BAD_INPUT, f"Unknown VRAM profile '{req.vram_profile}'.",
                           "Use auto, gpu, cpu_offload or disk.")
        plan = output.plan_output(self.config.lora_dir, req.name, req.subfolder, req.overwrite, job.id)
        paths = images_mod.collect_images(list(req.images))
        infos = images_mod.inspect_images(paths)
        for info in infos:
            for w in info.warnings:
                job._log("warning", w)
        bias = variant.bias_default if req.bias is None else bool(req.bias)
        files = self.resolve_files(variant.key, bias)
        card = output.card_data(req.description or f"Made from {len(paths)} image(s) with the i2L {variant.label} variant.",
                                req.activation_text, req.preferred_weight, self.hooks.sd_version())
        spec = {"variant": variant.key, "bias": bias, "images": paths, "image_sha256": [i.sha256 for i in infos],
                "files": files, "models_dir": self.config.models_dir, "output": plan.to_dict(),
                "key_format": req.key_format, "vram_profile": req.vram_profile,
                "gpu_hold_s": max(0.0, float(self.config.gpu_hold_seconds or 0)),
                "gpu_hold_gb": max(0.0, float(self.config.gpu_hold_gb or 0)),
                "metadata": {"modelspec.title": req.name}, "card": card}
        return spec, plan

    def _worker_python(self) -> str:
        from .envsetup import find_worker_python
        return find_worker_python(self.config.worker_python, self.config.worker_env)

    def _spawn(self, prefetch_files: list[str] | None = None) -> WorkerProcess:
        python = self._worker_python()
        sb = self._take_standby(python)
        if sb is not None:
            sb.log = self._route_log
            self._worker = sb
            try:
                sb.wake(prefetch_files, timeout=self.config.start_timeout)
                return sb
            except I2LError:
                if sb.alive:
                    raise
                sb.kill()               # it died while waiting: a fresh worker says why, if anything
        w = WorkerProcess(python, extra_env=dict(self.config.worker_env_vars), args=self.config.worker_args(),
                          log=self._route_log)
        self._worker = w
        w.start(prefetch_files, timeout=self.config.start_timeout)
        return w

    # -- standby worker ----------------------------------------------------------------------------
    def standby(self) -> bool:
        """Start a worker ahead of need, when the WebUI (or the app) has started and whenever the
        warm worker has gone: it imports torch and the model code, then waits holding no GPU
        memory and no weights (about 0.7 GB of RAM). The next job or tab load wakes it and
        starts with the weights' reading instead of seconds of imports. Returns whether one is
        there (or starting); never waits for it. Off with ``Config.standby = False``."""
        if not self.config.standby or self._closed:
            return False
        if not self._wlock.acquire(timeout=0.05):
            return False                    # a worker is being started right now
        try:
            if self._closed or self.busy or (self._worker is not None and self._worker.alive):
                return False
            sb = self._standby
            if sb is not None and sb.alive:
                return True
            try:
                w = WorkerProcess(self._worker_python(), extra_env=dict(self.config.worker_env_vars),
                                  args=self.config.worker_args())
                w.start_standby()
            except I2LError:
                return False                # no environment yet: the job will say what to do
            self._standby = w
            return True
        finally:
            self._wlock.release()

    def _take_standby(self, python: str) -> WorkerProcess | None:
        """The standby worker, if it is alive and was started the way a worker would be now."""
        sb, self._standby = self._standby, None
        if sb is None:
            return None
        if sb.alive and sb.standby and sb.python == python and sb.extra_env == dict(self.config.worker_env_vars) \
                and sb.args == self.config.worker_args():
            return sb
        sb.kill()                           # settings changed since it started
        return None

    def standby_pid(self) -> int | None:
        sb = self._standby
        return sb.pid if sb is not None and sb.alive else None

    def standby_ready(self, timeout: float = 0.0) -> bool:
        """Whether the standby worker has its code imported (waiting up to ``timeout`` s)."""
        sb = self._standby
        return sb is not None and sb.alive and sb.standby_ready.wait(timeout)

    def stop_standby(self) -> None:
        sb, self._standby = self._standby, None
        if sb is not None:
            sb.shutdown(timeout=2.0)

    def _ensure_worker(self, job: Job, spec: dict) -> WorkerProcess:
        with self._wlock:
            w = self._worker
            if w is not None and w.alive and w.args != self.config.worker_args():
                self._stop_worker()             # started with other settings (the VRAM limit)
            elif w is not None and w.alive:
                job._log("info", "Using the warm worker (pid %s)." % w.pid)
                return w
            job._progress("start", 0, 1, "Starting the worker")
            files = [p for role in ("siglip2", "dinov3", "text_encoder", "style", "coarse", "fine", "bias")
                     for p in spec["files"].get(role, [])]
            w = self._spawn(files)
        hello = w.hello or {}
        job._log("info", f"Worker ready: pid {hello.get('pid')}, device {hello.get('device')}, "
                          f"torch {hello.get('torch')}, diffsynth {hello.get('diffsynth')}.")
        job._progress("start", 1, 1, "Worker ready")
        return w

    def prewarm(self, variant: str = "style", bias: bool | None = None, vram_profile: str = "auto",
                wait: bool = False) -> threading.Thread | None:
        """Start the worker and begin reading the variant's weights before the click.

        Does nothing while a job runs, or when the weights are missing (the job will say so).
        """
        if self.busy:
            return None
        try:
            v = catalog.get_variant(variant)
            b = v.bias_default if bias is None else bool(bias)
            files = self.resolve_files(v.key, b)
        except I2LError:
            return None
        spec = {"variant": v.key, "bias": b, "files": files, "models_dir": self.config.models_dir,
                "vram_profile": vram_profile}
        flat = [p for role in ("siglip2", "dinov3", "text_encoder", "style", "coarse", "fine", "bias")
                for p in files.get(role, [])]

        def run():
            try:
                with self._wlock:
                    if self.busy:
                        return
                    w = self._worker
                    if w is None or not w.alive:
                        w = self._spawn(flat)
                    w.send({"type": "prefetch", "spec": spec})
                self._after_job()          # the idle timer applies to a prewarmed worker too
            except I2LError:
                pass
        t = threading.Thread(target=run, daemon=True, name="i2l-prewarm")
        t.start()
        if wait:
            t.join()
        return t

    def worker_stats(self, timeout: float = 10.0) -> dict | None:
        """VRAM the idle worker holds (None when there is no worker or a job is running)."""
        return self._ask({"type": "stats"}, "stats", timeout)

    def park(self, timeout: float = 5.0) -> dict | None:
        """Free the VRAM the idle worker still holds from its last job (the weights it kept on the
        GPU for a next job; they stay in RAM). The host calls it before it generates. Returns the
        worker's answer (``freed`` bytes, VRAM after), or None when there is nothing to ask: no
        worker, one still starting (it holds nothing yet), a job running (it parks on its own),
        or no answer in time. Never keeps the caller waiting on a worker's start."""
        return self._ask({"type": "park"}, "parked", timeout, wait_for_start=False)

    def _ask(self, msg: dict, answer: str, timeout: float, during_job: bool = False,
             wait_for_start: bool = True) -> dict | None:
        if self.busy and not during_job:
            return None
        if not self._wlock.acquire(timeout=-1 if wait_for_start else 0.05):
            return None                   # a worker is being started (or asked) right now
        try:
            w = self._worker
            if w is None or not w.alive or (self.busy and not during_job):
                return None
            w.send(msg)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                reply = w.next_message(max(0.0, deadline - time.monotonic()))
                if reply is None:
                    return None
                if reply["type"] == answer:
                    return reply
            return None
        finally:
            self._wlock.release()

    def _run(self, job: Job, spec: dict, plan: output.OutputPlan) -> None:
        state, result, error = "error", None, None
        deadline = time.monotonic() + self.config.job_timeout
        try:
            self.hooks.before_job(self.config)
            job.state = "running"
            worker = self._ensure_worker(job, spec)
            if job._cancel.is_set():
                raise I2LError(I2LError.CANCELLED, "The job was cancelled.")
            worker.send({"type": "job", "job": job.id, "spec": spec})
            while True:
                if job._cancel.is_set() or self.hooks.interrupted():
                    worker.kill()
                    raise I2LError(I2LError.CANCELLED, "The job was cancelled.")
                if time.monotonic() > deadline:
                    worker.kill()
                    raise I2LError(I2LError.TIMEOUT, f"The job took longer than {self.config.job_timeout:.0f} s and was stopped.",
                                   "Use fewer images or a faster VRAM profile, or raise the time limit.")
                msg = worker.next_message(0.2)
                if msg is None or msg.get("job") not in (job.id, None):
                    continue
                kind = msg["type"]
                if kind == "progress":
                    job._progress(msg.get("phase", job.phase), msg.get("step", 0), msg.get("total", 0),
                                  msg.get("message", ""))
                    job._log("info", msg.get("message", ""))
                elif kind == "result":
                    result = dict(msg["result"])
                    weight = job.request.preferred_weight
                    result["prompt"] = f"<lora:{plan.name}:{weight:g}>"
                    result["name"] = plan.name
                    state = "done"
                    break
                elif kind == "error":
                    raise I2LError.from_dict(msg.get("error") or {})
        except I2LError as e:
            error = e
            state = "cancelled" if e.code == I2LError.CANCELLED else "error"
        except Exception as e:   # a bug of ours: still a clear message, never a hang
            error = I2LError(I2LError.INTERNAL, f"Unexpected error: {e!r}", "Please report it with the log.")
        finally:
            if state != "done":
                output.cleanup(plan, remove_final=True)
                if self._worker is not None and state == "error" and error is not None and error.code in (
                        I2LError.OUT_OF_MEMORY, I2LError.INTERNAL):
                    self._stop_worker()        # start clean next time
            try:
                if state == "done" and (result or {}).get("held_on_gpu") and self.hooks.needs_gpu_after_job():
                    self._park_worker()
                self.hooks.after_job()
            except Exception as e:
                job._log("warning", f"Could not give the WebUI its models back: {e}")
            if state == "done":
                job._log("info", f"Wrote {result.get('path')} ({catalog.human_size(result.get('bytes', 0))}).")
            elif error is not None and error.code != I2LError.CANCELLED:
                job._log("error", str(error))
            job._finish(state, result, error)
            self._after_job()

    def _route_log(self, level: str, message: str) -> None:
        job = self._job
        if job is not None and level != "debug" and message:
            job._log(level, message)

    # -- warm worker -----------------------------------------------------------------------------
    def _after_job(self) -> None:
        if not self.config.keep_warm or self.config.idle_timeout <= 0:
            self._stop_worker()
            self.standby()                 # ready again, without the weights or the GPU
            return
        if self._worker is None or not self._worker.alive:
            self.standby()                 # the worker was stopped (after an error) or died
        self._cancel_idle_timer()
        t = threading.Timer(self.config.idle_timeout, self._idle)
        t.daemon = True
        self._idle_timer = t
        t.start()

    def _idle(self) -> None:
        with self._lock:
            if not self.busy:
                self._stop_worker()
                self.standby()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _park_worker(self) -> None:
        """``park`` from inside a job's end (the job still counts as running)."""
        self._ask({"type": "park"}, "parked", 5.0, during_job=True)

    def _stop_worker(self) -> None:
        w, self._worker = self._worker, None
        if w is not None:
            w.shutdown()

    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None and self._worker.alive else None

    def shutdown(self) -> None:
        self._closed = True
        self.cancel()
        if self._job is not None:
            self._job.wait(10)
        t = self._job_thread
        if t is not None and t is not threading.current_thread():
            t.join(15)                # what it does after the job (stopping a one-shot worker) ends too
        self._cancel_idle_timer()
        self._stop_worker()
        self.stop_standby()
