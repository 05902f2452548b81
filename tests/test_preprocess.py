"""Each step of the photo pipeline on made-up images, odd formats, and every bad-file case."""

import io

import numpy as np
import pytest
from PIL import Image

from fmnist.photos import preprocess as pp
from fmnist.photos.preprocess import PreprocessError, preprocess


def photo(w=300, h=200, bg=(250, 250, 250), box=(100, 50, 160, 170), fg=(30, 30, 30)):
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = bg
    l, t, r, b = box
    a[t:b, l:r] = fg
    return Image.fromarray(a)


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_trim_box_finds_object():
    rgb = np.asarray(photo())
    assert pp.trim_box(rgb, pp.corner_colour(rgb)) == (100, 50, 160, 170)


def test_trim_ignores_colours_within_fuzz():
    a = np.asarray(photo()).copy()
    a[5:10, 5:10] = 245  # 5 levels off the background: within 5%
    assert pp.trim_box(a, pp.corner_colour(a)) == (100, 50, 160, 170)


def test_resize_longest_edge_to_28():
    assert pp.resize_longest(Image.new("RGB", (60, 120))).size == (14, 28)
    assert pp.resize_longest(Image.new("RGB", (500, 50))).size == (28, 3)


def test_pad_centre():
    img = pp.pad_centre(Image.new("L", (14, 28), 200), 0)
    a = np.asarray(img)
    assert img.size == (28, 28) and a[:, 7:21].min() == 200 and a[:, :7].max() == 0 and a[:, 21:].max() == 0


def test_sharpen_increases_edge_contrast():
    a = np.zeros((28, 28), np.uint8)
    a[:, 14:] = 128
    s = np.asarray(pp.sharpen(Image.fromarray(a)))
    assert s[:, 14].mean() > 128 and s[:, 13].mean() < 1 + 0  # overshoot on the bright side of the edge


def test_light_background_is_negated_and_centred():
    out = preprocess(photo())
    assert out.background == "light" and out.image.shape == (28, 28) and out.image.dtype == np.uint8
    a = out.image
    assert a[:, 0].max() == 0 and a[:, -1].max() == 0  # black background beside the tall object
    cols = np.flatnonzero(a.max(0) > 100)
    assert a.max() > 200 and abs((cols[0] + cols[-1]) / 2 - 13.5) <= 1  # bright object, centred
    rows = np.flatnonzero(a.max(1) > 100)
    assert rows[-1] - rows[0] + 1 >= 27  # longest edge fills the frame


def test_dark_background_is_not_negated():
    out = preprocess(photo(bg=(5, 5, 5), fg=(220, 220, 220)))
    assert out.background == "dark" and out.image[14, 14] > 200 and out.image[0, 0] == 0


def test_off_white_background_maps_to_black():
    out = preprocess(photo(bg=(230, 228, 232)))
    assert out.image[0, 0] == 0 and out.image[14, 14] > 200


def test_transparency_composited():
    a = np.zeros((100, 80, 4), np.uint8)
    a[20:80, 30:50] = (40, 40, 40, 255)  # opaque dark object, transparent elsewhere
    out = preprocess(Image.fromarray(a, "RGBA"))
    assert out.background == "light" and out.image[0, 0] == 0 and out.image[14, 14] > 150
    with pytest.raises(PreprocessError, match="fully transparent"):
        preprocess(Image.fromarray(np.zeros((10, 10, 4), np.uint8), "RGBA"))


def test_exif_orientation_honoured():
    img = photo(w=300, h=100, box=(20, 40, 280, 60))  # wide bar
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: displayed as a tall bar
    out = preprocess(encode(img, "JPEG", exif=exif.tobytes()))
    rows = np.flatnonzero(out.image.max(1) > 100)
    cols = np.flatnonzero(out.image.max(0) > 100)
    assert len(rows) > 20 and len(cols) < 8


@pytest.mark.parametrize("mode", ["P", "L", "LA", "CMYK", "I;16", "1", "RGBA"])
def test_odd_modes(mode):
    img = photo()
    if mode == "I;16":
        a = np.asarray(img.convert("L")).astype(np.uint16) * 257
        img = Image.fromarray(a.astype("<u2"))
        assert img.mode == "I;16"
    else:
        img = img.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    out = preprocess(encode(img, fmt))
    assert out.background == "light" and out.image[0, 0] == 0 and out.image[14, 14] > 150


def test_animated_gif_first_frame():
    f1, f2 = photo().convert("P"), photo(bg=(0, 0, 0), fg=(255, 255, 255)).convert("P")
    buf = io.BytesIO()
    f1.save(buf, format="GIF", save_all=True, append_images=[f2], duration=100)
    assert preprocess(buf.getvalue()).background == "light"


def test_arrays_accepted():
    out = preprocess(np.asarray(photo()))
    assert out.image.shape == (28, 28)
    with pytest.raises(PreprocessError, match="expected"):
        preprocess(np.zeros((4, 4, 7), np.uint8))


