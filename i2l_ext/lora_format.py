"""LoRA key formats and file metadata. Pure Python: imported by both the host and the worker.

DiffSynth's i2L writes ``<DiT module path>.lora_A.default.weight`` / ``.lora_B...`` (no prefix, no
alpha, scale 1), which Forge Neo / ComfyUI load only when they recognise the loaded model's family
from those bare names (for Z-Image not at all). The formats written here load generically:

- ``diffusers`` (default): ``diffusion_model.<path>.lora_A.weight`` / ``.lora_B.weight``, no alpha.
- ``kohya``: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` and
  ``lora_unet_<path with _>.alpha`` = rank (so alpha / rank = 1, the same strength). Only for the
  families whose loaders read those names (``Family.key_formats``).

``check_keys_map`` applies the key-mapping rules of the Forge Neo / ComfyUI loader to a key list
and reports which DiT module of the family each key reaches.
"""
from __future__ import annotations

import datetime as _dt
import json
import re

from .families import FAMILIES, QWEN_IMAGE, Family

FORMATS = ("diffusers", "kohya")

_SRC_RE = re.compile(r"^(?:diffusion_model\.|transformer\.)?(?P<path>.+?)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def split_key(key: str) -> tuple[str, str]:
    """``(module path, "A" | "B")`` of a DiffSynth / diffusers LoRA key."""
    m = _SRC_RE.match(key)
    if not m:
        raise ValueError(f"not a LoRA A/B key: {key}")
    return m.group("path"), m.group("ab")


def _check_format(fmt: str) -> str:
    fmt = (fmt or "diffusers").lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown key format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def family_of(variant_or_family: str) -> Family:
    """A family by its key, or the family of a variant's key (Qwen-Image when unknown)."""
    if variant_or_family in FAMILIES:
        return FAMILIES[variant_or_family]
    from .catalog import VARIANTS
    v = VARIANTS.get(variant_or_family)
    return v.family if v is not None else QWEN_IMAGE


def kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def convert_key(diffsynth_key: str, fmt: str = "diffusers") -> str:
    """The name of a DiffSynth LoRA key (``<path>.lora_A.default.weight``) in ``fmt``."""
    fmt = _check_format(fmt)
    path, ab = split_key(diffsynth_key)
    if fmt == "diffusers":
        return f"diffusion_model.{path}.lora_{ab}.weight"
    return f"{kohya_name(path)}.{'lora_down' if ab == 'A' else 'lora_up'}.weight"


def alpha_key(diffsynth_key: str, fmt: str) -> str | None:
    """The alpha entry that goes with a key in ``fmt`` (None: the format has no alpha)."""
    if _check_format(fmt) != "kohya":
        return None
    return kohya_name(split_key(diffsynth_key)[0]) + ".alpha"


def build_state_dict(lora: dict, fmt: str = "diffusers", scalar=None) -> dict:
    """Rename a DiffSynth LoRA state dict to ``fmt``. Values pass through unchanged; for kohya,
    ``scalar(rank)`` makes each module's alpha value (the worker passes a torch scalar maker)."""
    fmt = _check_format(fmt)
    out = {}
    for key, value in lora.items():
        out[convert_key(key, fmt)] = value
        if fmt == "kohya" and split_key(key)[1] == "A":
            rank = int(value.shape[0])
            out[alpha_key(key, fmt)] = scalar(rank) if scalar is not None else rank
    return out


def lora_rank(keys_shapes: dict) -> int:
    """The largest rank among A matrices (shape[0] of lora_A / lora_down)."""
    ranks = [int(s[0]) for k, s in keys_shapes.items()
             if (".lora_A" in k or ".lora_down" in k) and len(s) == 2]
    return max(ranks) if ranks else 0


# ----------------------------------------------------------------------------- key-map check

_SUFFIXES = (
    (".lora_A.default.weight", "A"), (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"), (".lora_B.weight", "B"),
    (".lora_down.weight", "A"), (".lora_up.weight", "B"),
    (".lora.down.weight", "A"), (".lora.up.weight", "B"),
    (".lora_linear_layer.down.weight", "A"), (".lora_linear_layer.up.weight", "B"),
    (".alpha", "alpha"),
)


def check_keys_map(keys, family: Family = QWEN_IMAGE, max_blocks: int | None = None) -> dict:
    """Map each key to a DiT module of ``family`` the way Forge Neo's (ComfyUI-derived) loader does.

    The family's ``any_model_prefixes`` (``diffusion_model.<path>``, for Qwen-Image also
    ``lora_unet_<path with _>``) map for any model; its ``model_prefixes`` only once the loaded
    model is recognised as that family. ``max_blocks``: the DiT has only that many blocks in each
    list (a tiny test set). Returns ``{"mapped": {key: module}, "unmapped": [...], "generic": bool
    (every mapped key uses an any-model prefix), "incomplete": [modules lacking A or B],
    "ok": bool}``; ``ok`` means every key maps and every module has both halves.
    """
    modules = family.dit_modules(max_blocks)
    dotted = set(modules)
    underscored = {m.replace(".", "_"): m for m in modules}
    mapped, unmapped, halves = {}, [], {}
    generic = True
    for key in keys:
        for suffix, part in _SUFFIXES:
            if key.endswith(suffix):
                stem = key[: -len(suffix)]
                break
        else:
            unmapped.append(key)
            continue
        module, any_model = None, False
        for prefix in family.any_model_prefixes + family.model_prefixes:
            if not stem.startswith(prefix):
                continue
            rest = stem[len(prefix):]
            found = underscored.get(rest) if prefix.endswith("_") else (rest if rest in dotted else None)
            if found is not None:
                module, any_model = found, prefix in family.any_model_prefixes
                break
        if module is None:
            unmapped.append(key)
            continue
        generic = generic and any_model
        mapped[key] = module
        halves.setdefault(module, set()).add(part)
    incomplete = sorted(m for m, h in halves.items() if not {"A", "B"} <= h)
    return {"mapped": mapped, "unmapped": unmapped, "generic": generic and bool(mapped),
            "incomplete": incomplete, "ok": not unmapped and not incomplete and bool(mapped)}


# ----------------------------------------------------------------------------- metadata

def build_metadata(variant: str, image_sha256: list[str], bias: bool = False, key_format: str = "diffusers",
                   title: str | None = None, diffsynth_version: str | None = None,
                   max_rank: int | None = None, energy_kept: float | None = None,
                   extra: dict | None = None, created: str | None = None) -> dict[str, str]:
    """Safetensors metadata (all strings). ``ss_output_name`` is never written: hosts turn it into
    the prompt alias, which must stay the file's own name. With a rank cap, ``i2l.max_rank`` and
    ``i2l.energy_kept`` (the share, 0 to 1, of the LoRA's energy the cap kept). The base model's
    words come from the variant's family."""
    from . import __version__
    family = family_of(variant)
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.architecture,
        "modelspec.implementation": family.implementation,
        "modelspec.title": title or f"i2L {variant}",
        "ss_base_model_version": family.base_model_version,
        "i2l.variant": variant,
        "i2l.images": str(len(image_sha256)),
        "i2l.image_sha256": json.dumps(list(image_sha256)),
        "i2l.diffsynth_version": diffsynth_version or "",
        "i2l.created": created or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "i2l.bias": "true" if bias else "false",
        "i2l.key_format": _check_format(key_format),
        "i2l.version": __version__,
    }
    if max_rank is not None:
        meta["i2l.max_rank"] = str(max_rank)
        meta["i2l.energy_kept"] = f"{energy_kept:.6f}"
    for k, v in (extra or {}).items():
        if k == "ss_output_name":
            continue
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return meta
