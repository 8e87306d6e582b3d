"""Fetch what a variant lacks: resumable, checked, cancellable, never touching the user's files.

How a file arrives: it is written to ``<final>.part`` (resumed with an HTTP Range request after an
interruption, in this run or a later one), flushed to disk, checked against the hub's published
sha256 (git blob sha1 for Hugging Face's small non-LFS files; the size where nothing is published),
and only then moved into place. A file that fails the check is deleted (only our ``.part``) and
fetched again, a bounded number of times; it is never used.

What is never touched: any file that is not our ``.part``. A file already at the final path is
kept as it is, even when its size or hash is wrong: ``verify`` reports it and the user decides.
Files found in a search folder (a DiffSynth models folder, a hub cache) are used in place.
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import socket
import threading
import time
import urllib.error
from dataclasses import dataclass, field

from .. import catalog
from ..catalog import FILES, human_size, load_manifest, locate, save_manifest
from ..contract import I2LError, T, raw
from .remote import RemoteFile, http_error, list_repo, network_error, open_url
from .sources import Source, get_source, load_settings, search_dirs_for

LOCK_NAME = ".i2l-download.lock"
LOCK_STALE_S = 120.0
PART = ".part"
STALLED_S = 3.0            # no byte for this long: the progress shows no speed and no time left


def offline_error(what: str = "download model files") -> I2LError:
    return I2LError(I2LError.DOWNLOAD, T("m_offline", what=what),
                    T("m_offline_fix"))


# -- progress -------------------------------------------------------------------------------------
class Progress:
    """Bytes done/total, speed (moving average) and time left, as a snapshot dict."""

    def __init__(self, callback=None, min_interval: float = 0.2):
        self.callback, self.min_interval = callback, min_interval
        self.lock = threading.Lock()
        self.state = {"state": "idle", "variant": None, "file": None, "file_index": 0, "file_count": 0,
                      "file_done": 0, "file_total": 0, "done": 0, "total": 0, "speed": 0.0, "eta": None,
                      "message": "", "source": None}
        self._t = time.monotonic()
        self._mark = (self._t, 0)
        self._last_emit = 0.0
        self._last_bytes = self._t

    def snapshot(self) -> dict:
        with self.lock:
            snap = dict(self.state)
        if snap["state"] == "downloading" and time.monotonic() - self._last_bytes > STALLED_S:
            snap.update(speed=0.0, eta=None)         # nothing is arriving: no made-up time left
        return snap

    def set(self, force: bool = True, **kw) -> None:
        with self.lock:
            self.state.update(kw)
        self._emit(force)

    def start_bytes(self, done: int) -> None:
        with self.lock:
            self._last_bytes = time.monotonic()
            self._mark = (self._last_bytes, done)
            self.state.update(done=done, speed=0.0, eta=None)

    def add(self, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self._last_bytes = now
            s = self.state
            s["done"] += n
            s["file_done"] += n
            t0, d0 = self._mark
            if now - t0 >= 1.0:
                inst = (s["done"] - d0) / (now - t0)
                s["speed"] = inst if not s["speed"] else 0.7 * s["speed"] + 0.3 * inst
                self._mark = (now, s["done"])
            elif not s["speed"] and now - t0 > 0.05:
                s["speed"] = (s["done"] - d0) / (now - t0)
            left = max(0, s["total"] - s["done"])
            s["eta"] = left / s["speed"] if s["speed"] > 0 else None
        self._emit(False)

    def _emit(self, force: bool) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if force or now - self._last_emit >= self.min_interval:
            self._last_emit = now
            self.callback(self.snapshot())


# -- planning -------------------------------------------------------------------------------------
@dataclass
class PlanItem:
    role: str
    remote: RemoteFile
    dest: str
    have: int = 0              # bytes already in our .part

    @property
    def part(self) -> str:
        return self.dest + PART


@dataclass
class Plan:
    variant: str
    bias: bool | None
    source: Source | None
    items: list[PlanItem] = field(default_factory=list)
    present: dict = field(default_factory=dict)        # role -> paths already usable
    problems: list = field(default_factory=list)       # present user files that disagree with the hub (Texts)

    @property
    def total(self) -> int:
        return sum(i.remote.size for i in self.items)

    @property
    def remaining(self) -> int:
        return sum(max(0, i.remote.size - i.have) for i in self.items)

    def to_dict(self) -> dict:
        return {"variant": self.variant, "bias": self.bias, "source": self.source.to_dict() if self.source else None,
                "files": [{"role": i.role, "repo": i.remote.repo, "path": i.remote.path, "bytes": i.remote.size,
                           "have": i.have, "dest": i.dest} for i in self.items],
                "total": self.total, "remaining": self.remaining, "present": sorted(self.present),
                "problems": list(self.problems)}


def _free_space(path: str) -> tuple[int, str]:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return shutil.disk_usage(p).free, p


class Downloader:
    """Downloads one variant's missing files into ``models_dir`` (``<models_dir>/<repo>/<path>``)."""

    def __init__(self, models_dir: str, source: Source | None = None, search_dirs=(), offline: bool | None = None,
                 progress=None, cancel: threading.Event | None = None, retries: int = 5, attempts: int = 3,
                 backoff: float = 1.0, timeout: float = 60.0, chunk: int = 1 << 20, reserve: int = 200_000_000):
        self.models_dir = os.path.abspath(models_dir)
        self.source = source
        self.search_dirs = tuple(search_dirs_for(self.models_dir, search_dirs or ()))
        self.offline = bool(offline)
        self.progress = progress if isinstance(progress, Progress) else Progress(progress)
        self.cancel_event = cancel or threading.Event()
        self.retries, self.attempts, self.backoff = retries, attempts, backoff
        self.timeout, self.chunk, self.reserve = timeout, chunk, reserve
        self._listings: dict[str, list[RemoteFile]] = {}
        self.log: list = []           # notes for the user (Texts)
        self._active = None        # the response being read, closed by ``cancel``

    def cancel(self) -> None:
        """Stop the download: at once, even while a read waits on a connection that has gone quiet
        (its socket is shut down; what arrived stays in the ``.part``)."""
        self.cancel_event.set()
        resp = self._active
        if resp is not None:
            _shutdown(resp)

    # -- helpers ----------------------------------------------------------------------------------
    def _source(self) -> Source:
        if self.source is None:
            self.source = get_source(settings=load_settings(self.models_dir))
        return self.source

    def _check_cancel(self) -> None:
        if self.cancel_event.is_set():
            raise I2LError(I2LError.CANCELLED, T("m_dl_cancelled"))

    def listing(self, repo: str) -> list[RemoteFile]:
        if self.offline:
            raise offline_error("list the files of " + repo)
        if repo not in self._listings:
            self.progress.set(state="listing", message=T("m_asking", source=self._source().label, repo=repo))
            files = list_repo(self._source(), repo, timeout=self.timeout)
            self._listings[repo] = files
            manifest = load_manifest(self.models_dir)
            manifest[repo] = {f.path: f.to_manifest() for f in files}
            try:
                save_manifest(self.models_dir, manifest)
            except OSError:
                pass
        return self._listings[repo]

    # -- plan -------------------------------------------------------------------------------------
    def plan(self, variant, bias: bool | None = None) -> Plan:
        """What a download of ``variant`` would fetch. Makes no network call when nothing is missing."""
        v = catalog._variant(variant)
        plan = Plan(v.key, bias, None)
        manifest = load_manifest(self.models_dir)
        for role in v.needed_roles(bias):
            loc = locate(role, self.models_dir, self.search_dirs)
            if loc.present:
                plan.present[role] = loc.paths
                try:                         # sizes the hub published earlier, if known: no network
                    catalog._check_sizes(FILES[role], loc, manifest)
                except I2LError as e:
                    plan.problems.append(e.text)
                continue
            mf = FILES[role]
            plan.source = self._source()
            wanted = [f for f in self.listing(mf.repo) if mf.matches(f.path)]
            if not wanted:
                raise I2LError(I2LError.DOWNLOAD, T("m_lists_no_files", source=self._source().label, title=mf.label, repo=mf.repo, pattern=mf.pattern), T("m_lists_no_files_fix"))
            for rf in wanted:
                dest = os.path.join(self.models_dir, *mf.repo.split("/"), *rf.path.split("/"))
                if os.path.lexists(dest):
                    size = os.path.getsize(dest) if os.path.isfile(dest) else -1
                    if size != rf.size:
                        plan.problems.append(
                            T("m_already_there", dest=dest, size=size, repo=mf.repo, path=rf.path, want=rf.size, source=self._source().label))
                    continue
                have = os.path.getsize(dest + PART) if os.path.isfile(dest + PART) else 0
                plan.items.append(PlanItem(role, rf, dest, have if have <= rf.size else 0))
        return plan

    # -- download ---------------------------------------------------------------------------------
    def download(self, variant, bias: bool | None = None) -> dict:
        """Fetch everything ``variant`` lacks. Returns a summary; raises ``I2LError`` (``DOWNLOAD``,
        ``CANCELLED``) on failure, leaving finished files in place and unfinished ones resumable."""
        v = catalog._variant(variant)
        t0 = time.monotonic()
        self.progress.set(state="planning", variant=v.key, message=T("m_checking_here"))
        plan = self.plan(v, bias)
        if plan.problems:
            raise I2LError(I2LError.WEIGHTS_INVALID, T("m_files_mismatch_list", head=T("m_files_mismatch"),
                                                                     lines=plan.problems), T("m_files_mismatch_fix"))
        if not plan.items:
            self.progress.set(state="done", message=T("m_all_here"))
            return {"variant": v.key, "downloaded": [], "bytes": 0, "seconds": 0.0, "present": plan.present,
                    "source": plan.source.to_dict() if plan.source else None}
        free, where = _free_space(self.models_dir)
        need = plan.remaining + self.reserve
        if free < need:
            raise I2LError(I2LError.DOWNLOAD,
                           T("m_no_space", variant=v.label, need=human_size(plan.remaining), reserve=human_size(self.reserve), where=where, free=human_size(free)),
                           T("m_no_space_fix"))
        os.makedirs(self.models_dir, exist_ok=True)
        with _DirLock(self.models_dir):
            self.progress.set(state="downloading", total=plan.total, file_count=len(plan.items),
                              source=plan.source.label, message=T("m_downloading_from", size=human_size(plan.remaining), source=plan.source.label))
            self.progress.start_bytes(sum(i.have for i in plan.items))
            done = []
            for n, item in enumerate(plan.items, 1):
                self._check_cancel()
                self.progress.set(file=f"{item.remote.repo}/{item.remote.path}", file_index=n,
                                  file_done=item.have, file_total=item.remote.size,
                                  message=T("m_file_of", path=item.remote.path, n=n, total=len(plan.items)))
                self._fetch(item)
                done.append(item.dest)
        self.progress.set(state="done", eta=0, message=T("m_downloaded_n", n=len(done)))
        return {"variant": v.key, "downloaded": done, "bytes": plan.total, "seconds": time.monotonic() - t0,
                "present": plan.present, "source": plan.source.to_dict()}

    def _fetch(self, item: PlanItem) -> None:
        rf = item.remote
        for attempt in range(1, self.attempts + 1):
            hasher = self._transfer(item)
            self.progress.set(state="verifying", message=T("m_checking_file", path=rf.path))
            problem = _check_digest(hasher, rf, os.path.getsize(item.part))
            if problem is None:
                _place(item.part, item.dest)
                self.progress.set(state="downloading")
                return
            self.log.append(T("m_try_again_note", repo=rf.repo, path=rf.path, problem=problem, n=attempt,
                              total=self.attempts))
            os.remove(item.part)              # ours, and wrong: never used
            self.progress.add(-item.remote.size)
            with self.progress.lock:
                self.progress.state["file_done"] = 0
            item.have = 0
        raise I2LError(I2LError.DOWNLOAD,
                       T("m_damaged_times", repo=rf.repo, path=rf.path, n=self.attempts, source=self._source().label, problem=problem),
                       T("m_damaged_fix"))

    def _transfer(self, item: PlanItem):
        """Bring ``item.part`` to its full size; returns the running hash of its bytes."""
        rf = item.remote
        part = item.part
        os.makedirs(os.path.dirname(part), exist_ok=True)
        have = os.path.getsize(part) if os.path.isfile(part) else 0
        if have > rf.size:
            os.remove(part)
            have = 0
        hasher = _Hasher(rf)
        if have:
            with open(part, "rb") as f:
                for buf in iter(lambda: f.read(self.chunk), b""):
                    hasher.update(buf)
        item.have = have
        fails = 0
        while True:
            self._check_cancel()
            if have >= rf.size and rf.size > 0:
                return hasher
            try:
                headers = {"Range": f"bytes={have}-"} if have else {}
                with open_url(rf.url, headers, self.timeout) as resp:
                    self._active = resp
                    read = getattr(resp, "read1", resp.read)   # what has arrived, not a whole chunk
                    start = 0
                    if have and resp.status == 206:
                        start = _content_range_start(resp.headers.get("Content-Range"))
                    if start != have:                # the server ignored or misread the Range: start over
                        have, hasher = 0, _Hasher(rf)
                        self.progress.add(-item.have)
                        with self.progress.lock:
                            self.progress.state["file_done"] = 0
                    with open(part, "ab" if have else "wb") as f:
                        while True:
                            self._check_cancel()
                            buf = read(self.chunk)
                            if not buf:
                                break
                            f.write(buf)
                            hasher.update(buf)
                            have += len(buf)
                            item.have = have
                            self.progress.add(len(buf))
                            fails = 0
                            if have > rf.size:
                                break
                        f.flush()
                        os.fsync(f.fileno())
                self._check_cancel()                 # a cancelled read may have ended like a short file
                if have >= rf.size:
                    return hasher
                raise http.client.IncompleteRead(b"", rf.size - have)
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:           # asked past the end: the .part is complete or wrong
                    return hasher
                if e.code not in (408, 429, 500, 502, 503, 504):
                    raise http_error(e, self._source(), rf.url) from None
                err: BaseException = e
            except (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError, OSError) as e:
                self._check_cancel()                 # a cancelled read ends like a dropped connection
                if getattr(e, "errno", None) == errno.ENOSPC:
                    raise I2LError(I2LError.DOWNLOAD, T("m_disk_full", path=self.models_dir, part=part), T("m_disk_full_fix")) from None
                err = e
            finally:
                self._active = None
            fails += 1
            if fails > self.retries:
                raise network_error(err, self._source(), rf.url)
            self.log.append(T("m_resume_note", path=rf.path, error=raw(f"{type(err).__name__}: {err}"), n=have))
            self.progress.set(message=T("m_retrying", path=rf.path, size=human_size(have), n=fails))
            if self.cancel_event.wait(min(30.0, self.backoff * 2 ** (fails - 1))):
                self._check_cancel()


