"""Where a job's weights and its LoRA live between the disk and the GPU.

- ``Memory.files``: model files read into page-locked RAM (``weights.WeightFile``), read ahead in
  the order the job needs them and page-locked in the background; the models are built on them.
- The GPU hold: after a job, what VRAM allows of its streamed layers stays on the GPU
  (``streaming.GpuMirror``) for ``gpu_hold_s`` seconds, so a burst of jobs skips most copying;
  ``park`` drops it.
- The LoRA's way back: one device-to-host copy into a page-locked buffer kept for the next jobs.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import torch

from ..contract import I2LError, T
from . import vram, weights
from .models import PINNED_PROFILES
from .streaming import GpuMirror, Streamer, plan_holds
from .weights import WeightFile


class Memory:
    def __init__(self, lock: threading.RLock, log):
        self._lock = lock                   # the engine's: a job and a prefetch never load at once
        self.log = log
        self.files: dict[str, WeightFile] = {}     # path -> weights read into page-locked RAM
        self.mirror: GpuMirror | None = None       # layers kept on the GPU for the next job of a burst
        self.hold_until = 0.0                      # monotonic time the kept layers are parked at
        self.copied = 0                            # bytes copied host -> GPU by the last job's streams
        self._out_buf = None                       # page-locked buffer the LoRA is copied into
        self._out_buf_growing = False

    # ------------------------------------------------------------------ page-locked files

    def weight_file(self, path: str) -> WeightFile:
        """The page-locked copy of a file (created on first use; read in order by ``read_ahead``,
        or at once when a model needs it first)."""
        wf = self.files.get(path)
        if wf is None:
            try:
                wf = WeightFile(path, pin=True)
            except ValueError as e:
                raise I2LError(I2LError.WEIGHTS_INVALID, T("m_not_safetensors_error", path=path, error=e),
                               T("m_delete_redownload")) from None
            self.files[path] = wf
            if vram.device() == "cuda":
                self._pin_later([wf])
        return wf

    def held_bytes(self) -> int:
        return sum(f.nbytes for f in self.files.values())

    def keep_files(self, keep: set) -> bool:
        """Release the files not in ``keep``; True when any went."""
        dropped = False
        for path in [p for p in self.files if p not in keep]:
            self.files.pop(path).release()
            dropped = True
        return dropped

    def release_files(self) -> None:
        for wf in self.files.values():
            wf.release()
        self.files.clear()

    def adopt(self, files: list[WeightFile]) -> None:
        """Files whose reading began before torch was imported (``warmstart``): kept and
        page-locked in place when there is a GPU, dropped otherwise."""
        if not files:
            return
        if vram.device() != "cuda":
            for wf in files:
                wf.release()
            return
        with self._lock:
            for wf in files:
                self.files.setdefault(wf.path, wf)
        self._pin_later(files)

    @staticmethod
    def _pin_later(files: list[WeightFile]) -> None:
        """Page-lock each file in the background once it is read (locking memory not yet
        written would fill it page by page first) and, at a cold start, once the model code is
        imported: locking gigabytes holds the process's memory map, which the imports need too.
        Copies from plain RAM work meanwhile, only slower."""
        def run():
            from .warmstart import trace
            weights.FULL_SPEED.wait(300)
            for wf in files:
                try:
                    wf.wait()
                    ok = wf.pin_memory()
                    trace(f"pinned {os.path.basename(wf.path)}: {ok}")
                except Exception:
                    pass
        threading.Thread(target=run, daemon=True, name="i2l-pin").start()

    def wait_tensor(self, t) -> None:
        for wf in self.files.values():
            if wf.contains(t):
                wf.wait_for(t)
                return

    def read_ahead(self, paths: list[str]) -> None:
        """Start reading files into page-locked RAM, one after the other in the order given, when
        there is a GPU to feed and the RAM to hold them."""
        if vram.device() != "cuda":
            return
        total = sum(os.path.getsize(p) for p in paths if p not in self.files)
        ram = vram.available_ram()
        if ram is not None and total + vram.RAM_MARGIN > ram:
            self.log("info", T("m_ram_short"))
            return
        with self._lock:
            files = []
            for p in paths:
                try:
                    files.append(self.weight_file(p))
                except I2LError:
                    continue            # the job reports it
        threading.Thread(target=self._read_in_order, args=(files,), daemon=True, name="i2l-read-ahead").start()

    @staticmethod
    def _read_in_order(files) -> None:
        for wf in files:
            try:
                wf.start()
                wf.wait()
            except BaseException:
                return

    # ------------------------------------------------------------------ streaming and the hold

    @contextmanager
    def stream(self, built, raw_blocks: bool = False):
        """Around a model's phase: to the GPU whole (gpu) or layer by layer (cpu_offload), and back.
        ``raw_blocks``: the caller reads each layer's GPU bytes itself (``Streamer.span``)."""
        if built is None or built.dev != "cuda" or built.profile not in PINNED_PROFILES:
            yield None
            return
        s = Streamer(built.model, "cuda", wait=self.wait_tensor, layered=built.profile == "cpu_offload",
                     mirror=self.mirror, point=not raw_blocks)
        try:
            with s:
                yield s if s.layers else None
        finally:
            self.copied += s.bytes_copied

    @property
    def held_on_gpu(self) -> int:
        """Bytes of weights kept on the GPU since the last job (0 once parked)."""
        m = self.mirror
        return m.nbytes if m is not None else 0

    def park(self) -> int:
        """Drop the weights kept on the GPU (they stay in page-locked RAM); returns the bytes freed.
        Never while a job runs: the caller holds no job, or waits for it through the lock (not
        when nothing is kept: then it answers at once, even while models are being loaded)."""
        if self.mirror is None:
            return 0
        with self._lock:
            m, self.mirror = self.mirror, None
            self.hold_until = 0.0
            if m is None:
                return 0
            freed = m.nbytes
            torch.cuda.synchronize()        # the copies were made on other streams: all done first
            m.clear()                       # freed now, even if a finished stream still refers to m
            torch.cuda.empty_cache()
            return freed

    def park_if_due(self) -> None:
        """Park when the hold time after the last job has passed (and no later job extended it)."""
        with self._lock:
            if self.mirror is not None and time.monotonic() >= self.hold_until:
                self.park()

    def hold_setup(self, spec, profile, dev, work: int | None) -> None:
        """Decide how much of this job's weights may stay on the GPU for the next job:
        ``gpu_hold_s`` seconds after it, at most ``gpu_hold_gb`` and what free VRAM allows
        beside the job's working memory ``work`` (bytes; None: keep nothing)."""
        hold_s = float(spec.gpu_hold_s or 0)
        budget = float(spec.gpu_hold_gb or 0) * vram.GiB
        if dev != "cuda" or profile not in PINNED_PROFILES or hold_s <= 0 or budget <= 0 or work is None:
            self.park()
            return
        held = self.held_on_gpu
        fv = vram.free_vram()
        room = (fv[0] if fv else 0) + held - work
        limit = int(max(0, min(budget, room)))
        if self.mirror is not None and limit < held:
            self.park()                     # less room than before (another program took VRAM)
        if limit <= 0:
            return
        if self.mirror is None:
            self.mirror = GpuMirror("cuda", limit)
        self.mirror.limit = limit

    def plan_holds(self, models: list) -> None:
        """Which of the job's weights the kept copies are made of (``streaming.plan_holds``):
        ``models`` are (built model, its passes in the job)."""
        if self.mirror is None:
            return
        entries = [(b.model, b.profile == "cpu_offload", passes) for b, passes in models
                   if b.dev == "cuda" and b.profile in PINNED_PROFILES]
        self.mirror.plan(plan_holds(entries, self.mirror.limit))

    def hold_after_job(self, spec) -> float:
        hold_s = float(spec.gpu_hold_s or 0)
        self.hold_until = time.monotonic() + hold_s
        return hold_s

    # ------------------------------------------------------------------ the LoRA's way back

    def to_host(self, lora: dict) -> dict:
        """Every tensor to host memory in bf16 with one device-to-host copy, into a page-locked
        buffer kept for the next jobs (made in the background when the job starts: page-locking
        one costs more than the copy). If it is not there in time, the copy goes to plain memory."""
        keys = list(lora)
        vals = [lora[k].detach() for k in keys]
        if vals and vals[0].is_cuda:
            flat = torch.cat([v.reshape(-1).to(torch.bfloat16) for v in vals])
            buf = self._out_buf
            if buf is not None and buf.numel() >= flat.numel():
                host = buf[:flat.numel()]
                host.copy_(flat)
            else:
                host = flat.cpu()
                self.grow_out_buf(flat.numel())
            del flat
            out, off = {}, 0
            for k, v in zip(keys, vals):
                n = v.numel()
                out[k] = host[off:off + n].view(v.shape)
                off += n
            return out
        return {k: v.to("cpu", torch.bfloat16).contiguous() for k, v in zip(keys, vals)}

    def grow_out_buf(self, n: int) -> None:
        """A page-locked output buffer of ``n`` elements for this and the next jobs, made in a thread."""
        if self._out_buf_growing or not n or (self._out_buf is not None and self._out_buf.numel() >= n):
            return
        self._out_buf_growing = True

        def run():
            try:
                buf = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
                if self._out_buf is None or self._out_buf.numel() < n:
                    self._out_buf = buf
            except Exception:       # no page-locked memory to spare: plain memory works too
                pass
            finally:
                self._out_buf_growing = False
        threading.Thread(target=run, daemon=True, name="i2l-out-buf").start()

    def drop_out_buf(self) -> None:
        self._out_buf = None
