"""No process outlives its parent (i2l_ext/lifetime.py): a child started from a short-lived thread
lives on while its parent does, and ends within 2 s of the parent's death even while it is busy
in a long computation that writes to no pipe."""
import os
import subprocess
import sys
import time

from helpers import ROOT, gone

CHILD = ("import sys; sys.path.insert(0, sys.argv[2]); from i2l_ext import lifetime; "
         "lifetime.exit_with_parent(int(sys.argv[1])); print('busy', flush=True); "
         "sum(i * i for i in range(10 ** 12))")
PARENT = r"""
import os, sys, threading, time
sys.path.insert(0, sys.argv[1])
from i2l_ext import lifetime
box = {}
def start():            # a thread that ends at once, as a job's or a callback's thread does
    box["child"] = lifetime.spawn([sys.executable, "-c", sys.argv[2], str(os.getpid()), sys.argv[1]],
                                  stdout=subprocess.DEVNULL)
import subprocess
t = threading.Thread(target=start)
t.start()
t.join()
print(box["child"].pid, flush=True)
time.sleep(600)
"""


def test_child_outlives_its_starter_thread_but_not_its_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT, ROOT, CHILD], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.0)
        assert not gone(child, 0.1)              # its starter thread is long gone; it runs on
        parent.kill()                            # kill -9: the parent does nothing more
        parent.wait(10)
        t0 = time.monotonic()
        assert gone(child, 2.0), "the child outlived its parent"
        assert time.monotonic() - t0 < 2.0
    finally:
        parent.kill()


def test_a_child_whose_parent_is_already_gone_ends_at_once():
    p = subprocess.run([sys.executable, "-c", CHILD, "1", ROOT], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "busy" not in p.stdout       # pid 1 is not its parent: it never started work
