"""One job, as named steps: check the inputs, plan and load the models, encode, decode, merge, write.

The result equals DiffSynth's own Encode and Decode units of the variant's family (one image at a
time, then ``merge_lora(loras, alpha=1/N)``, then ``merge_lora([lora, bias])`` where the family
has a Bias LoRA) within float rounding; here every image goes through each model at once.

Devices and dtypes: on CUDA the models run in bfloat16. On CPU the real models run in bfloat16
(their size in float32 would double the RAM needed) and a marked test set in float32;
``spec.dtype`` ("bfloat16" / "float32") overrides and ``spec.device = "cpu"`` keeps a job off the
GPU. The file is always written in bfloat16.
"""
from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import catalog, families, lora_format, output
from ..contract import I2LError, JobSpec, T, Text
from ..images import crop_and_resize
from . import decoders, encoders, lora_file, streaming, vram
from .rank_cap import cap_rank
from .weights import WeightFile

PHASES = ("load", "encode", "decode", "merge", "write")
ENCODE_SIZE = 1024                      # every i2L encoder sees the image crop-and-resized to this
# The Qwen2.5-VL residual: the image's size for it, the progress line when it is done.
RESIDUAL = {"low": (28 * 8, "m_qwen_lo_done"), "high": (ENCODE_SIZE, "m_qwen_hi_done")}


class ReadingNote:
    """The job's progress, passed through. A first job may start before its weights are all read
    (the worker was woken or started moments before the click): its models are built on the
    buffers and each layer waits for its bytes inside the job's steps. Meanwhile, once a second,
    the step's message is sent again with how much is read, so the tab shows what the job waits
    for while its bar stands still."""

    def __init__(self, progress: Callable[[str, int, int, Text], None], period: float = 1.0):
        self._progress = progress
        self.period = period
        self.last: tuple | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, phase: str, step: int, total: int, message: Text) -> None:
        self.last = (phase, step, total, message)
        self._progress(phase, step, total, message)

    def watch(self, files: list[WeightFile]) -> None:
        if self._thread is not None or all(f.ready for f in files):
            return
        self._thread = threading.Thread(target=self._run, args=(list(files),), daemon=True, name="i2l-reading-note")
        self._thread.start()

    def _run(self, files: list[WeightFile]) -> None:
        total = sum(f.nbytes for f in files)
        while not self._stop.wait(self.period):
            done = sum(f.read_bytes for f in files)
            if done >= total or self.last is None:
                return
            phase, step, n, message = self.last
            self._progress(phase, step, n, T("m_weights_read", what=message, done=f"{done / vram.GiB:.1f}", total=f"{total / vram.GiB:.1f}"))

    def close(self) -> None:
        self._stop.set()


@dataclass
class Job:
    """What the steps share."""
    spec: JobSpec
    images: list
    progress: ReadingNote
    variant: catalog.Variant = None
    family: families.Family = None
    bias: bool = False
    dev: str = "cpu"
    tight: bool = False             # the second try after running out of VRAM: nothing held, small passes
    out_path: str = ""
    plan: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.bfloat16
    profile: str = ""
    model_roles: list = field(default_factory=list)
    decoders: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    _t: float = field(default_factory=time.monotonic)

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.timings[phase] += now - self._t
        self._t = now


def run(engine, spec: JobSpec, images: list, progress: ReadingNote, tight: bool = False) -> dict:
    """The job, start to end (the engine's lock held). ``tight``: keep nothing on the GPU for the
    next job and run the text encoder an image at a time (the retry after running out of VRAM)."""
    job = check_inputs(spec, images, progress)
    job.tight = tight
    plan_models(engine, job)
    load_models(engine, job)
    with torch.no_grad():
        x, residuals = encode(engine, job)
        parts = decode(engine, job, x, residuals)
        lora, energy_kept = merge(engine, job, parts)
    return write(engine, job, lora, energy_kept)


# ----------------------------------------------------------------------------- 1. check the inputs

def check_inputs(spec: JobSpec, images: list, progress: ReadingNote) -> Job:
    if not images:
        raise I2LError(I2LError.BAD_INPUT, T("m_no_images"), T("m_add_one"))
    job = new_job(spec, images, progress)
    catalog.check_key_format(job.variant, spec.key_format)
    job.out_path = spec.output.get("tmp_path") or ""
    if not job.out_path:
        raise I2LError(I2LError.INTERNAL, T("m_no_output"), T("m_report"))
    return job


def new_job(spec: JobSpec, images: list, progress) -> Job:
    variant = catalog.get_variant(spec.variant)
    return Job(spec=spec, images=images, progress=progress, variant=variant, family=variant.family,
               bias=bool(spec.bias) and variant.has_bias, dev="cpu" if spec.device == "cpu" else vram.device())


# ----------------------------------------------------------------------------- 2. which files, which classes

