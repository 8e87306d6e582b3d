"""Running jobs in one first-come queue, on workers that stay warm between them.

The tab, the HTTP API, the CLI and the standalone app all go through ``Service``. A job reads as
named steps: ``start`` checks the request (``JobRequest.check``), the images, the model files and
the output (``output.plan_output`` claims the name) in the calling process, so mistakes are
reported at once and nothing runs, then puts the job in the queue; a free ``Slot`` (one worker
process, seeing one GPU) takes the oldest queued job; ``_run`` hands the worker the ``JobSpec`` and
turns what comes back into ``Job`` state and events; whatever happens, the job ends, its output is
committed or taken back, and the slot takes the next job.
"""
from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass, field

from . import catalog, images as images_mod, output
from .contract import I2LError, JobRequest, JobResult, JobSpec, T, Text, bad_input, raw
from .settings import Settings
from .supervisor import WorkerProcess

__all__ = ["Service", "Slot", "Job", "JobRequest", "HostHooks", "PHASE_SPAN", "QUEUE_MAX"]

QUEUE_MAX = 32          # jobs waiting for a worker; one more is refused (QUEUE_FULL)
KEEP_FINISHED = 100     # finished jobs the service still answers about (the API's GET /jobs/{id})

# Share of the progress bar given to each phase (the worker reports steps within a phase).
PHASE_SPAN = {"start": (0.0, 0.05), "load": (0.05, 0.45), "encode": (0.45, 0.75), "decode": (0.75, 0.92),
              "merge": (0.92, 0.95), "write": (0.95, 1.0)}


class HostHooks:
    """What a host does around a job. The default (standalone, CLI) does nothing."""

    def before_job(self, settings, job: "Job") -> bool:
        """Before a job uses its worker; False when the job was cancelled meanwhile. A host waits
        here for its GPU (its queue lock) and says so in ``job``'s progress."""
        return True

    def after_job(self) -> None:
        pass

    def interrupted(self) -> bool:
        return False

    def sd_version(self, family) -> str:
        """The Lora card's "sd version" for a LoRA of ``family`` (a ``families.Family``)."""
        return "Unknown"

    def needs_gpu_after_job(self) -> bool:
        """True when ``after_job`` puts the host's own models back on the GPU at once: the worker
        then parks its kept layers first."""
        return False


@dataclass
class LogLine:
    stamp: str          # HH:MM:SS
    level: str          # debug | info | warning | error
    text: Text

    def render(self, lang: str | None = None, surface: str | None = None) -> str:
        return f"[{self.stamp}] {self.text.render(lang, surface)}"


@dataclass
class Job:
    request: JobRequest
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:output.JOB_ID_LEN])
    state: str = "queued"            # queued | starting | running | done | error | cancelled
    phase: str = "start"
    fraction: float = 0.0
    message: Text = field(default_factory=lambda: T("m_starting"))
    log: list[LogLine] = field(default_factory=list)
    result: JobResult | None = None
    error: I2LError | None = None
    started: float = field(default_factory=time.time)
    ahead: int = 0                   # queued: jobs before it in the queue
    worker: int | None = None        # the slot that runs it

    def __post_init__(self):
        self._events: list[dict] = []
        self._cond = threading.Condition()
        self._cancel = threading.Event()

    # -- producer side -----------------------------------------------------------------------
    def _emit(self, event: dict) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def _progress(self, phase: str, step: int, total: int, text: Text) -> None:
        lo, hi = PHASE_SPAN.get(phase, (self.fraction, self.fraction))
        frac = lo + (hi - lo) * (step / total if total else 0.0)
        self.phase, self.fraction, self.message = phase, max(self.fraction, min(frac, 1.0)), text
        self._emit({"type": "progress", "phase": phase, "step": step, "total": total, "fraction": self.fraction,
                    "text": text})

    def _log(self, level: str, text: Text) -> None:
        self.log.append(LogLine(time.strftime("%H:%M:%S"), level, text))
        del self.log[:-500]
        self._emit({"type": "log", "level": level, "text": text})

    def _finish(self, state: str, result: JobResult | None = None, error: I2LError | None = None) -> None:
        self.state, self.result, self.error = state, result, error
        if state == "done":
            self.fraction, self.message = 1.0, T("m_done")
            self._emit({"type": "result", "result": result})
        else:
            self.message = error.text if error else T("m_job_cancelled")
            self._emit({"type": "error", "error": error, "state": state})

    # -- consumer side -----------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.state in ("done", "error", "cancelled")

    def log_lines(self, lang: str | None = None, surface: str | None = None, last: int = 300,
                  debug: bool = False) -> list[str]:
        return [line.render(lang, surface) for line in self.log[-last:] if debug or line.level != "debug"]

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
        """Stop the job: a queued one leaves the queue at once, a running one within a second."""
        self._cancel.set()
        on_cancel = getattr(self, "_on_cancel", None)
        if on_cancel is not None:
            on_cancel(self)



