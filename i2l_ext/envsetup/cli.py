"""``python -m i2l_ext env status|setup|repair``: the worker environment from the command line."""
from __future__ import annotations

import argparse
import json
import sys

from .. import settings


def _add_install_options(p: argparse.ArgumentParser) -> None:
    for name in ("worker_env", "wheels", "index_url", "torch_index_url", "own_torch", "offline"):
        settings.add_cli_flag(p, name)
    p.add_argument("-q", "--quiet", action="store_true", help="print only the outcome")


def register(subparsers) -> None:
    env = subparsers.add_parser("env", help="the worker's own Python environment: status, setup, repair",
                                description="The worker runs in its own venv (diffsynth needs transformers 5). "
                                            "Run these with the WebUI's Python so its torch can be reused.")
    sub = env.add_subparsers(dest="env_command", metavar="ACTION")

    p = sub.add_parser("status", help="show whether the worker environment is ready")
    settings.add_cli_flag(p, "worker_env")
    settings.add_cli_flag(p, "worker_python")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--verify", action="store_true", help="also import torch, transformers and diffsynth in the "
                   "worker interpreter (slow)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("setup", help="create or upgrade the worker environment (what install.py does)")
    _add_install_options(p)
    p.set_defaults(func=cmd_setup, rebuild=False)

    p = sub.add_parser("repair", help="rebuild the worker environment from scratch")
    _add_install_options(p)
    p.set_defaults(func=cmd_setup, rebuild=True)

    env.set_defaults(func=lambda args: (env.print_help(), 0)[1])


def cmd_status(args) -> int:
    from . import env_status
    cfg = settings.from_args(args)
    st = env_status(cfg.worker_env, explicit=cfg.worker_python)
    if args.verify and st["python"] and st["state"] != "missing":
        st["verify"] = verify_python(st["python"])
        if not st["verify"]["ok"]:
            st["ok"] = False
            st["state"] = "damaged" if st["state"] == "ready" else st["state"]
            st["error"] = st["verify"]["error"]
    text = st.pop("text", None)
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
        return 0 if st["ok"] else 1
    print(text.render(surface="cli") if text is not None else st["message"])
    print(f"  folder:  {st['env_dir']}")
    if st["python"]:
        print(f"  python:  {st['python']}")
    if st.get("torch"):
        t = st["torch"]
        print(f"  torch:   {t.get('version')} ({'the WebUI' + chr(39) + 's, reused' if t.get('mode') == 'host' else 'its own'}, "
              f"{t.get('path')})")
    if st.get("verify"):
        print(f"  verify:  {'ok' if st['verify']['ok'] else st['verify']['error']}")
    if not st["ok"]:
        if st.get("log_path"):
            print(f"  log:     {st['log_path']}")
        print(f"  repair:  {st['repair_command']}")
    return 0 if st["ok"] else 1


def verify_python(python: str) -> dict:
    """Import the worker's libraries in ``python`` (a subprocess; seconds, not milliseconds)."""
    import subprocess
    from .installer import VERIFY_MODULES, clean_env
    code = "import " + ", ".join(VERIFY_MODULES)
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"ok": False, "error": str(e)}
    if r.returncode != 0:
        return {"ok": False, "error": (r.stderr.strip().splitlines() or ["exit code %d" % r.returncode])[-1]}
    return {"ok": True, "error": None}


def cmd_setup(args) -> int:
    from . import ensure_env
    from .installer import PREFIX
    log = (lambda m: print(m, flush=True)) if not args.quiet else (lambda m: None)
    cfg = settings.from_args(args)
    st = ensure_env(reuse_host_torch=not cfg.own_torch, wheels=cfg.wheels, index_url=cfg.index_url,
                    log=log, env_dir=cfg.worker_env, rebuild=args.rebuild, offline=cfg.offline,
                    torch_index_url=cfg.torch_index_url)
    if st["ok"]:
        if args.quiet or not args.rebuild:
            print(f"{PREFIX} {st['message']} ({st['python']})")
        return 0
    if args.quiet:
        print(st["message"], file=sys.stderr)
        print(f"repair: {st['repair_command']}", file=sys.stderr)
    return 1