def plan_models(engine, job: Job) -> None:
    roles = job.variant.needed_roles(job.bias)
    job.progress("load", 0, len(roles), T("m_checking_models"))
    job.plan = engine.models.plan(roles, job.spec)
    is_tiny = any(p["tiny"] for p in job.plan.values())
    job.dtype = engine.models.dtype(job.spec, job.dev, is_tiny)
    job.profile = engine.choose_profile(job.spec, job.plan, job.dev)
    job.model_roles = [r for r in roles if "cls" in job.plan[r]]
    job.decoders = [r for r in job.model_roles if r in families.DECODERS]
    if is_tiny:
        job.warnings.append(T("m_tiny"))


# ----------------------------------------------------------------------------- 3. load (or reuse)

def load_models(engine, job: Job) -> None:
    plan, dev = job.plan, job.dev
    if dev == "cpu":
        engine.log("info", T("m_cpu", dtype=str(job.dtype).replace('torch.', '')))
    engine.log("info", T("m_vram_profile", profile=T(f"profile_{job.profile}")))
    engine.keep_only(job)
    engine.memory.copied = 0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n = len(job.model_roles)
    for i, role in enumerate(job.model_roles):
        job.progress("load", i, n + 1, T("m_loading", title=catalog.FILES[role].label))
        engine.models.load(role, plan[role], job.profile, job.dtype, dev, engine.memory.weight_file)
    if "processor" in plan:
        engine.models.load_processor(plan["processor"]["paths"][0])
    if job.bias:
        engine.models.load_bias(plan[job.family.bias_role], dev)
    engine.memory.hold_setup(job.spec, job.profile, dev, None if job.tight else working_bytes(engine, job))
    engine.memory.plan_holds([(engine.models.built[r], passes(job, r)) for r in job.model_roles])
    job.progress("load", n + 1, n + 1, T("m_models_ready"))
    job.progress.watch([engine.memory.files[p] for r in job.model_roles for p in plan[r]["paths"]
                        if p in engine.memory.files])
    from .engine import imports_done
    imports_done()               # the model code is imported by now, whoever imported it
    engine.models.freeze_heap()
    job.lap("load")
    if dev == "cuda":               # the LoRA's page-locked buffer, made while the job computes
        numel = sum(decoders.lora_numel(engine.models.built[d].model, len(job.images)) for d in job.decoders)
        if job.bias and engine.models.bias is not None:
            numel += sum(v.numel() for v in engine.models.bias[1].values())
        engine.memory.grow_out_buf(numel)


SLACK = 1024 ** 3          # beyond the estimate: the allocator's rounding, the LoRA, small buffers


def working_bytes(engine, job: Job) -> int:
    """GPU memory the job needs beside what it keeps for the next job: the largest phase's
    streamed layers in flight (the whole model in the ``gpu`` profile) and its activations for
    the images of one pass (``encoders.WORK_PER_IMAGE``), and some slack."""
    n = len(job.images)
    per_pass = {role: [(role, n)] for role in job.model_roles}
    per_pass["text_encoder"] = [(f"text_encoder@{RESIDUAL[families.DECODERS[d].residual][0]}", min(n, text_chunk(job, d)))
                                for d in job.decoders if families.DECODERS[d].residual]
    worst = 0
    for role in job.model_roles:
        b = engine.models.built[role]
        weights = b.nbytes if b.profile == "gpu" else streaming.ring_bytes(b.model)
        act = max((encoders.WORK_PER_IMAGE.get(key, 0) * k for key, k in per_pass[role]), default=0)
        worst = max(worst, weights + int(act) + encoders.WORK_FIXED)
    return worst + SLACK


