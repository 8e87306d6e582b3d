"""Devices, dtypes and VRAM profiles for the engine.

Profiles:
- ``gpu``: every model resident on the GPU, kept between jobs.
- ``cpu_offload``: weights in RAM; DiffSynth's VRAM management moves each layer to the GPU when it
  runs (and keeps it there while VRAM allows); a model is sent back to RAM after its phase.
- ``disk``: weights stay in their safetensors files; layers are read as they run and dropped after
  the model's phase (the official low-VRAM example).
- ``auto``: ``gpu`` when all models plus a working margin fit in free VRAM, else ``disk``
  (measured faster than ``cpu_offload`` on an H100, see FACTS.md).
On a machine without CUDA every profile is plain CPU.
"""
from __future__ import annotations

import torch

PROFILES = ("auto", "gpu", "cpu_offload", "disk")
GiB = 1024 ** 3
# Room for activations (the text encoder's 1024x1024 pass is the largest) on top of the weights.
WORK_MARGIN = int(3 * GiB)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def free_vram() -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()


def choose_profile(requested: str, needed_bytes: int, resident_bytes: int = 0, dev: str | None = None) -> str:
    """The profile to use. ``resident_bytes``: weights this worker already holds on the GPU."""
    requested = (requested or "auto").lower().replace("-", "_")
    if requested not in PROFILES:
        requested = "auto"
    if (dev or device()) == "cpu":
        return "cpu"
    if requested != "auto":
        return requested
    free, _total = free_vram()
    return "gpu" if needed_bytes + WORK_MARGIN <= free + resident_bytes else "disk"


def vram_config(profile: str, dtype: torch.dtype, dev: str) -> dict | None:
    """DiffSynth's per-model vram_config for a profile (None: load plainly onto ``dev``)."""
    if profile == "cpu_offload":
        return {"offload_dtype": dtype, "offload_device": "cpu", "onload_dtype": dtype, "onload_device": "cpu",
                "preparing_dtype": dtype, "preparing_device": dev,
                "computation_dtype": dtype, "computation_device": dev}
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
