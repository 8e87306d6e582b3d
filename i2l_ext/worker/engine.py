"""The engine: what a worker keeps between jobs (built models, page-locked weights, GPU copies)
and the jobs it runs on them (``job.run``: check, load, encode, decode, merge, write).

It uses DiffSynth's own model classes, loader (``diffsynth.core.loader.load_model``), state dict
converters and VRAM management; what a model family needs is read from its description
(``i2l_ext.families``) and the catalog.
"""
from __future__ import annotations

import gc
import threading
from typing import Callable

import torch

from .. import catalog
from ..contract import I2LError, JobSpec, T, Text
from . import job as job_steps
from . import lightimport, vram, weights
from .job import ReadingNote
from .memory import Memory
from .models import PINNED_PROFILES, Models

lightimport.install()


def imports_done() -> None:
    """The model code is imported: the readers held back during the imports go, and page-locking;
    the garbage collector is on again."""
    weights.FULL_SPEED.set()
    from .warmstart import resume_gc
    resume_gc()


class Engine:
    def __init__(self, log: Callable[[str, Text], None]):
        self.log = log
        self._lock = threading.RLock()             # a job and a prefetch never load at the same time
        self.models = Models(lambda level, text: self.log(level, text))
        self.memory = Memory(self._lock, lambda level, text: self.log(level, text))

    # ------------------------------------------------------------------ jobs

    def run(self, spec: JobSpec, images: list, progress: Callable[[str, int, int, Text], None]) -> dict:
        """The job; if the GPU runs out of memory, once more with nothing kept on the GPU and the
        text encoder's images one at a time (another program may have taken VRAM meanwhile)."""
        note = ReadingNote(progress)
        try:
            with self._lock:
                for tight in (False, True):
                    try:
                        return job_steps.run(self, spec, images, note, tight=tight)
                    except I2LError:
                        raise
                    except BaseException as e:
                        if not vram.is_oom(e):
                            raise
                        self._drop_after_oom()
                        if tight or vram.device() != "cuda":
                            raise I2LError(I2LError.OUT_OF_MEMORY, T("m_oom"), T("m_oom_fix"),
                                           details=f"{type(e).__name__}: {e}") from None
                        self.log("warning", T("m_oom_retry"))
        finally:
            note.close()

    def prefetch(self, spec: JobSpec) -> None:
        """Start reading a variant's weights (and building its models) before the job arrives."""
        dev = vram.device()
        if dev != "cuda":
            return
        with self._lock:
            job = job_steps.new_job(spec, [], lambda *a: None)
            job.dev = dev
            job_steps.plan_models(self, job)
            if job.profile not in PINNED_PROFILES:
                return
            self.keep_only(job)
            self.memory.read_ahead([path for r in job.model_roles for path in job.plan[r]["paths"]])
            for role in job.model_roles:
                self.models.load(role, job.plan[role], job.profile, job.dtype, dev, self.memory.weight_file)
            self.models.freeze_heap()
        needed = sum(job.plan[r]["bytes"] for r in job.model_roles)
        self.log("info", T("m_reading_ahead", variant=job.variant.label, size=catalog.human_size(needed)))
        from .warmstart import trace
        trace("prefetch: models built on the weights")

    def choose_profile(self, spec: JobSpec, plan: dict, dev: str) -> str:
        needed = sum(p["bytes"] for p in plan.values() if "cls" in p)
        return vram.choose_profile(spec.vram_profile, needed, self.memory.held_bytes(), dev)

    def keep_only(self, job) -> None:
        """Drop cached models and page-locked files this job does not use, or that were loaded
        differently."""
        dropped = self.models.keep_only(set(job.plan), job.plan, job.profile, job.dtype, job.dev,
                                        job.family.bias_role)
        keep = {path for p in job.plan.values() for path in p["paths"]} if (
            job.dev == "cuda" and job.profile in PINNED_PROFILES) else set()
        dropped = self.memory.keep_files(keep) or dropped
        if dropped:
            self.park()                    # kept GPU copies of freed host bytes are stale
            gc.unfreeze()                  # what the dropped models left can be collected again
            gc.collect()
            if job.dev == "cuda":
                torch.cuda.empty_cache()

    def unload(self) -> None:
        """Free every model (VRAM and RAM)."""
        gc.unfreeze()
        self.park()
        self.memory.drop_out_buf()
        self.models.clear()
        self.memory.release_files()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _drop_after_oom(self):
        self.park()
        self.models.offload_disk_models()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the GPU hold, the weights

    @property
    def held_on_gpu(self) -> int:
        """Bytes of weights kept on the GPU since the last job (0 once parked)."""
        return self.memory.held_on_gpu

    @property
    def hold_until(self) -> float:
        return self.memory.hold_until

    def park(self) -> int:
        return self.memory.park()

    def park_if_due(self) -> None:
        self.memory.park_if_due()

    def adopt(self, files) -> None:
        self.memory.adopt(files)

    def read_ahead(self, paths: list[str]) -> None:
        self.memory.read_ahead(paths)

    @staticmethod
    def import_models() -> None:
        """Import the model code ahead of the first job (it takes seconds; the reads go on meanwhile)."""
        try:
            lightimport.import_model_code()
            from .warmstart import trace
            trace("imports: model code ready")
        except Exception:
            pass               # the job itself reports a broken install
        finally:
            imports_done()
