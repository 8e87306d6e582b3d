"""The worker's loop: read jobs from stdin, answer on the protocol pipe.

Started by ``i2l_ext.supervisor`` as ``python -m i2l_ext.worker`` in the worker's own Python
environment. Everything libraries print goes to stderr; only protocol messages go to the pipe
that was stdout.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback

from .. import protocol
from ..contract import I2LError, JobResult, JobSpec, T, Text, raw

_out = None
_out_lock = threading.Lock()


def send(msg: dict) -> None:
    with _out_lock:
        _out.write(protocol.encode(msg))
        _out.flush()


def _debug(message: str) -> None:
    """A line for the log's details (not shown to the user)."""
    send({"type": "log", "job": None, "level": "debug", "text": raw(message).to_dict()})


def _claim_stdout() -> None:
    """Keep the real stdout for the protocol; point fd 1 (and sys.stdout) at stderr."""
    global _out
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _out = os.fdopen(fd, "wb", buffering=0)


def parse_args(argv: list[str]):
    """The worker's command line, given by the host (``supervisor.WorkerProcess``):
    ``[--parent PID] [--vram-limit-gb GB] [--ram-limit-gb GB] [--trace FILE] [--standby | --prefetch FILE...] [--record-code]``."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m i2l_ext.worker", add_help=False)
    p.add_argument("--parent", type=int, default=0)
    p.add_argument("--vram-limit-gb", type=float, default=0.0)
    p.add_argument("--ram-limit-gb", type=float, default=0.0)
    p.add_argument("--trace", default=None)
    p.add_argument("--standby", action="store_true")
    p.add_argument("--prefetch", nargs="*", default=[])
    p.add_argument("--record-code", action="store_true")
    return p.parse_args(argv)


def _apply_vram_limit(gb: float) -> None:
    """The ``vram_limit_gb`` setting: this process never uses more VRAM than that."""
    import torch
    from . import vram
    vram.LIMIT_BYTES = int(gb * vram.GiB) if gb > 0 else None
    if vram.LIMIT_BYTES and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, vram.LIMIT_BYTES / total))


_parks = 0          # park requests answered (the host asks before each of its generations)


def _stats(engine=None) -> dict:
    import torch
    import gc
    info = {"type": "stats", "pid": os.getpid(), "vram_allocated": None, "vram_reserved": None,
            "held_on_gpu": engine.held_on_gpu if engine is not None else 0, "parks": _parks,
            "gc": gc.isenabled()}
    if torch.cuda.is_available():
        info.update(vram_allocated=torch.cuda.memory_allocated(), vram_reserved=torch.cuda.memory_reserved())
    return info


def _hello(vram_limit_gb: float = 0.0) -> dict:
    import torch
    _apply_vram_limit(vram_limit_gb)
    info = {"type": "hello", "protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid(),
            "python": sys.version.split()[0], "torch": torch.__version__, "device": "cpu",
            "vram_total": None, "vram_free": None}
    try:
        from importlib.metadata import version
        info["diffsynth"] = version("diffsynth")
    except Exception:
        info["diffsynth"] = None
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info.update(device=f"cuda:{torch.cuda.current_device()}", gpu=torch.cuda.get_device_name(),
                    vram_total=total, vram_free=free)
    return info


def _classify(exc: BaseException) -> I2LError:
    """The one place an exception of the worker becomes an ``I2LError``."""
    if isinstance(exc, I2LError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):
        from .. import output
        return output.os_error(exc, T("m_working_on_files"), getattr(exc, "filename", None) or "?")
    if "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError":
        return I2LError(I2LError.OUT_OF_MEMORY, T("m_oom"),
                        T("m_oom_fix"),
                        traceback.format_exc())
    if isinstance(exc, MemoryError):
        return I2LError(I2LError.OUT_OF_MEMORY, T("m_ram"),
                        T("m_ram_fix"),
                        traceback.format_exc())
    return I2LError(I2LError.INTERNAL, T("m_worker_failed", error=raw(text)), T("m_report_log"),
                    traceback.format_exc())


class _Background:
    """A function run in a thread whose exception comes back at ``join``."""

    def __init__(self, fn):
        self.error = None

        def run():
            try:
                fn()
            except BaseException as e:
                self.error = e
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, swallow: bool = False) -> None:
        self.thread.join()
        if self.error is not None and not swallow:
            raise self.error


def run_job(engine, job_id: str, spec: JobSpec) -> JobResult:
    """One job: the images loaded, the card and preview written beside the engine's work, the
    LoRA written by the engine, then all three put in place (``output.commit``); on any failure
    what this job wrote is taken back (``output.abort``)."""
    from .. import images as images_mod, output
    t0 = time.monotonic()
    plan = output.OutputPlan.from_dict(spec.output)

    def progress(phase: str, step: int, total: int, text: Text) -> None:
        send({"type": "progress", "job": job_id, "phase": phase, "step": step, "total": total,
              "text": text.to_dict()})

    def log(level: str, text: Text) -> None:
        send({"type": "log", "job": job_id, "level": level, "text": text.to_dict()})

    engine.log = log
    pictures = []
    side = None
    try:
        # The host checked the images and said their notes; here they are only loaded.
        pictures = [im for im, _ in images_mod.load_images(spec.images)]

        def extras():               # the card and the preview, written while the engine works
            try:
                output.write_preview(plan, pictures)
                output.write_card(plan, spec.card or output.card_data())
            except OSError as e:
                raise output.write_failed("extras", plan.folder, e) from None
        side = _Background(extras)
        info = engine.run(spec, pictures, progress)
        progress("write", 1, 2, T("m_moving"))
        side.join()
        output.commit(plan)
        progress("write", 2, 2, T("m_done"))
    except BaseException:
        if side is not None:
            side.join(swallow=True)
        output.abort(plan)
        raise
    finally:
        for im in pictures:
            im.close()
    fields = set(JobResult.__dataclass_fields__)
    return JobResult(path=plan.path, sidecar=plan.sidecar, preview=plan.preview, bytes=os.path.getsize(plan.path),
                     keys=info["keys"], rank=info["rank"], variant=spec.variant, images=len(spec.images),
                     bias=spec.bias, seconds=round(time.monotonic() - t0, 3), device=info["device"],
                     dtype=info["dtype"], profile=info["profile"], warnings=list(info.get("warnings", [])),
                     timings=info.get("timings", {}), held_on_gpu=int(info.get("held_on_gpu") or 0),
                     peak_vram=info.get("peak_vram"),
                     extra={k: v for k, v in info.items() if k not in fields})


def _begin(what: str):
    """The worker's first step, before torch: note the files it opens and ask for its code
    files to be read ahead; returns the event set once they are in."""
    from . import warmstart, weights
    weights.FULL_SPEED.clear()         # one reader until the model code is imported (Engine.import_models)
    warmstart.watch_opens()
    warmstart.trace(what)
    return warmstart.warm_code()


def _start_early(files: list[str]) -> list:
    """Before torch: ask for the code files and start reading the weights ``files`` beside them
    (one reader until the model code is imported); both go on while torch is imported. (The
    code's read-ahead is many small reads that leave the disk room for the weights' first reader.)"""
    from . import warmstart
    _begin("worker started")
    try:
        return warmstart.start_reads(files)
    except OSError:
        return []


def _standby() -> tuple[list, list[str]]:
    """``--standby``: a worker started ahead of need (when the WebUI starts). It reads its
    code ahead, imports torch and the model code, says ``standby``, and waits -- no GPU context,
    no weights, about 0.7 GB of RAM. ``wake`` (with the weight files to read) turns it into a
    worker like any other: the reads start at once (at full speed when the imports are done, one
    reader while they still run, as at a fresh start), then CUDA comes up and ``hello`` is sent.
    ``shutdown``, or the host going away (end of its pipe), ends it at once.
    Returns (the early reads, the files named by ``wake``)."""
    from . import warmstart
    _begin("worker started (standby)")
    woke = threading.Event()
    box: dict = {"early": [], "files": []}

    def listen():
        while True:
            line = sys.stdin.buffer.readline()
            if not line:
                os._exit(0)                 # the host is gone: nothing to hand back
            msg = protocol.decode(line)
            kind = (msg or {}).get("type")
            if kind == "shutdown":
                os._exit(0)
            if kind == "ping":
                send({"type": "pong"})
            elif kind == "wake":
                files = [p for p in msg.get("prefetch") or [] if isinstance(p, str)]
                warmstart.trace("standby: woken")
                try:
                    box["early"] = warmstart.start_reads(files)
                except OSError:
                    pass
                box["files"] = files
                woke.set()
                return
    threading.Thread(target=listen, daemon=True, name="i2l-standby").start()
    import torch  # noqa: F401  (no CUDA call here: a standby holds no GPU memory)
    from .engine import Engine

    def imports():                  # in a thread, so a wake meanwhile goes on to CUDA at once
        Engine.import_models()
        if not woke.is_set():
            send({"type": "standby", "pid": os.getpid()})
    threading.Thread(target=imports, daemon=True, name="i2l-imports").start()
    woke.wait()
    return box["early"], box["files"]


def _warm_up(engine, early: list, paths: list[str], imports: bool = True) -> None:
    """Right after hello: the early reads handed to the engine (page-locked in place now that CUDA
    is up), anything left read ahead, and the model code imported (unless a standby did already),
    all in the background."""
    engine.adopt(early)
    paths = [p for p in paths if os.path.isfile(p)]
    if paths:
        try:
            engine.read_ahead(paths)
        except (ValueError, OSError) as e:
            _debug(f"read-ahead skipped: {e}")
    if imports:
        threading.Thread(target=engine.import_models, daemon=True, name="i2l-imports").start()

    def warm():
        try:
            _warm_cuda()
        except Exception as e:     # only a missed head start
            _debug(f"GPU warm-up skipped: {e}")
    threading.Thread(target=warm, daemon=True, name="i2l-warm-cuda").start()


def _warm_cuda() -> None:
    """Run each kind of GPU work a job does once, on small tensors: the first use of the GPU's
    math libraries loads and sets them up (a second or two), which then happens while the model
    code is imported instead of in the first job."""
    import torch
    if not torch.cuda.is_available():
        return
    from .warmstart import trace
    F = torch.nn.functional
    with torch.no_grad():
        bf = dict(device="cuda", dtype=torch.bfloat16)
        x = torch.randn(2, 64, 256, **bf)
        w, b = torch.randn(512, 256, **bf), torch.randn(512, **bf)
        y = F.gelu(F.linear(x, w, b), approximate="tanh") + F.silu(F.linear(x, w))
        F.layer_norm(y, (512,)).sum().item()
        torch.bmm(x, x.transpose(1, 2)).softmax(-1).sum().item()
        img = torch.randn(1, 3, 64, 64, **bf)
        F.conv2d(img, torch.randn(16, 3, 16, 16, **bf), stride=16).sum().item()
        for d in (64, 96, 128):
            q = torch.randn(1, 4, 80, d, **bf)
            F.scaled_dot_product_attention(q, q, q).sum().item()
        torch.cat([x, x], 0).float().cpu()
    torch.cuda.empty_cache()
    trace("cuda: math libraries warmed up")


def _park(engine) -> dict:
    """The host is about to use the GPU: drop the layers kept since the last job, say what is left."""
    global _parks
    _parks += 1
    freed = engine.park()
    info = _stats(engine)
    info.update(type="parked", freed=freed)
    return info


RECORD_AFTER_S = 30.0


def _park_later(engine) -> None:
    """After a job: the layers it left on the GPU are dropped when its hold time is over (a later
    job moves that time on; ``park_if_due`` checks)."""
    if not engine.held_on_gpu:
        return
    wait = max(0.0, engine.hold_until - time.monotonic()) + 0.05
    t = threading.Timer(wait, engine.park_if_due)
    t.daemon = True
    t.start()


class _CodeRecorder:
    """Lists the code files once, after the first GPU job, when no job has come for
    ``RECORD_AFTER_S`` (listing takes a few tenths of a second: never in the middle of a burst)."""

    def __init__(self, engine):
        self.engine, self.done, self.last_job = engine, False, 0.0
        self._timer: threading.Timer | None = None

    def job_ended(self, on_gpu: bool) -> None:
        self.last_job = time.monotonic()
        if self.done or (not on_gpu and self._timer is None):
            return
        if self._timer is None:
            self._arm(RECORD_AFTER_S)

    def _arm(self, delay: float) -> None:
        self._timer = threading.Timer(delay, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        quiet = time.monotonic() - self.last_job
        if quiet < RECORD_AFTER_S:            # a job came meanwhile: wait for quiet again
            self._arm(RECORD_AFTER_S - quiet)
            return
        from . import warmstart
        try:
            with self.engine._lock:           # never while a job runs
                warmstart.record_code()
            self.done = True
        except Exception:
            self.done = True


def record_code_main() -> int:
    """``python -m i2l_ext.worker --record-code``: do what a job does first (imports, the GPU's
    math libraries) and list the code files used, so the next cold start reads them ahead. Run
    once after the environment is installed; every job on the GPU refreshes the list."""
    from . import lightimport, warmstart
    warmstart.watch_opens()
    import torch  # noqa: F401  (first, as in a job)
    lightimport.import_model_code()
    from transformers import DINOv3ViTImageProcessor, Siglip2ImageProcessor  # noqa: F401
    _warm_cuda()
    where = warmstart.record_code()
    print(where or "the list of code files could not be written", file=sys.stderr)
    return 0 if where else 1


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from .. import lifetime
    lifetime.exit_with_parent(args.parent)         # first: never outlive the host, even mid-import
    from . import warmstart, weights
    warmstart.TRACE_FILE = args.trace
    weights.RAM_LIMIT_BYTES = int(args.ram_limit_gb * 1024 ** 3) if args.ram_limit_gb > 0 else None
    if args.record_code:
        sys.exit(record_code_main())
    _claim_stdout()
    warmstart.pause_gc()             # until the model code is imported (engine.imports_done)
    standby = args.standby
    if standby:
        early, paths = _standby()
    else:
        paths = list(args.prefetch)
        early = _start_early(paths)
    try:
        send(_hello(args.vram_limit_gb))
    except Exception as e:
        send({"type": "error", "job": None, "error": _classify(e).to_dict()})
        sys.exit(3)
    from .warmstart import trace
    trace("hello: torch imported, CUDA up")
    from .engine import Engine
    engine = Engine(log=lambda level, text: send({"type": "log", "job": None, "level": level, "text": text.to_dict()}))
    _warm_up(engine, early, paths, imports=not standby)
    recorder = _CodeRecorder(engine)
    for line in sys.stdin.buffer:
        msg = protocol.decode(line)
        if msg is None:
            continue
        if msg["type"] == "shutdown":
            break
        if msg["type"] == "ping":
            send({"type": "pong"})
            continue
        if msg["type"] == "stats":
            send(_stats(engine))
            continue
        if msg["type"] == "park":
            send(_park(engine))
            continue
        if msg["type"] == "prefetch":
            def prefetch(spec=msg.get("spec")):
                try:
                    engine.prefetch(JobSpec.from_dict(spec))
                except BaseException as e:   # a prefetch that fails is only a missed head start
                    _debug(f"prefetch skipped: {e}")
            threading.Thread(target=prefetch, daemon=True, name="i2l-prefetch").start()
            continue
        if msg["type"] != "job":
            continue
        job_id = msg.get("job")
        try:
            trace("job: received")
            result = run_job(engine, job_id, JobSpec.from_dict(msg.get("spec")))   # checked as it enters
            trace(f"job: done {result.timings}")
            send({"type": "result", "job": job_id, "result": result.to_dict()})
            _park_later(engine)
            recorder.job_ended(result.device != "cpu")   # the code it used, listed when quiet
        except BaseException as e:   # report, then keep serving
            _park_later(engine)
            recorder.job_ended(False)
            err = _classify(e)
            send({"type": "error", "job": job_id, "error": err.to_dict()})
            if err.code in (I2LError.OUT_OF_MEMORY, I2LError.INTERNAL):
                try:
                    engine.unload()
                except Exception:
                    pass
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                break
    try:
        engine.unload()
    except Exception:
        pass
    send({"type": "bye"})
