"""``python -m i2l_ext models list|download VARIANT|verify [VARIANT]|path|source|search-dirs``."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from .. import settings
from ..catalog import VARIANTS, human_size
from ..contract import I2LError, T


def _common(p: argparse.ArgumentParser, source: bool = True) -> None:
    settings.add_cli_flag(p, "models_dir")
    p.add_argument("--search-dir", action="append", default=[], metavar="DIR",
                   help="another folder that may already hold the files, used in place (a DiffSynth models "
                        "folder, a Hugging Face or ModelScope cache); repeatable")
    settings.add_cli_flag(p, "offline")
    if source:
        p.add_argument("--source", help="modelscope (default), modelscope-intl, huggingface or custom (this run only; "
                                        "`models source` remembers one)")
        p.add_argument("--endpoint", help="the address of a mirror, e.g. https://hf-mirror.com")
        p.add_argument("--api", choices=["huggingface", "modelscope"], help="which API the mirror speaks (default: guessed)")


def _bias(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bias", dest="bias", action="store_true", default=None, help="include the Bias LoRA")
    g.add_argument("--no-bias", dest="bias", action="store_false", help="leave the Bias LoRA out")


def _add_subcommands(sub) -> None:
    p = sub.add_parser("list", help="what is present, what is missing, how big")
    _common(p, source=False)
    _bias(p)
    p.set_defaults(models_func=cmd_list)

    p = sub.add_parser("download", help="download what a variant lacks (resumable; Ctrl-C keeps what arrived)")
    p.add_argument("variant", help="style, coarse-fine, coarse, fine, z-image or z-image-omni")
    _bias(p)
    _common(p)
    p.add_argument("--dry-run", action="store_true", help="show what would be fetched, fetch nothing")
    p.set_defaults(models_func=cmd_download)

    p = sub.add_parser("verify", help="recheck present files against the hub's published sha256")
    p.add_argument("variant", nargs="?", help="one variant (default: every file present)")
    _bias(p)
    _common(p)
    p.set_defaults(models_func=cmd_verify)

    p = sub.add_parser("path", help="print the models folder")
    settings.add_cli_flag(p, "models_dir", help=argparse.SUPPRESS)
    p.set_defaults(models_func=cmd_path)

    p = sub.add_parser("source", help="show or remember where downloads come from")
    p.add_argument("name", nargs="?", help="modelscope, modelscope-intl, huggingface or custom")
    p.add_argument("--endpoint", help="a mirror's address (with custom, or another address for the named hub)")
    p.add_argument("--api", choices=["huggingface", "modelscope"], help="which API the mirror speaks")
    settings.add_cli_flag(p, "models_dir", help=argparse.SUPPRESS)
    p.set_defaults(models_func=cmd_source)

    p = sub.add_parser("search-dirs", help="show or remember folders whose files are used in place")
    p.add_argument("--add", action="append", default=[], metavar="DIR")
    p.add_argument("--remove", action="append", default=[], metavar="DIR")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--hub-caches", dest="hub_caches", action="store_true", default=None,
                   help="also look in this user's Hugging Face and ModelScope caches")
    g.add_argument("--no-hub-caches", dest="hub_caches", action="store_false", help="do not (default)")
    settings.add_cli_flag(p, "models_dir", help=argparse.SUPPRESS)
    p.set_defaults(models_func=cmd_search_dirs)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``models`` to the main command line."""
    p = subparsers.add_parser("models", help="list, download and check model files",
                              description="List, download and check the model files of each variant.")
    _add_subcommands(p.add_subparsers(dest="models_command", metavar="ACTION"))
    p.set_defaults(func=run, models_parser=p)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m i2l_ext models",
                                description="List, download and check the model files of each variant.")
    _add_subcommands(p.add_subparsers(dest="models_command", metavar="ACTION"))
    p.set_defaults(func=run, models_parser=p)
    return p