class Service:
    """The queue and the slots that run its jobs. ``config.gpus`` gives one slot per GPU (each worker
    sees only its own); without it, one slot whose worker sees what the host sees."""

    def __init__(self, config: Settings, hooks: HostHooks | None = None):
        self.config = config
        self.hooks = hooks or HostHooks()
        self._lock = threading.RLock()              # the queue, the slots' jobs, the job list
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._plans: dict[str, tuple[JobSpec, output.OutputPlan]] = {}
        self.slots = [Slot(self, i, d) for i, d in enumerate(config.worker_devices)]
        self._closed = False

    # -- checks the tab runs as the user types -------------------------------------------------
    def check_name(self, name: str, subfolder: str = "", overwrite: bool = False) -> Text | None:
        return output.check_name(self.config.lora_dir, name, subfolder, overwrite)

    def resolve_files(self, variant: str, bias: bool | None) -> dict[str, list[str]]:
        return catalog.resolve_files(catalog.get_variant(variant), self.config.models_dir, bias=bias,
                                     search_dirs=tuple(self.config.search_dirs),
                                     command_flags=self.config.cli_flags("models_dir"))

    # -- jobs ----------------------------------------------------------------------------------
    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def start(self, req: JobRequest) -> Job:
        """Check everything a job needs, claim its name and queue it; a free worker takes it at once.
        Raises ``I2LError`` (nothing queued) when something is wrong or the queue is full. The
        images are looked at outside the service's lock: a page adding 64 large images keeps no
        other page or worker waiting."""
        req.check()
        self._check_room()
        job = Job(request=req)
        spec, plan = self._prepare(job)       # raises before anything is queued
        with self._lock:
            try:
                self._check_room()            # another page may have filled it meanwhile
            except I2LError:
                output.abort(plan)
                output.release(plan)
                raise
            self._plans[job.id] = (spec, plan)
            job._on_cancel = self._cancelled
            self._jobs[job.id] = job
            self._forget_old()
            self._queue.append(job)
            self._number_queue()
            self._dispatch()
        return job

    def _check_room(self) -> None:
        with self._lock:
            if self._closed:
                raise I2LError(I2LError.CANCELLED, T("m_job_cancelled"))
            if len(self._queue) >= QUEUE_MAX:
                raise I2LError(I2LError.QUEUE_FULL, T("err_queue_full", n=QUEUE_MAX), T("fix_queue_full"))

    def run(self, req: JobRequest) -> Job:
        job = self.start(req)
        job.wait()
        return job

    def cancel(self, job_id: str | None = None) -> bool:
        """Cancel one job, or (no id) every job that has not ended. Whether there was one."""
        with self._lock:
            jobs = [self._jobs[job_id]] if job_id in self._jobs else [] if job_id else list(self._jobs.values())
        jobs = [j for j in jobs if not j.finished]
        for j in jobs:
            j.cancel()
        return bool(jobs)

    def position(self, job: Job) -> int | None:
        """How many jobs are before ``job`` in the queue (None once a worker has it)."""
        with self._lock:
            return job.ahead if job.state == "queued" else None

    def _cancelled(self, job: Job) -> None:
        """A queued job leaves the queue at once and gives its name back."""
        with self._lock:
            if job not in self._queue:
                return                              # running: its slot sees the cancel
            self._queue.remove(job)
            self._number_queue()
            spec, plan = self._plans.pop(job.id)
        output.abort(plan)
        output.release(plan)
        job._finish("cancelled", None, I2LError(I2LError.CANCELLED, T("m_job_cancelled")))

    def _number_queue(self) -> None:
        for i, j in enumerate(self._queue):
            j.ahead = i

    def _forget_old(self) -> None:
        done = [k for k, j in self._jobs.items() if j.finished]
        for k in done[:max(0, len(done) - KEEP_FINISHED)]:
            del self._jobs[k]

    def _dispatch(self) -> None:
        """Each free slot takes the oldest queued job (the first slot first: its worker is the warm one)."""
        with self._lock:
            if self._closed:
                return
            for sl in self.slots:
                if not self._queue:
                    return
                if sl.job is None:
                    job = self._queue.popleft()
                    self._number_queue()
                    spec, plan = self._plans.pop(job.id)
                    sl.take(job, spec, plan)

    def _prepare(self, job: Job) -> tuple[JobSpec, output.OutputPlan]:
        """The job's inputs checked and its output claimed: images, model files, then the name."""
        req = job.request
        variant = catalog.get_variant(req.variant)
        paths = images_mod.collect_images(list(req.images))
        infos = images_mod.inspect_images(paths)
        for info in infos:
            for note in info.warnings:
                job._log("warning", note)
        catalog.check_key_format(variant, req.key_format)
        if req.bias and not variant.has_bias:
            raise bad_input(T("m_no_bias", family=variant.family.label), T("m_no_bias_fix"))
        bias = variant.has_bias and (variant.bias_default if req.bias is None else bool(req.bias))
        files = self.resolve_files(variant.key, bias)
        try:
            plan = output.plan_output(self.config.lora_dir, req.name, req.subfolder, req.overwrite, job.id)
        except OSError as e:                                   # a folder that could not even be looked at
            raise output.os_error(e, T("m_preparing_folder"), self.config.lora_dir) from None
        description = req.description or T("m_default_description", n=len(paths), variant=variant.label).render("en")
        notes = T(f"m_card_note_{variant.family.key}", family=variant.family.label).render("en") \
            if variant.family.conditional_only else ""
        card = output.card_data(description, req.activation_text, req.preferred_weight,
                                self.hooks.sd_version(variant.family), notes)
        spec = JobSpec(variant=variant.key, bias=bias, images=paths, image_sha256=[i.sha256 for i in infos],
                       files=files, models_dir=self.config.models_dir, output=plan.to_dict(),
                       key_format=req.key_format, vram_profile=req.vram_profile, max_rank=req.max_rank,
                       gpu_hold_s=max(0.0, float(self.config.gpu_hold_seconds or 0)),
                       gpu_hold_gb=max(0.0, float(self.config.gpu_hold_gb or 0)),
                       metadata={"modelspec.title": req.name}, card=card)
        return spec, plan

    def worker_python(self) -> str:
        from .envsetup import find_worker_python
        return find_worker_python(self.config.worker_python, self.config.worker_env)

    # -- the workers, through the first slot (the one a single-GPU machine has) ------------------
    def standby(self) -> bool:
        """A standby worker in every free slot (see ``Slot.standby``); whether the first has one."""
        return [sl.standby() for sl in self.slots][0]

    def prewarm(self, variant: str = "style", bias: bool | None = None, vram_profile: str = "auto",
                wait: bool = False) -> threading.Thread | None:
        return self.slots[0].prewarm(variant, bias, vram_profile, wait)

    def worker_stats(self, timeout: float = 10.0) -> dict | None:
        return self.slots[0].ask({"type": "stats"}, "stats", timeout)

    def park(self, timeout: float = 5.0) -> dict | None:
        """Every idle worker frees the VRAM it kept from its last job (see ``Slot.park``); the
        answers summed (``freed`` bytes), or None when no worker answered."""
        replies = [r for r in (sl.park(timeout) for sl in self.slots) if r]
        if not replies:
            return None
        out = dict(replies[0])
        out["freed"] = sum(int(r.get("freed") or 0) for r in replies)
        return out

    def worker_pid(self) -> int | None:
        return self.slots[0].worker_pid()

    def worker_pids(self) -> list[int]:
        return [p for p in (sl.worker_pid() for sl in self.slots) if p]

    def standby_pid(self) -> int | None:
        return self.slots[0].standby_pid()

    def standby_ready(self, timeout: float = 0.0) -> bool:
        return self.slots[0].standby_ready(timeout)

    def stop_standby(self) -> None:
        for sl in self.slots:
            sl.stop_standby()

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            queued = list(self._queue)
        for job in queued:
            job.cancel()
        for sl in self.slots:
            sl.cancel_job()
        for sl in self.slots:
            sl.shutdown()


