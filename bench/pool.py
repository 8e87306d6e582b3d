"""The worker pool on one machine: two jobs through one queue on two workers at once, where each
worker sees only its own device, and a worker killed mid-job (its job fails clearly, the other
worker's job completes).

    python3 bench/pool.py --models DIR --lora DIR --images a.png,... [--gpus 0,cpu] [--out pool.json]

With ``--gpus 0,cpu`` (one GPU and the CPU: what a one-GPU machine allows) the tiny random-weight
model set is the fair load; on a machine with two GPUs, ``--gpus 0,1`` with full-size weights.
Reported: each job's worker, device and time, the overlap of the two jobs, the VRAM the driver
charges to each worker's pid (nvidia-smi), and the killed job's error.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import common as C  # noqa: E402
from i2l_ext.service import JobRequest  # noqa: E402


def main() -> int:
    ap = C.job_args(__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="0,cpu")
    a = ap.parse_args()
    images = a.images.split(",")
    svc = C.service(a.models, a.lora, gpus=a.gpus)
    out = {"gpus": a.gpus, "rounds": []}
    try:
        for rnd in ("cold", "warm", "kill"):
            t0 = C.now()
            jobs = [svc.start(JobRequest(images=images, name=f"pool_{rnd}_{i}", overwrite=True)) for i in range(2)]
            vram, both_running = {}, 0.0
            killed = None
            while not all(j.finished for j in jobs):
                if all(j.state == "running" for j in jobs):
                    both_running += 0.02
                for sl in svc.slots:
                    pid = sl.worker_pid()
                    used = C.process_vram(pid) if pid else None
                    if used:
                        vram[sl.device] = max(vram.get(sl.device, 0), used)
                if rnd == "kill" and killed is None and jobs[0].state == "running" and jobs[0].phase != "start":
                    killed = svc.slots[jobs[0].worker].worker_pid()
                    os.kill(killed, signal.SIGKILL)
                time.sleep(0.02)
            out["rounds"].append({
                "round": rnd, "wall_s": round(C.now() - t0, 3), "both_running_s": round(both_running, 2),
                "vram_by_device": {str(k): C.gb(v) for k, v in vram.items()},
                "jobs": [{"worker": j.worker, "device": svc.slots[j.worker].device, "state": j.state,
                          "seconds": j.result.seconds if j.result else None,
                          "ran_on": j.result.device if j.result else None,
                          "error": j.error.code if j.error else None,
                          "message": j.error.message if j.error else None} for j in jobs]})
            print(json.dumps(out["rounds"][-1]), flush=True)
    finally:
        svc.shutdown()
    if a.out:
        C.write_json(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
