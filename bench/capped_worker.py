"""The worker under a VRAM cap, for the bench's low-VRAM measurement.

Started as the worker's Python (``bench/capped-python -u -m i2l_ext.worker``): before the worker
runs, caps this process's CUDA allocations at ``I2L_VRAM_CAP_GB`` GB (2**30 bytes) with
``torch.cuda.set_per_process_memory_fraction``, as a card of that size would, then runs the module.
"""
import os
import runpy
import sys

cap = float(os.environ.get("I2L_VRAM_CAP_GB") or 0)
if cap > 0:
    import torch
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 1024 ** 3 / total))
        print(f"bench: VRAM capped at {cap:g} GB of {total / 1024 ** 3:.1f} GB", file=sys.stderr, flush=True)

args = sys.argv[1:]
if "-m" not in args:
    sys.exit("usage: capped_worker.py [-u] -m MODULE [args]")
i = args.index("-m")
module = args[i + 1]
sys.argv = [module] + args[i + 2:]
sys.path[0] = os.getcwd()   # not this folder: the worker imports nothing from the bench
runpy.run_module(module, run_name="__main__", alter_sys=True)
