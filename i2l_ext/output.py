"""Where a LoRA goes and how it gets there, as a transaction that never loses a file.

1. ``plan_output`` (host, before anything runs) checks the name (characters, and bytes against
   the folder's limit), makes the subfolders it needs (remembering which), removes what dead jobs
   left in that folder, and **claims** the name: ``.<name>.i2l-claim`` is created exclusively,
   holding the owner's pid, so of two jobs racing for one name exactly one goes on and the other
   gets "name taken". A name whose files exist is taken too, unless the job overwrites.
2. The worker writes ``.<name>.<job>.<ext>.i2l-partial`` files, each flushed to the disk
   (``fsync``) before it is closed.
3. ``commit`` (worker) links each into place without replacing anything (``os.link``; a plain
   rename where the file system has no hard links), the card and preview first and the LoRA
   last, then drops the partial names and flushes the folder. Overwriting replaces instead.
4. ``release`` drops the claim once the job is over. ``abort`` (worker and host, after a failure
   or a cancel) removes this job's partial files, a final file only when it is still the same
   file as this job's partial (so only what this job put there), the claim, and the subfolders
   this job made if they are empty again. Neither raises: what could not be removed is returned
   for the log.

Every ``OSError`` becomes an ``I2LError`` through ``os_error`` (one place: ENOSPC, EROFS,
EACCES, ENAMETOOLONG, EIO... each with its own words).
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
import unicodedata
import uuid
from dataclasses import asdict, dataclass, field

from .contract import I2LError, T, Text, bad_input, raw

MAX_NAME = 120                      # characters
PARTIAL_SUFFIX = ".i2l-partial"
CLAIM_SUFFIX = ".i2l-claim"
JOB_ID_LEN = 12
# The longest name this step gives a file, beyond the LoRA's name: ".<name>.<job>.safetensors.i2l-partial".
LONGEST_EXTRA = len(".." + "x" * JOB_ID_LEN + ".safetensors" + PARTIAL_SUFFIX)
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_BAD_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_REFUSED_CATEGORIES = {"Cc": "m_char_control", "Cf": "m_char_format", "Zl": "m_char_line",
                       "Zp": "m_char_paragraph", "Cs": "m_char_surrogate"}


# -------------------------------------------------------------------------------------------- names
def name_problem(name: str) -> Text | None:
    """Why ``name`` can't be a LoRA's name, or None if it can (the folder's byte limit aside:
    ``name_bytes_problem``)."""
    if not name or not name.strip():
        return T("m_name_empty")
    for c in name:
        cat = unicodedata.category(c)
        if cat in _REFUSED_CATEGORIES:
            return T("m_name_invisible", char=f"U+{ord(c):04X}", kind=T(_REFUSED_CATEGORIES[cat]))
    if name != name.strip():
        return T("m_name_space")
    if "/" in name or "\\" in name:
        return T("m_name_slash")
    if ".." in name:
        return T("m_name_dotdot")
    bad = sorted(set(_BAD_CHARS.findall(name)))
    if bad:
        return T("m_name_chars", chars=" ".join(bad))
    if name.endswith("."):
        return T("m_name_end_dot")
    if name.startswith("."):
        return T("m_name_start_dot")
    if name.split(".")[0].lower() in _RESERVED:
        return T("m_name_reserved", name=name)
    if name.lower().endswith(".safetensors"):
        return T("m_name_ext")
    if len(name) > MAX_NAME:
        return T("m_name_long", n=len(name), max=MAX_NAME)
    return None


def name_max(folder: str) -> int:
    """The longest file name ``folder``'s file system takes, in bytes (255 where it won't say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def name_bytes_problem(name: str, folder: str) -> Text | None:
    """Whether ``name`` with the longest suffix this step writes fits ``folder``'s name limit."""
    limit = name_max(folder) - LONGEST_EXTRA
    n = len(name.encode("utf-8", "surrogatepass"))
    return T("m_name_bytes", n=n, max=limit) if n > limit else None


