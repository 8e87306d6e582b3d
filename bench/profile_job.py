"""Where a warm job's time goes: the engine in this process, one job to load, then per image
count ``--reps`` warm jobs (phases, and the time of each of the engine's steps) and one under
cProfile; with ``--trace``, one more under torch's profiler (busiest operations, timeline).

    python3 bench/profile_job.py --models DIR --images a.png,b.png --variant style [--counts 1,5]
        [--reps 5]         (warm jobs timed per image count)
        [--hold-gb 10]     (layers kept on the GPU between jobs, as the product's default; 0: none)
        [--trace DIR]      (also writes a profiled job's timeline there, for chrome://tracing or
                            Perfetto; the engine's steps appear as named ranges)
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
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
    ap.add_argument("--trace", default="")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    import torch
    from PIL import Image
    from i2l_ext import catalog
    from i2l_ext.contract import JobSpec
    from i2l_ext.worker.engine import Engine
    paths = a.images.split(",")
    v = catalog.get_variant(a.variant)
    files = {r: catalog.FILES[r].resolve(a.models) for r in v.needed_roles(v.bias_default)}
    if a.trace:
        os.makedirs(a.trace, exist_ok=True)
    _label_steps()
    eng = Engine(lambda level, msg: None)
    out = os.path.join(tempfile.mkdtemp(), "p.safetensors")

    def job(n):
        ims = [Image.open(p).convert("RGB") for p in paths[:n]]
        spec = {"variant": v.key, "bias": v.bias_default, "files": files, "output": {"tmp_path": out},
                "vram_profile": "auto", "gpu_hold_s": 60.0 if a.hold_gb > 0 else 0.0, "gpu_hold_gb": a.hold_gb}
        t = time.perf_counter()
        res = eng.run(JobSpec.from_dict(spec), ims, lambda *x: None)
        torch.cuda.synchronize()
        return time.perf_counter() - t, res["timings"], {"copied_GB": round(res["copied_to_gpu"] / 2 ** 30, 2),
                                                         "held_GB": round(res["held_on_gpu"] / 2 ** 30, 2),
                                                         "peak_GB": round((res["peak_vram"] or 0) / 2 ** 30, 2)}

    print("first job (loads):", job(len(paths)))
    time.sleep(3)                       # page-locking finishes
    for n in [int(c) for c in a.counts.split(",")]:
        job(n)
        walls, steps = [], {}
        for _ in range(a.reps):
            STEPS.clear()
            t0 = time.perf_counter()
            wall, phases, mem = job(n)
            walls.append(wall)
            for name, start, dur in STEPS:
                steps.setdefault(name, []).append(dur)
            print(f"{n} image(s), plain: {wall:.3f} s {phases} {mem}")
        print(f"{n} image(s): median {statistics.median(walls):.3f} s; the last job's steps "
              f"(ms from its start, ms long; median length over {a.reps} jobs):")
        for name, start, dur in STEPS:
            print(f"    {(start - t0) * 1e3:8.1f} {dur * 1e3:7.1f}  {statistics.median(steps[name]) * 1e3:7.1f}  {name}")
        prof = cProfile.Profile()
        prof.enable()
        job(n)
        prof.disable()
        print(f"{n} image(s) under cProfile, by cumulative time:")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(a.rows)
        if not a.trace:
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            wall, phases, mem = job(n)
        print(f"{n} image(s), profiled: {wall:.3f} s {phases} {mem}")
        prof.export_chrome_trace(os.path.join(a.trace, f"job-{n}.json"))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


STEPS: list = []        # (name, start, seconds) of the engine's steps in the current job


def _label_steps() -> None:
    """Name the engine's steps in the profiler's timeline and time them (wrappers set here, not in
    the product)."""
    import torch
    from i2l_ext.worker import decoders, encoders, job, lora_file, memory, models

    def labelled(name, fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                with torch.profiler.record_function(name):
                    return fn(*args, **kwargs)
            finally:
                STEPS.append((name, t, time.perf_counter() - t))
        return run
    for owner, names in ((encoders, ("siglip", "dinov3", "qwenvl")), (decoders, ("decode", "merge", "merge_bias")),
                         (job, ("metadata",)), (memory.Memory, ("to_host", "hold_setup")),
                         (models.Models, ("plan", "load", "keep_only"))):
        for name in names:
            setattr(owner, name, labelled(f"i2l_{name}", getattr(owner, name)))
    from i2l_ext.worker import streaming
    for name in ("__init__", "__enter__", "__exit__"):
        setattr(streaming.Streamer, name, labelled("i2l_streamer" + name, getattr(streaming.Streamer, name)))
    lora_file.write = labelled("i2l_write", lora_file.write)
    job.crop_and_resize = labelled("i2l_crop_and_resize", job.crop_and_resize)
    job.lora_format.build_state_dict = labelled("i2l_build_state_dict", job.lora_format.build_state_dict)


if __name__ == "__main__":
    main()