class Slot:
    """One worker process and its life: started for a job (or ahead of need, as a standby), kept warm
    between jobs, stopped when idle. ``device``: the GPU it sees (``CUDA_VISIBLE_DEVICES``; "cpu":
    none), or None for whatever the host's environment shows."""

    def __init__(self, service: Service, index: int, device: str | None):
        self.service = service
        self.index = index
        self.device = device
        self.job: Job | None = None
        self._worker: WorkerProcess | None = None
        self._standby: WorkerProcess | None = None   # a worker started ahead of need
        self._idle_timer: threading.Timer | None = None
        self._wlock = threading.RLock()      # held while the worker starts or is asked something
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> Settings:
        return self.service.config

    @property
    def worker(self) -> WorkerProcess | None:
        return self._worker

    @property
    def busy(self) -> bool:
        return self.job is not None

    def _env(self) -> dict:
        env = dict(self.config.worker_env_vars)
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = "" if self.device == "cpu" else self.device
        return env

    # -- a job ---------------------------------------------------------------------------------
    def take(self, job: Job, spec: JobSpec, plan: output.OutputPlan) -> None:
        """Run ``job`` on this slot's worker, in a thread of its own (called with the service's lock)."""
        self.job = job
        job.worker, job.state = self.index, "starting"
        self._cancel_idle_timer()
        t = threading.Thread(target=self._run, args=(job, spec, plan), daemon=True, name=f"i2l-job-{job.id}")
        self._thread = t
        t.start()

    def cancel_job(self) -> None:
        job = self.job
        if job is not None:
            job.cancel()

    def _run(self, job: Job, spec: JobSpec, plan: output.OutputPlan) -> None:
        state, result, error = "error", None, None
        try:
            if not self.service.hooks.before_job(self.config, job):
                raise I2LError(I2LError.CANCELLED, T("m_job_cancelled"))
            job.state = "running"
            result = self._work(job, spec, plan)
            state = "done"
        except I2LError as e:
            error = e
            state = "cancelled" if e.code == I2LError.CANCELLED else "error"
        except BaseException as e:   # a bug of ours: still a clear message, never a hang
            error = I2LError(I2LError.INTERNAL, T("m_unexpected", error=raw(repr(e))), T("m_report"))
        finally:
            self._end(job, state, result, error, plan)

    def _work(self, job: Job, spec: JobSpec, plan: output.OutputPlan) -> JobResult:
        """The job in the worker: progress and log lines as they come, the result at the end."""
        hooks = self.service.hooks
        deadline = time.monotonic() + self.config.job_timeout
        worker = self._ensure_worker(job, spec)
        if job._cancel.is_set():
            raise I2LError(I2LError.CANCELLED, T("m_job_cancelled"))
        worker.send({"type": "job", "job": job.id, "spec": spec.to_dict()})
        while True:
            if job._cancel.is_set() or hooks.interrupted():
                worker.kill()
                raise I2LError(I2LError.CANCELLED, T("m_job_cancelled"))
            if time.monotonic() > deadline:
                worker.kill()
                raise I2LError(I2LError.TIMEOUT, T("m_job_timeout", s=f"{self.config.job_timeout:.0f}"),
                               T("m_job_timeout_fix"))
            msg = worker.next_message(0.2)
            if msg is None or msg.get("job") not in (job.id, None):
                continue
            kind = msg["type"]
            if kind == "progress":
                text = Text.from_dict(msg.get("text"))
                job._progress(msg.get("phase", job.phase), msg.get("step", 0), msg.get("total", 0), text)
                job._log("info", text)
            elif kind == "result":
                result = JobResult.from_dict(msg["result"])
                result.name = plan.name
                result.prompt = f"<lora:{plan.name}:{job.request.preferred_weight:g}>"
                return result
            elif kind == "error":
                raise I2LError.from_dict(msg.get("error") or {})

    def _end(self, job: Job, state: str, result: JobResult | None, error: I2LError | None,
             plan: output.OutputPlan) -> None:
        """Whatever happened: the output committed or taken back, the claim on the name dropped,
        the host given its GPU back, the job finished, and the slot free for the next one."""
        hooks = self.service.hooks
        try:
            if state != "done":
                for problem in output.abort(plan):
                    job._log("warning", problem)
                if self._worker is not None and error is not None and error.code in (
                        I2LError.OUT_OF_MEMORY, I2LError.INTERNAL):
                    self._stop_worker()        # start clean next time
        except BaseException as e:
            job._log("warning", T("m_unexpected", error=raw(repr(e))))
        finally:
            output.release(plan)
        try:
            if state == "done" and result.held_on_gpu and hooks.needs_gpu_after_job():
                self.ask({"type": "park"}, "parked", 5.0, during_job=True)
            hooks.after_job()
        except BaseException as e:
            job._log("warning", T("m_give_back_failed", error=raw(e)))
        if state == "done":
            job._log("info", T("m_wrote", path=result.path, size=catalog.human_size(result.bytes)))
        elif error is not None and error.code != I2LError.CANCELLED:
            job._log("error", error.text)
            if error.fix_text is not None:
                job._log("error", T("m_fix_line", fix=error.fix_text))
        with self.service._lock:
            self.job = None
            job._finish(state, result, error)
            if self.service._queue:
                self.service._dispatch()      # the next job, on the worker that is warm now
                return
        try:
            self._after_job()
        except BaseException:
            pass

    def _route_log(self, level: str, text: Text) -> None:
        job = self.job
        if job is not None and not job.finished and level != "debug":
            job._log(level, text)

    # -- the worker ----------------------------------------------------------------------------
    def _spawn(self, prefetch_files: list[str] | None = None) -> WorkerProcess:
        python = self.service.worker_python()
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
        w = WorkerProcess(python, extra_env=self._env(), args=self.config.worker_args(), log=self._route_log)
        self._worker = w
        w.start(prefetch_files, timeout=self.config.start_timeout)
        return w

    def _ensure_worker(self, job: Job, spec: JobSpec) -> WorkerProcess:
        with self._wlock:
            w = self._worker
            if w is not None and w.alive and w.args != self.config.worker_args():
                self._stop_worker()             # started with other settings (the VRAM limit)
            elif w is not None and w.alive:
                job._log("info", T("m_worker_warm", pid=w.pid))
                return w
            job._progress("start", 0, 1, T("m_starting_worker"))
            w = self._spawn(catalog.weight_paths(spec.files))
        hello = w.hello or {}
        job._log("info", T("m_worker_ready_info", pid=hello.get('pid'), device=hello.get('device'), torch=hello.get('torch'), diffsynth=hello.get('diffsynth')))
        job._progress("start", 1, 1, T("m_worker_ready"))
        return w

    def standby(self) -> bool:
        """Start a worker ahead of need, when the WebUI (or the app) has started and whenever the
        warm worker has gone: it imports torch and the model code, then waits holding no GPU
        memory and no weights (about 0.7 GB of RAM). The next job or tab load wakes it and
        starts with the weights' reading instead of seconds of imports. Returns whether one is
        there (or starting); never waits for it. Off with ``Settings.standby = False``."""
        if not self.config.standby or self.service._closed:
            return False
        if not self._wlock.acquire(timeout=0.05):
            return False                    # a worker is being started right now
        try:
            if self.service._closed or self.busy or (self._worker is not None and self._worker.alive):
                return False
            sb = self._standby
            if sb is not None and sb.alive:
                return True
            try:
                w = WorkerProcess(self.service.worker_python(), extra_env=self._env(), args=self.config.worker_args())
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
        if sb.alive and sb.standby and sb.python == python and sb.extra_env == self._env() \
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

    def prewarm(self, variant: str = "style", bias: bool | None = None, vram_profile: str = "auto",
                wait: bool = False) -> threading.Thread | None:
        """Start the worker and begin reading the variant's weights before the click.

        Does nothing while a job runs, or when the weights are missing (the job will say so).
        """
        if self.busy:
            return None
        try:
            v = catalog.get_variant(variant)
            b = v.has_bias and (v.bias_default if bias is None else bool(bias))
            files = self.service.resolve_files(v.key, b)
        except I2LError:
            return None
        spec = JobSpec(variant=v.key, bias=b, files=files, models_dir=self.config.models_dir,
                       vram_profile=vram_profile if vram_profile in ("auto", "gpu", "cpu_offload", "disk") else "auto")
        flat = catalog.weight_paths(files)

        def run():
            try:
                with self._wlock:
                    if self.busy:
                        return
                    w = self._worker
                    if w is None or not w.alive:
                        w = self._spawn(flat)
                    w.send({"type": "prefetch", "spec": spec.to_dict()})
                self._after_job()          # the idle timer applies to a prewarmed worker too
            except I2LError:
                pass
        t = threading.Thread(target=run, daemon=True, name="i2l-prewarm")
        t.start()
        if wait:
            t.join()
        return t

    def park(self, timeout: float = 5.0) -> dict | None:
        """Free the VRAM the idle worker still holds from its last job (the weights it kept on the
        GPU for a next job; they stay in RAM). The host calls it before it generates. Returns the
        worker's answer (``freed`` bytes, VRAM after), or None when there is nothing to ask: no
        worker, one still starting (it holds nothing yet), a job running (it parks on its own),
        or no answer in time. Never keeps the caller waiting on a worker's start."""
        return self.ask({"type": "park"}, "parked", timeout, wait_for_start=False)

    def ask(self, msg: dict, answer: str, timeout: float, during_job: bool = False,
            wait_for_start: bool = True) -> dict | None:
        """A question to the idle worker (stats, park) and its answer; None when there is none."""
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

    def _after_job(self) -> None:
        """Between jobs: the worker kept warm for ``idle_timeout`` s, or (0) stopped now and a
        standby in its place. A job the slot took meanwhile keeps its worker."""
        if not self.config.keep_warm or self.config.idle_timeout <= 0:
            self._idle()
            return
        if self._worker is None or not self._worker.alive:
            self.standby()                 # the worker was stopped (after an error) or died
        with self.service._lock:
            if self.busy:
                return
            self._cancel_idle_timer()
            t = threading.Timer(self.config.idle_timeout, self._idle)
            t.daemon = True
            self._idle_timer = t
            t.start()

    def _idle(self) -> None:
        with self.service._lock:
            if self.busy:
                return
            w, self._worker = self._worker, None        # taken under the lock: no job can pick it up now
        if w is not None:
            w.shutdown()
        self.standby()                 # ready again, without the weights or the GPU

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _stop_worker(self) -> None:
        w, self._worker = self._worker, None
        if w is not None:
            w.shutdown()

    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None and self._worker.alive else None

    def shutdown(self) -> None:
        job = self.job
        if job is not None:
            job.wait(10)
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(15)                # what it does after the job (stopping a one-shot worker) ends too
        self._cancel_idle_timer()
        self._stop_worker()
        self.stop_standby()
