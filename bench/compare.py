"""Our LoRA against the reference's, module by module, as the change each makes: B·A.

    python3 bench/compare.py OURS.safetensors REF.safetensors [--out equal.json]

Keys are matched through the product's key conversion (the reference writes DiffSynth's own
names). Prints and writes the relative error ||ΔW_ours - ΔW_ref|| / ||ΔW_ref|| (Frobenius) over
the whole LoRA and the largest among the modules; bf16 files agree to about 1e-2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from i2l_ext import lora_format  # noqa: E402


def compare(ours_path: str, ref_path: str) -> dict:
    import torch
    from safetensors.torch import load_file
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ours, ref = load_file(ours_path), load_file(ref_path)
    diff2 = ref2 = 0.0
    worst, modules, missing = 0.0, 0, []
    for k, a_ref in ref.items():
        path, ab = lora_format.split_key(k)
        if ab != "A":
            continue
        b_ref = ref[k.replace(".lora_A.", ".lora_B.")]
        ka = lora_format.convert_key(k, "diffusers")
        kb = lora_format.convert_key(k.replace(".lora_A.", ".lora_B."), "diffusers")
        if ka not in ours or kb not in ours:
            missing.append(path)
            continue
        w_ref = b_ref.to(dev, torch.float32) @ a_ref.to(dev, torch.float32)
        w_ours = ours[kb].to(dev, torch.float32) @ ours[ka].to(dev, torch.float32)
        d = (w_ours - w_ref).pow(2).sum().item()
        r = w_ref.pow(2).sum().item()
        diff2, ref2, modules = diff2 + d, ref2 + r, modules + 1
        worst = max(worst, (d / r) ** 0.5 if r else 0.0)
    extra = len(ours) - 2 * modules
    return {"ours": ours_path, "reference": ref_path, "modules": modules, "missing": missing[:5],
            "n_missing": len(missing), "extra_keys": extra,
            "relative_error": (diff2 / ref2) ** 0.5 if ref2 else None, "worst_module": worst}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("ref")
    ap.add_argument("--out")
    a = ap.parse_args()
    r = compare(a.ours, a.ref)
    print(f"ours vs reference: {r['modules']} modules, relative error of B·A {r['relative_error']:.2e} "
          f"(worst module {r['worst_module']:.2e}), missing {r['n_missing']}, extra keys {r['extra_keys']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)
    return 0 if r["n_missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
