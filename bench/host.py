"""Host side: what the extension adds to the WebUI's start-up.

    python3 bench/host.py --out host.json [--python PY] [--worker-env DIR] [--reps 5]

- ``tab_import_s``: executing ``scripts/i2l_tab.py`` the way the WebUI loads a script (with a stand-in
  ``modules.script_callbacks``), timed inside a fresh interpreter; median of ``--reps``.
- ``install_process_s``: ``install.py`` run as the WebUI runs it (its own process) when there is
  nothing to do, wall time; ``install_noop_s`` the same minus an empty interpreter's start; medians
  of ``--reps``. Nothing to do means: a worker
  environment that is already set up (``--worker-env``, a stamped one), or, without one, a worker
  interpreter the user manages (``I2L_PYTHON``), which install.py only checks for.
- ``preload_import_s``: importing ``preload.py`` and calling ``preload(parser)``.
The tab's page itself is built later, inside the WebUI's ``on_ui_tabs`` callback, with gradio.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common as C  # noqa: E402

STUB = "def on_ui_tabs(cb): pass\ndef on_ui_settings(cb): pass\ndef on_app_started(cb): pass\n"
TIMED = ("import time, runpy, sys; t = time.perf_counter(); {body}; "
         "sys.stdout.write('%.6f' % (time.perf_counter() - t))")


def _child(py, code, env, cwd) -> float:
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def _wall(cmd, env, cwd) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, env=env, cwd=cwd, timeout=300)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--worker-env", default=None)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    res = {"python": a.python}
    with tempfile.TemporaryDirectory() as stub:
        os.makedirs(os.path.join(stub, "modules"))
        open(os.path.join(stub, "modules", "__init__.py"), "w").close()
        with open(os.path.join(stub, "modules", "script_callbacks.py"), "w") as f:
            f.write(STUB)
        e = dict(env, PYTHONPATH=stub)
        tab = os.path.join(ROOT, "scripts", "i2l_tab.py")
        res["tab_import_s"] = round(C.median([_child(a.python, TIMED.format(body=f"runpy.run_path({tab!r})"), e, stub)
                                              for _ in range(a.reps)]), 4)
    pre = os.path.join(ROOT, "preload.py")
    if os.path.isfile(pre):
        body = f"import argparse; runpy.run_path({pre!r})['preload'](argparse.ArgumentParser())"
        res["preload_import_s"] = round(C.median([_child(a.python, TIMED.format(body=body), env, ROOT)
                                                  for _ in range(a.reps)]), 4)
    inst = os.path.join(ROOT, "install.py")
    if os.path.isfile(inst):
        e = dict(env)
        if a.worker_env:
            e["I2L_WORKER_ENV"] = a.worker_env
            res["install_case"] = f"worker environment already set up: {a.worker_env}"
        else:
            e["I2L_PYTHON"] = a.python
            res["install_case"] = "worker interpreter managed by the user (I2L_PYTHON)"
        with tempfile.TemporaryDirectory() as cwd:     # a WebUI folder with no settings file
            base = C.median([_wall([a.python, "-c", "pass"], e, cwd) for _ in range(a.reps)])
            run = C.median([_wall([a.python, inst], e, cwd) for _ in range(a.reps)])
        res["python_start_s"] = round(base, 4)
        res["install_noop_s"] = round(run - base, 4)
        res["install_process_s"] = round(run, 4)
    # What the WebUI's start-up waits for: the install process as a whole, the script and preload.
    res["total_added_s"] = round(sum(res.get(k, 0) for k in ("tab_import_s", "preload_import_s", "install_process_s")), 4)
    print("host: " + ", ".join(f"{k} {v}" for k, v in res.items() if k.endswith("_s")), flush=True)
    C.write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
