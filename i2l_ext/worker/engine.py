"""The engine: load the models, encode the images, decode LoRAs, merge, add Bias, write the file.

It uses DiffSynth's own model classes, loader (``diffsynth.core.loader.load_model``), state dict
converters and VRAM management, and computes what DiffSynth's ``QwenImageUnit_Image2LoRAEncode``
+ ``QwenImageUnit_Image2LoRADecode`` compute, with all images batched through each model at once
(the units run them one at a time). The result equals DiffSynth's per-image units followed by
``merge_lora(loras, alpha=1/N)`` (and ``merge_lora([lora, bias])`` for Bias) within float rounding.

Devices and dtypes: on CUDA the models run in bfloat16. On CPU the real models run in bfloat16 (their
size in float32 would double the RAM needed) and the tiny test set in float32; ``spec.dtype``
("bfloat16" / "float32") overrides and ``spec.device = "cpu"`` keeps a job off the GPU.
The file is always written in bfloat16.
"""
from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch

from .. import catalog, lora_format, output, safetensors_header
from ..contract import I2LError, JobSpec, T, Text, raw
from ..images import crop_and_resize
from . import lightimport, lora_file, tiny, vram, weights
from .rank_cap import cap_rank
from .streaming import GpuMirror, Streamer, plan_holds
from .weights import WeightFile

lightimport.install()

PHASES = ("load", "encode", "decode", "merge", "write")

# role -> diffsynth's model name in configs/model_configs.py
DS_NAMES = {
    "siglip2": "siglip2_image_encoder",
    "dinov3": "dinov3_image_encoder",
    "text_encoder": "qwen_image_text_encoder",
    "style": "qwen_image_image2lora_style",
    "coarse": "qwen_image_image2lora_coarse",
    "fine": "qwen_image_image2lora_fine",
}
LOAD_ORDER = ("siglip2", "dinov3", "text_encoder", "style", "coarse", "fine")
# The Qwen2.5-VL pass of the Coarse / Fine residual runs in chunks of this many images.
TEXT_ENCODER_CHUNK = {"coarse": 16, "fine": 4}


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


def _import(dotted: str):
    import importlib
    mod, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(mod), name)


@contextmanager
def _no_random_init():
    """While a model whose every parameter comes from its file is made: the layers' and
    transformers' random initialisation skipped (about a second of CPU for the big models; the
    parameters it would fill are replaced by the file's right after). Buffers computed in the
    constructors (position tables) are made as usual."""
    nn = torch.nn
    patched = [(c, "reset_parameters") for c in (nn.Linear, nn.LayerNorm, nn.Embedding,
                                                 nn.modules.conv._ConvNd)]
    pm = sys.modules.get("transformers.modeling_utils")
    if pm is not None and hasattr(pm, "PreTrainedModel"):
        patched.append((pm.PreTrainedModel, "init_weights"))
    saved = [(c, name, c.__dict__[name]) for c, name in patched if name in c.__dict__]
    for c, name, _ in saved:
        setattr(c, name, lambda self, *a, **k: None)
    try:
        yield
    finally:
        for c, name, fn in saved:
            setattr(c, name, fn)


def build_model(cls, config: dict, state_dict: dict, converter, dtype, device: str):
    """A model on its weights, as diffsynth's ``load_model`` builds one without VRAM management:
    made without initialising its parameters, the (converted) state dict assigned, then moved."""
    from diffsynth.core.vram.initialization import skip_model_initialization
    with skip_model_initialization(), _no_random_init():
        model = cls(**(config or {}))
    sd = converter(state_dict) if converter is not None else dict(state_dict)
    assign_state_dict(model, sd)
    dev = torch.device(device)
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.device.type != dev.type or (t.is_floating_point() and t.dtype != dtype) for t in tensors):
        model = model.to(dtype=dtype, device=device)        # (a walk over every module: only if needed)
    return model.eval()