def suggest_name(name: str) -> str:
    """A usable name close to ``name`` (for messages and as-you-type hints)."""
    s = "".join(c for c in name if unicodedata.category(c) not in _REFUSED_CATEGORIES)
    s = _BAD_CHARS.sub("_", s.replace("..", "_")).strip().strip(".")
    if s.lower().endswith(".safetensors"):
        s = s[: -len(".safetensors")]
    if s.split(".")[0].lower() in _RESERVED:
        s = "lora_" + s
    while len(s.encode("utf-8")) > 200:
        s = s[:-1]
    return (s or "my_lora")[:MAX_NAME]


def subfolder_parts(subfolder: str) -> list[str]:
    return [p for p in re.split(r"[\\/]", subfolder or "") if p not in ("", ".")]


def subfolder_problem(subfolder: str) -> Text | None:
    if not subfolder:
        return None
    if subfolder.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", subfolder):
        return T("m_subfolder_relative")
    for p in subfolder_parts(subfolder):
        problem = name_problem(p)
        if problem:
            return T("m_subfolder_part", part=p, problem=problem)
    return None


def check_name(lora_dir: str, name: str, subfolder: str = "", overwrite: bool = False) -> Text | None:
    """What the tab says as the user types: the name's problem, or a LoRA (or a job) that has it."""
    problem = name_problem(name) or subfolder_problem(subfolder)
    if problem:
        return problem
    folder = os.path.join(lora_dir, *subfolder_parts(subfolder))
    problem = name_bytes_problem(name, folder if os.path.isdir(folder) else lora_dir)
    if problem:
        return problem
    if claimed(folder, name):
        return T("m_name_being_made", name=name)
    taken = existing_outputs(lora_dir, name, subfolder)
    if taken and not overwrite:
        return T("m_name_taken_short", name=name, file=os.path.basename(taken[0]))
    return None


# ------------------------------------------------------------------------------------------- errors
_ERRNO_KEYS = {errno.ENOSPC: "m_os_nospace", errno.EROFS: "m_os_readonly", errno.EACCES: "m_os_denied",
               errno.EPERM: "m_os_denied", errno.ENAMETOOLONG: "m_os_name_too_long", errno.EIO: "m_os_io",
               errno.ENOENT: "m_os_missing", errno.ENOTDIR: "m_os_missing", errno.EDQUOT: "m_os_nospace"}


def os_error(e: OSError, what: Text, path: str, need: str | None = None) -> I2LError:
    """The one error for an ``OSError`` met while ``what`` (a Text naming the step) touched
    ``path``: the system's reason in plain words, and what to check."""
    reason = T(_ERRNO_KEYS[e.errno]) if e.errno in _ERRNO_KEYS else raw(e.strerror or e)
    fix = T("m_os_fix_room", size=need) if need else T("m_os_fix")
    return I2LError(I2LError.OUTPUT, T("m_os_error", what=what, path=path, reason=reason), fix, details=repr(e))


def write_failed(what: str, folder: str, err: OSError, need: str | None = None) -> I2LError:
    """The error for a file of a job's output that could not be written (``what``: lora | extras)."""
    return os_error(err, T(f"m_writing_{what}"), folder, need)


# -------------------------------------------------------------------------------------------- plans
@dataclass
class OutputPlan:
    name: str
    folder: str
    path: str          # <folder>/<name>.safetensors
    sidecar: str       # <folder>/<name>.json
    preview: str       # <folder>/<name>.preview.png
    tmp_path: str
    tmp_sidecar: str
    tmp_preview: str
    overwrite: bool
    claim: str = ""                                     # <folder>/.<name>.i2l-claim, held while the job runs
    job: str = ""                                       # the job's id (in its partial names and its claim)
    made_dirs: list[str] = field(default_factory=list)  # subfolders this job created, outermost first

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OutputPlan":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(partial, final), in the order they are put in place: the LoRA last."""
        return [(self.tmp_preview, self.preview), (self.tmp_sidecar, self.sidecar), (self.tmp_path, self.path)]


