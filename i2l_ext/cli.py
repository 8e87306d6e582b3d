"""``python -m i2l_ext``: make a LoRA, manage models and the worker environment, serve the app."""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time

from . import __version__, settings
from .contract import I2LError, T

# Modules that add their own sub-commands with ``register(subparsers)``.
SUBCOMMAND_MODULES = ("i2l_ext.hub.cli", "i2l_ext.envsetup.cli", "i2l_ext.ui.cli")


class ProgressBar:
    """One line, redrawn in place on a terminal; one line per step elsewhere (logs, CI)."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width = stream, width
        self.tty = stream.isatty()
        self.last = None

    def update(self, fraction: float, phase: str, message: str) -> None:
        if self.tty:
            done = int(self.width * fraction)
            cols = shutil.get_terminal_size((100, 20)).columns
            line = f"\r[{'#' * done}{'.' * (self.width - done)}] {fraction * 100:3.0f}% {phase:<6} {message}"
            self.stream.write(line[:cols - 1].ljust(cols - 1))
        elif (phase, message) != self.last:
            self.stream.write(f"[{fraction * 100:3.0f}%] {phase}: {message}\n")
        self.last = (phase, message)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last is not None:
            self.stream.write("\n")
            self.stream.flush()


def _config(args) -> settings.Settings:
    """The settings for a one-shot command: no worker kept warm, no standby worker."""
    return settings.from_args(args, host="cli", keep_warm_minutes=0.0, standby=False)


def say(text) -> str:
    """A message as the command line shows it: the user's language, the command line's wording."""
    return text.render(surface="cli") if hasattr(text, "render") else str(text)


def _lora_dir(cfg: settings.Settings) -> None:
    """The Lora folder is made when missing: the default on first use (said once), one the user
    named when its parent exists; else a clear error."""
    d = cfg.lora_dir
    if os.path.isdir(d):
        return
    parent = os.path.dirname(os.path.abspath(d))
    if cfg.given("lora_dir") and not os.path.isdir(parent):
        raise I2LError(I2LError.OUTPUT, T("m_lora_dir_no_parent", path=d, parent=parent),
                       T("m_lora_dir_no_parent_fix"))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        from .output import os_error
        raise os_error(e, T("m_making_lora_dir"), d) from None
    print(say(T("m_lora_dir_made", path=d)), file=sys.stderr)


def cmd_make(args) -> int:
    from .service import JobRequest, Service
    cfg = _config(args)
    name = args.name or os.path.splitext(os.path.basename(args.images[0].rstrip("/\\")))[0]
    req = JobRequest(images=args.images, name=name, variant=args.variant, bias=args.bias, subfolder=args.subfolder,
                     overwrite=args.overwrite, key_format=cfg.key_format, vram_profile=cfg.vram_profile,
                     preferred_weight=args.weight, activation_text=args.activation_text, description=args.description,
                     max_rank=args.max_rank)
    bar = ProgressBar()
    try:
        req.check()
        _lora_dir(cfg)
        service = Service(cfg)
        job = service.start(req)
    except I2LError as e:
        return _fail(e, cfg.debug)
    previous = signal.signal(signal.SIGINT, lambda *_: job.cancel())
    try:
        for ev in job.events():
            if ev["type"] == "progress":
                bar.update(ev["fraction"], ev["phase"], say(ev["text"]))
            elif ev["type"] == "log" and ev["level"] in ("warning", "error") and args.verbose < 1:
                if ev["level"] == "warning":            # errors are said once, at the end
                    bar.close()
                    print(f"{ev['level']}: {say(ev['text'])}", file=sys.stderr)
            elif ev["type"] == "log" and args.verbose >= 1:
                bar.close()
                print(say(ev["text"]), file=sys.stderr)
        job.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
        service.shutdown()
    if job.state == "cancelled":
        print(say(T("cancelled_msg")), file=sys.stderr)
        return 130
    if job.state != "done":
        return _fail(job.error, cfg.debug)
    r = job.result
    print(say(T("m_cli_wrote", path=r.path, mb=f"{r.bytes / 1e6:.1f}", keys=r.keys, rank=r.rank,
                s=f"{r.seconds:.1f}")))
    print(say(T("m_cli_use_it", prompt=r.prompt)))
    return 0


def _fail(e: I2LError | None, debug: bool = False) -> int:
    if e is None:
        print("error: the job failed", file=sys.stderr)
        return 1
    message, fix = e.render(surface="cli")
    print(f"error: {message}", file=sys.stderr)
    if fix:
        print(f"fix: {fix}", file=sys.stderr)
    if e.details and debug:
        print(e.details, file=sys.stderr)
    return 2 if e.code in (I2LError.BAD_INPUT, I2LError.OUTPUT, I2LError.NAME_TAKEN) else 1


def cmd_tiny_models(args) -> int:
    """Write the tiny random-weight model set with the worker's interpreter (it needs torch)."""
    cfg = _config(args)
    python = cfg.worker_python
    if not python:
        try:
            from .envsetup import find_worker_python
            python = find_worker_python(env_dir=cfg.worker_env)
        except I2LError as e:
            return _fail(e)
    env = dict(os.environ, PYTHONPATH=settings.EXT_ROOT)
    t0 = time.monotonic()
    rc = subprocess.call([python, "-m", "i2l_ext.testing.tiny", os.path.abspath(args.dir)], env=env)
    if rc == 0:
        print(f"Tiny model set written to {os.path.abspath(args.dir)} in {time.monotonic() - t0:.1f} s "
              f"(random weights: its LoRAs are meaningless, the code path is the real one).")
    return rc


