"""The real worker, pausing before it moves a job's files into place, so a test can act mid-job
(cancel it, kill it, start a second one). Started as the worker's Python through ``slow-python``
(``slow-python -u -m i2l_ext.worker ARGS``): ``SHIM_PYTHON`` is the real interpreter and
``SHIM_PAUSE_BEFORE_WRITE`` the pause in seconds (default 1).
"""
import os
import sys
import time

args = sys.argv[1:]
if "-m" not in args:
    sys.exit("usage: slow_worker.py [-u] -m i2l_ext.worker [args]")
i = args.index("-m")
sys.path[0] = os.getcwd()          # the extension folder (the supervisor's cwd), not this one

from i2l_ext import output  # noqa: E402
from i2l_ext.worker import main as worker  # noqa: E402

pause = float(os.environ.get("SHIM_PAUSE_BEFORE_WRITE") or 1)
commit = output.commit


def slow_commit(*a, **k):
    time.sleep(pause)
    return commit(*a, **k)


output.commit = slow_commit
worker.main(args[i + 2:])