def existing_outputs(lora_dir: str, name: str, subfolder: str = "") -> list[str]:
    folder = os.path.join(lora_dir, *subfolder_parts(subfolder))
    return [p for p in (os.path.join(folder, name + ext) for ext in (".safetensors", ".json", ".preview.png"))
            if os.path.lexists(p)]


def plan_output(lora_dir: str, name: str, subfolder: str = "", overwrite: bool = False,
                job_id: str | None = None) -> OutputPlan:
    """Check the name and folder, decide every path and claim the name; raises I2LError with the
    fix (and leaves nothing behind when it does)."""
    problem = name_problem(name)
    if problem:
        raise bad_input(T("m_bad_name", name=repr(name), problem=problem), T("m_try_name", name=suggest_name(name)))
    problem = subfolder_problem(subfolder)
    if problem:
        raise bad_input(T("m_bad_subfolder", name=repr(subfolder), problem=problem), T("m_subfolder_simple"))
    if not lora_dir:
        raise I2LError(I2LError.OUTPUT, T("m_no_lora_dir"), T("m_no_lora_dir_fix"))
    root = os.path.abspath(lora_dir)
    if not os.path.isdir(root):
        raise I2LError(I2LError.OUTPUT, T("m_lora_dir_missing", path=root), T("m_lora_dir_missing_fix"))
    parts = subfolder_parts(subfolder)
    folder = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(folder)]) != real_root:
        raise bad_input(T("m_subfolder_outside", name=repr(subfolder)), T("m_subfolder_inside"))
    problem = name_bytes_problem(name, root)
    if problem:
        raise bad_input(T("m_bad_name", name=repr(name), problem=problem), T("m_try_name", name=suggest_name(name)))
    job_id = (job_id or uuid.uuid4().hex)[:JOB_ID_LEN]
    base = os.path.join(folder, name)
    tmp = os.path.join(folder, f".{name}.{job_id}")
    plan = OutputPlan(name=name, folder=folder, path=base + ".safetensors", sidecar=base + ".json",
                      preview=base + ".preview.png", tmp_path=tmp + ".safetensors" + PARTIAL_SUFFIX,
                      tmp_sidecar=tmp + ".json" + PARTIAL_SUFFIX, tmp_preview=tmp + ".png" + PARTIAL_SUFFIX,
                      overwrite=overwrite, claim=os.path.join(folder, f".{name}{CLAIM_SUFFIX}"), job=job_id)
    try:
        _make_dirs(root, parts, plan)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise I2LError(I2LError.OUTPUT, T("m_not_writable", path=folder), T("m_not_writable_fix"))
        sweep(folder)
        _claim(plan, job_id)
        taken = existing_outputs(root, name, subfolder)
        if taken and not overwrite:
            raise I2LError(I2LError.NAME_TAKEN, T("m_name_taken", name=name, path=taken[0]), T("m_name_taken_fix"))
    except BaseException as e:
        release(plan)
        remove_made_dirs(plan)
        if isinstance(e, OSError):
            raise os_error(e, T("m_preparing_folder"), folder) from None
        raise
    return plan


def _make_dirs(root: str, parts: list[str], plan: OutputPlan) -> None:
    cur = root
    for p in parts:
        cur = os.path.join(cur, p)
        try:
            os.mkdir(cur)
            plan.made_dirs.append(cur)
        except FileExistsError:
            if not os.path.isdir(cur):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), cur) from None


# ------------------------------------------------------------------------------------------- claims
# A claim is live while its owner holds a lock on it (``flock``: the system lets go of it when the
# owner dies, however it dies). Where there is no ``flock`` (Windows) the owner's pid is asked.
try:
    import fcntl
except ImportError:                  # Windows
    fcntl = None
_HELD: dict[str, tuple[str, int]] = {}   # this process's claims: path -> (job, the open, locked file)