def cmd_settings(args) -> int:
    """The settings in force here and where each came from (or README's table)."""
    if args.markdown:
        print(settings.markdown_table())
        return 0
    cfg = settings.from_args(args)
    width = max(len(s.name) for s in settings.SETTINGS)
    for name, value, source in settings.describe(cfg):
        print(f"{name:<{width}}  {value or '-'}  ({source})")
    for s, where, raw, why in cfg.problems:
        print(f"ignored: {s.env if where == 'env' else s.name}={raw!r} ({why})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m i2l_ext", description="Image to LoRA: images in, a Qwen-Image or Z-Image LoRA out.")
    parser.add_argument("--version", action="version", version=f"i2l_ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("make", help="make a LoRA from images", description="Make a LoRA from one image or a few.")
    p.add_argument("images", nargs="+", help="image files, or folders of images")
    p.add_argument("--name", help="LoRA name (default: the first image's name)")
    p.add_argument("--variant", default="style", choices=list(settings.VARIANT_KEYS), help="style (default), coarse-fine, coarse, fine (Qwen-Image); z-image, z-image-omni (Z-Image)")
    bias = p.add_mutually_exclusive_group()
    bias.add_argument("--no-bias", dest="bias", action="store_false", default=None, help="leave the Bias LoRA out (coarse-fine)")
    bias.add_argument("--bias", dest="bias", action="store_true", help="merge the Bias LoRA in")
    settings.add_cli_flag(p, "lora_dir")
    p.add_argument("--subfolder", default="", help="a subfolder inside the Lora folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing LoRA of the same name")
    settings.add_cli_flag(p, "key_format")
    settings.add_cli_flag(p, "vram_profile")
    settings.add_cli_flag(p, "vram_limit_gb", metavar="GB")
    settings.add_cli_flag(p, "ram_limit_gb", metavar="GB")
    settings.add_cli_flag(p, "gpus", metavar="N", help="the GPU the job runs on, e.g. 1 (default: what the "
                          "environment shows; or I2L_GPUS)")
    p.add_argument("--max-rank", type=int, default=None, metavar="R",
                   help="cap the LoRA's rank at R (best rank-R approximation of each module): "
                        "a smaller file, less detail (default: no cap)")
    p.add_argument("--weight", type=float, default=1.0, help="preferred weight written to the card (default 1)")
    p.add_argument("--activation-text", default="", help="activation text for the card")
    p.add_argument("--description", default="", help="description for the card")
    p.add_argument("-v", "--verbose", action="count", default=0)
    for name in ("models_dir", "worker_python", "worker_env", "offline"):
        settings.add_cli_flag(p, name)
    p.set_defaults(func=cmd_make)

    p = sub.add_parser("tiny-models", help="write a tiny random-weight model set (for trying the whole path on a CPU)")
    p.add_argument("dir")
    settings.add_cli_flag(p, "worker_python")
    settings.add_cli_flag(p, "worker_env")
    p.set_defaults(func=cmd_tiny_models)

    p = sub.add_parser("settings", help="show the settings in force and where each comes from")
    p.add_argument("--markdown", action="store_true", help="print README's settings table")
    p.set_defaults(func=cmd_settings)

    for mod in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import i18n
    parser = build_parser()
    args = parser.parse_args(argv)
    i18n.set_language(settings.from_args(args).language)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except I2LError as e:
        return _fail(e, settings.resolve().debug)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
