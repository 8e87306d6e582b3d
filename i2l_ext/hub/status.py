"""What is present, what is missing and how big, for the Models panel and ``models list``.
File system only: no network call."""
from __future__ import annotations

import os
import threading

from .. import catalog
from ..catalog import FILES, VARIANTS, expected_files, human_size, load_manifest, locate
from ..contract import I2LError, T
from .download import Downloader, Progress, file_digest
from .remote import RemoteFile
from .sources import Source, search_dirs_for


def _disk_bytes(paths: list[str]) -> int:
    total = 0
    for p in paths:
        if os.path.isdir(p):
            for n in os.listdir(p):
                q = os.path.join(p, n)
                if os.path.isfile(q):
                    total += os.path.getsize(q)
        elif os.path.isfile(p):
            total += os.path.getsize(p)
    return total


def role_status(role: str, models_dir: str, search_dirs=(), manifest: dict | None = None) -> dict:
    mf = FILES[role]
    manifest = load_manifest(models_dir) if manifest is None else manifest
    loc = locate(role, models_dir, search_dirs)
    expected = expected_files(role, models_dir, manifest)
    exact = all(e for _, _, e in expected)
    expected_bytes = sum(n for _, n, _ in expected) if exact else mf.approx_bytes
    missing = []
    if not loc.present:
        published = manifest.get(mf.repo, {})
        missing = [{"path": p, "bytes": int(published.get(p, {}).get("size", n) or 0)} for p, n in loc.missing]
    return {"role": role, "title": mf.title, "repo": mf.repo, "pattern": mf.pattern, "present": loc.present,
            "in_place": loc.in_place, "where": loc.where, "paths": loc.paths,
            "bytes": _disk_bytes(loc.paths) if loc.present else 0,
            "expected_bytes": expected_bytes, "exact": exact, "missing": missing,
            "missing_bytes": 0 if loc.present else expected_bytes}


def models_status(models_dir: str, search_dirs=(), bias: bool | None = None) -> list[dict]:
    """Per variant: ``{variant, label, complete, roles: [role dicts], missing_bytes, total_bytes,
    download_command}``. A role dict: ``role, title, repo, pattern, present, in_place, where,
    paths, bytes (on disk), expected_bytes, exact (sizes from the hub's listing, else approximate),
    missing ([{path, bytes}]), missing_bytes``."""
    manifest = load_manifest(models_dir)
    search_dirs = search_dirs_for(models_dir, search_dirs)
    cache: dict[str, dict] = {}
    out = []
    for v in VARIANTS.values():
        roles = []
        for r in v.needed_roles(bias):
            if r not in cache:
                cache[r] = role_status(r, models_dir, search_dirs, manifest)
            roles.append(cache[r])
        out.append({"variant": v.key, "label": v.label, "complete": all(r["present"] for r in roles),
                    "roles": roles, "missing_bytes": sum(r["missing_bytes"] for r in roles),
                    "total_bytes": sum(r["expected_bytes"] for r in roles),
                    "download_command": f"python -m i2l_ext models download {v.key}"})
    return out


def status_rows(models_dir: str, search_dirs=(), bias: bool | None = None) -> list[list[str]]:
    """One row per role for a table: [role, state, size, where]."""
    rows = []
    manifest = load_manifest(models_dir)
    search_dirs = search_dirs_for(models_dir, search_dirs)
    for r in [role_status(k, models_dir, search_dirs, manifest) for k in FILES]:
        state = ("present (used in place)" if r["in_place"] else "present") if r["present"] else "missing"
        size = human_size(r["bytes"] if r["present"] else r["missing_bytes"])
        if not r["present"] and not r["exact"]:
            size = "about " + size
        rows.append([r["title"], state, size, (r["where"] or "") if r["present"] else ""])
    return rows


def verify(models_dir: str, variant=None, bias: bool | None = None, search_dirs=(), source: Source | None = None,
           offline: bool | None = None, progress=None, cancel: threading.Event | None = None) -> list[dict]:
    """Recheck every present file of ``variant`` (all variants when None) against the hub's published
    sha256 (git sha1 / size where none). Reads the published values from the manifest; lists the
    hub when they are not known (unless offline). Reports only: deletes and changes nothing.

    Returns ``[{role, repo, path, file, status, detail}]`` with status ``ok``, ``mismatch``,
    ``unchecked`` (nothing published known) or ``missing``."""
    roles: list[str] = []
    for v in ([catalog._variant(variant)] if variant else VARIANTS.values()):
        roles += [r for r in v.needed_roles(bias if variant else True) if r not in roles]
    search_dirs = search_dirs_for(models_dir, search_dirs)
    dl = Downloader(models_dir, source=source, search_dirs=search_dirs, offline=offline, progress=progress, cancel=cancel)
    prog = dl.progress
    manifest = load_manifest(models_dir)
    out = []
    todo = []
    for role in roles:
        mf = FILES[role]
        loc = locate(role, models_dir, search_dirs)
        if not loc.present:
            out.append({"role": role, "repo": mf.repo, "path": mf.pattern, "file": None, "status": "missing",
                        "detail": "not on this computer"})
            continue
        files = ([os.path.join(loc.paths[0], n) for n in sorted(os.listdir(loc.paths[0]))
                  if os.path.isfile(os.path.join(loc.paths[0], n))] if mf.is_folder else list(loc.paths))
        if mf.role == "text_encoder":
            idx = os.path.join(loc.root, *catalog.TEXT_ENCODER_INDEX.split("/"))
            if os.path.isfile(idx):
                files.append(idx)
        published = manifest.get(mf.repo)
        if not published and not dl.offline:
            try:
                published = {f.path: f.to_manifest() for f in dl.listing(mf.repo)}
            except I2LError as e:
                published = {}
                dl.log.append(e.text)
        for f in files:
            rel = os.path.relpath(f, loc.root).replace(os.sep, "/")
            todo.append((role, mf.repo, rel, f, (published or {}).get(rel)))
    total = sum(os.path.getsize(t[3]) for t in todo)
    prog.set(state="verifying", total=total, file_count=len(todo), message=T("m_checking_files"))
    prog.start_bytes(0)
    for n, (role, repo, rel, f, pub) in enumerate(todo, 1):
        size = os.path.getsize(f)
        prog.set(file=f"{repo}/{rel}", file_index=n, file_done=0, file_total=size, message=T("m_checking_file", path=rel))
        if not pub:
            out.append({"role": role, "repo": repo, "path": rel, "file": f, "status": "unchecked",
                        "detail": "no published size or hash known (run verify online once)"})
            prog.add(size)
            continue
        rf = RemoteFile(repo, rel, int(pub.get("size") or 0), pub.get("sha256"), pub.get("oid"), "")
        problem = file_digest(f, rf, cancel=dl.cancel_event)
        prog.add(size)
        out.append({"role": role, "repo": repo, "path": rel, "file": f, "status": "ok" if problem is None else "mismatch",
                    "detail": problem or ("sha256 matches" if rf.sha256 else "git hash matches" if rf.git_oid else "size matches")})
    prog.set(state="done", message=T("m_checked"))
    return out
