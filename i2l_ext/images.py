"""Reading user images safely and turning them into upright RGB.

Used on both sides: the host checks images before a job starts (so a bad file is reported at
once, by name), and the worker loads them the same way. Pillow only.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field

from .errors import bad_input

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic")
MAX_PIXELS = 64_000_000      # 8000x8000; the model looks at 1024x1024 anyway
MAX_IMAGES = 64
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


def collect_images(inputs: list[str]) -> list[str]:
    """Expand folders (sorted, images only, not recursive) and keep files as given."""
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
            if not found:
                raise bad_input(f"The folder {item} holds no images.",
                                "Pick a folder with .png, .jpg or .webp files, or pick the images themselves.")
            paths.extend(found)
        else:
            paths.append(item)
    if not paths:
        raise bad_input("No image was given.", "Add at least one image (a few of the same style work best).")
    if len(paths) > MAX_IMAGES:
        raise bad_input(f"{len(paths)} images were given; at most {MAX_IMAGES} can go into one LoRA.",
                        "Pick the most typical images; 1 to 8 usually give the best result.")
    return paths


def _open(path: str):
    from PIL import Image, UnidentifiedImageError
    name = os.path.basename(path)
    if not os.path.exists(path):
        raise bad_input(f"Image not found: {path}", "Check the path, or upload the image again.")
    if not os.path.isfile(path):
        raise bad_input(f"{path} is not a file.", "Give image files, or a folder with the folder option.")
    if os.path.getsize(path) == 0:
        raise bad_input(f"{name} is empty (0 bytes).", "Export or download the image again.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except UnidentifiedImageError:
        raise bad_input(f"{name} is not an image Pillow can read.",
                        "Use a PNG, JPEG or WebP file.") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise bad_input(f"{name} declares a gigantic size (a decompression bomb); it was not opened.",
                        f"Use an image of at most {MAX_PIXELS // 1_000_000} megapixels.") from None
    except OSError as e:
        raise bad_input(f"{name} could not be read: {e}", "Export or download the image again.") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise bad_input(f"{name} is {w}x{h} ({w * h / 1e6:.0f} megapixels); the limit is "
                        f"{MAX_PIXELS // 1_000_000} megapixels.",
                        "Scale it down first; the model sees every image at 1024x1024.")
    if w < 1 or h < 1:
        raise bad_input(f"{name} has no pixels ({w}x{h}).", "Use another image.")
    return im


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
    try:
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            notes.append(f"{name} is animated ({frames} frames); its first frame was used.")
            im.seek(0)
        if im.format == "JPEG" and max(im.size) > 2 * max_side:
            im.draft("RGB", (max_side, max_side))   # decode big JPEGs at a reduced scale
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise bad_input(f"{name} is damaged or truncated ({e}).",
                            "Export or download the image again.") from None
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:   # a broken EXIF block must not lose the image
            upright = im
            notes.append(f"{name} has an unreadable EXIF orientation; it was used as stored.")
        if upright is not im and upright.size != im.size:
            notes.append(f"{name} was rotated upright from its EXIF orientation.")
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
