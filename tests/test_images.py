"""Every kind of awkward image gives upright RGB or a clear error naming the file."""
import io
import os
import struct

import pytest
from PIL import Image

from i2l_ext.contract import I2LError
from i2l_ext.images import MAX_PIXELS, collect_images, inspect_images, load_image
from helpers import make_image


def bad(fn, *a):
    with pytest.raises(I2LError) as e:
        fn(*a)
    assert e.value.code == I2LError.BAD_INPUT
    assert e.value.fix
    return e.value.message


def test_no_image_and_empty_folder(tmp_path):
    assert "No image" in bad(collect_images, [])
    (tmp_path / "empty").mkdir()
    assert "holds no images" in bad(collect_images, [str(tmp_path / "empty")])


def test_folder_expands_sorted_images_only(tmp_path):
    make_image(tmp_path / "b.png"); make_image(tmp_path / "a.jpg", fmt="JPEG")
    (tmp_path / "notes.txt").write_text("x")
    assert [os.path.basename(p) for p in collect_images([str(tmp_path)])] == ["a.jpg", "b.png"]


def test_not_an_image(tmp_path):
    p = tmp_path / "readme.png"
    p.write_text("this is text, not a picture")
    assert "readme.png is not an image" in bad(load_image, str(p))


def test_missing_and_empty_files(tmp_path):
    assert "not found" in bad(load_image, str(tmp_path / "nope.png"))
    (tmp_path / "zero.png").write_bytes(b"")
    assert "empty" in bad(load_image, str(tmp_path / "zero.png"))


def test_truncated_image(tmp_path):
    p = make_image(tmp_path / "full.jpg", size=(256, 256), fmt="JPEG")
    data = open(p, "rb").read()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    msg = bad(load_image, str(tmp_path / "cut.jpg"))
    assert "cut.jpg" in msg and ("truncated" in msg or "damaged" in msg)


def test_corrupt_png_body(tmp_path):
    p = make_image(tmp_path / "ok.png", size=(64, 64))
    data = bytearray(open(p, "rb").read())
    for i in range(60, len(data) - 20):
        data[i] ^= 0x5A
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert "bad.png" in bad(load_image, str(tmp_path / "bad.png"))


def _png_header_only(path, w, h):
    """A PNG whose header declares w x h; nothing else is needed to be refused."""
    import zlib
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    raw += chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    path.write_bytes(raw)
    return str(path)


def test_huge_image_refused_before_decoding(tmp_path):
    msg = bad(load_image, _png_header_only(tmp_path / "huge.png", 20000, 20000))
    assert "huge.png" in msg and ("megapixels" in msg or "decompression bomb" in msg)


def test_decompression_bomb(tmp_path):
    msg = bad(load_image, _png_header_only(tmp_path / "bomb.png", 60000, 60000))
    assert "bomb.png" in msg


def test_within_limit_is_fine():
    assert MAX_PIXELS >= 20_000_000


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (300, 300), (i * 80, 0, 0)) for i in range(3)]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100)
    im, notes = load_image(str(p))
    assert im.mode == "RGB" and im.size == (300, 300)
    assert [str(n) for n in notes] == ["anim.gif is animated (3 frames); its first frame was used."]


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "LA", "RGBA", "1", "I;16", "I", "F"])
def test_modes_become_rgb(tmp_path, mode):
    size = (96, 72)
    if mode == "CMYK":
        p = tmp_path / "c.jpg"; Image.new("CMYK", size, (0, 255, 255, 0)).save(p)
    elif mode == "I;16":
        p = tmp_path / "g16.png"; Image.new("I;16", size, 65535).save(p)
    elif mode == "F":
        p = tmp_path / "f.tif"; Image.new("F", size, 0.5).save(p)
    elif mode == "I":
        p = tmp_path / "i.tif"; Image.new("I", size, 40000).save(p)
    else:
        p = tmp_path / f"m{mode}.png"; Image.new(mode, size).save(p)
    im, _ = load_image(str(p))
    assert im.mode == "RGB" and im.size == size
    if mode == "CMYK":
        r, g, b = im.getpixel((0, 0)); assert r > 200 and g < 60 and b < 60
    if mode == "I;16":
        assert im.getpixel((0, 0)) == (255, 255, 255)   # full-scale 16-bit is white, not clipped noise
    if mode == "F":
        assert 120 <= im.getpixel((0, 0))[0] <= 135


def test_alpha_composited_on_white_and_said(tmp_path):
    p = tmp_path / "alpha.png"
    Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(p)
    im, notes = load_image(str(p))
    assert im.getpixel((5, 5)) == (255, 255, 255)
    assert [n.key for n in notes] == ["m_transparency"] and "透明" in notes[0].render("zh_CN")
    opaque = tmp_path / "opaque.png"
    Image.new("RGBA", (300, 300), (9, 9, 9, 255)).save(opaque)          # an alpha channel, all opaque
    assert load_image(str(opaque))[1] == []
    pal = tmp_path / "pal.png"
    Image.new("P", (300, 300)).save(pal, transparency=0)
    assert [n.key for n in load_image(str(pal))[1]] == ["m_transparency"]


@pytest.mark.parametrize("size,refused,warned", [((1, 1), True, False), ((16, 16), True, False),
                                                 ((63, 500), True, False), ((64, 64), False, True),
                                                 ((255, 900), False, True), ((256, 256), False, False)])
def test_tiny_images_refused_small_ones_warned(tmp_path, size, refused, warned):
    p = make_image(tmp_path / "s.png", size=size)
    if refused:
        with pytest.raises(I2LError) as e:
            inspect_images([p])
        assert e.value.code == I2LError.BAD_INPUT and f"{size[0]}x{size[1]}" in e.value.message
        assert "64" in e.value.message
        return
    info = inspect_images([p])[0]
    assert [n.key for n in info.warnings] == (["m_small_image"] if warned else [])


def test_exif_rotation_made_upright(tmp_path):
    im = Image.new("RGB", (600, 300), (10, 200, 10))
    exif = Image.Exif(); exif[0x0112] = 6   # rotate 90 CW on display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif.tobytes())
    out, notes = load_image(str(p))
    assert out.size == (300, 600)
    assert any("upright" in str(n) for n in notes)


def test_big_image_is_scaled_down_for_work(tmp_path):
    p = make_image(tmp_path / "big.png", size=(3000, 1500))
    im, _ = load_image(str(p))
    assert max(im.size) == 2048 and im.size[1] == 1024


def test_inspect_reports_sha_and_size(images):
    infos = inspect_images(images)
    assert [i.width for i in infos] == [80, 96, 112]
    assert all(len(i.sha256) == 64 for i in infos)
