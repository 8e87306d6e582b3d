"""Model families: one description per base model that i2L makes LoRAs for.

A family says what its LoRAs are for (the base model, the generators that load them, the card's
and the metadata's words for it), which DiT modules they change (for key checks), which key
formats those generators read, and which decoders make them (their files are in ``catalog``).
The job, the streaming, the CLI and the tab read these descriptions; adding a family is an
entry here, its files and variants in ``catalog``, and the decoder's code only if DiffSynth's
decoder class is new in shape. Pure Python: imported by the host and the worker.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Decoder:
    """One i2L decoder: its file's role in ``catalog.FILES`` and DiffSynth's name for it in
    ``diffsynth/configs/model_configs.py`` (its class, key hash and config come from there)."""
    role: str
    ds_name: str
    title: str               # its name in progress lines (a product name, the same in every language)
    residual: str = ""       # "" none; "low" / "high": the Qwen2.5-VL residual at 224 / 1024 px
    text_chunk: int = 0      # images per Qwen2.5-VL pass for that residual


@dataclass(frozen=True)
class Family:
    key: str
    label: str                          # the base model, as users name it
    architecture: str                   # ``modelspec.architecture`` of the LoRA
    implementation: str                 # ``modelspec.implementation``
    base_model_version: str             # ``ss_base_model_version``
    sd_version: str                     # the Lora card's "sd version" in Forge Neo ("Unknown" elsewhere)
    generators: tuple[str, ...]         # where its LoRAs load (with a model of this family)
    blocks: tuple[tuple[str, int], ...]            # the DiT's block lists: (prefix, count)
    block_linears: dict[str, tuple[int, int]]      # linear module in a block -> (in, out)
    decoded_modules: tuple[str, ...]               # the modules of each block the decoders write
    top_linears: dict[str, tuple[int, int]] = field(default_factory=dict)   # linears outside the blocks
    # The key prefixes Forge Neo's loader maps for any model; the others it maps only once it has
    # recognised the loaded model as this family.
    any_model_prefixes: tuple[str, ...] = ("diffusion_model.",)
    model_prefixes: tuple[str, ...] = ()
    key_formats: tuple[str, ...] = ("diffusers",)
    bias_role: str = ""                 # a LoRA file merged on top of the decoded one ("" none)
    conditional_only: bool = False      # made for the conditional branch only (DiffSynth applies it so)

    def dit_modules(self, max_blocks: int | None = None) -> list[str]:
        """Every linear module path of the DiT (the first ``max_blocks`` of each block list)."""
        mods = list(self.top_linears)
        for prefix, count in self.blocks:
            for i in range(count if max_blocks is None else min(count, max_blocks)):
                mods += [f"{prefix}.{i}.{m}" for m in self.block_linears]
        return mods

    def linear_shape(self, module: str) -> tuple[int, int] | None:
        """(in, out) of a module path, None when the DiT has no such linear module."""
        if module in self.top_linears:
            return self.top_linears[module]
        for prefix, count in self.blocks:
            head = prefix + "."
            if module.startswith(head):
                idx, _, name = module[len(head):].partition(".")
                if idx.isdigit() and int(idx) < count:
                    return self.block_linears.get(name)
        return None


QWEN_IMAGE = Family(
    key="qwen-image", label="Qwen-Image",
    architecture="Qwen-Image/lora", implementation="https://github.com/QwenLM/Qwen-Image",
    base_model_version="qwen_image", sd_version="qwen",
    generators=("Forge Neo", "ComfyUI", "SD.Next", "diffusers"),
    blocks=(("transformer_blocks", 60),),
    block_linears={
        "img_mod.1": (3072, 18432),
        "attn.to_q": (3072, 3072), "attn.to_k": (3072, 3072), "attn.to_v": (3072, 3072),
        "attn.add_q_proj": (3072, 3072), "attn.add_k_proj": (3072, 3072), "attn.add_v_proj": (3072, 3072),
        "attn.to_out.0": (3072, 3072), "attn.to_add_out": (3072, 3072),
        "img_mlp.net.0.proj": (3072, 12288), "img_mlp.net.2": (12288, 3072),
        "txt_mod.1": (3072, 18432),
        "txt_mlp.net.0.proj": (3072, 12288), "txt_mlp.net.2": (12288, 3072),
    },
    decoded_modules=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.2", "img_mod.1",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                     "txt_mlp.net.2", "txt_mod.1"),
    top_linears={
        "time_text_embed.timestep_embedder.linear_1": (256, 3072),
        "time_text_embed.timestep_embedder.linear_2": (3072, 3072),
        "img_in": (64, 3072), "txt_in": (3584, 3072), "norm_out.linear": (3072, 6144), "proj_out": (3072, 64),
    },
    any_model_prefixes=("diffusion_model.", "lora_unet_"),
    model_prefixes=("", "transformer.", "lycoris_"),
    key_formats=("diffusers", "kohya"),
    bias_role="bias",
)

Z_IMAGE = Family(
    key="z-image", label="Z-Image",
    architecture="Z-Image/lora", implementation="https://github.com/Tongyi-MAI/Z-Image",
    base_model_version="z_image", sd_version="zit",
    generators=("Forge Neo", "ComfyUI", "SD.Next", "diffusers"),
    blocks=(("layers", 30), ("context_refiner", 2), ("noise_refiner", 2)),
    block_linears={
        "attention.to_q": (3840, 3840), "attention.to_k": (3840, 3840), "attention.to_v": (3840, 3840),
        "attention.to_out.0": (3840, 3840),
        "feed_forward.w1": (3840, 10240), "feed_forward.w2": (10240, 3840), "feed_forward.w3": (3840, 10240),
    },
    decoded_modules=("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    any_model_prefixes=("diffusion_model.",),
    model_prefixes=("lycoris_",),
    conditional_only=True,
)

FAMILIES: dict[str, Family] = {f.key: f for f in (QWEN_IMAGE, Z_IMAGE)}

DECODERS: dict[str, Decoder] = {d.role: d for d in (
    Decoder("style", "qwen_image_image2lora_style", "Style"),
    Decoder("coarse", "qwen_image_image2lora_coarse", "Coarse", residual="low", text_chunk=16),
    Decoder("fine", "qwen_image_image2lora_fine", "Fine", residual="high", text_chunk=4),
    Decoder("z_image", "z_image_image2lora_style", "Z-Image"),
    Decoder("z_image_omni", "z_image_image2lora_style", "Z-Image-Omni-Base"),
)}

# Encoders: role -> diffsynth's model name. SigLIP2 and DINOv3 serve every decoder; the Qwen2.5-VL
# text encoder (with its processor) serves the decoders that take a residual.
ENCODERS: dict[str, str] = {
    "siglip2": "siglip2_image_encoder",
    "dinov3": "dinov3_image_encoder",
    "text_encoder": "qwen_image_text_encoder",
}
IMAGE_ENCODERS = ("siglip2", "dinov3")
TEXT_ENCODER = ("text_encoder", "processor")


def ds_name(role: str) -> str:
    """DiffSynth's model name of a model file's role."""
    return DECODERS[role].ds_name if role in DECODERS else ENCODERS[role]
