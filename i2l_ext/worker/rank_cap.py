"""The rank cap: each module's change ΔW = B·A replaced by its best rank-R approximation.

The i2L decoders give every module a LoRA of rank 4 per image per decoder, so the file grows with
the number of images. A cap R keeps, per module, the R largest singular directions of ΔW (the
truncated SVD, by Eckart-Young the closest rank-R matrix in the Frobenius norm) without ever
forming the out x in matrix: with B = Qb·Rb and Aᵀ = Qa·Ra (reduced QR),
ΔW = Qb·(Rb·Raᵀ)·Qaᵀ, so the SVD of the small r x r matrix Rb·Raᵀ = U·S·Vᵀ is ΔW's own:
ΔW = (Qb·U)·S·(Qa·V)ᵀ. Modules with the same shapes are worked on together, in batches, in
float32 on the LoRA's device; the factors are cast back to the LoRA's dtype.

The share of the change a cap keeps is its energy: the sum of the kept squared singular values
over the sum of all of them (ΔW's squared Frobenius norm), summed over the modules.
"""
from __future__ import annotations

import torch

BATCH_BYTES = 128 << 20      # float32 factors taken at once: bounds the extra memory to a few times this


def cap_rank(lora: dict, max_rank: int) -> tuple[dict, float]:
    """``(lora, energy kept)``: every module of ``lora`` (DiffSynth keys, A ``[r, in]`` and B
    ``[out, r]``) at rank ``max_rank`` at most, and the share of the LoRA's energy that stays.
    A module whose rank is not above the cap keeps its factors as they are."""
    groups: dict[tuple, list[str]] = {}
    for key, a in lora.items():
        if ".lora_A." in key:
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(key)
    if all(shapes[0][0] <= max_rank for shapes in groups):
        return lora, 1.0
    out = dict(lora)
    kept = total = 0.0
    for (a_shape, b_shape), keys in groups.items():
        rank = a_shape[0]
        step = max(1, BATCH_BYTES // (4 * rank * (a_shape[1] + b_shape[0])))
        for i in range(0, len(keys), step):
            a_keys = keys[i:i + step]
            b_keys = [k.replace(".lora_A.", ".lora_B.") for k in a_keys]
            dtype = lora[a_keys[0]].dtype
            a = torch.stack([lora[k] for k in a_keys]).float()          # [n, r, in]
            b = torch.stack([lora[k] for k in b_keys]).float()          # [n, out, r]
            qb, rb = torch.linalg.qr(b)
            qa, ra = torch.linalg.qr(a.transpose(1, 2))
            u, s, vh = torch.linalg.svd(rb @ ra.transpose(1, 2))
            energy = s.square()
            keep = min(max_rank, s.shape[-1])
            part = energy[:, :keep].sum().item()
            kept += part
            total += part + energy[:, keep:].sum().item()       # so the share never passes 1 by rounding
            if rank <= max_rank:
                continue
            # S split evenly, sqrt(S) on each side: bf16 rounds every value to 8 significant bits
            # whatever its size, so the product's rounding is the same wherever S goes, but the
            # even split leaves A and B of one scale (row / column i of each of norm sqrt(s_i)), as
            # the decoders' own factors are, instead of one factor orthonormal and the other
            # carrying the whole magnitude.
            root = s[:, :keep].sqrt()
            new_b = (qb @ u[:, :, :keep]) * root[:, None, :]
            new_a = root[:, :, None] * (vh[:, :keep, :] @ qa.transpose(1, 2))
            for j, (ka, kb) in enumerate(zip(a_keys, b_keys)):
                out[ka] = new_a[j].to(dtype)
                out[kb] = new_b[j].to(dtype)
    return out, kept / total if total > 0 else 1.0
