"""The models of a job: found, checked by their key hash, built on their weights, kept for the next.

Each file's tensor names and shapes are hashed as DiffSynth's loader hashes them; the hash picks
the DiffSynth model class, config and state dict converter from ``diffsynth/configs/model_configs``
(by the family description's name for the role). A models folder may also hold a marked set of
test models (``catalog.TINY_MARKER``): the marker names the module that gives their classes, which
is imported only then, so no test code sits on the product's import path.
"""
from __future__ import annotations

import gc
import hashlib
import importlib
import json
import os
import sys
import time
from contextlib import contextmanager

import torch

from .. import catalog, families, lora_format, safetensors_header
from ..contract import I2LError, T
from . import encoders, vram

PINNED_PROFILES = ("gpu", "cpu_offload")


def import_dotted(dotted: str):
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
    """DiffSynth's entry for a role's model: class, key hash, config, converter."""
    from diffsynth.configs.model_configs import MODEL_CONFIGS
    name = families.ds_name(role)
    for cfg in MODEL_CONFIGS:
        if cfg["model_name"] == name:
            return cfg
    raise I2LError(I2LError.ENVIRONMENT, T("m_no_model_class", name=name), T("m_reinstall"))


# ----------------------------------------------------------------------------- file checks

def read_safetensors_header(path: str, title="model") -> dict:
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


def keys_hash(keys_shapes: dict) -> str:
    """DiffSynth's model hash over tensor names and shapes (``hash_model_file``)."""
    from diffsynth.core.loader.file import convert_keys_dict_to_single_str
    return hashlib.md5(convert_keys_dict_to_single_str(keys_shapes).encode("utf-8")).hexdigest()


def models_dir_of(role: str, path: str) -> str:
    """The models folder a file of ``role`` sits in, given the catalog's layout."""
    entry = catalog.FILES[role]
    depth = len(entry.repo.split("/")) + len(entry.pattern.rstrip("/").split("/"))
    d = os.path.abspath(path)
    for _ in range(depth):
        d = os.path.dirname(d)
    return d


def read_marker(models_dir: str) -> dict | None:
    """The marker of a test model set in ``models_dir`` (None when there is none)."""
    p = os.path.join(models_dir, catalog.TINY_MARKER)
    if not os.path.isfile(p):
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def marked_class(marker: dict, role: str):
    """A test set's model class for ``role``, from the module its marker names (only the
    package's own modules)."""
    provider = str(marker.get("provider") or "")
    if not provider.startswith("i2l_ext."):
        raise I2LError(I2LError.WEIGHTS_INVALID, T("m_not_weights_problem", path=catalog.TINY_MARKER,
                                                   title=catalog.FILES[role].label, problem="no provider"),
                       T("m_right_folder"))
    return importlib.import_module(provider).model_class(role)


def bias_problem(shapes: dict, family: families.Family) -> str | None:
    """Why a Bias LoRA does not fit the decoders' key set (None when it does)."""
    want = {f"{prefix}.{i}.{m}" for prefix, count in family.blocks for i in range(count)
            for m in family.decoded_modules}
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
        fan_in, fan_out = family.linear_shape(path)
        if set(ab) != {"A", "B"} or len(ab["A"]) != 2 or len(ab["B"]) != 2:
            return f"{path} lacks a matrix"
        if ab["A"][1] != fan_in or ab["B"][0] != fan_out or ab["A"][0] != ab["B"][1]:
            return f"{path} has shapes {ab['A']} / {ab['B']}"
    return None


# ----------------------------------------------------------------------------- the cache

class Built:
    """A built model and what it was built from."""

    def __init__(self, role, key, model, profile, nbytes, dev="cpu"):
        self.role, self.key, self.model, self.profile, self.nbytes = role, key, model, profile, nbytes
        self.dev = dev


def _cache_key(p, profile, dtype, dev):
    return (p["key"], profile, str(dtype), dev, json.dumps(p.get("config"), sort_keys=True), p["tiny"])


