"""The rank cap on full-size weights: per cap, the LoRA's rank and size, the energy the cap kept and
what the cap costs (the merge step's time, which holds the SVD, against the uncapped job's).

    python3 bench/rank_sweep.py --models DIR --lora DIR --images a.png,b.png,... [--caps 0,32,16,8,4]
                                [--counts 1,5] [--reps 3] [--out rank.json]

Jobs go through ``i2l_ext.service.Service`` as the tab's do, on one warm worker (a first uncapped
job loads the weights and is not counted). Cap 0 is no cap. With the benchmark's random weights and
images the energy figures describe those random LoRAs, not LoRAs of real images.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import common as C  # noqa: E402
from i2l_ext.service import JobRequest  # noqa: E402


def main() -> int:
    ap = C.job_args(__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="style")
    ap.add_argument("--caps", default="0,32,16,8,4")
    ap.add_argument("--counts", default="1,5")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    images = a.images.split(",")
    svc = C.service(a.models, a.lora)
    rows = []
    try:
        def job(n, cap, name):
            j = svc.run(JobRequest(images=images[:n], name=name, variant=a.variant, overwrite=True,
                                   max_rank=cap or None))
            if j.state != "done":
                raise SystemExit(f"job failed: {j.error}")
            return j.result

        job(len(images), 0, "sweep_warmup")
        for n in (int(c) for c in a.counts.split(",")):
            for cap in (int(c) for c in a.caps.split(",")):
                runs = [job(n, cap, f"sweep_{n}_{cap}") for _ in range(a.reps)]
                r = runs[-1]
                rows.append({"images": n, "cap": cap, "rank": r.rank, "bytes": r.bytes,
                             "energy_kept": r.get("energy_kept", 1.0),
                             "merge_s": statistics.median(x.timings.get("merge", 0.0) for x in runs),
                             "job_s": statistics.median(x.seconds for x in runs), "device": r.device})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        svc.shutdown()
    base = {r["images"]: r["merge_s"] for r in rows if r["cap"] == 0}
    print("\n| images | cap | rank | size | energy kept | merge step | of which the cap | job |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = r["merge_s"] - base.get(r["images"], r["merge_s"])
        print(f"| {r['images']} | {r['cap'] or 'none'} | {r['rank']} | {r['bytes'] / 1e6:.1f} MB | "
              f"{100 * r['energy_kept']:.2f}% | {r['merge_s']:.3f} s | {extra:+.3f} s | {r['job_s']:.2f} s |")
    if a.out:
        C.write_json(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
