"""Where a warm job's time goes: the engine in this process, one job to warm up, then a job per
image count under torch's profiler; prints the phases and the busiest operations.

    python3 bench/profile_job.py --models DIR --images a.png,b.png --variant style [--counts 1,5]
        [--hold-gb 10]     (layers kept on the GPU between jobs, as the product's default; 0: none)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--variant", default="style")
    ap.add_argument("--counts", default="1,5")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--hold-gb", type=float, default=10.0)
    a = ap.parse_args()
    import torch
    from PIL import Image
    from i2l_ext import catalog
    from i2l_ext.worker.engine import Engine
    paths = a.images.split(",")
    v = catalog.get_variant(a.variant)
    files = {r: catalog.FILES[r].resolve(a.models) for r in v.needed_roles(v.bias_default)}
    eng = Engine(lambda level, msg: None)
    out = os.path.join(tempfile.mkdtemp(), "p.safetensors")

    def job(n):
        ims = [Image.open(p).convert("RGB") for p in paths[:n]]
        spec = {"variant": v.key, "bias": v.bias_default, "files": files, "output": {"tmp_path": out},
                "vram_profile": "auto", "gpu_hold_s": 60.0 if a.hold_gb > 0 else 0.0, "gpu_hold_gb": a.hold_gb}
        t = time.perf_counter()
        res = eng.run(spec, ims, lambda *x: None)
        torch.cuda.synchronize()
        return time.perf_counter() - t, res["timings"], {"copied_GB": round(res["copied_to_gpu"] / 2 ** 30, 2),
                                                         "held_GB": round(res["held_on_gpu"] / 2 ** 30, 2),
                                                         "peak_GB": round((res["peak_vram"] or 0) / 2 ** 30, 2)}

    print("first job (loads):", job(len(paths)))
    time.sleep(3)                       # page-locking finishes
    for n in [int(c) for c in a.counts.split(",")]:
        job(n)
        print(f"{n} image(s), plain:", job(n))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            wall, phases, mem = job(n)
        print(f"{n} image(s), profiled: {wall:.3f} s {phases} {mem}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
