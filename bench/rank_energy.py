"""The energy a rank cap keeps, on the full-size Style decoder with random weights and random inputs
(what the benchmark's random model set gives; it says nothing of LoRAs of real images).

    python bench/rank_energy.py [--counts 1,5] [--caps 32,16,8,4] [--seed 0] [--out energy.json]

The decoder is DiffSynth's own class at its real size, its weights drawn as bench/fake_weights.py
draws them (bf16, N(0, 0.02^2)); each image's encoder output is a random vector of the true width
(SigLIP2 and DINOv3 side by side). The job's own decode, merge (alpha 1/N) and rank cap
(``i2l_ext.worker.engine`` / ``rank_cap``) then run on the CPU or the GPU, whichever is here.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common as C  # noqa: E402
import torch  # noqa: E402

from i2l_ext.worker import decoders  # noqa: E402
from i2l_ext.worker.models import build_model, import_dotted, real_model_config  # noqa: E402
from i2l_ext.worker.rank_cap import cap_rank  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1,5")
    ap.add_argument("--caps", default="32,16,8,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    real = real_model_config("style")
    cls = import_dotted(real["model_class"])
    t0 = time.time()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in cls(**real["extra_kwargs"]).state_dict().items()}
    g = torch.Generator(device=dev).manual_seed(a.seed)
    sd = {k: torch.randn(tuple(s), generator=g, device=dev, dtype=torch.bfloat16).mul_(0.02) for k, s in shapes.items()}
    model = build_model(cls, real["extra_kwargs"], sd, None, torch.bfloat16, dev)
    params = sum(v.numel() for v in sd.values())
    width = model.blocks[0].__dict__.get("in_dim") or next(
        m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    print(f"decoder: {params / 1e9:.2f} B parameters, input width {width}, built in {time.time() - t0:.0f} s on {dev}",
          flush=True)
    rows = []
    with torch.no_grad():
        for n in (int(c) for c in a.counts.split(",")):
            x = torch.randn(n, width, generator=g, device=dev, dtype=torch.bfloat16)
            lora = decoders.merge([decoders.decode(model, x, None, n)], 1 / n)
            rank = max(v.shape[0] for k, v in lora.items() if ".lora_A." in k)
            for cap in (int(c) for c in a.caps.split(",")):
                t = time.perf_counter()
                capped, energy = cap_rank(lora, cap)
                secs = time.perf_counter() - t
                rows.append({"images": n, "rank": rank, "cap": cap, "energy_kept": round(energy, 6),
                             "seconds": round(secs, 3), "device": dev})
                print(json.dumps(rows[-1]), flush=True)
    if a.out:
        C.write_json(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