def assign_state_dict(model, sd: dict) -> None:
    """``model.load_state_dict(sd, assign=True)`` (strict), in one pass over the keys: torch's
    walks every module and filters the whole dict for each (a second for the 5,500 modules of a
    decoder). Models with loading hooks or their own loading code go through torch's."""
    base = torch.nn.Module._load_from_state_dict
    mods = dict(model.named_modules())
    if any(type(m)._load_from_state_dict is not base or m._load_state_dict_pre_hooks
           or m._load_state_dict_post_hooks for m in mods.values()):
        model.load_state_dict(sd, assign=True)
        return
    slots = {}
    for prefix, m in mods.items():
        for name, p in m._parameters.items():
            if p is not None:
                slots[f"{prefix}.{name}" if prefix else name] = (m, name, p, True)
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                slots[f"{prefix}.{name}" if prefix else name] = (m, name, b, False)
    missing = [k for k in slots if k not in sd]
    unexpected = [k for k in sd if k not in slots]
    wrong = [k for k, (m, name, old, _) in slots.items() if k in sd and tuple(sd[k].shape) != tuple(old.shape)]
    if missing or unexpected or wrong:
        raise RuntimeError(f"the weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                           f"wrong shape {wrong[:3]}")
    for k, (m, name, old, is_param) in slots.items():
        t = sd[k]
        if is_param:
            m._parameters[name] = torch.nn.Parameter(t, requires_grad=old.requires_grad)
        else:
            m._buffers[name] = t


def real_model_config(role: str) -> dict:
    from diffsynth.configs.model_configs import MODEL_CONFIGS
    for cfg in MODEL_CONFIGS:
        if cfg["model_name"] == DS_NAMES[role]:
            return cfg
    raise I2LError(I2LError.ENVIRONMENT, T("m_no_model_class", name=DS_NAMES[role]),
                   T("m_reinstall"))


# ----------------------------------------------------------------------------- file checks

def read_safetensors_header(path: str, title: str = "model") -> dict:
    """Tensor names -> shapes of a model file, checking that it is a whole safetensors file."""
    if not os.path.exists(path):
        raise I2LError(I2LError.WEIGHTS_MISSING, T("m_file_missing", title=title, path=path),
                       T("m_redownload_panel"))
    bad = I2LError(I2LError.WEIGHTS_INVALID, T("m_not_safetensors_title", path=path, title=title),
                   T("m_delete_redownload"))
    if not path.endswith(".safetensors"):
        raise bad
    try:
        return safetensors_header.read(path).shapes()
    except safetensors_header.NotSafetensors as e:
        if e.truncated:
            raise I2LError(I2LError.WEIGHTS_INVALID, T("m_cut_short", path=path, title=title),
                           T("m_delete_redownload")) from None
        raise bad from None
    except OSError:
        raise bad from None


def keys_hash(shapes: dict) -> str:
    return tiny.keys_hash(shapes)


def models_dir_of(role: str, path: str) -> str:
    """The models folder a file of ``role`` sits in, given the catalog's layout."""
    entry = catalog.FILES[role]
    depth = len(entry.repo.split("/")) + len(entry.pattern.rstrip("/").split("/"))
    d = os.path.abspath(path)
    for _ in range(depth):
        d = os.path.dirname(d)
    return d


def _bias_problem(shapes: dict, num_blocks: int) -> str | None:
    """Why a Bias LoRA does not fit the decoders' key set (None when it does)."""
    want = set()
    for i in range(num_blocks):
        for m in lora_format.QWEN_I2L_MODULES:
            want.add(f"transformer_blocks.{i}.{m}")
    got = {}
    for k, s in shapes.items():
        try:
            path, ab = lora_format.split_key(k)
        except ValueError:
            return f"unexpected tensor {k}"
        got.setdefault(path, {})[ab] = s
    if set(got) != want:
        return f"{len(got)} modules where {len(want)} were expected"
    for path, ab in got.items():
        mod = path.split(".", 2)[2]
        fan_in, fan_out = lora_format.BLOCK_LINEARS[mod]
        if set(ab) != {"A", "B"} or len(ab["A"]) != 2 or len(ab["B"]) != 2:
            return f"{path} lacks a matrix"
        if ab["A"][1] != fan_in or ab["B"][0] != fan_out or ab["A"][0] != ab["B"][1]:
            return f"{path} has shapes {ab['A']} / {ab['B']}"
    return None


class _Model:
    def __init__(self, role, key, model, profile, nbytes, dev="cpu"):
        self.role, self.key, self.model, self.profile, self.nbytes = role, key, model, profile, nbytes
        self.dev = dev


PINNED_PROFILES = ("gpu", "cpu_offload")
DECODERS = ("style", "coarse", "fine")


def imports_done() -> None:
    """The model code is imported: the readers held back during the imports go, and page-locking;
    the garbage collector is on again."""
    weights.FULL_SPEED.set()
    from .warmstart import resume_gc
    resume_gc()


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


class Engine:
    def __init__(self, log: Callable[[str, Text], None]):
        self.log = log
        self._models: dict[str, _Model] = {}
        self._processor = None      # (folder, processor)
        self._bias = None           # (key, state dict)
        self._checked: dict = {}    # file key -> (hash, shapes) of headers already read
        self._files: dict[str, WeightFile] = {}   # path -> weights read into page-locked RAM
        self._lock = threading.RLock()             # a job and a prefetch never load at the same time
        self._mirror: GpuMirror | None = None       # layers kept on the GPU for the next job of a burst
        self.hold_until = 0.0                       # monotonic time the kept layers are parked at
        self.copied = 0                             # bytes copied host -> GPU by the last job's streams
        self._out_buf = None                        # page-locked buffer the LoRA is copied into
        self._out_buf_growing = False
        self._built = False                         # models built since the heap was last frozen

    # ------------------------------------------------------------------ public

    def run(self, spec: JobSpec, images: list, progress: Callable[[str, int, int, Text], None]) -> dict:
        note = ReadingNote(progress)
        try:
            with self._lock:
                return self._run(spec, images, note)
        except I2LError:
            raise
        except BaseException as e:
            if vram.is_oom(e):
                self._drop_after_oom()
                raise I2LError(I2LError.OUT_OF_MEMORY, T("m_oom"), T("m_oom_fix"),
                               details=f"{type(e).__name__}: {e}") from None
            raise
        finally:
            note.close()

    def unload(self) -> None:
        """Free every model (VRAM and RAM)."""
        gc.unfreeze()
        self.park()
        self._out_buf = None
        self._models.clear()
        self._processor = None
        self._bias = None
        for wf in self._files.values():
            wf.release()
        self._files.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def held_on_gpu(self) -> int:
        """Bytes of weights kept on the GPU since the last job (0 once parked)."""
        m = self._mirror
        return m.nbytes if m is not None else 0

    def park(self) -> int:
        """Drop the weights kept on the GPU (they stay in page-locked RAM); returns the bytes freed.
        Never while a job runs: the caller holds no job, or waits for it through the lock (not
        when nothing is kept: then it answers at once, even while models are being loaded)."""
        if self._mirror is None:
            return 0
        with self._lock:
            m, self._mirror = self._mirror, None
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
            if self._mirror is not None and time.monotonic() >= self.hold_until:
                self.park()

    def _hold_setup(self, spec, profile, dev) -> None:
        """Decide how much of this job's weights may stay on the GPU for the next job:
        ``gpu_hold_s`` seconds after it, at most ``gpu_hold_gb`` and what free VRAM allows
        beside the job's working memory."""
        hold_s = float(spec.gpu_hold_s or 0)
        budget = float(spec.gpu_hold_gb or 0) * vram.GiB
        if dev != "cuda" or profile not in PINNED_PROFILES or hold_s <= 0 or budget <= 0:
            self.park()
            return
        held = self.held_on_gpu
        fv = vram.free_vram()
        room = (fv[0] if fv else 0) + held - vram.WORK_MARGIN
        limit = int(max(0, min(budget, room)))
        if self._mirror is not None and limit < held:
            self.park()                     # less room than before (another program took VRAM)
        if limit <= 0:
            return
        if self._mirror is None:
            self._mirror = GpuMirror("cuda", limit)
        self._mirror.limit = limit

    def _plan_holds(self, roles, n_images: int) -> None:
        """Which of the job's weights the kept copies are made of (``streaming.plan_holds``); the
        text encoder runs once per chunk of images for each of Coarse and Fine."""
        if self._mirror is None:
            return
        te_passes = sum(-(-n_images // TEXT_ENCODER_CHUNK[d]) for d in ("coarse", "fine") if d in roles)
        models = []
        for r in roles:
            m = self._models.get(r)
            if m is not None and m.dev == "cuda" and m.profile in PINNED_PROFILES:
                models.append((m.model, m.profile == "cpu_offload", te_passes if r == "text_encoder" else 1))
        self._mirror.plan(plan_holds(models, self._mirror.limit))

    # ------------------------------------------------------------------ job

    def _run(self, spec, images, progress: ReadingNote) -> dict:
        timings = {p: 0.0 for p in PHASES}
        warnings: list[str] = []
        t_phase = time.monotonic()

        def lap(phase):
            nonlocal t_phase
            now = time.monotonic()
            timings[phase] += now - t_phase
            t_phase = now

        if not images:
            raise I2LError(I2LError.BAD_INPUT, T("m_no_images"), T("m_add_one"))
        variant = catalog.get_variant(spec.variant)
        bias = bool(spec.bias)
        key_format = spec.key_format
        if key_format not in lora_format.FORMATS:
            raise I2LError(I2LError.BAD_INPUT, T("m_unknown_key_format", value=key_format),
                           T("m_key_format_fix"))
        out_path = spec.output.get("tmp_path")
        if not out_path:
            raise I2LError(I2LError.INTERNAL, T("m_no_output"), T("m_report"))
        roles = variant.needed_roles(bias)
        dev = "cpu" if spec.device == "cpu" else vram.device()

        # --- which files, which classes
        progress("load", 0, len(roles), T("m_checking_models"))
        plan = self._plan(roles, spec)
        is_tiny = any(p["tiny"] for p in plan.values())
        dtype = self._dtype(spec, dev, is_tiny)
        needed = sum(p["bytes"] for r, p in plan.items() if r not in ("processor", "bias"))
        held = sum(f.nbytes for f in self._files.values())     # already in RAM: needs no more
        profile = vram.choose_profile(spec.vram_profile, needed, held, dev)
        if is_tiny:
            warnings.append(T("m_tiny"))
        if dev == "cpu":
            self.log("info", T("m_cpu", dtype=str(dtype).replace('torch.', '')))
        self.log("info", T("m_vram_profile", profile=T(f"profile_{profile}")))

        # --- load (or reuse)
        self._keep_only(set(roles), plan, profile, dtype, dev)
        self._hold_setup(spec, profile, dev)
        self.copied = 0
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model_roles = [r for r in LOAD_ORDER if r in plan]
        for i, role in enumerate(model_roles):
            progress("load", i, len(model_roles) + 1, T("m_loading", title=catalog.FILES[role].label))
            self._load(role, plan[role], profile, dtype, dev)
        if "processor" in plan:
            self._load_processor(plan["processor"]["paths"][0])
        if bias:
            self._load_bias(plan["bias"], dev)
        self._plan_holds(model_roles, len(images))
        progress("load", len(model_roles) + 1, len(model_roles) + 1, T("m_models_ready"))
        progress.watch([self._files[p] for r in model_roles for p in plan[r]["paths"] if p in self._files])
        imports_done()               # the model code is imported by now, whoever imported it
        self._freeze_heap()
        lap("load")

        decoders = [d for d in ("style", "coarse", "fine") if d in plan]
        if dev == "cuda":               # the LoRA's page-locked buffer, made while the job computes
            self._grow_out_buf(self._lora_numel(decoders, len(images), bias))

        with torch.no_grad():
            # --- encode
            n = len(images)
            steps = 2 + ("coarse" in plan) + ("fine" in plan)
            progress("encode", 0, steps, T("m_encoding", n=n, s='s' * (n != 1)))
            hi = [crop_and_resize(im, 1024, 1024) for im in images]
            with self._stream("siglip2"):
                x_sig = self._encode_siglip(hi, dtype, dev)
            progress("encode", 1, steps, T("m_siglip_done"))
            with self._stream("dinov3"):
                x_dino = self._encode_dino(hi, dtype, dev)
            progress("encode", 2, steps, T("m_dino_done"))
            x = torch.concat([x_sig, x_dino], dim=-1)
            residual = {}
            step = 2
            with self._stream("text_encoder") if "text_encoder" in plan else nullcontext():
                if "coarse" in plan:
                    lo = [crop_and_resize(im, 28 * 8, 28 * 8) for im in images]
                    residual["coarse"] = self._encode_qwenvl(lo, dtype, dev, TEXT_ENCODER_CHUNK["coarse"])
                    step += 1
                    progress("encode", step, steps, T("m_qwen_lo_done"))
                if "fine" in plan:
                    residual["fine"] = self._encode_qwenvl(hi, dtype, dev, TEXT_ENCODER_CHUNK["fine"])
                    step += 1
                    progress("encode", step, steps, T("m_qwen_hi_done"))
            if "text_encoder" in self._models:
                self._release("text_encoder")
            lap("encode")

            # --- decode: per decoder, every image at once
            parts: list[dict] = []
            for i, d in enumerate(decoders):
                progress("decode", i, len(decoders), T("m_decoding", name=d.title()))
                m = self._models[d].model
                vram.onload(m)
                with self._stream(d) as streamer:
                    parts.append(self._decode(m, x, residual.get(d), n, streamer))
                self._release(d)
            progress("decode", len(decoders), len(decoders), T("m_decoded"))
            lap("decode")

            # --- merge: one merge over every per-image LoRA, alpha = 1/N (as the Decode unit), then Bias,
            # then the rank cap
            progress("merge", 0, 1, T("m_merging"))
            lora = self._merge(parts, 1 / n)
            if bias:
                lora = self._merge_bias(lora)
            energy_kept = None
            if spec.max_rank:
                before = _rank(lora)
                lora, energy_kept = cap_rank(lora, spec.max_rank)
                self.log("info", T("m_rank_capped", cap=spec.max_rank, before=before, after=_rank(lora),
                                   energy=f"{100 * energy_kept:.2f}"))
            progress("merge", 1, 1, T("m_merged"))
            lap("merge")

        # --- write
        progress("write", 0, 1, T("m_writing"))
        cpu = self._to_host(lora)
        del lora
        state = lora_format.build_state_dict(cpu, key_format,
                                             scalar=lambda r: torch.tensor(float(r), dtype=torch.float32))
        meta = self._metadata(spec, images, variant.key, bias, key_format, energy_kept)
        folder = os.path.dirname(os.path.abspath(out_path))
        try:
            size = lora_file.write(out_path, state, meta)     # straight from the host buffer
        except OSError as e:
            need = catalog.human_size(sum(t.numel() * t.element_size() for t in state.values()))
            raise output.write_failed("lora", folder, e, need) from None
        lap("write")
        peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
        hold_s = float(spec.gpu_hold_s or 0)
        self.hold_until = time.monotonic() + hold_s
        if dev == "cuda":
            torch.cuda.empty_cache()      # the worker now holds its CUDA context and the kept layers only
        return {"held_on_gpu": self.held_on_gpu, "gpu_hold_s": hold_s if self.held_on_gpu else 0.0,
                "copied_to_gpu": self.copied,
                "keys": len(state), "rank": _rank(cpu), "bytes": size,
                "timings": {k: round(v, 3) for k, v in timings.items()}, "peak_vram": peak,
                "device": f"cuda:{torch.cuda.current_device()}" if dev == "cuda" else "cpu",
                "dtype": str(dtype).replace("torch.", ""), "profile": profile, "warnings": warnings,
                **({"energy_kept": energy_kept} if energy_kept is not None else {})}

    # ------------------------------------------------------------------ planning

    def _dtype(self, spec, dev, is_tiny):
        want = spec.dtype or ""
        if want in ("bfloat16", "bf16"):
            return torch.bfloat16
        if want in ("float32", "fp32"):
            return torch.float32
        if dev == "cpu" and is_tiny:
            return torch.float32
        return torch.bfloat16

    def _plan(self, roles, spec) -> dict:
        files = spec.files
        models_dir = spec.models_dir
        plan = {}
        marker_cache: dict[str, dict | None] = {}

        def marker_for(role, paths):
            d = models_dir_of(role, paths[0])
            if d not in marker_cache:
                marker_cache[d] = tiny.read_marker(d)
            return marker_cache[d]

        for role in roles:
            entry = catalog.FILES[role]
            paths = files.get(role)
            if isinstance(paths, str):
                paths = [paths]
            if not paths and models_dir:
                paths = entry.resolve(models_dir)
            if not paths:
                where = entry.local_path(models_dir) if models_dir else f"{entry.repo}/{entry.pattern}"
                raise I2LError(I2LError.WEIGHTS_MISSING, T("m_missing_looked", title=entry.label, path=where),
                               T("m_download_variant_panel"))
            paths = [os.path.abspath(p) for p in paths]
            if role == "processor":
                d = paths[0]
                if not os.path.isdir(d) or not any(os.path.exists(os.path.join(d, f)) for f in
                                                   ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
                    raise I2LError(I2LError.WEIGHTS_MISSING, T("m_missing_incomplete", title=entry.label, path=d),
                                   T("m_redownload_variant"))
                plan[role] = {"paths": [d], "tiny": False, "bytes": 0}
                continue
            for p in paths:
                if not os.path.isfile(p):
                    raise I2LError(I2LError.WEIGHTS_MISSING, T("m_file_missing", title=entry.label, path=p),
                                   T("m_redownload_variant"))
            key = tuple((p, os.path.getsize(p), os.path.getmtime(p)) for p in paths)
            if key in self._checked:         # same files as an earlier job: skip re-reading headers
                h, shapes = self._checked[key]
            else:
                shapes = {}
                for p in paths:
                    shapes.update(read_safetensors_header(p, entry.label))
                h = keys_hash(shapes)
            marker = marker_for(role, paths)
            nbytes = sum(os.path.getsize(p) for p in paths)
            if role == "bias":
                if marker and marker.get("hashes", {}).get("bias") == h:
                    plan[role] = {"paths": paths, "tiny": True, "bytes": nbytes, "key": key}
                    continue
                problem = _bias_problem(shapes, lora_format.NUM_DIT_BLOCKS)
                if problem:
                    raise I2LError(I2LError.WEIGHTS_INVALID, T("m_not_weights_problem", path=paths[0], title=entry.label, problem=problem),
                                   T("m_delete_redownload"))
                plan[role] = {"paths": paths, "tiny": False, "bytes": nbytes, "key": key}
                self._checked[key] = (h, shapes)
                continue
            real = real_model_config(role)
            self._checked[key] = (h, shapes)
            if h == real["model_hash"]:
                plan[role] = {"paths": paths, "tiny": False, "bytes": nbytes, "key": key,
                              "cls": _import(real["model_class"]), "config": dict(real.get("extra_kwargs") or {}),
                              "converter": _import(real["state_dict_converter"]) if "state_dict_converter" in real else None,
                              "module_map_name": real["model_class"]}
            elif marker and marker.get("hashes", {}).get(role) == h:
                plan[role] = {"paths": paths, "tiny": True, "bytes": nbytes, "key": key,
                              "cls": tiny.tiny_class(role), "config": dict(marker["configs"][role]),
                              "converter": _import(real["state_dict_converter"]) if "state_dict_converter" in real else None,
                              "module_map_name": real["model_class"]}
            else:
                self._checked.pop(key, None)
                names = ", ".join(os.path.basename(p) for p in paths)
                raise I2LError(I2LError.WEIGHTS_INVALID,
                               T("m_not_weights_hash", path=paths[0] if len(paths) == 1 else names, title=entry.label, hash=h),
                               T("m_right_folder"))
        return plan

    # ------------------------------------------------------------------ loading

    def _keep_only(self, roles, plan, profile, dtype, dev):
        """Drop cached models this job does not use, or that were loaded differently."""
        before = len(self._models)
        for role in list(self._models):
            m = self._models[role]
            if role not in roles or m.key != self._cache_key(role, plan[role], profile, dtype, dev):
                del self._models[role]
        if self._bias is not None and ("bias" not in plan or self._bias[0] != (plan["bias"]["key"], dev)):
            self._bias = None
        if self._processor is not None and ("processor" not in plan or self._processor[0] != plan["processor"]["paths"][0]):
            self._processor = None
        keep = {path for r, p in plan.items() for path in p["paths"]} if (
            dev == "cuda" and profile in PINNED_PROFILES) else set()
        dropped = len(self._models) != before
        for path in [p for p in self._files if p not in keep]:
            self._files.pop(path).release()
            dropped = True
        if dropped:
            self.park()                    # kept GPU copies of freed host bytes are stale
            gc.unfreeze()                  # what the dropped models left can be collected again
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()

    @staticmethod
    def _cache_key(role, p, profile, dtype, dev):
        return (p["key"], profile, str(dtype), dev, json.dumps(p.get("config"), sort_keys=True), p["tiny"])

    def _load(self, role, p, profile, dtype, dev):
        key = self._cache_key(role, p, profile, dtype, dev)
        if role in self._models and self._models[role].key == key:
            return
        paths = p["paths"] if len(p["paths"]) > 1 else p["paths"][0]
        t = time.monotonic()
        vc = vram.vram_config(profile, dtype, dev) if dev == "cuda" else None
        pinned = dev == "cuda" and profile in PINNED_PROFILES
        try:
            if pinned:
                # The file is read into page-locked RAM (perhaps already, by a prefetch); the model's
                # parameters are views of it, and its layers go to the GPU as they run.
                files = [self._weight_file(path) for path in p["paths"]]
                sd = {}
                for wf in files:
                    sd.update(wf.state_dict())
                if any(t.dtype != dtype for t in sd.values()):
                    for wf in files:       # a dtype change copies: wait for all bytes first
                        wf.wait()
                model = build_model(p["cls"], p["config"], sd, p["converter"], dtype, "cpu")
            elif vc is None:
                from diffsynth.core.loader.file import load_state_dict
                sd = load_state_dict(paths, dtype, dev)
                model = build_model(p["cls"], p["config"], sd, p["converter"], dtype, dev)
            else:
                from diffsynth.core.loader.model import load_model      # the disk profile only
                module_map = self._module_map(p["module_map_name"])
                model = load_model(p["cls"], paths, p["config"], torch_dtype=dtype, device=dev,
                                   state_dict_converter=p["converter"], use_disk_map=True, module_map=module_map,
                                   vram_config=vc, vram_limit=vram.vram_limit_gb())
        except I2LError:
            raise
        except Exception as e:
            if vram.is_oom(e):
                raise
            raise I2LError(I2LError.WEIGHTS_INVALID,
                           T("m_load_failed", path=p['paths'][0], title=catalog.FILES[role].label, error=e),
                           T("m_delete_redownload"), details=repr(e)) from None
        model.eval()
        from .warmstart import trace
        trace(f"built {role}")
        self._built = True
        self._models[role] = _Model(role, key, model, profile, p["bytes"], dev)
        self.log("info", T("m_loaded", title=catalog.FILES[role].label, s=f"{time.monotonic() - t:.1f}", profile=T(f"profile_{profile}")))

    # ------------------------------------------------------------------ page-locked weights

    def _weight_file(self, path: str) -> WeightFile:
        """The page-locked copy of a file (created on first use; read in order by ``read_ahead``,
        or at once when a model needs it first)."""
        wf = self._files.get(path)
        if wf is None:
            try:
                wf = WeightFile(path, pin=True)
            except ValueError as e:
                raise I2LError(I2LError.WEIGHTS_INVALID, T("m_not_safetensors_error", path=path, error=e),
                               T("m_delete_redownload")) from None
            self._files[path] = wf
            if vram.device() == "cuda":
                self._pin_later([wf])
        return wf

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
                self._files.setdefault(wf.path, wf)
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

    def _wait_tensor(self, t) -> None:
        for wf in self._files.values():
            if wf.contains(t):
                wf.wait_for(t)
                return

    def read_ahead(self, paths: list[str]) -> None:
        """Start reading files into page-locked RAM, one after the other in the order given, when
        there is a GPU to feed and the RAM to hold them."""
        if vram.device() != "cuda":
            return
        total = sum(os.path.getsize(p) for p in paths if p not in self._files)
        ram = vram.available_ram()
        if ram is not None and total + vram.RAM_MARGIN > ram:
            self.log("info", T("m_ram_short"))
            return
        with self._lock:
            files = []
            for p in paths:
                try:
                    files.append(self._weight_file(p))
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

    @contextmanager
    def _stream(self, role):
        """Around a model's phase: to the GPU whole (gpu) or layer by layer (cpu_offload), and back."""
        m = self._models.get(role)
        if m is None or m.dev != "cuda" or m.profile not in PINNED_PROFILES:
            yield None
            return
        blocks = role in DECODERS and all(p is not None for p in self._block_plans(m.model))
        s = Streamer(m.model, "cuda", wait=self._wait_tensor, layered=m.profile == "cpu_offload",
                     mirror=self._mirror, point=not blocks)
        try:
            with s:
                yield s if s.layers else None
        finally:
            self.copied += s.bytes_copied

    def prefetch(self, spec: JobSpec) -> None:
        """Start reading a variant's weights (and building its models) before the job arrives."""
        variant = catalog.get_variant(spec.variant)
        bias = bool(spec.bias)
        roles = variant.needed_roles(bias)
        dev = vram.device()
        if dev != "cuda":
            return
        with self._lock:
            plan = self._plan(roles, spec)
            is_tiny = any(p["tiny"] for p in plan.values())
            dtype = self._dtype(spec, dev, is_tiny)
            needed = sum(p["bytes"] for r, p in plan.items() if r not in ("processor", "bias"))
            held = sum(f.nbytes for f in self._files.values())
            profile = vram.choose_profile(spec.vram_profile, needed, held, dev)
            if profile not in PINNED_PROFILES:
                return
            self._keep_only(set(roles), plan, profile, dtype, dev)
            order = [r for r in LOAD_ORDER if r in plan]
            self.read_ahead([path for r in order for path in plan[r]["paths"]])
            for role in order:
                self._load(role, plan[role], profile, dtype, dev)
            self._freeze_heap()
        self.log("info", T("m_reading_ahead", variant=variant.label, size=catalog.human_size(needed)))
        from .warmstart import trace
        trace("prefetch: models built on the weights")

    def _to_host(self, lora: dict) -> dict:
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
                self._grow_out_buf(flat.numel())
            del flat
            out, off = {}, 0
            for k, v in zip(keys, vals):
                n = v.numel()
                out[k] = host[off:off + n].view(v.shape)
                off += n
            return out
        return {k: v.to("cpu", torch.bfloat16).contiguous() for k, v in zip(keys, vals)}

    def _freeze_heap(self) -> None:
        """After models were built: the interpreter's objects so far (the model code, the models'
        thousands of modules) are left out of the garbage collector's full passes, which
        otherwise walk them all (a fifth of a second) whenever one falls in the middle of a job.
        Undone when models are dropped."""
        if self._built:
            self._built = False
            gc.freeze()

    def _lora_numel(self, decoders, n_images: int, bias: bool) -> int:
        """How many numbers the finished LoRA holds: each decoder's A and B for every image, with
        the Bias LoRA's merged in."""
        total = 0
        for d in decoders:
            for block in self._models[d].model.blocks:
                total += sum(n_images * layer.rank * (a_dim + b_dim)
                             for (_, a_dim, b_dim), layer in zip(block.lora_patterns, block.layers))
        if bias and self._bias is not None:
            total += sum(v.numel() for v in self._bias[1].values())
        return total

    def _grow_out_buf(self, n: int) -> None:
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

    def _module_map(self, class_path):
        """DiffSynth's VRAM-management map for a model class, tolerant of transformers renames
        (5.24 calls Qwen2_5_VisionRotaryEmbedding Qwen2_5_VLVisionRotaryEmbedding)."""
        from diffsynth.configs.vram_management_module_maps import VERSION_CHECKER_MAPS, VRAM_MANAGEMENT_MODULE_MAPS
        from diffsynth.core.vram.layers import AutoWrappedModule
        if class_path in VERSION_CHECKER_MAPS:
            table = VERSION_CHECKER_MAPS[class_path]()
        elif class_path in VRAM_MANAGEMENT_MODULE_MAPS:
            table = VRAM_MANAGEMENT_MODULE_MAPS[class_path]
        else:
            return {_import(class_path): AutoWrappedModule}
        out = {}
        for src, dst in table.items():
            cls = None
            for cand in (src, src.replace(".Qwen2_5_Vision", ".Qwen2_5_VLVision"),
                         src.replace(".Qwen2RMSNorm", ".Qwen2_5_VLRMSNorm")):
                try:
                    cls = _import(cand)
                    break
                except (ImportError, AttributeError):
                    continue
            if cls is None:
                self.log("warning", T("m_vram_mgmt", name=src))
                continue
            out[cls] = _import(dst)
        return out

    def _load_processor(self, folder):
        if self._processor is not None and self._processor[0] == folder:
            return
        from transformers import Qwen2VLProcessor
        try:
            self._processor = (folder, Qwen2VLProcessor.from_pretrained(folder))
        except Exception as e:
            raise I2LError(I2LError.WEIGHTS_INVALID, T("m_bad_processor", path=folder, error=e),
                           T("m_delete_redownload")) from None

    def _load_bias(self, p, dev):
        if self._bias is not None and self._bias[0] == (p["key"], dev):
            return
        from diffsynth.core.loader.file import load_state_dict
        sd = load_state_dict(p["paths"][0], device=dev)
        norm = {}
        for k, v in sd.items():
            path, ab = lora_format.split_key(k)
            norm[f"{path}.lora_{ab}.default.weight"] = v
        self._bias = ((p["key"], dev), norm)

    def _release(self, role):
        """After a model's phase: back to RAM / disk for the offload profiles."""
        m = self._models.get(role)
        if m is not None and m.profile in ("cpu_offload", "disk"):
            vram.offload(m.model)

    def _drop_after_oom(self):
        self.park()
        for m in self._models.values():
            if m.profile == "disk":
                vram.offload(m.model)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ encoders (batched)

    def _encode_siglip(self, images, dtype, dev):
        sig = self._models["siglip2"].model
        vram.onload(sig)
        pv = sig.processor(images=images, return_tensors="pt")["pixel_values"]
        # As Siglip2ImageEncoder.forward: pixels go in as bfloat16 (its default torch_dtype).
        pv = pv.to(device=dev, dtype=torch.bfloat16)
        h = sig.embeddings(pv, interpolate_pos_encoding=False)
        h = sig.encoder(inputs_embeds=h, output_attentions=False, output_hidden_states=False).last_hidden_state
        h = sig.post_layernorm(h)
        out = sig.head(h).to(dtype)
        self._release("siglip2")
        return out

    def _encode_dino(self, images, dtype, dev):
        dino = self._models["dinov3"].model
        vram.onload(dino)
        pv = dino.processor(images=images, return_tensors="pt")["pixel_values"]
        pv = pv.to(device=dev, dtype=torch.bfloat16)     # as DINOv3ImageEncoder.forward
        h = dino.embeddings(pv, bool_masked_pos=None)
        pe = dino.rope_embeddings(pv)
        for layer in dino.model.layer:
            h = layer(h, attention_mask=None, position_embeddings=pe)
        out = dino.norm(h)[:, 0, :].to(dtype)
        self._release("dinov3")
        return out

    def _encode_qwenvl(self, images, dtype, dev, chunk):
        """The Coarse / Fine residual: Qwen2.5-VL hidden states of the edit prompt with the image,
        first 64 tokens dropped (as QwenImageUnit_Image2LoRAEncode.encode_prompt_edit)."""
        te = self._models["text_encoder"].model
        vram.onload(te)
        proc = self._processor[1]
        template = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                    "objects, background), then explain how the user's text instruction should alter or modify the "
                    "image. Generate a new image that meets the user's requirements while maintaining consistency "
                    "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                    "<|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
        drop_idx = 64
        outs = []
        for s in range(0, len(images), chunk):
            part = images[s:s + chunk]
            inputs = proc(text=[template.format("")] * len(part), images=part, padding=True,
                          return_tensors="pt").to(dev)
            hidden = te(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                        pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
                        output_hidden_states=True)[-1]
            for h, m in zip(hidden, inputs.attention_mask):       # each prompt's real tokens
                e = h[m.bool()]
                outs.append(e[drop_idx:].to(dtype=dtype, device=dev).reshape(1, -1))
        lengths = {o.shape[1] for o in outs}
        if len(lengths) != 1:
            raise I2LError(I2LError.INTERNAL, T("m_residuals"), T("m_report"))
        return torch.stack(outs)          # [N, 1, tokens * hidden]

    # ------------------------------------------------------------------ decoder (batched)

    @staticmethod
    def _decode(model, x, residual, n, streamer=None):
        """Per-image LoRAs of one decoder for all images at once: key -> (A [N, r, in], B [N, out, r])."""
        if residual is not None and model.use_residual:
            residual = residual * model.residual_scale
        else:
            residual = None
        out = {}
        if getattr(model, "vram_management_enabled", False):
            # The disk profile: DiffSynth's wrapped layers fetch their weights inside their own
            # forward, so the blocks run through their modules.
            for block in model.blocks:
                Engine._decode_block_modules(block, x, residual, n, out)
            return out
        if streamer is not None and not streamer.point:
            # Each block's weights read straight from its GPU bytes (no parameter swapping)
            plans = Engine._block_plans(model)
            for i, block in enumerate(model.blocks):
                with streamer.layer(i):
                    buf, base = streamer.span(i)
                    if plans[i]["base"] != base:
                        raise I2LError(I2LError.INTERNAL, T("m_block_moved"),
                                       T("m_report"))
                    Engine._decode_block_raw(block, plans[i], buf, x, residual, n, out)
            return out
        for i, block in enumerate(model.blocks):
            with streamer.layer(i) if streamer is not None else nullcontext():
                Engine._decode_block(block, x, residual, n, out)
        return out

    @staticmethod
    def _block_plans(model) -> list:
        """Where each decoder block's weights lie in its host bytes (element offset, shape,
        stride from the block's lowest address, as ``Streamer`` copies it), worked out once per model."""
        plans = getattr(model, "_i2l_block_plans", None)
        if plans is None:
            plans = [Engine._block_plan(block) for block in model.blocks]
            model._i2l_block_plans = plans
        return plans

    @staticmethod
    def _block_plan(block) -> dict | None:
        params = [p for p in block.parameters()]
        if not params or any(p.device.type != "cpu" for p in params):
            return None
        base = min(p.data_ptr() for p in params)
        mlps = [m for layer in block.layers for m in (layer.proj_a, layer.proj_b)]
        pr = block.proj_residual
        tensors = [m.proj_in.weight for m in mlps] + [m.proj_out.weight for m in mlps]
        if any(m.proj_in.bias is not None or m.proj_out.bias is not None for m in mlps):
            return None
        pr_parts = []
        if pr is not None:
            pr_parts = [pr.proj_in.weight, pr.proj_in.bias, pr.proj_out.weight, pr.proj_out.bias]
            tensors += [t for t in pr_parts if t is not None]
        dtype = tensors[0].dtype
        esize = tensors[0].element_size()
        if any(t.dtype != dtype or not t.is_contiguous() or (t.data_ptr() - base) % esize for t in tensors):
            return None

        def where(t):
            return None if t is None else ((t.data_ptr() - base) // esize, tuple(t.shape), tuple(t.stride()))
        ins = [where(m.proj_in.weight) for m in mlps]
        outs = [where(m.proj_out.weight) for m in mlps]
        return {"base": base, "dtype": dtype, "in": ins, "out": outs, "pr": [where(t) for t in pr_parts],
                "in_batch": Engine._as_batch(ins), "out_batch": Engine._as_batch(outs)}

    @staticmethod
    def _as_batch(entries) -> tuple | None:
        """Equal tensors at equal distances (offset, shape, stride) as one strided batch view's
        (offset, shape, stride); None when they are not laid out so."""
        if len(entries) < 2 or any(e[1:] != entries[0][1:] for e in entries):
            return None
        step = entries[1][0] - entries[0][0]
        if step <= 0 or any(b[0] - a[0] != step for a, b in zip(entries, entries[1:])):
            return None
        return entries[0][0], (len(entries),) + entries[0][1], (step,) + entries[0][2]

    @staticmethod
    def _decode_block_raw(block, plan, buf, x, residual, n, out) -> None:
        """``_decode_block`` with the weights taken from the block's bytes ``buf`` by ``plan``
        (the block's first and second projections as two strided batches where they lie evenly)."""
        flat = buf.view(plan["dtype"])
        start = flat.storage_offset()

        def w(entry):
            return None if entry is None else torch.as_strided(flat, entry[1], entry[2], start + entry[0])
        r = None
        pr = block.proj_residual
        if pr is not None:
            in_w, in_b, out_w, out_b = (w(e) for e in plan["pr"])
            r = Engine._residual(pr, residual, n, in_w, in_b, out_w, out_b)
        w_in = w(plan["in_batch"]) if plan["in_batch"] else [w(e) for e in plan["in"]]
        w_out = w(plan["out_batch"]) if plan["out_batch"] else [w(e) for e in plan["out"]]
        Engine._decode_mlps(block, w_in, w_out, x, r, n, out)

    @staticmethod
    def _decode_block_modules(block, x, residual, n, out) -> None:
        """One decoder block through its modules (as ``LoRATrainerBlock.forward``), every image at once."""
        r = None
        if block.proj_residual is not None:
            r = torch.cat([block.proj_residual(residual[i]) for i in range(n)])     # [N, compress]
        Engine._decode_block_plain(block, x, r, n, out)

    @staticmethod
    def _decode_block(block, x, residual, n, out) -> None:
        """One decoder block for every image, in a handful of kernels: the block's first
        projections (they all read the same embedding) as one batched product, the second ones
        as another where their shapes agree. The same arithmetic as the block's modules."""
        r = None
        pr = block.proj_residual
        if pr is not None:
            r = Engine._residual(pr, residual, n, pr.proj_in.weight, pr.proj_in.bias,
                                 pr.proj_out.weight, pr.proj_out.bias)
        mlps = [m for layer in block.layers for m in (layer.proj_a, layer.proj_b)]
        if any(m.proj_in.bias is not None or m.proj_out.bias is not None for m in mlps):
            return Engine._decode_block_plain(block, x, r, n, out)
        Engine._decode_mlps(block, [m.proj_in.weight for m in mlps], [m.proj_out.weight for m in mlps],
                            x, r, n, out)

    @staticmethod
    def _residual(pr, residual, n, in_w, in_b, out_w, out_b):
        """``SequencialMLP.forward`` for every image at once."""
        F = torch.nn.functional
        h = F.linear(residual.reshape(n, pr.length, pr.in_dim), in_w, in_b)
        return F.linear(h.reshape(n, pr.length * pr.mid_dim), out_w, out_b)

    @staticmethod
    def _decode_mlps(block, w_in, w_out, x, r, n, out) -> None:
        """The block's bias-free MLPs (proj_a, proj_b of each layer, in order) for every image.
        ``w_in`` / ``w_out``: the weights as lists, or each as one [2L, rows, cols] batch."""
        if isinstance(w_in, (list, tuple)):
            w_in = torch.stack(w_in)
        k = w_in.shape[0]
        h = torch.bmm(x.expand(k, *x.shape), w_in.transpose(1, 2))      # [2L, n, compress]
        if r is not None:
            h = h + r
        if isinstance(w_out, (list, tuple)) and all(w.shape == w_out[0].shape for w in w_out):
            w_out = torch.stack(w_out)
        if isinstance(w_out, torch.Tensor):
            res = torch.bmm(h, w_out.transpose(1, 2)).unbind(0)               # 2L x [n, out]
        else:
            res = [h[j] @ wo.T for j, wo in enumerate(w_out)]
        for j, (key, rank, a_dim, b_dim) in enumerate(Engine._block_outputs(block)):
            out[key] = (res[2 * j].reshape(n, rank, a_dim), res[2 * j + 1].reshape(n, b_dim, rank))

    @staticmethod
    def _block_outputs(block) -> list:
        """(LoRA key, rank, A's width, B's height) of each layer of a decoder block, worked out once."""
        outs = getattr(block, "_i2l_outputs", None)
        if outs is None:
            outs = [(f"transformer_blocks.{block.block_id}.{name}.lora_A.default.weight", layer.rank, a_dim, b_dim)
                    for (name, a_dim, b_dim), layer in zip(block.lora_patterns, block.layers)]
            block._i2l_outputs = outs
        return outs

    @staticmethod
    def _decode_block_plain(block, x, r, n, out) -> None:
        for (name, a_dim, b_dim), layer in zip(block.lora_patterns, block.layers):
            a = layer.proj_a(x, r).view(n, layer.rank, a_dim)
            b = layer.proj_b(x, r).view(n, b_dim, layer.rank)
            out[f"transformer_blocks.{block.block_id}.{name}.lora_A.default.weight"] = (a, b)

    @staticmethod
    def _merge(parts, alpha):
        """merge_lora over [decoder1 image1..N, decoder2 image1..N, ...] with one alpha."""
        lora = {}
        for key in parts[0]:
            As, Bs = [], []
            for part in parts:
                a, b = part[key]
                n, r, a_dim = a.shape
                As.append(a.reshape(n * r, a_dim))
                Bs.append(b.permute(1, 0, 2).reshape(b.shape[1], n * r))
            A = torch.concat(As, dim=0) if len(As) > 1 else As[0]
            lora[key] = A * alpha
            lora[key.replace(".lora_A.", ".lora_B.")] = torch.concat(Bs, dim=1) if len(Bs) > 1 else Bs[0]
        return lora

    def _merge_bias(self, lora):
        from diffsynth.utils.lora.merge import merge_lora
        bias = self._bias[1]
        missing = [k for k in lora if k not in bias]
        if missing:
            raise I2LError(I2LError.WEIGHTS_INVALID, T("m_bias_cover", key=missing[0], n=len(missing) - 1),
                           T("m_bias_fix"))
        dev = next(iter(lora.values())).device
        return merge_lora([lora, {k: bias[k].to(dev) for k in lora}])

    # ------------------------------------------------------------------ metadata

    @staticmethod
    def _metadata(spec, images, variant, bias, key_format, energy_kept=None):
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
        dsv = _diffsynth_version()
        extra = dict(spec.metadata)
        title = extra.pop("modelspec.title", None) or extra.pop("title", None)
        return lora_format.build_metadata(variant, shas, bias=bias, key_format=key_format, title=title,
                                          diffsynth_version=dsv, max_rank=spec.max_rank, energy_kept=energy_kept,
                                          extra=extra)
