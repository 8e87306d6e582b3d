"""What each variant needs: model files, where they come from, where they go, how big they are.

Files live under the models folder in DiffSynth's own layout, ``<models_dir>/<repo id>/<path>``,
so an existing DiffSynth ``models`` folder can be used as it is.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

ENCODERS_REPO = "DiffSynth-Studio/General-Image-Encoders"
I2L_REPO = "DiffSynth-Studio/Qwen-Image-i2L"
QWEN_IMAGE_REPO = "Qwen/Qwen-Image"
QWEN_EDIT_REPO = "Qwen/Qwen-Image-Edit"

GB = 1000 ** 3


@dataclass(frozen=True)
class ModelFile:
    role: str            # siglip2, dinov3, text_encoder, processor, style, coarse, fine, bias
    repo: str            # same id on ModelScope and Hugging Face
    pattern: str         # a file, a glob of shards ("text_encoder/model*.safetensors") or a folder ("processor/")
    approx_bytes: int
    title: str

    @property
    def is_folder(self) -> bool:
        return self.pattern.endswith("/")

    @property
    def is_glob(self) -> bool:
        return "*" in self.pattern

    def local_path(self, models_dir: str) -> str:
        return os.path.join(models_dir, *self.repo.split("/"), *self.pattern.rstrip("/").split("/"))

    def resolve(self, models_dir: str) -> list[str]:
        """The files on disk for this entry (sorted shards for a glob); empty when missing."""
        p = self.local_path(models_dir)
        if self.is_glob:
            return sorted(glob.glob(p))
        if self.is_folder:
            return [p] if os.path.isdir(p) and os.listdir(p) else []
        return [p] if os.path.isfile(p) else []


FILES: dict[str, ModelFile] = {f.role: f for f in [
    ModelFile("siglip2", ENCODERS_REPO, "SigLIP2-G384/model.safetensors", int(2.3 * GB), "SigLIP2-G384 image encoder"),
    ModelFile("dinov3", ENCODERS_REPO, "DINOv3-7B/model.safetensors", int(13.4 * GB), "DINOv3-7B image encoder"),
    ModelFile("text_encoder", QWEN_IMAGE_REPO, "text_encoder/model*.safetensors", int(16.6 * GB), "Qwen2.5-VL text encoder"),
    ModelFile("processor", QWEN_EDIT_REPO, "processor/", 12_000_000, "Qwen2-VL processor"),
    ModelFile("style", I2L_REPO, "Qwen-Image-i2L-Style.safetensors", int(4.8 * GB), "i2L Style decoder"),
    ModelFile("coarse", I2L_REPO, "Qwen-Image-i2L-Coarse.safetensors", int(15.9 * GB), "i2L Coarse decoder"),
    ModelFile("fine", I2L_REPO, "Qwen-Image-i2L-Fine.safetensors", int(15.1 * GB), "i2L Fine decoder"),
    ModelFile("bias", I2L_REPO, "Qwen-Image-i2L-Bias.safetensors", 60_000_000, "i2L Bias LoRA"),
]}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    purpose: str
    decoders: tuple[str, ...]
    vram_gb: float          # peak with the default profile
    low_vram_gb: float      # peak with the low-VRAM profile
    bias_default: bool = False
    roles: tuple[str, ...] = field(default=())

    def needed_roles(self, bias: bool | None = None) -> list[str]:
        roles = ["siglip2", "dinov3"]
        if any(d in ("coarse", "fine") for d in self.decoders):
            roles += ["text_encoder", "processor"]
        roles += list(self.decoders)
        if self.bias_default if bias is None else bias:
            roles.append("bias")
        return roles

    def download_bytes(self, bias: bool | None = None) -> int:
        return sum(FILES[r].approx_bytes for r in self.needed_roles(bias))


VARIANTS: dict[str, Variant] = {v.key: v for v in [
    Variant("style", "Style", "Captures the look (palette, brushwork, lighting) and leaves the content free.",
            ("style",), vram_gb=13, low_vram_gb=8),
    Variant("coarse-fine", "Coarse + Fine (+ Bias)", "Captures style and content: subjects, layout, details.",
            ("coarse", "fine"), vram_gb=24, low_vram_gb=8, bias_default=True),
    Variant("coarse", "Coarse", "Style and content at a coarse level; lighter than Coarse + Fine.",
            ("coarse",), vram_gb=20, low_vram_gb=8),
    Variant("fine", "Fine", "Adds 1024x1024 detail; meant to go with Coarse.",
            ("fine",), vram_gb=20, low_vram_gb=8),
]}


def get_variant(key: str) -> Variant:
    key = key.strip().lower().replace("_", "-").replace("+", "-")
    if key in ("coarsefine", "coarse-fine-bias"):
        key = "coarse-fine"
    try:
        return VARIANTS[key]
    except KeyError:
        from .errors import bad_input
        raise bad_input(f"Unknown variant '{key}'.", "Choose one of: " + ", ".join(VARIANTS)) from None


def missing_roles(variant: Variant, models_dir: str, bias: bool | None = None) -> list[str]:
    return [r for r in variant.needed_roles(bias) if not FILES[r].resolve(models_dir)]


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
