"""Where a Z-Image LoRA lands in another generator: diffusers' own Z-Image LoRA loading path.

The keys are those the worker writes for DiffSynth's full-size Z-Image i2L decoder (built on the
meta device, no weights), through the product's key format; diffusers converts them as its
``ZImagePipeline.lora_state_dict`` does, and each must name a linear module of its
``ZImageTransformer2DModel`` (Z-Image-Turbo's sizes, also on the meta device) with the LoRA's
shapes. Runs in the worker's environment with diffusers added for the tests.
"""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from i2l_ext import families, lora_format  # noqa: E402
from i2l_ext.worker import decoders  # noqa: E402


def z_image_lora(rank=4) -> dict:
    """The worker's LoRA keys for the real Z-Image i2L decoder, in the default key format."""
    from diffsynth.models.z_image_image2lora import ZImageImage2LoRAModel
    from i2l_ext.worker.models import real_model_config
    with torch.device("meta"):
        model = ZImageImage2LoRAModel(**real_model_config("z_image")["extra_kwargs"])
    lora = {}
    for block in decoders.blocks(model):
        for key, _, a_dim, b_dim in decoders._block_outputs(block):
            lora[key] = torch.zeros(rank, a_dim, dtype=torch.bfloat16)
            lora[key.replace(".lora_A.", ".lora_B.")] = torch.zeros(b_dim, rank, dtype=torch.bfloat16)
    return lora_format.build_state_dict(lora, "diffusers")


def test_diffusers_loads_every_key_of_a_z_image_lora():
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    sd = z_image_lora()
    assert len(sd) == 2 * sum(count for _, count in families.Z_IMAGE.blocks) * len(families.Z_IMAGE.decoded_modules)
    converted = ZImagePipeline.lora_state_dict(dict(sd))
    converted = converted[0] if isinstance(converted, tuple) else converted
    assert len(converted) == len(sd)
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel()
    modules = dict(transformer.named_modules())
    landed = set()
    for key, t in converted.items():
        assert key.startswith("transformer."), key
        path, _, half = key[len("transformer."):].rpartition(".lora_")
        m = modules.get(path)
        assert isinstance(m, torch.nn.Linear), f"{key}: no linear module {path}"
        want = (4, m.in_features) if half == "A.weight" else (m.out_features, 4)
        assert tuple(t.shape) == want, key
        landed.add(path)
    assert len(landed) == len(sd) // 2