def _proc_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: ticks since boot), to tell it from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _pid_alive(owner: dict) -> bool:
    """Without ``flock``: whether the process that wrote a claim still runs (one from another
    computer counts as alive)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    start = owner.get("start")
    return start is None or _proc_start(pid) in (None, start)


def _read_fd(fd: int) -> dict:
    try:
        os.lseek(fd, 0, 0)
        d = json.loads(os.read(fd, 65536).decode("utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _try_lock(fd: int, exclusive: bool = True) -> bool:
    """Take the claim's lock without waiting; False when another process holds it."""
    if fcntl is None:
        d = _read_fd(fd)
        return not (d and _pid_alive(d))
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _still_there(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def _claim(plan: OutputPlan, job_id: str) -> None:
    taken = I2LError(I2LError.NAME_TAKEN, T("m_name_being_made", name=plan.name), T("m_name_being_made_fix"))
    payload = json.dumps({"pid": os.getpid(), "start": _proc_start(os.getpid()), "host": socket.gethostname(),
                          "job": job_id, "name": plan.name, "time": time.time()}).encode()
    for _ in range(5):
        try:
            fd, created = os.open(plan.claim, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(plan.claim, os.O_RDWR), False
            except FileNotFoundError:
                continue                     # released meanwhile: try again
        try:
            held = os.open(plan.claim, os.O_RDONLY)  # the lock is held on a read-only handle: no file of
        except OSError:                              # the job stays open for writing (a disk can go read-only)
            os.close(fd)
            continue
        if not (created and fcntl is None) and not _try_lock(held):
            os.close(held)
            os.close(fd)
            raise taken
        if not _still_there(held, plan.claim):   # removed by its owner or a sweep just now
            os.close(held)
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.write(fd, payload)
        finally:
            os.close(fd)
        _HELD[plan.claim] = (job_id, held)
        return
    raise taken


def release(plan: OutputPlan) -> None:
    """Drop the job's claim on its name (removed while still locked, so no one takes a half-gone claim)."""
    held = _HELD.get(plan.claim) if plan.claim else None
    if held is None or held[0] != plan.job:          # not this job's: never another's
        return
    del _HELD[plan.claim]
    _unlink(plan.claim)
    os.close(held[1])


def _live_claim(path: str) -> tuple[bool, str | None]:
    """(whether a running job holds the claim at ``path``, the job it names)."""
    if path in _HELD:
        return True, _HELD[path][0]
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False, None
    try:
        job = _read_fd(fd).get("job")
        if fcntl is None:
            return not _try_lock(fd), job
        if _try_lock(fd, exclusive=False):
            return False, job
        return True, job
    finally:
        os.close(fd)


def claimed(folder: str, name: str) -> bool:
    """Whether a running job holds ``name`` in ``folder``."""
    return _live_claim(os.path.join(folder, f".{name}{CLAIM_SUFFIX}"))[0]


_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<job>[0-9a-f]{%d})\.[a-z.]+%s$" % (JOB_ID_LEN, re.escape(PARTIAL_SUFFIX)))


def sweep(folder: str) -> list[str]:
    """Remove what dead jobs left in ``folder``: their claims and their partial files (those no
    live claim names). Only this step's own patterns; returns what was removed."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    live_jobs, removed = set(), []
    for n in names:
        if n.startswith(".") and n.endswith(CLAIM_SUFFIX):
            p = os.path.join(folder, n)
            live, job = _live_claim(p)
            if live:
                live_jobs.add(job)
            elif _remove_dead_claim(p):
                removed.append(p)
    for n in names:
        m = _PARTIAL.match(n)
        if m and m.group("job") not in live_jobs:
            p = os.path.join(folder, n)
            if _unlink(p):
                removed.append(p)
    return removed


def _remove_dead_claim(path: str) -> bool:
    """Unlink a dead claim while holding its lock, so a job taking it over meanwhile is not undone."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        if fcntl is not None and not _try_lock(fd):
            return False
        return _still_there(fd, path) and _unlink(path)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ card, preview
def card_data(description: str = "", activation_text: str = "", preferred_weight: float = 1.0,
              sd_version: str = "Unknown", notes: str = "") -> dict:
    """The WebUI's Lora card sidecar (`<stem>.json`)."""
    return {"description": description, "sd version": sd_version, "activation text": activation_text,
            "preferred weight": float(preferred_weight), "negative text": "", "notes": notes}


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_card(plan: OutputPlan, card: dict) -> None:
    _write_synced(plan.tmp_sidecar, json.dumps(card, ensure_ascii=False, indent=2, allow_nan=False).encode("utf-8"))


def contact_sheet(images: list, size: int = 768):
    """A square grid of the input images (centre-cropped) for the Lora card preview."""
    from PIL import Image
    n = max(1, min(len(images), 16))
    cols = 1 if n == 1 else 2 if n <= 4 else 3 if n <= 9 else 4
    rows = -(-n // cols)
    cell = size // cols
    sheet = Image.new("RGB", (cell * cols, cell * rows), (24, 24, 24))
    for i, im in enumerate(images[:n]):
        w, h = im.size
        s = min(w, h)
        tile = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize(
            (cell, cell), Image.Resampling.LANCZOS)
        sheet.paste(tile, ((i % cols) * cell, (i // cols) * cell))
    return sheet


def write_preview(plan: OutputPlan, images: list) -> None:
    import io
    buf = io.BytesIO()
    contact_sheet(images).save(buf, format="PNG")
    _write_synced(plan.tmp_preview, buf.getvalue())


# ------------------------------------------------------------------------------------------- commit
def _usual_mode(path: str) -> None:
    """Give a file the permissions a new file normally gets (some writers create 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(path, 0o666 & ~mask)
    except OSError:
        pass


def _link_no_replace(src: str, dst: str) -> bool:
    """Put ``src`` at ``dst`` unless ``dst`` exists; atomic where hard links work. True: linked
    (``src`` stays until the commit ends), False: renamed (no hard links here)."""
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)
    return False


def commit(plan: OutputPlan) -> None:
    """Put the finished partial files in place: card and preview first, the LoRA last; never over
    another file unless the job overwrites. On failure what this call placed is taken back."""
    present = [(t, f) for t, f in plan.pairs if os.path.exists(t)]
    for t, _ in present:
        _usual_mode(t)
    placed: list[tuple[str, str]] = []
    try:
        for tmp, final in present:
            if plan.overwrite:
                os.replace(tmp, final)
            else:
                try:
                    _link_no_replace(tmp, final)
                except FileExistsError:
                    raise I2LError(I2LError.NAME_TAKEN, T("m_appeared", path=final), T("m_appeared_fix")) from None
                placed.append((tmp, final))
        for tmp, _ in present:
            _unlink(tmp)
        fsync_dir(plan.folder)
    except BaseException:
        for tmp, final in placed:
            if _same(tmp, final):
                _unlink(final)
        raise


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (the renames into it) to the disk, where the system allows it."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def abort(plan: OutputPlan) -> list[Text]:
    """Remove what this job wrote: its partial files, a final file only while it is still the same
    file as this job's partial (a commit cut short), its claim (where this process holds it), and
    the subfolders it made once empty. Never raises; returns what could not be removed, for the log."""
    problems: list[Text] = []
    for tmp, final in plan.pairs:
        if not plan.overwrite and _same(tmp, final):
            _unlink(final, problems)
        _unlink(tmp, problems)
    release(plan)
    problems += remove_made_dirs(plan)
    return problems


def remove_made_dirs(plan: OutputPlan) -> list[Text]:
    problems: list[Text] = []
    for d in reversed(plan.made_dirs):
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                problems.append(T("m_not_removed", path=d, error=raw(e.strerror or e)))
            break                          # something else is in it now: leave it and what holds it
    return problems


def _unlink(path: str, problems: list | None = None) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:
        if problems is not None:
            problems.append(T("m_not_removed", path=path, error=raw(e.strerror or e)))
        return False
