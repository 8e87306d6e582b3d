"""The i2L decoders, every image of a job at once, and the merge of their LoRAs.

A DiffSynth i2L decoder is one or more components (Qwen-Image's decoder is one; Z-Image's has
three: ``layers``, ``context_refiner``, ``noise_refiner``), each a list of blocks with an optional
residual projection; a block turns the image embedding into the A and B matrices of its DiT
modules. What is computed equals the decoder's own forward for each image followed by
DiffSynth's ``merge_lora(loras, alpha=1/N)`` (and ``merge_lora([lora, bias])`` for a Bias LoRA),
within float rounding; only the order differs: each block's projections run for all images in
a few batched products.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..contract import I2LError, T

_NO_PLAN = object()


def components(model) -> list:
    """The parts of a decoder that hold its blocks, in the decoder's own order."""
    if hasattr(model, "blocks"):
        return [model]
    return [c for c in model.children() if hasattr(c, "blocks")]


def blocks(model) -> list:
    """Every block of a decoder, in order (worked out once per model)."""
    found = model.__dict__.get("_i2l_blocks")
    if found is None:
        found = model.__dict__["_i2l_blocks"] = [b for c in components(model) for b in c.blocks]
    return found


def lora_numel(model, n_images: int) -> int:
    """How many numbers a decoder's LoRA for ``n_images`` holds (its A and B for every image)."""
    return sum(n_images * layer.rank * (a_dim + b_dim)
               for block in blocks(model)
               for (_, a_dim, b_dim), layer in zip(block.lora_patterns, block.layers))


def can_read_raw(model) -> bool:
    """Whether every block's weights lie in its host bytes in a way ``decode`` can read from the
    block's GPU copy directly (``Streamer(point=False)``)."""
    return all(block_plan(b) is not None for b in blocks(model))


def decode(model, x, residual, n, streamer=None) -> dict:
    """Per-image LoRAs of one decoder for all images at once: key -> (A [N, r, in], B [N, out, r])."""
    out = {}
    layer_of = {id(layer): i for i, layer in enumerate(streamer.layers)} if streamer is not None else {}
    for comp in components(model):
        r_in = residual * comp.residual_scale if residual is not None and comp.use_residual else None
        for block in comp.blocks:
            i = layer_of.get(id(block))
            if getattr(model, "vram_management_enabled", False):
                # The disk profile: DiffSynth's wrapped layers fetch their weights inside their own
                # forward, so the blocks run through their modules.
                _decode_block_modules(block, x, r_in, n, out)
            elif i is not None and not streamer.point:
                # The block's weights read straight from its GPU bytes (no parameter swapping)
                with streamer.layer(i):
                    buf, base = streamer.span(i)
                    plan = block_plan(block)
                    if plan is None or plan["base"] != base:
                        raise I2LError(I2LError.INTERNAL, T("m_block_moved"), T("m_report"))
                    decode_block_raw(block, plan, buf, x, r_in, n, out)
            else:
                with streamer.layer(i) if i is not None else nullcontext():
                    decode_block(block, x, r_in, n, out)
    return out


def block_plan(block) -> dict | None:
    """Where a decoder block's weights lie in its host bytes (element offset, shape, stride from
    the block's lowest address, as ``Streamer`` copies it), worked out once per block."""
    plan = block.__dict__.get("_i2l_plan", _NO_PLAN)
    if plan is _NO_PLAN:
        plan = block.__dict__["_i2l_plan"] = _block_plan(block)
    return plan


