"""Reading user images safely and turning them into upright RGB.

Used on both sides: the host checks images before a job starts (so a bad file is reported at
once, by name), and the worker loads them the same way. Pillow only.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field

from .contract import I2LError, T, bad_input, raw

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic")
MAX_PIXELS = 64_000_000      # 8000x8000; the model looks at 1024x1024 anyway
MAX_IMAGES = 64
MIN_SIDE = 64                # shorter side under this: refused (nothing for the encoders to see)
SMALL_SIDE = 256             # shorter side under this: used, with a warning (upscaled to 1024)
WORK_SIZE = 2048             # longest side kept after loading; every encoder resizes to <= 1024


@dataclass
class ImageInfo:
    path: str
    width: int
    height: int
    mode: str
    format: str
    sha256: str
    warnings: list[str] = field(default_factory=list)


def check_readable(settings, path: str, upload_dirs=()) -> None:
    """Where other computers can reach the page (``settings.remote``), images are read only from
    uploads (``upload_dirs``) and the folders the owner listed (``image_dirs``): never any other
    file or folder of the server. Raises ``I2LError(NOT_ALLOWED)``."""
    if not settings.remote:
        return
    real = os.path.realpath(path)
    for root in [*upload_dirs, *settings.image_dirs]:
        r = os.path.realpath(root)
        try:
            if os.path.commonpath([r, real]) == r:
                return
        except ValueError:
            continue
    raise I2LError(I2LError.NOT_ALLOWED, T("m_folder_not_allowed", path=path), T("m_folder_not_allowed_fix"))


def collect_images(inputs: list[str]) -> list[str]:
    """Expand folders (sorted, images only, not recursive) and keep files as given."""
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
            if not found:
                raise bad_input(T("m_folder_no_images", path=item),
                                T("m_folder_no_images_fix"))
            paths.extend(found)
        else:
            paths.append(item)
    if not paths:
        raise bad_input(T("err_no_images"), T("m_add_image"))
    if len(paths) > MAX_IMAGES:
        raise bad_input(T("err_too_many", n=len(paths), max=MAX_IMAGES),
                        T("m_pick_typical"))
    return paths


def _open(path: str):
    from PIL import Image, UnidentifiedImageError
    name = os.path.basename(path)
    if not os.path.exists(path):
        raise bad_input(T("m_image_not_found", path=path), T("m_check_path"))
    if not os.path.isfile(path):
        raise bad_input(T("m_not_a_file", path=path), T("m_not_a_file_fix"))
    if os.path.getsize(path) == 0:
        raise bad_input(T("m_image_empty", name=name), T("m_export_again"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except UnidentifiedImageError:
        raise bad_input(T("m_not_image", name=name),
                        T("m_use_formats")) from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise bad_input(T("m_bomb", name=name),
                        T("m_bomb_fix", max=MAX_PIXELS // 1_000_000)) from None
    except OSError as e:
        raise bad_input(T("m_unreadable", name=name, error=raw(e)), T("m_export_again")) from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise bad_input(T("m_too_big", name=name, w=w, h=h, mp=f"{w * h / 1e6:.0f}", max=MAX_PIXELS // 1_000_000),
                        T("m_scale_down"))
    if w < 1 or h < 1:
        raise bad_input(T("m_no_pixels", name=name, w=w, h=h), T("m_use_another"))
    if min(w, h) < MIN_SIDE:
        im.close()
        raise bad_input(T("m_too_small", name=name, w=w, h=h, min=MIN_SIDE), T("m_too_small_fix", small=SMALL_SIDE))
    return im


def has_transparency(im) -> bool:
    """Whether ``im`` has an alpha channel or a transparent palette entry that is actually used."""
    if im.mode == "P":
        return "transparency" in im.info
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        lo, _ = im.getchannel("A").getextrema()
        return lo < 255
    return "transparency" in im.info


def _to_rgb(im):
    """Upright 8-bit RGB from any mode: palette, alpha (on white), CMYK, 16-bit and float greys."""
    from PIL import Image
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        lo, hi = im.getextrema() if im.mode == "I" else (0, 65535)
        if im.mode == "I" and hi <= 255 and lo >= 0:
            lo, hi = 0, 255
        scale = 255.0 / max(hi - lo, 1)
        im = im.convert("I").point(lambda v: (v - lo) * scale).convert("L")
    elif im.mode == "F":
        lo, hi = im.getextrema()
        if hi <= 1.0 and lo >= 0.0:
            lo, hi = 0.0, 1.0
        scale = 255.0 / max(hi - lo, 1e-12)
        im = im.point(lambda v: (v - lo) * scale).convert("L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def load_image(path: str, max_side: int = WORK_SIZE):
    """Open, check and normalise one image. Returns (PIL RGB image, list of warnings)."""
    from PIL import Image, ImageOps
    name = os.path.basename(path)
    notes: list[str] = []
    im = _open(path)
    w, h = im.size                       # as stored (a JPEG's draft decode below is smaller)
    try:
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            notes.append(T("m_animated", name=name, n=frames))
            im.seek(0)
        if im.format == "JPEG" and max(im.size) > 2 * max_side:
            im.draft("RGB", (max_side, max_side))   # decode big JPEGs at a reduced scale
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise bad_input(T("m_damaged_image", name=name, error=raw(e)),
                            T("m_export_again")) from None
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:   # a broken EXIF block must not lose the image
            upright = im
            notes.append(T("m_exif_unreadable", name=name))
        if upright is not im and upright.size != im.size:
            notes.append(T("m_rotated", name=name))
        if has_transparency(upright):
            notes.append(T("m_transparency", name=name))
        if min(w, h) < SMALL_SIDE:
            notes.append(T("m_small_image", name=name, w=w, h=h, small=SMALL_SIDE))
        rgb = _to_rgb(upright)
        if max(rgb.size) > max_side:
            rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        if rgb is im:
            rgb = im.copy()
        return rgb, notes
    finally:
        im.close()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inspect(p: str) -> ImageInfo:
    rgb, notes = load_image(p, max_side=256)
    with _open(p) as im:
        w, h, mode, fmt = im.size[0], im.size[1], im.mode, im.format or "?"
    rgb.close()
    return ImageInfo(p, w, h, mode, fmt, file_sha256(p), notes)


def inspect_images(paths: list[str]) -> list[ImageInfo]:
    """Fully decode each image once (catches truncation) and report what it is; raises for the
    first bad one in the order given. Images are decoded in parallel (Pillow releases the GIL)."""
    return list(_pool_map(_inspect, paths))


def load_images(paths: list[str], max_side: int = WORK_SIZE) -> list:
    """``load_image`` for several paths at once, in parallel; [(image, warnings)] in order."""
    return list(_pool_map(lambda p: load_image(p, max_side), paths))


def _pool_map(fn, items):
    if len(items) <= 1:
        return [fn(i) for i in items]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(8, len(items), (os.cpu_count() or 2))) as pool:
        futures = [pool.submit(fn, i) for i in items]
        return [f.result() for f in futures]     # re-raises the first failure in input order


def crop_and_resize(image, height: int, width: int):
    """Scale ``image`` (PIL) so it covers ``height`` x ``width``, then cut that size from its middle.

    The preprocessing of DiffSynth's i2L units (its ``ImageCropAndResize``): bilinear resize of
    the PIL image to the covering size, rounded, then a centred crop whose offsets are rounded."""
    from PIL import Image
    w, h = image.size
    scale = max(width / w, height / h)
    rw, rh = round(w * scale), round(h * scale)
    if (rw, rh) != (w, h):
        image = image.resize((rw, rh), Image.BILINEAR)
    top = int(round((rh - height) / 2.0))
    left = int(round((rw - width) / 2.0))
    return image.crop((left, top, left + width, top + height))