def passes(job: Job, role: str) -> int:
    """How many times the job runs a model: the text encoder once per chunk of images for each
    decoder that takes its residual, the others once."""
    if role != "text_encoder":
        return 1
    n = len(job.images)
    return sum(-(-n // text_chunk(job, d)) for d in job.decoders if families.DECODERS[d].residual)


def text_chunk(job: Job, decoder: str) -> int:
    """Images per text-encoder pass for a decoder's residual (one at a time in the retry)."""
    return 1 if job.tight else families.DECODERS[decoder].text_chunk


# ----------------------------------------------------------------------------- 4. encode

def encode(engine, job: Job):
    """The images through SigLIP2 and DINOv3 (the decoders' input) and, for the decoders that take
    one, Qwen2.5-VL (their residual)."""
    built, dtype, dev, images = engine.models.built, job.dtype, job.dev, job.images
    n = len(images)
    residual_decoders = [d for d in job.decoders if families.DECODERS[d].residual]
    steps = 2 + len(residual_decoders)
    job.progress("encode", 0, steps, T("m_encoding", n=n, s='s' * (n != 1)))
    hi = [crop_and_resize(im, ENCODE_SIZE, ENCODE_SIZE) for im in images]
    xs = []
    for step, (role, fn, done) in enumerate((("siglip2", encoders.siglip, "m_siglip_done"),
                                             ("dinov3", encoders.dinov3, "m_dino_done")), 1):
        with engine.memory.stream(built[role]):
            vram.onload(built[role].model)
            xs.append(fn(built[role].model, hi, dtype, dev))
            engine.models.release(role)
        job.progress("encode", step, steps, T(done))
    x = torch.concat(xs, dim=-1)
    residuals = {}
    if residual_decoders:
        te = built["text_encoder"]
        with engine.memory.stream(te):
            vram.onload(te.model)
            for d in residual_decoders:
                spec = families.DECODERS[d]
                size, done = RESIDUAL[spec.residual]
                pics = hi if size == ENCODE_SIZE else [crop_and_resize(im, size, size) for im in images]
                residuals[d] = encoders.qwenvl(te.model, engine.models.processor[1], pics, dtype, dev,
                                               text_chunk(job, d))
                job.progress("encode", 2 + len(residuals), steps, T(done))
        engine.models.release("text_encoder")
    job.lap("encode")
    return x, residuals


# ----------------------------------------------------------------------------- 5. decode

def decode(engine, job: Job, x, residuals) -> list[dict]:
    """Per decoder, every image at once."""
    parts = []
    n = len(job.images)
    for i, d in enumerate(job.decoders):
        job.progress("decode", i, len(job.decoders), T("m_decoding", name=families.DECODERS[d].title))
        b = engine.models.built[d]
        vram.onload(b.model)
        with engine.memory.stream(b, raw_blocks=decoders.can_read_raw(b.model)) as streamer:
            parts.append(decoders.decode(b.model, x, residuals.get(d), n, streamer))
        engine.models.release(d)
    job.progress("decode", len(job.decoders), len(job.decoders), T("m_decoded"))
    job.lap("decode")
    return parts


# ----------------------------------------------------------------------------- 6. merge

def merge(engine, job: Job, parts):
    """One merge over every per-image LoRA, alpha = 1/N (as the Decode units), then the Bias
    LoRA, then the rank cap."""
    job.progress("merge", 0, 1, T("m_merging"))
    lora = decoders.merge(parts, 1 / len(job.images))
    if job.bias:
        lora = decoders.merge_bias(lora, engine.models.bias[1])
    energy_kept = None
    cap = job.spec.max_rank
    if cap:
        before = _rank(lora)
        lora, energy_kept = cap_rank(lora, cap)
        engine.log("info", T("m_rank_capped", cap=cap, before=before, after=_rank(lora),
                             energy=f"{100 * energy_kept:.2f}"))
    job.progress("merge", 1, 1, T("m_merged"))
    job.lap("merge")
    return lora, energy_kept


# ----------------------------------------------------------------------------- 7. write

def write(engine, job: Job, lora: dict, energy_kept) -> dict:
    spec, dev = job.spec, job.dev
    job.progress("write", 0, 1, T("m_writing"))
    cpu = engine.memory.to_host(lora)
    del lora
    state = lora_format.build_state_dict(cpu, spec.key_format,
                                         scalar=lambda r: torch.tensor(float(r), dtype=torch.float32))
    meta = metadata(spec, job.images, job.variant.key, job.bias, spec.key_format, energy_kept)
    folder = os.path.dirname(os.path.abspath(job.out_path))
    try:
        size = lora_file.write(job.out_path, state, meta)     # straight from the host buffer
    except OSError as e:
        need = catalog.human_size(sum(t.numel() * t.element_size() for t in state.values()))
        raise output.write_failed("lora", folder, e, need) from None
    job.lap("write")
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    hold_s = engine.memory.hold_after_job(spec)
    if dev == "cuda":
        torch.cuda.empty_cache()      # the worker now holds its CUDA context and the kept layers only
    held = engine.memory.held_on_gpu
    return {"held_on_gpu": held, "gpu_hold_s": hold_s if held else 0.0,
            "copied_to_gpu": engine.memory.copied,
            "keys": len(state), "rank": _rank(cpu), "bytes": size,
            "timings": {k: round(v, 3) for k, v in job.timings.items()}, "peak_vram": peak,
            "device": f"cuda:{torch.cuda.current_device()}" if dev == "cuda" else "cpu",
            "dtype": str(job.dtype).replace("torch.", ""), "profile": job.profile, "warnings": job.warnings,
            **({"energy_kept": energy_kept} if energy_kept is not None else {})}


def _rank(lora: dict) -> int:
    """The LoRA's rank: the largest among its modules."""
    return lora_format.lora_rank({k: v.shape for k, v in lora.items()})


@functools.lru_cache(maxsize=1)
def _diffsynth_version() -> str | None:
    """The installed diffsynth's version, for the LoRA's metadata (looked up once: the lookup
    walks the interpreter's search path, a few milliseconds of every job)."""
    try:
        from importlib.metadata import version
        return version("diffsynth")
    except Exception:
        return None


def metadata(spec, images, variant, bias, key_format, energy_kept=None) -> dict:
    shas = spec.image_sha256
    if not shas:
        shas = []
        paths = spec.images
        for i, im in enumerate(images):
            p = paths[i] if i < len(paths) else None
            h = hashlib.sha256()
            if p and os.path.isfile(p):
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            else:
                h.update(im.tobytes())
            shas.append(h.hexdigest())
    extra = dict(spec.metadata)
    title = extra.pop("modelspec.title", None) or extra.pop("title", None)
    return lora_format.build_metadata(variant, shas, bias=bias, key_format=key_format, title=title,
                                      diffsynth_version=_diffsynth_version(), max_rank=spec.max_rank,
                                      energy_kept=energy_kept, extra=extra)