@pytest.mark.parametrize("case,match", [
    ("empty", "empty file"),
    ("text", "not an image"),
    ("truncated", "truncated or corrupt"),
    ("huge", "over the limit"),
    ("missing", "cannot read"),
])
def test_bad_files(tmp_path, case, match):
    p = tmp_path / f"{case}.png"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "text":
        p.write_text("hello, not a picture")
    elif case == "truncated":
        p.write_bytes(encode(photo(), "JPEG")[:600])
    elif case == "huge":
        p.write_bytes(encode(Image.new("L", (3000, 3000), 255)))
    with pytest.raises(PreprocessError, match=match) as e:
        preprocess(p, max_pixels=4_000_000)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


# An iPhone photo's first bytes: an ISO-BMFF box naming the HEIC brand (no HEVC data after it
# is needed: Pillow refuses the file before it would decode any).
HEIC_HEAD = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)


def test_heic_photos_get_how_to_convert_them_and_are_not_skipped_in_folders(tmp_path):
    """Before: "not an image in an accepted format", and a folder's .heic files were skipped
    without a word. An iPhone saves HEIC unless told otherwise."""
    (tmp_path / "IMG_0001.HEIC").write_bytes(HEIC_HEAD)
    (tmp_path / "shirt.png").write_bytes(encode(photo()))
    assert [f.name for f in pp.iter_image_files([tmp_path])] == ["IMG_0001.HEIC", "shirt.png"]
    with pytest.raises(pp.UnsupportedFormatError, match=r"HEIC/HEIF .* export it as JPEG") as e:
        preprocess(tmp_path / "IMG_0001.HEIC")
    assert "IMG_0001.HEIC" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(not pp.AVIF, reason="this Pillow has no AVIF codec")
def test_avif_photos_convert_as_the_same_photo_as_png():
    """AVIF (phones and browsers share it) opens, by path as by bytes, and converts to nearly
    the 28x28 image of the same pixels as a PNG (AVIF is lossy: a few grey levels apart)."""
    img = photo(bg=(235, 230, 220), fg=(40, 60, 120))
    a = preprocess(encode(img, "AVIF", quality=95)).image.astype(int)
    b = preprocess(encode(img, "PNG")).image.astype(int)
    assert np.abs(a - b).mean() < 3 and a.max() > 200


def test_not_a_regular_file_oversized_or_corrupt_png(tmp_path, monkeypatch):
    """A named pipe would block the read forever and /dev/zero never ends: refused from a stat,
    as is a file over the size cap (a sparse one here, so nothing is written or read)."""
    import os

    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(PreprocessError, match="not a regular file"):
        preprocess(tmp_path / "pipe.jpg")
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(pp.MAX_FILE_BYTES + 1)
    with pytest.raises(PreprocessError, match="over the limit of 256 MiB"):
        preprocess(big)
    # The PNG signature, then a header whose CRC is wrong: corrupt, not "not an image".
    data = bytearray(encode(photo()))
    data[29] ^= 0xFF   # a byte of the IHDR chunk's CRC
    (tmp_path / "crc.png").write_bytes(bytes(data))
    with pytest.raises(PreprocessError, match="corrupt PNG data"):
        preprocess(tmp_path / "crc.png")


def test_16_bit_images_are_scaled_a_block_of_rows_at_a_time():
    """More rows than one block (256), values that differ by row: each block scaled alike."""
    a = (np.arange(700, dtype=np.uint32)[:, None] * 93 % 65536 * np.ones((1, 5), np.uint32)).astype("<u2")
    got = np.asarray(pp._wide_to_l(Image.fromarray(a)))
    assert got.dtype == np.uint8 and np.array_equal(got, np.floor(a / 65535 * 255 + 0.5).astype(np.uint8))
    f = np.linspace(-2, 3, 600 * 4, dtype=np.float32).reshape(600, 4)
    got = np.asarray(pp._wide_to_l(Image.fromarray(f, "F")))
    assert got[0, 0] == 0 and got[-1, -1] == 255 and np.all(np.diff(got.ravel().astype(int)) >= 0)


@pytest.mark.parametrize("pipeline", ["robust", "paper"])
@pytest.mark.parametrize("size", [(1, 1), (2, 2), (1, 100), (100, 1), (3, 50)])
def test_tiny_and_blank_images_come_back_without_an_item(size, pipeline):
    """A 1x1 image once crashed the robust pipeline's k-means (4 colours from 2 border pixels);
    a blank image has nothing in it for the paper's recipe either."""
    out = preprocess(encode(Image.new("RGB", size, (200, 190, 180))), pipeline=pipeline)
    assert out.image.shape == (28, 28) and not out.item_found and out.note.startswith("no clear item")
    if pipeline == "robust":   # and noise, which the paper's recipe cannot judge
        noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        assert preprocess(encode(Image.fromarray(noise)), pipeline=pipeline).image.shape == (28, 28)


def test_28x28_dataset_style_only_when_background_is_dark():
    from fmnist.photos.preprocess import is_dataset_style

    garment = np.zeros((28, 28), np.uint8)
    garment[6:22, 8:20] = 200
    assert is_dataset_style(garment) and is_dataset_style(garment.astype(np.float32) / 255)
    assert is_dataset_style(Image.fromarray(garment))
    # The same garment as a 28x28 thumbnail on white must be converted, not used as is.
    assert not is_dataset_style(255 - garment) and not is_dataset_style(Image.fromarray(255 - garment))
    assert not is_dataset_style(np.zeros((28, 28, 3), np.uint8))
