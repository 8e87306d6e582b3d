"""Devices, dtypes and VRAM profiles for the engine.

Profiles:
- ``gpu``: weights kept in page-locked RAM; each model goes to the GPU whole for its phase (the
  fastest compute, the most VRAM) and leaves it afterwards.
- ``cpu_offload``: weights kept in page-locked RAM; each model runs layer by layer, the next
  layer's copy overlapping the current layer's compute (``streaming.Streamer``). Peak VRAM is a
  few GB whatever the model's size.
- ``disk``: weights stay in their safetensors files; DiffSynth's VRAM management reads layers as
  they run (the official low-VRAM example). For machines without the RAM to hold the weights.
- ``auto``: ``cpu_offload`` when the weights fit in available RAM with a margin, else ``disk``.
Between jobs the worker holds only its CUDA context, except for a short hold after a job (``gpu``
and ``cpu_offload``): up to ``gpu_hold_gb`` of the layers it copied stay on the GPU for
``gpu_hold_s`` seconds, so jobs made in a row skip copying them; the WebUI's generation, a
shrinking free VRAM or the end of the hold parks them (the copies in page-locked RAM remain).
On a machine without CUDA every profile is plain CPU.
"""
from __future__ import annotations

import os

import torch

PROFILES = ("auto", "gpu", "cpu_offload", "disk")
GiB = 1024 ** 3
# Room for activations (the text encoder's 1024x1024 pass is the largest) on top of the weights.
WORK_MARGIN = int(3 * GiB)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


LIMIT_BYTES: int | None = None        # the ``vram_limit_gb`` setting, set when the worker starts


def vram_cap() -> int | None:
    """The VRAM this worker may use at most, in bytes (None: the whole card)."""
    return LIMIT_BYTES


def free_vram() -> tuple[int, int] | None:
    """(free, total) bytes of VRAM for this process, within the cap when one is set."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    cap = vram_cap()
    if cap is not None:
        total = min(total, cap)
        free = min(free, max(0, cap - torch.cuda.memory_reserved()))
    return free, total


def choose_profile(requested: str, needed_bytes: int, resident_bytes: int = 0, dev: str | None = None) -> str:
    """The profile to use. ``resident_bytes``: weights this worker already holds on the GPU."""
    requested = (requested or "auto").lower().replace("-", "_")
    if requested not in PROFILES:
        requested = "auto"
    if (dev or device()) == "cpu":
        return "cpu"
    if requested != "auto":
        return requested
    ram = available_ram()
    return "cpu_offload" if ram is None or needed_bytes + RAM_MARGIN <= ram + resident_bytes else "disk"


# Host RAM: measured without torch (the worker reads weights before torch is imported).
from .weights import RAM_MARGIN, available_ram  # noqa: E402,F401


def vram_config(profile: str, dtype: torch.dtype, dev: str) -> dict | None:
    """DiffSynth's per-model vram_config for a profile (None: load plainly onto ``dev``)."""
    if profile == "disk":
        return {"offload_dtype": "disk", "offload_device": "disk", "onload_dtype": "disk", "onload_device": "disk",
                "preparing_dtype": dtype, "preparing_device": dev,
                "computation_dtype": dtype, "computation_device": dev}
    return None


def vram_limit_gb() -> float | None:
    """DiffSynth's ``vram_limit``: layers stay on the GPU while used VRAM (all processes) is under it."""
    fv = free_vram()
    if fv is None:
        return None
    return max(1.0, (fv[1] - WORK_MARGIN) / GiB)


def onload(model) -> None:
    """What DiffSynth's ``load_models_to_device`` does for one managed model."""
    if getattr(model, "vram_management_enabled", False):
        if hasattr(model, "onload"):
            model.onload()
        else:
            for m in model.modules():
                if hasattr(m, "onload"):
                    m.onload()


def offload(model) -> None:
    if getattr(model, "vram_management_enabled", False):
        if hasattr(model, "offload"):
            model.offload()
        else:
            for m in model.modules():
                if hasattr(m, "offload"):
                    m.offload()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and "CUDA" in str(exc)