def _block_plan(block) -> dict | None:
    params = [p for p in block.parameters()]
    if not params or any(p.device.type != "cpu" for p in params):
        return None
    base = min(p.data_ptr() for p in params)
    mlps = [m for layer in block.layers for m in (layer.proj_a, layer.proj_b)]
    pr = block.proj_residual
    tensors = [m.proj_in.weight for m in mlps] + [m.proj_out.weight for m in mlps]
    if any(m.proj_in.bias is not None or m.proj_out.bias is not None for m in mlps):
        return None
    pr_parts = []
    if pr is not None:
        pr_parts = [pr.proj_in.weight, pr.proj_in.bias, pr.proj_out.weight, pr.proj_out.bias]
        tensors += [t for t in pr_parts if t is not None]
    dtype = tensors[0].dtype
    esize = tensors[0].element_size()
    if any(t.dtype != dtype or not t.is_contiguous() or (t.data_ptr() - base) % esize for t in tensors):
        return None

    def where(t):
        return None if t is None else ((t.data_ptr() - base) // esize, tuple(t.shape), tuple(t.stride()))
    ins = [where(m.proj_in.weight) for m in mlps]
    outs = [where(m.proj_out.weight) for m in mlps]
    return {"base": base, "dtype": dtype, "in": ins, "out": outs, "pr": [where(t) for t in pr_parts],
            "in_batch": _as_batch(ins), "out_batch": _as_batch(outs)}


def _as_batch(entries) -> tuple | None:
    """Equal tensors at equal distances (offset, shape, stride) as one strided batch view's
    (offset, shape, stride); None when they are not laid out so."""
    if len(entries) < 2 or any(e[1:] != entries[0][1:] for e in entries):
        return None
    step = entries[1][0] - entries[0][0]
    if step <= 0 or any(b[0] - a[0] != step for a, b in zip(entries, entries[1:])):
        return None
    return entries[0][0], (len(entries),) + entries[0][1], (step,) + entries[0][2]


def decode_block_raw(block, plan, buf, x, residual, n, out) -> None:
    """``decode_block`` with the weights taken from the block's bytes ``buf`` by ``plan``
    (the block's first and second projections as two strided batches where they lie evenly)."""
    flat = buf.view(plan["dtype"])
    start = flat.storage_offset()

    def w(entry):
        return None if entry is None else torch.as_strided(flat, entry[1], entry[2], start + entry[0])
    r = None
    pr = block.proj_residual
    if pr is not None:
        in_w, in_b, out_w, out_b = (w(e) for e in plan["pr"])
        r = _residual(pr, residual, n, in_w, in_b, out_w, out_b)
    w_in = w(plan["in_batch"]) if plan["in_batch"] else [w(e) for e in plan["in"]]
    w_out = w(plan["out_batch"]) if plan["out_batch"] else [w(e) for e in plan["out"]]
    _decode_mlps(block, w_in, w_out, x, r, n, out)


def _decode_block_modules(block, x, residual, n, out) -> None:
    """One decoder block through its modules (as ``LoRATrainerBlock.forward``), every image at once."""
    r = None
    if block.proj_residual is not None:
        r = torch.cat([block.proj_residual(residual[i]) for i in range(n)])     # [N, compress]
    _decode_block_plain(block, x, r, n, out)


def decode_block(block, x, residual, n, out) -> None:
    """One decoder block for every image, in a handful of kernels: the block's first
    projections (they all read the same embedding) as one batched product, the second ones
    as another where their shapes agree. The same arithmetic as the block's modules."""
    r = None
    pr = block.proj_residual
    if pr is not None:
        r = _residual(pr, residual, n, pr.proj_in.weight, pr.proj_in.bias, pr.proj_out.weight, pr.proj_out.bias)
    mlps = [m for layer in block.layers for m in (layer.proj_a, layer.proj_b)]
    if any(m.proj_in.bias is not None or m.proj_out.bias is not None for m in mlps):
        return _decode_block_plain(block, x, r, n, out)
    _decode_mlps(block, [m.proj_in.weight for m in mlps], [m.proj_out.weight for m in mlps], x, r, n, out)


def _residual(pr, residual, n, in_w, in_b, out_w, out_b):
    """``SequencialMLP.forward`` for every image at once."""
    F = torch.nn.functional
    h = F.linear(residual.reshape(n, pr.length, pr.in_dim), in_w, in_b)
    return F.linear(h.reshape(n, pr.length * pr.mid_dim), out_w, out_b)


def _decode_mlps(block, w_in, w_out, x, r, n, out) -> None:
    """The block's bias-free MLPs (proj_a, proj_b of each layer, in order) for every image.
    ``w_in`` / ``w_out``: the weights as lists, or each as one [2L, rows, cols] batch."""
    if isinstance(w_in, (list, tuple)):
        w_in = torch.stack(w_in)
    k = w_in.shape[0]
    h = torch.bmm(x.expand(k, *x.shape), w_in.transpose(1, 2))      # [2L, n, compress]
    if r is not None:
        h = h + r
    if isinstance(w_out, (list, tuple)) and all(w.shape == w_out[0].shape for w in w_out):
        w_out = torch.stack(w_out)
    if isinstance(w_out, torch.Tensor):
        res = torch.bmm(h, w_out.transpose(1, 2)).unbind(0)               # 2L x [n, out]
    else:
        res = [h[j] @ wo.T for j, wo in enumerate(w_out)]
    for j, (key, rank, a_dim, b_dim) in enumerate(_block_outputs(block)):
        out[key] = (res[2 * j].reshape(n, rank, a_dim), res[2 * j + 1].reshape(n, b_dim, rank))


def _block_outputs(block) -> list:
    """(LoRA key, rank, A's width, B's height) of each layer of a decoder block, worked out once."""
    outs = block.__dict__.get("_i2l_outputs")
    if outs is None:
        prefix = getattr(block, "prefix", "transformer_blocks")
        outs = block.__dict__["_i2l_outputs"] = [
            (f"{prefix}.{block.block_id}.{name}.lora_A.default.weight", layer.rank, a_dim, b_dim)
            for (name, a_dim, b_dim), layer in zip(block.lora_patterns, block.layers)]
    return outs


def _decode_block_plain(block, x, r, n, out) -> None:
    for (key, rank, a_dim, b_dim), layer in zip(_block_outputs(block), block.layers):
        a = layer.proj_a(x, r).view(n, rank, a_dim)
        b = layer.proj_b(x, r).view(n, b_dim, rank)
        out[key] = (a, b)


def merge(parts, alpha):
    """merge_lora over [decoder1 image1..N, decoder2 image1..N, ...] with one alpha."""
    lora = {}
    for key in parts[0]:
        As, Bs = [], []
        for part in parts:
            a, b = part[key]
            n, r, a_dim = a.shape
            As.append(a.reshape(n * r, a_dim))
            Bs.append(b.permute(1, 0, 2).reshape(b.shape[1], n * r))
        A = torch.concat(As, dim=0) if len(As) > 1 else As[0]
        lora[key] = A * alpha
        lora[key.replace(".lora_A.", ".lora_B.")] = torch.concat(Bs, dim=1) if len(Bs) > 1 else Bs[0]
    return lora


def merge_bias(lora, bias):
    """DiffSynth's ``merge_lora([lora, bias])``: the Bias LoRA's modules must cover the LoRA's."""
    from diffsynth.utils.lora.merge import merge_lora
    missing = [k for k in lora if k not in bias]
    if missing:
        raise I2LError(I2LError.WEIGHTS_INVALID, T("m_bias_cover", key=missing[0], n=len(missing) - 1),
                       T("m_bias_fix"))
    dev = next(iter(lora.values())).device
    return merge_lora([lora, {k: bias[k].to(dev) for k in lora}])