def run(args) -> int:
    if not getattr(args, "models_func", None):
        args.models_parser.print_help()
        return 0
    return int(args.models_func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except I2LError as e:
        message, fix = e.render(surface="cli")
        print(f"error: {message}", file=sys.stderr)
        if fix:
            print(f"fix: {fix}", file=sys.stderr)
        return 130 if e.code == I2LError.CANCELLED else 1


# -- context --------------------------------------------------------------------------------------
def _models_dir(args) -> str:
    return settings.from_args(args).models_dir


def _ctx(args):
    from .sources import get_source, load_settings, search_dirs_for
    cfg = settings.from_args(args)
    remembered = load_settings(cfg.models_dir)
    dirs = search_dirs_for(cfg.models_dir, getattr(args, "search_dir", []) or [], remembered)
    if getattr(args, "source", None) or getattr(args, "endpoint", None):
        source = get_source(args.source, args.endpoint, getattr(args, "api", None))
    else:
        source = get_source(settings=remembered)
    return cfg.models_dir, dirs, cfg.offline, source


def _say(text) -> str:
    return text.render(surface="cli") if hasattr(text, "render") else str(text)


# -- progress bar -----------------------------------------------------------------------------------
def _clock(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressLine:
    """A text progress bar on stderr: bytes, speed, time left. One line per file off a terminal."""

    def __init__(self, stream=None, width: int = 24):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width = width
        self.last_file = None
        self.last_plain = 0.0
        self.drawn = False

    def __call__(self, s: dict) -> None:
        if s["state"] not in ("downloading", "verifying") or not s["total"]:
            if s.get("message") and s["state"] in ("listing",):
                self._plain(_say(s["message"]))
            return
        frac = min(1.0, s["done"] / s["total"]) if s["total"] else 0.0
        speed = f"{human_size(s['speed'])}/s" if s["speed"] else "--"
        text = (f"{frac * 100:3.0f}% {human_size(s['done'])}/{human_size(s['total'])} {speed} "
                f"{_clock(s['eta'])} left  {s['file'] or ''} ({s['file_index']}/{s['file_count']})")
        if self.tty:
            n = int(self.width * frac)
            cols = shutil.get_terminal_size((100, 20)).columns
            line = f"\r[{'#' * n}{'.' * (self.width - n)}] {text}"
            self.stream.write(line[:cols - 1].ljust(cols - 1))
            self.stream.flush()
            self.drawn = True
        elif s["file"] != self.last_file or time.monotonic() - self.last_plain > 10:
            self._plain(text)
        self.last_file = s["file"]

    def _plain(self, text: str) -> None:
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last_plain = time.monotonic()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


# -- commands -------------------------------------------------------------------------------------
def cmd_path(args) -> int:
    print(_models_dir(args))
    return 0


def cmd_list(args) -> int:
    from .status import models_status
    models_dir, dirs, offline, _ = _ctx(args)
    from .sources import get_source, load_settings
    src = get_source(settings=load_settings(models_dir))
    print(f"Models folder: {models_dir}")
    print(f"Source: {src.label}{' (offline: no downloads)' if offline else ''}")
    if dirs:
        print("Also used in place: " + "; ".join(dirs))
    for v in models_status(models_dir, dirs, getattr(args, "bias", None)):
        state = "complete" if v["complete"] else f"missing {'about ' if not all(r['exact'] for r in v['roles'] if not r['present']) else ''}{human_size(v['missing_bytes'])}"
        print(f"\n{v['label']} [{v['variant']}]: {state}")
        for r in v["roles"]:
            if r["present"]:
                where = f"  (in place: {r['where']})" if r["in_place"] else ""
                print(f"  [x] {r['title']:<28} {human_size(r['bytes']):>9}{where}")
            else:
                size = ("" if r["exact"] else "about ") + human_size(r["missing_bytes"])
                print(f"  [ ] {r['title']:<28} {size:>15}  missing: {r['repo']}/{r['pattern']}")
        if not v["complete"]:
            print(f"  -> {v['download_command']}")
    return 0


def cmd_download(args) -> int:
    from .download import Downloader
    models_dir, dirs, offline, source = _ctx(args)
    bar = ProgressLine()
    dl = Downloader(models_dir, source=source, search_dirs=dirs, offline=offline, progress=bar)
    if args.dry_run:
        plan = dl.plan(args.variant, args.bias)
        for i in plan.items:
            print(f"{i.remote.repo}/{i.remote.path}  {human_size(i.remote.size)}"
                  + (f"  ({human_size(i.have)} already here, resumes)" if i.have else ""))
        for p in plan.problems:
            print("problem: " + _say(p))
        print(f"To fetch: {human_size(plan.remaining)} from {plan.source.label if plan.source else 'nowhere (complete)'}")
        return 0
    try:
        result = dl.download(args.variant, args.bias)
    except KeyboardInterrupt:
        bar.close()
        print("Stopped. What arrived is kept (*.part); run the same command again to resume.", file=sys.stderr)
        return 130
    except I2LError as e:
        bar.close()
        if e.code == I2LError.CANCELLED:
            print(_say(e.text), file=sys.stderr)
            return 130
        raise
    finally:
        bar.close()
    for line in dl.log:
        print("note: " + _say(line), file=sys.stderr)
    if not result["downloaded"]:
        print(f"Nothing to download: every file of {args.variant} is here.")
    else:
        secs = max(result["seconds"], 1e-6)
        print(f"Downloaded {len(result['downloaded'])} file(s), {human_size(result['bytes'])} in {secs:.1f} s "
              f"from {result['source']['label']}; every file matched the hub's published hash or size.")
    return 0


def cmd_verify(args) -> int:
    from .status import verify
    models_dir, dirs, offline, source = _ctx(args)
    bar = ProgressLine()
    try:
        rows = verify(models_dir, args.variant, args.bias, dirs, source, offline, progress=bar)
    finally:
        bar.close()
    bad = 0
    for r in rows:
        if r["status"] == "missing":
            continue
        mark = {"ok": "ok      ", "mismatch": "MISMATCH", "unchecked": "?       "}[r["status"]]
        print(f"{mark} {r['file']}  ({r['detail']})")
        bad += r["status"] == "mismatch"
    missing = [r for r in rows if r["status"] == "missing"]
    if missing:
        print(f"{len(missing)} role(s) not present: " + ", ".join(sorted({r['role'] for r in missing})))
    if bad:
        print(f"{bad} file(s) differ from the hub. They were left untouched: move or delete them, then download again.",
              file=sys.stderr)
        return 1
    return 0


def cmd_source(args) -> int:
    from .sources import LABELS, get_source, load_settings, save_settings
    models_dir = _models_dir(args)
    if args.name or args.endpoint:
        src = get_source(args.name, args.endpoint, args.api)
        save_settings(models_dir, source=src.name, endpoint=args.endpoint or "", api=args.api or "")
        print(f"Downloads now come from {src.label} (remembered in {models_dir}).")
    else:
        src = get_source(settings=load_settings(models_dir))
        print(f"Downloads come from {src.label}.")
        print("Choices: " + "; ".join(f"{k}: {v}" for k, v in LABELS.items()))
    return 0


def cmd_search_dirs(args) -> int:
    from .sources import load_settings, save_settings, search_dirs_for
    models_dir = _models_dir(args)
    s = load_settings(models_dir)
    dirs = list(s["search_dirs"])
    for d in args.add:
        d = os.path.abspath(os.path.expanduser(d))
        if not os.path.isdir(d):
            raise I2LError(I2LError.BAD_INPUT, T("m_not_a_folder", path=d))
        if d not in dirs:
            dirs.append(d)
    for d in args.remove:
        d = os.path.abspath(os.path.expanduser(d))
        dirs = [x for x in dirs if x != d]
    if args.add or args.remove or args.hub_caches is not None:
        s = save_settings(models_dir, search_dirs=dirs,
                          use_hub_caches=s["use_hub_caches"] if args.hub_caches is None else args.hub_caches)
    print("Folders whose files are used in place (never copied, changed or deleted):")
    for d in search_dirs_for(models_dir, (), s):
        print("  " + d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