def _shutdown(resp) -> None:
    """Shut the socket under an ``http.client`` response down, from another thread: a read blocked
    on it returns. (The plain socket's shutdown, also for TLS, so the reader's TLS state is left alone.)"""
    sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
    if isinstance(sock, socket.socket):
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _content_range_start(value: str | None) -> int:
    try:
        return int((value or "").split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


class _Hasher:
    """sha256 when the hub publishes it, else the git blob sha1, else nothing (size only)."""

    def __init__(self, rf: RemoteFile):
        self.kind = "sha256" if rf.sha256 else ("git" if rf.git_oid else "size")
        self.h = hashlib.sha256() if self.kind == "sha256" else hashlib.sha1() if self.kind == "git" else None
        if self.kind == "git":
            self.h.update(b"blob %d\0" % rf.size)

    def update(self, buf: bytes) -> None:
        if self.h is not None:
            self.h.update(buf)

    def hexdigest(self) -> str | None:
        return self.h.hexdigest() if self.h is not None else None


def _check_digest(hasher: _Hasher, rf: RemoteFile, size: int) -> str | None:
    if size != rf.size:
        return f"size {size} instead of {rf.size}"
    if hasher.kind == "sha256" and hasher.hexdigest() != rf.sha256:
        return f"sha256 {hasher.hexdigest()} instead of {rf.sha256}"
    if hasher.kind == "git" and hasher.hexdigest() != rf.git_oid:
        return f"git hash {hasher.hexdigest()} instead of {rf.git_oid}"
    return None


def file_digest(path: str, rf: RemoteFile, chunk: int = 1 << 20, cancel: threading.Event | None = None) -> str | None:
    """``None`` when ``path`` matches what the hub published, else what differs."""
    h = _Hasher(rf)
    size = 0
    with open(path, "rb") as f:
        for buf in iter(lambda: f.read(chunk), b""):
            if cancel is not None and cancel.is_set():
                raise I2LError(I2LError.CANCELLED, T("m_check_cancelled"))
            h.update(buf)
            size += len(buf)
    return _check_digest(h, rf, size)


def _place(part: str, dest: str) -> None:
    """Move a checked ``.part`` into place without ever replacing an existing file."""
    try:
        os.link(part, dest)                      # fails if dest exists: never overwrites
        os.remove(part)
        return
    except FileExistsError:
        raise I2LError(I2LError.DOWNLOAD, T("m_appeared_dl", dest=dest, part=part), T("m_compare")) from None
    except OSError:
        pass                                     # no hard links here (FAT, some network drives)
    if os.path.lexists(dest):
        raise I2LError(I2LError.DOWNLOAD, T("m_appeared_dl", dest=dest, part=part), T("m_compare"))
    os.rename(part, dest)


class _DirLock:
    """One download at a time per models folder (the tab and the command line may share it)."""

    def __init__(self, models_dir: str):
        self.path = os.path.join(models_dir, LOCK_NAME)
        self._stop = threading.Event()

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                break
            except FileExistsError:
                try:
                    age = time.time() - os.path.getmtime(self.path)
                except OSError:
                    continue
                if age > LOCK_STALE_S:           # its owner stopped refreshing it: gone
                    try:
                        os.remove(self.path)
                    except OSError:
                        pass
                    continue
                raise I2LError(I2LError.BUSY, T("m_dl_busy"),
                               T("m_dl_busy_fix")) from None
        else:
            raise I2LError(I2LError.BUSY, T("m_dl_busy"),
                           T("m_dl_busy_fix"))
        threading.Thread(target=self._beat, daemon=True, name="i2l-download-lock").start()
        return self

    def _beat(self):
        while not self._stop.wait(LOCK_STALE_S / 4):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def __exit__(self, *exc):
        self._stop.set()
        try:
            os.remove(self.path)
        except OSError:
            pass
        return False
