"""Helpers shared by the tests (imported as ``helpers``; conftest files are not for importing)."""
from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image(path, size=(96, 64), mode="RGB", color=(200, 30, 60), fmt=None, **save):
    from PIL import Image
    im = Image.new(mode, size, color if mode in ("RGB", "RGBA", "CMYK") else 128)
    if mode == "RGB":
        # a little structure so encoders see more than a flat colour
        for x in range(0, size[0], 8):
            for y in range(0, size[1], 8):
                if (x + y) // 8 % 2:
                    im.putpixel((x, y), (x * 2 % 256, y * 3 % 256, 90))
    im.save(str(path), format=fmt, **save)
    return str(path)
