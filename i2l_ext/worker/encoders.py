"""The image encoders, every image of a job in one batch.

Each computes what DiffSynth's Encode units compute image by image (``QwenImageUnit_Image2LoRAEncode``
and ``ZImageUnit_Image2LoRAEncode`` share SigLIP2-G384 and DINOv3-7B), through the model's own
submodules. The caller moves a model onto its device before and releases it after.
"""
from __future__ import annotations

import torch

from ..contract import I2LError, T
from . import vram
from .streaming import is_on_host, keep_on_host

# The Qwen2.5-VL edit prompt of QwenImageUnit_Image2LoRAEncode.encode_prompt_edit.
QWENVL_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                   "objects, background), then explain how the user's text instruction should alter or modify the "
                   "image. Generate a new image that meets the user's requirements while maintaining consistency "
                   "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                   "<|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
QWENVL_DROP = 64          # the prompt's first tokens, dropped from the residual

# GPU working memory of one pass beyond the weights, per image and fixed (bfloat16), as the engine
# sizes what it keeps on the GPU beside a job. The text encoder's: measured on the full-width model
# (RSS, CPU) with 1024x1024 and 224x224 images; the image encoders': the size of their largest
# activations (DINOv3: 4101 tokens of 4096, its 8192-wide gated MLP).
GiB = vram.GiB
WORK_PER_IMAGE = {"siglip2": 0.05 * GiB, "dinov3": 0.3 * GiB, "text_encoder@1024": 0.28 * GiB,
                  "text_encoder@224": 0.04 * GiB}
WORK_FIXED = int(0.1 * GiB)


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


def prepare(model) -> None:
    """Once, when a model is built: parts that never go to the GPU. The Qwen2.5-VL text encoder's
    language-model head (1.1 GB) is not used for the residual and is dropped; its token embedding
    (1.1 GB, of which a job reads a few hundred rows) stays in host memory and is looked up there
    (``qwenvl``). Its vision tower's windowed attention runs every window of a size in one call
    (``windows_attention``) instead of one call per window."""
    lm = getattr(model, "model", None)
    language = getattr(lm, "language_model", None)
    if not (hasattr(model, "lm_head") and hasattr(language, "embed_tokens") and hasattr(lm, "visual")):
        return
    if getattr(model, "vram_management_enabled", False):
        return                      # the disk profile: DiffSynth's layers fetch their own weights
    model.lm_head = None
    keep_on_host(language.embed_tokens)
    lm.visual.config._attn_implementation = WINDOWS_ATTENTION
    _register_windows_attention()


def qwenvl(te, proc, images, dtype, dev, chunk):
    """The Coarse / Fine residual: Qwen2.5-VL hidden states of the edit prompt with the image,
    first 64 tokens dropped (as QwenImageUnit_Image2LoRAEncode.encode_prompt_edit), ``chunk``
    images per pass: [N, 1, tokens * hidden]. DiffSynth's forward returns every layer's hidden
    states and keeps the generation cache; only the last (the final norm's output) is used, so
    the language model runs without either."""
    outs = []
    vl = te.model
    embed = vl.language_model.embed_tokens
    for s in range(0, len(images), chunk):
        part = images[s:s + chunk]
        inputs = proc(text=[QWENVL_TEMPLATE.format("")] * len(part), images=part, padding=True,
                      return_tensors="pt")
        embeds = embed(inputs.input_ids).to(dev, non_blocking=True) if is_on_host(embed) else None
        inputs = inputs.to(dev)
        hidden = vl(input_ids=inputs.input_ids, inputs_embeds=embeds, attention_mask=inputs.attention_mask,
                    pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
                    use_cache=False, output_hidden_states=False).last_hidden_state
        for h, m in zip(hidden, inputs.attention_mask):       # each prompt's real tokens
            e = h[m.bool()]
            outs.append(e[QWENVL_DROP:].to(dtype=dtype, device=dev).reshape(1, -1))
    lengths = {o.shape[1] for o in outs}
    if len(lengths) != 1:
        raise I2LError(I2LError.INTERNAL, T("m_residuals"), T("m_report"))
    return torch.stack(outs)


# transformers hands an attention implementation the packed sequences with their boundaries
# (``cu_seq_lens_q``) in one call when its name says "flash"; others get one call per window.
WINDOWS_ATTENTION = "i2l_windows_flash"


def windows_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                      cu_seq_lens_q=None, **kwargs):
    """Attention within each of the packed sequences (the vision tower's windows, or its whole
    images), ``scaled_dot_product_attention`` once for all the sequences of one length: what
    transformers' per-window loop computes, in a few calls instead of hundreds per layer.
    ``query`` etc.: [1, heads, tokens, head_dim]; returns ([1, tokens, heads, head_dim], None)."""
    F = torch.nn.functional
    q, k, v = query[0], key[0], value[0]                          # [heads, tokens, dim]
    heads, total, dim = q.shape
    bounds = cu_seq_lens_q.tolist() if cu_seq_lens_q is not None else [0, total]
    by_length: dict[int, list[int]] = {}
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            by_length.setdefault(b - a, []).append(a)
    out = q.new_empty(total, heads, dim)
    for length, starts in by_length.items():
        if len(starts) == 1:
            a = starts[0]
            o = F.scaled_dot_product_attention(q[None, :, a:a + length], k[None, :, a:a + length],
                                               v[None, :, a:a + length], scale=scaling)
            out[a:a + length] = o[0].transpose(0, 1)
            continue
        idx = (torch.tensor(starts, device=q.device)[:, None]
               + torch.arange(length, device=q.device)[None, :]).reshape(-1)
        def pick(t):
            return t.index_select(1, idx).view(heads, len(starts), length, dim).transpose(0, 1)
        o = F.scaled_dot_product_attention(pick(q), pick(k), pick(v), scale=scaling)   # [n, heads, len, dim]
        out.index_copy_(0, idx, o.permute(0, 2, 1, 3).reshape(-1, heads, dim))
    return out[None], None


def _register_windows_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(WINDOWS_ATTENTION, windows_attention)
