"""The image encoders, every image of a job in one batch.

Each computes what DiffSynth's Encode units compute image by image (``QwenImageUnit_Image2LoRAEncode``
and ``ZImageUnit_Image2LoRAEncode`` share SigLIP2-G384 and DINOv3-7B), through the model's own
submodules. The caller moves a model onto its device before and releases it after.
"""
from __future__ import annotations

import torch

from ..contract import I2LError, T

# The Qwen2.5-VL edit prompt of QwenImageUnit_Image2LoRAEncode.encode_prompt_edit.
QWENVL_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                   "objects, background), then explain how the user's text instruction should alter or modify the "
                   "image. Generate a new image that meets the user's requirements while maintaining consistency "
                   "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                   "<|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
QWENVL_DROP = 64          # the prompt's first tokens, dropped from the residual


def siglip(sig, images, dtype, dev):
    """SigLIP2-G384's pooled embedding of each image: [N, hidden]."""
    pv = sig.processor(images=images, return_tensors="pt")["pixel_values"]
    # As Siglip2ImageEncoder.forward: pixels go in as bfloat16 (its default torch_dtype).
    pv = pv.to(device=dev, dtype=torch.bfloat16)
    h = sig.embeddings(pv, interpolate_pos_encoding=False)
    h = sig.encoder(inputs_embeds=h, output_attentions=False, output_hidden_states=False).last_hidden_state
    h = sig.post_layernorm(h)
    return sig.head(h).to(dtype)


def dinov3(dino, images, dtype, dev):
    """DINOv3-7B's class token of each image: [N, hidden]."""
    pv = dino.processor(images=images, return_tensors="pt")["pixel_values"]
    pv = pv.to(device=dev, dtype=torch.bfloat16)     # as DINOv3ImageEncoder.forward
    h = dino.embeddings(pv, bool_masked_pos=None)
    pe = dino.rope_embeddings(pv)
    for layer in dino.model.layer:
        h = layer(h, attention_mask=None, position_embeddings=pe)
    return dino.norm(h)[:, 0, :].to(dtype)


def qwenvl(te, proc, images, dtype, dev, chunk):
    """The Coarse / Fine residual: Qwen2.5-VL hidden states of the edit prompt with the image,
    first 64 tokens dropped (as QwenImageUnit_Image2LoRAEncode.encode_prompt_edit), ``chunk``
    images per pass: [N, 1, tokens * hidden]."""
    outs = []
    for s in range(0, len(images), chunk):
        part = images[s:s + chunk]
        inputs = proc(text=[QWENVL_TEMPLATE.format("")] * len(part), images=part, padding=True,
                      return_tensors="pt").to(dev)
        hidden = te(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                    pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
                    output_hidden_states=True)[-1]
        for h, m in zip(hidden, inputs.attention_mask):       # each prompt's real tokens
            e = h[m.bool()]
            outs.append(e[QWENVL_DROP:].to(dtype=dtype, device=dev).reshape(1, -1))
    lengths = {o.shape[1] for o in outs}
    if len(lengths) != 1:
        raise I2LError(I2LError.INTERNAL, T("m_residuals"), T("m_report"))
    return torch.stack(outs)