class Models:
    """The models of the last jobs, kept while the next job uses the same files the same way."""

    def __init__(self, log):
        self.log = log
        self.built: dict[str, Built] = {}
        self.processor = None      # (folder, processor)
        self.bias = None           # (key, state dict)
        self._checked: dict = {}   # file key -> (hash, shapes) of headers already read
        self.fresh = False         # models built since the heap was last frozen

    # -- which files, which classes -------------------------------------------------------------
    def plan(self, roles, spec) -> dict:
        """Role -> what loading it takes: its files checked (whole safetensors, the key hash of a
        known model), the class, config and converter the hash names."""
        plan = {}
        markers: dict[str, dict | None] = {}
        family = catalog.get_variant(spec.variant).family
        for role in roles:
            entry = catalog.FILES[role]
            paths = spec.files.get(role)
            if isinstance(paths, str):
                paths = [paths]
            if not paths and spec.models_dir:
                paths = entry.resolve(spec.models_dir)
            if not paths:
                where = entry.local_path(spec.models_dir) if spec.models_dir else f"{entry.repo}/{entry.pattern}"
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
            d = models_dir_of(role, paths[0])
            if d not in markers:
                markers[d] = read_marker(d)
            marker = markers[d]
            marked = bool(marker) and marker.get("hashes", {}).get(role) == h
            nbytes = sum(os.path.getsize(p) for p in paths)
            if role == family.bias_role:
                problem = None if marked else bias_problem(shapes, family)
                if problem:
                    raise I2LError(I2LError.WEIGHTS_INVALID, T("m_not_weights_problem", path=paths[0], title=entry.label, problem=problem),
                                   T("m_delete_redownload"))
                plan[role] = {"paths": paths, "tiny": marked, "bytes": nbytes, "key": key}
                self._checked[key] = (h, shapes)
                continue
            real = real_model_config(role)
            converter = import_dotted(real["state_dict_converter"]) if "state_dict_converter" in real else None
            if h == real["model_hash"]:
                plan[role] = {"paths": paths, "tiny": False, "bytes": nbytes, "key": key,
                              "cls": import_dotted(real["model_class"]), "config": dict(real.get("extra_kwargs") or {}),
                              "converter": converter, "module_map_name": real["model_class"]}
            elif marked:
                plan[role] = {"paths": paths, "tiny": True, "bytes": nbytes, "key": key,
                              "cls": marked_class(marker, role), "config": dict(marker["configs"][role]),
                              "converter": converter, "module_map_name": real["model_class"]}
            else:
                self._checked.pop(key, None)
                names = ", ".join(os.path.basename(p) for p in paths)
                raise I2LError(I2LError.WEIGHTS_INVALID,
                               T("m_not_weights_hash", path=paths[0] if len(paths) == 1 else names, title=entry.label, hash=h),
                               T("m_right_folder"))
            self._checked[key] = (h, shapes)
        return plan

    @staticmethod
    def dtype(spec, dev, is_tiny):
        want = spec.dtype or ""
        if want in ("bfloat16", "bf16"):
            return torch.bfloat16
        if want in ("float32", "fp32"):
            return torch.float32
        if dev == "cpu" and is_tiny:
            return torch.float32
        return torch.bfloat16

    # -- keeping and dropping -------------------------------------------------------------------
    def keep_only(self, roles, plan, profile, dtype, dev, bias_role: str = "") -> bool:
        """Drop the models this job does not use, or that were loaded differently; True when any went."""
        before = len(self.built)
        for role in list(self.built):
            if role not in roles or self.built[role].key != _cache_key(plan[role], profile, dtype, dev):
                del self.built[role]
        bias = plan.get(bias_role) if bias_role else None
        if self.bias is not None and (bias is None or self.bias[0] != (bias["key"], dev)):
            self.bias = None
        if self.processor is not None and ("processor" not in plan or self.processor[0] != plan["processor"]["paths"][0]):
            self.processor = None
        return len(self.built) != before

    def release(self, role):
        """After a model's phase: back to RAM / disk for the offload profiles."""
        m = self.built.get(role)
        if m is not None and m.profile in ("cpu_offload", "disk"):
            vram.offload(m.model)

    def offload_disk_models(self):
        for m in self.built.values():
            if m.profile == "disk":
                vram.offload(m.model)

    def clear(self):
        self.built.clear()
        self.processor = None
        self.bias = None

    def freeze_heap(self) -> None:
        """After models were built: the interpreter's objects so far (the model code, the models'
        thousands of modules) are left out of the garbage collector's full passes, which
        otherwise walk them all (a fifth of a second) whenever one falls in the middle of a job.
        Undone when models are dropped."""
        if self.fresh:
            self.fresh = False
            gc.freeze()

    # -- building -------------------------------------------------------------------------------
    def load(self, role, p, profile, dtype, dev, weight_file):
        """Build ``role``'s model unless the one kept was built the same way. ``weight_file(path)``
        gives a file's page-locked copy (the pinned profiles build on it)."""
        key = _cache_key(p, profile, dtype, dev)
        if role in self.built and self.built[role].key == key:
            return
        paths = p["paths"] if len(p["paths"]) > 1 else p["paths"][0]
        t = time.monotonic()
        vc = vram.vram_config(profile, dtype, dev) if dev == "cuda" else None
        pinned = dev == "cuda" and profile in PINNED_PROFILES
        try:
            if pinned:
                # The file is read into page-locked RAM (perhaps already, by a prefetch); the model's
                # parameters are views of it, and its layers go to the GPU as they run.
                files = [weight_file(path) for path in p["paths"]]
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
        encoders.prepare(model)
        from .warmstart import trace
        trace(f"built {role}")
        self.fresh = True
        self.built[role] = Built(role, key, model, profile, p["bytes"], dev)
        self.log("info", T("m_loaded", title=catalog.FILES[role].label, s=f"{time.monotonic() - t:.1f}", profile=T(f"profile_{profile}")))

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
            return {import_dotted(class_path): AutoWrappedModule}
        out = {}
        for src, dst in table.items():
            cls = None
            for cand in (src, src.replace(".Qwen2_5_Vision", ".Qwen2_5_VLVision"),
                         src.replace(".Qwen2RMSNorm", ".Qwen2_5_VLRMSNorm")):
                try:
                    cls = import_dotted(cand)
                    break
                except (ImportError, AttributeError):
                    continue
            if cls is None:
                self.log("warning", T("m_vram_mgmt", name=src))
                continue
            out[cls] = import_dotted(dst)
        return out

    def load_processor(self, folder):
        if self.processor is not None and self.processor[0] == folder:
            return
        from transformers import Qwen2VLProcessor
        try:
            self.processor = (folder, Qwen2VLProcessor.from_pretrained(folder))
        except Exception as e:
            raise I2LError(I2LError.WEIGHTS_INVALID, T("m_bad_processor", path=folder, error=e),
                           T("m_delete_redownload")) from None

    def load_bias(self, p, dev):
        if self.bias is not None and self.bias[0] == (p["key"], dev):
            return
        from diffsynth.core.loader.file import load_state_dict
        sd = load_state_dict(p["paths"][0], device=dev)
        norm = {}
        for k, v in sd.items():
            path, ab = lora_format.split_key(k)
            norm[f"{path}.lora_{ab}.default.weight"] = v
        self.bias = ((p["key"], dev), norm)
