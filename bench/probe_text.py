"""The Qwen2.5-VL residual pass (Coarse / Fine) alone, on the GPU, with no weight files: the full-size
text encoder built with random values on the GPU, the real processor's token counts. Per image
size and images per pass: the GPU memory a pass needs beyond the weights and its time (median),
for DiffSynth's forward as the official example calls it and for ``encoders.qwenvl`` after
``encoders.prepare`` (the embedding looked up in host memory, the vision windows batched).

    python3 bench/probe_text.py [--chunks 1,2,4,5,8] [--reps 3] [--out probe.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", default="1,2,4,5,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import numpy as np
    import torch
    from PIL import Image
    from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder
    from i2l_ext.testing import tiny
    from i2l_ext.worker import encoders
    from i2l_ext.worker.job import ENCODE_SIZE, RESIDUAL

    dev = "cuda"
    with torch.device("meta"):
        te = QwenImageTextEncoder()
    te = te.to_empty(device=dev).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in te.parameters():
            p.normal_(0, 0.02)
    proc = tiny.build_processor()
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (ENCODE_SIZE, ENCODE_SIZE, 3), dtype=np.uint8)) for _ in range(8)]
    low = [im.resize((RESIDUAL["low"][0],) * 2) for im in pics]
    weights = torch.cuda.memory_allocated()
    print(f"text encoder on the GPU: {weights / 2 ** 30:.2f} GB", flush=True)

    def official(images):
        inputs = proc(text=[encoders.QWENVL_TEMPLATE.format("")] * len(images), images=images, padding=True,
                      return_tensors="pt").to(dev)
        return te(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                  image_grid_thw=inputs.image_grid_thw, output_hidden_states=True)[-1]

    def ours(images):
        return encoders.qwenvl(te, proc, images, torch.bfloat16, dev, len(images))

    def measure(fn, images):
        times = []
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(a.reps + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                out = fn(images)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            del out
        return {"s": round(statistics.median(times[1:]), 4),
                "work_GB": round((torch.cuda.max_memory_allocated() - base) / 2 ** 30, 3)}

    rows = []
    for name, fn in (("official", official), ("ours", ours)):
        if name == "ours":
            encoders.prepare(te)
            emb = te.model.language_model.embed_tokens
            emb.weight.data = emb.weight.data.cpu().pin_memory()
        for size, images in (("low", low), ("high", pics)):
            for n in [int(c) for c in a.chunks.split(",")]:
                try:
                    r = measure(fn, images[:n])
                except torch.cuda.OutOfMemoryError as e:
                    r = {"error": str(e)[:200]}
                row = {"path": name, "size": size, "images": n, **r}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"weights_GB": weights / 2 ** 30, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
