"""Key formats, the Forge Neo / ComfyUI key-map check and file metadata (pure Python)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from i2l_ext import __version__, families, lora_format  # noqa: E402


class Shape:
    """Stands in for a tensor: build_state_dict only reads ``.shape``."""

    def __init__(self, *shape):
        self.shape = shape


def i2l_keys(num_blocks=2, family=families.QWEN_IMAGE):
    """DiffSynth's raw key names, as its decoders for ``family`` write them."""
    keys = []
    for prefix, count in family.blocks:
        for i in range(min(count, num_blocks)):
            for m in family.decoded_modules:
                keys += [f"{prefix}.{i}.{m}.lora_A.default.weight", f"{prefix}.{i}.{m}.lora_B.default.weight"]
    return keys


def test_no_torch_on_import():
    code = "import sys, i2l_ext.lora_format; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_convert_key_diffusers():
    k = "transformer_blocks.3.attn.to_out.0.lora_A.default.weight"
    assert lora_format.convert_key(k, "diffusers") == "diffusion_model.transformer_blocks.3.attn.to_out.0.lora_A.weight"
    assert lora_format.convert_key(k.replace("lora_A", "lora_B"), "diffusers") == \
        "diffusion_model.transformer_blocks.3.attn.to_out.0.lora_B.weight"
    assert lora_format.alpha_key(k, "diffusers") is None


def test_convert_key_kohya():
    k = "transformer_blocks.59.img_mlp.net.2.lora_A.default.weight"
    assert lora_format.convert_key(k, "kohya") == "lora_unet_transformer_blocks_59_img_mlp_net_2.lora_down.weight"
    assert lora_format.convert_key(k.replace("lora_A", "lora_B"), "kohya") == \
        "lora_unet_transformer_blocks_59_img_mlp_net_2.lora_up.weight"
    assert lora_format.alpha_key(k, "kohya") == "lora_unet_transformer_blocks_59_img_mlp_net_2.alpha"


def test_convert_key_rejects():
    with pytest.raises(ValueError):
        lora_format.convert_key("transformer_blocks.0.attn.to_q.weight", "diffusers")
    with pytest.raises(ValueError):
        lora_format.convert_key("transformer_blocks.0.attn.to_q.lora_A.default.weight", "lycoris")


def test_build_state_dict_kohya_alpha_is_rank():
    lora = {"transformer_blocks.0.attn.to_q.lora_A.default.weight": Shape(12, 3072),
            "transformer_blocks.0.attn.to_q.lora_B.default.weight": Shape(3072, 12)}
    sd = lora_format.build_state_dict(lora, "kohya", scalar=float)
    assert sd["lora_unet_transformer_blocks_0_attn_to_q.alpha"] == 12.0
    assert set(sd) == {"lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight",
                       "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight",
                       "lora_unet_transformer_blocks_0_attn_to_q.alpha"}
    sd = lora_format.build_state_dict(lora, "diffusers")
    assert set(sd) == {"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight",
                       "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight"}
    assert lora_format.lora_rank({k: v.shape for k, v in sd.items()}) == 12


@pytest.mark.parametrize("fmt", lora_format.FORMATS)
def test_written_formats_map_generically(fmt):
    keys = list(lora_format.build_state_dict({k: Shape(4, 8) for k in i2l_keys(60)}, fmt, scalar=float))
    report = lora_format.check_keys_map(keys)
    assert report["ok"] and report["generic"], report["unmapped"][:3]
    assert len(set(report["mapped"].values())) == 60 * 12


def test_raw_diffsynth_keys_map_only_as_qwen():
    report = lora_format.check_keys_map(i2l_keys(2))
    assert report["ok"] and not report["generic"]


def test_z_image_keys_map_in_neo_only_with_the_diffusers_names():
    """Forge Neo maps a Z-Image LoRA from ``diffusion_model.<diffusers name>`` (and ``lycoris_``),
    not from DiffSynth's bare names nor from kohya's ``lora_unet_`` names."""
    z = families.Z_IMAGE
    raw = i2l_keys(30, z)
    assert len(raw) == 34 * 7 * 2
    report = lora_format.check_keys_map(list(lora_format.build_state_dict({k: Shape(4, 8) for k in raw}, "diffusers")), z)
    assert report["ok"] and report["generic"] and len(set(report["mapped"].values())) == 34 * 7
    assert not lora_format.check_keys_map(raw, z)["mapped"]
    kohya = list(lora_format.build_state_dict({k: Shape(4, 8) for k in raw}, "kohya", scalar=float))
    assert not lora_format.check_keys_map(kohya, z)["mapped"]
    assert z.key_formats == ("diffusers",)


def test_family_shapes():
    assert families.Z_IMAGE.linear_shape("layers.29.feed_forward.w2") == (10240, 3840)
    assert families.Z_IMAGE.linear_shape("layers.30.feed_forward.w2") is None
    assert families.QWEN_IMAGE.linear_shape("img_in") == (64, 3072)
    assert len(families.QWEN_IMAGE.dit_modules()) == 6 + 60 * 14


def test_check_keys_map_finds_problems():
    report = lora_format.check_keys_map([
        "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight",     # B missing
        "diffusion_model.transformer_blocks.0.attn.to_qq.lora_A.weight",    # no such module
        "lora_unet_transformer_blocks_60_attn_to_q.lora_down.weight",       # block out of range
        "something.else",
    ])
    assert not report["ok"]
    assert report["incomplete"] == ["transformer_blocks.0.attn.to_q"]
    assert len(report["unmapped"]) == 3


def test_build_metadata():
    meta = lora_format.build_metadata("coarse-fine", ["a" * 64, "b" * 64], bias=True, key_format="kohya",
                                      title="My LoRA", diffsynth_version="2.1.12",
                                      extra={"ss_output_name": "x", "note": "hi", "n": 3})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["modelspec.architecture"] == "Qwen-Image/lora"
    assert meta["modelspec.implementation"] == "https://github.com/QwenLM/Qwen-Image"
    assert meta["modelspec.title"] == "My LoRA"
    assert meta["ss_base_model_version"] == "qwen_image"
    assert "ss_output_name" not in meta
    assert meta["i2l.variant"] == "coarse-fine" and meta["i2l.images"] == "2"
    assert json.loads(meta["i2l.image_sha256"]) == ["a" * 64, "b" * 64]
    assert meta["i2l.bias"] == "true" and meta["i2l.key_format"] == "kohya"
    assert meta["i2l.diffsynth_version"] == "2.1.12" and meta["i2l.version"] == __version__
    assert meta["i2l.created"][:2] == "20" and "T" in meta["i2l.created"]
    assert meta["note"] == "hi" and meta["n"] == "3"
    z = lora_format.build_metadata("z-image", ["a" * 64])
    assert z["modelspec.architecture"] == "Z-Image/lora" and z["ss_base_model_version"] == "z_image"
    assert z["modelspec.implementation"] == "https://github.com/Tongyi-MAI/Z-Image"
