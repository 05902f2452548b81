"""Turn a real photo into what the model saw in training: a centred, light-on-black 28x28
8-bit grayscale image, by the conversion Fashion-MNIST's authors describe (Xiao, Rasul,
Vollgraf 2017, section 2):

  1. trim the border whose colour is close (5% of the RGB range) to the corner pixels
  2. resize the longest edge to 28 by subsampling pixels
  3. sharpen (Gaussian, radius and sigma 1.0)
  4. extend the shorter edge to 28, object centred
  5. negate intensities
  6. 8-bit grayscale

Around that, what real files need: EXIF orientation, palette / 16-bit / CMYK / animated
inputs, transparency composited onto the background, and a light-or-dark background test so
photos that are already light-on-dark are not negated into dark-on-light.
"""

from __future__ import annotations

import io
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageFilter, ImageOps, PngImagePlugin, UnidentifiedImageError, features

from fmnist.classes import IMAGE_SIZE

MAX_PIXELS = 40_000_000   # ~ a 7,700 x 5,200 photo; larger files are refused, not resampled
MAX_FILE_BYTES = 256 * 2**20   # a 40 MP PNG can reach ~120 MB; a larger file is refused before it is read
TRIM_FUZZ = 0.05          # the paper's "within 5% of the maximum possible intensity in RGB space"
# .heic/.heif are listed so that a folder's iPhone photos are reported (HEIF_HINT), not skipped unseen.
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".avif", ".tif", ".tiff", ".ppm", ".pgm",
                    ".heic", ".heif"}
# Pillow plugins tried on open; the rest (EPS runs Ghostscript on the file) never see the bytes.
# JPEG also opens MPO (phone JPEGs); PPM also reads PGM/PBM. AVIF (what phones and browsers
# increasingly share) where this Pillow was built with libavif (its wheels are, from 11.3).
AVIF = ("AVIF",) if features.check("avif") else ()
OPEN_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", *AVIF, "BMP", "TIFF", "PPM")
# File signatures of those formats: a file that starts like one but does not open is corrupt,
# not of the wrong kind, and the error should say so.
MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
         (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
_SHOWN = {"WEBP": "WebP", "PPM": "PPM/PGM"}  # how messages name a Pillow format
# HEIC/HEIF (an iPhone camera's default) needs a HEVC decoder that Pillow does not ship: say
# what to do instead of "not an image". ISO-BMFF files name their brand at bytes 4-12.
HEIF_BRANDS = (b"ftypheic", b"ftypheix", b"ftyphevc", b"ftyphevx", b"ftypmif1", b"ftypmsf1", b"ftypheim",
               b"ftypheis")
HEIF_HINT = ("a HEIC/HEIF photo (an iPhone camera's format), which is not supported: save or export it as "
             "JPEG first (on the iPhone: Settings > Camera > Formats > Most Compatible)")


def format_names(formats) -> str:
    """'PNG, JPEG, ...': Pillow formats as a person knows them."""
    return ", ".join(_SHOWN.get(f, f) for f in formats)


class PreprocessError(Exception):
    """A file that cannot become a 28x28 image; the message is one line a person can act on."""


class UnsupportedFormatError(PreprocessError):
    """Bytes of no format that may be opened here (the server answers 415)."""


PIPELINES = ("robust", "paper")


@dataclass
class Preprocessed:
    image: np.ndarray          # (28, 28) uint8, light object on black
    background: str            # "light" (negated) or "dark" (kept)
    box: tuple[int, int, int, int]  # item box (left, top, right, bottom) in the oriented input
    pipeline: str = "paper"    # which conversion made it
    item_found: bool = True    # the conversion found a clear item (robust pipeline only judges)
    note: str = ""             # why no clear item was found


# ---------------------------------------------------------------------------- opening

def open_image(src, max_pixels: int = MAX_PIXELS, draft: int | None = None,
               formats: tuple[str, ...] = OPEN_FORMATS) -> Image.Image:
    """Open a path, bytes, a binary file object (io.BytesIO, an upload's .file) or a PIL image:
    first frame, EXIF orientation applied, fully decoded.
    draft: JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the longest side
    >= draft px, which saves most of the cost of a large photo. formats: the Pillow plugins
    tried (some of OPEN_FORMATS), which the error for anything else names."""
    name = str(src) if isinstance(src, (str, Path)) else "image"
    if isinstance(src, Image.Image):
        img = src
    else:
        data = read_file(src) if isinstance(src, (str, Path)) else read_stream(src) if is_file_object(src) \
            else bytes(src)
        if not data:
            raise PreprocessError(f"{name}: empty file (0 bytes)")
        try:
            img = Image.open(io.BytesIO(data), formats=formats)
        except UnidentifiedImageError:
            fmt = next((f for magic, f in MAGIC if data.startswith(magic) and f in formats), None)
            if fmt is None and data[4:12] in HEIF_BRANDS and b"avif" not in data[8:64]:
                raise UnsupportedFormatError(f"{name}: {HEIF_HINT}") from None
            if fmt:   # the right signature, then a bad header (a CRC error, a cut-off file)
                raise PreprocessError(f"{name}: corrupt {fmt} data (its header does not decode); "
                                      "re-save or re-export the image") from None
            raise UnsupportedFormatError(f"{name}: not an image in an accepted format ({format_names(formats)})"
                                         ) from None
        except Image.DecompressionBombError:
            raise PreprocessError(f"{name}: too many pixels (limit {max_pixels:,}); resize it first") from None
        except ValueError as e:
            if "MAX_TEXT" in str(e):  # Pillow's guard on PNG text and colour-profile chunks
                raise PreprocessError(f"{name}: its PNG metadata (a text chunk or colour profile) unpacks to over "
                                      f"{PngImagePlugin.MAX_TEXT_CHUNK >> 20} MiB, more than a picture needs; save "
                                      "it again without metadata") from None
            raise PreprocessError(f"{name}: truncated or corrupt image data ({e})") from None
        except (OSError, SyntaxError) as e:
            raise PreprocessError(f"{name}: truncated or corrupt image data ({e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise PreprocessError(f"{name}: {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; resize it first")
    if w == 0 or h == 0:
        raise PreprocessError(f"{name}: image has no pixels ({w}x{h})")
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)  # first frame of GIF / APNG / WebP animations
        if draft and img.format == "JPEG" and img.mode in ("RGB", "L"):
            # Request the aspect-preserving size whose longest side is `draft`: asking for a
            # square would keep the short side >= draft too and often decode at twice the scale.
            s = draft / max(w, h)
            img.draft(img.mode, (max(1, int(w * s)), max(1, int(h * s))))
        img.load()
        fmt = img.format
        img = ImageOps.exif_transpose(img)
        img.format = fmt  # the transposed copy forgets it; the server checks it
        # An image opened before (the server, Predictor.prepare) already knows its file's size.
        img.info["orig_size"] = img.info.get("orig_size") or ((w, h) if (img.width >= img.height) == (w >= h) else (h, w))
    except (OSError, SyntaxError, ValueError) as e:
        raise PreprocessError(f"{name}: truncated or corrupt image data ({e})") from None
    return img


def is_file_object(src) -> bool:
    return callable(getattr(src, "read", None))


def read_stream(f) -> bytes:
    """A binary file object's bytes from where it stands, at most MAX_FILE_BYTES."""
    data = f.read(MAX_FILE_BYTES + 1)
    if isinstance(data, str):
        raise PreprocessError("image: a text stream; open the file in binary mode ('rb')")
    if len(data) > MAX_FILE_BYTES:
        raise PreprocessError(f"image: over the limit of {MAX_FILE_BYTES / 2**20:,.0f} MiB for one image; "
                              "resize or recompress it")
    return data


def read_file(path) -> bytes:
    """A path's bytes, for an image: a regular file of at most MAX_FILE_BYTES (a device such as
    /dev/zero or a named pipe would be read without end, or never answer)."""
    name = str(path)
    try:
        st = Path(path).stat()
        if stat.S_ISDIR(st.st_mode):
            raise PreprocessError(f"{name}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise PreprocessError(f"{name}: not a regular file (a device, pipe or socket); save the image to a file")
        if st.st_size > MAX_FILE_BYTES:
            raise PreprocessError(f"{name}: {st.st_size / 2**20:,.0f} MiB, over the limit of "
                                  f"{MAX_FILE_BYTES / 2**20:,.0f} MiB for one image; resize or recompress it")
        with open(path, "rb") as f:
            return f.read(MAX_FILE_BYTES)   # bounded even if the file grew since the stat
    except OSError as e:
        raise PreprocessError(f"{name}: cannot read ({e.strerror or e})") from None


def _to_8bit(img: Image.Image, scale) -> Image.Image:
    """A one-channel 16/32-bit or float image -> "L", `scale` mapping a float64 block to 0..255.
    A block of rows at a time: the whole image in float64 is 8 bytes a pixel (a 25 MP 16-bit PNG
    of a few KB would cost 200 MB for each temporary)."""
    a = np.asarray(img)
    out = np.empty(a.shape, np.uint8)
    for i in range(0, a.shape[0], 256):
        out[i:i + 256] = np.clip(scale(a[i:i + 256].astype(np.float64)) + 0.5, 0, 255)
    return Image.fromarray(out, "L")


WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")   # one channel, more than 8 bits


def _finite_range(a: np.ndarray) -> tuple[float, float]:
    """(min, max) of a float image's finite values, a block of rows at a time; PreprocessError
    if it has none (all NaN or infinite: nothing to see)."""
    lo, top = np.inf, -np.inf
    for i in range(0, a.shape[0], 256):
        block = a[i:i + 256]
        block = block[np.isfinite(block)]
        if block.size:
            lo, top = min(lo, float(block.min())), max(top, float(block.max()))
    if lo > top:
        raise PreprocessError("image: every pixel is NaN or infinite (a floating-point image with no values)")
    return lo, top


def _wide_to_l(img: Image.Image) -> Image.Image:
    """A WIDE_MODES image -> "L": 16-bit scaled from 0..65535, 32-bit integers from 0..255
    unless they go higher, floats stretched from their minimum to their maximum."""
    if img.mode == "F":
        lo, top = _finite_range(np.asarray(img))
        # NaN as the darkest value, infinities as the extremes; no numpy warning from the cast.
        return _to_8bit(img, lambda a: (np.nan_to_num(a, nan=lo, posinf=top, neginf=lo) - lo)
                        / max(top - lo, 1e-12) * 255)
    hi = 65535.0 if img.mode.startswith("I;16") or img.getextrema()[1] > 255 else 255.0
    return _to_8bit(img, lambda a: a / hi * 255)


def _to_rgba_or_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, or RGBA when it carries transparency."""
    if img.mode in WIDE_MODES:
        return _wide_to_l(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        return img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return img.convert("RGBA")
    return img.convert("RGB")  # includes CMYK (Pillow undoes Adobe's inverted CMYK JPEGs on decode)


# ---------------------------------------------------------------------------- steps

def corner_colour(rgb: np.ndarray) -> np.ndarray:
    """Median of the four corner pixels: robust to one corner touching the object."""
    h, w, _ = rgb.shape
    corners = rgb[[0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]].astype(np.float64)
    return np.median(corners, axis=0)


def trim_box(rgb: np.ndarray, bg: np.ndarray, fuzz: float = TRIM_FUZZ) -> tuple[int, int, int, int]:
    """Bounding box of pixels farther than `fuzz` of the RGB range from the background colour."""
    dist = np.sqrt(((rgb.astype(np.float64) - bg) ** 2).sum(-1))
    mask = dist > fuzz * 255 * np.sqrt(3)
    if not mask.any():
        return 0, 0, rgb.shape[1], rgb.shape[0]  # uniform image: nothing to trim
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def resize_longest(img: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Longest edge to `size` by subsampling pixels (the paper), other edge in proportion."""
    w, h = img.size
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    # Pillow's NEAREST picks the pixel at each sample centre: exactly "skipping rows and columns".
    return img.resize((nw, nh), Image.Resampling.NEAREST)


def sharpen(img: Image.Image) -> Image.Image:
    """Gaussian sharpening, radius and sigma 1.0 (unsharp mask: stronger near outlines)."""
    return img.filter(ImageFilter.UnsharpMask(radius=1.0, percent=100, threshold=0))


def pad_centre(img: Image.Image, fill, size: int = IMAGE_SIZE) -> Image.Image:
    canvas = Image.new(img.mode, (size, size), fill)
    w, h = img.size
    canvas.paste(img, ((size - w) // 2, (size - h) // 2))
    return canvas


# ---------------------------------------------------------------------------- pipeline

def preprocess(src, max_pixels: int = MAX_PIXELS, pipeline: str = "robust", options=None) -> Preprocessed:
    """Path, bytes, PIL image or array -> Preprocessed (28x28 uint8, light on black).
    pipeline: "robust" (segment the item first, robust.py) or "paper" (the dataset's recipe);
    options: robust.RobustOptions (steps switched off for the ablation)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; choose from {', '.join(PIPELINES)}")
    if isinstance(src, np.ndarray):
        src = array_to_image(src)
    if pipeline == "paper":
        return convert_paper(load_rgb(src, max_pixels))
    from fmnist.photos import robust

    img = load_rgb(src, max_pixels, work=robust.WORK)
    scale = max(img.info["orig_size"]) / max(img.size)
    conv = robust.convert(np.asarray(img), options)
    box = tuple(int(round(v * scale)) for v in conv.box)
    return Preprocessed(conv.image, "light" if conv.negated else "dark", box, "robust", conv.item_found, conv.note)


def load_rgb(src, max_pixels: int = MAX_PIXELS, work: int | None = None) -> Image.Image:
    """Opened, oriented RGB (transparency composited onto its background). work: shrink to at
    most `work` px on the longest side, decoding JPEGs reduced; info["orig_size"] keeps the size."""
    img = open_image(src, max_pixels, draft=work)
    orig = img.info.get("orig_size", img.size)
    if work and max(img.size) > work:
        if img.mode in WIDE_MODES:
            img = _wide_to_l(img)        # 8 bits, one channel, before anything at full size
        elif img.mode in ("1", "P"):
            img = _to_rgba_or_rgb(img)   # resampling palette / 1-bit images directly is nearest-only
        img = img.copy() if img is src else img
        img.thumbnail((work, work), Image.Resampling.BILINEAR, reducing_gap=2.0)
    img = _to_rgba_or_rgb(img)
    if img.mode == "RGBA":
        rgba = np.asarray(img)
        opaque = rgba[..., 3] > 0
        # Transparent cut-outs are product shots on no background; composite onto white (the
        # usual catalogue background), unless the visible border says the background is dark.
        border = np.concatenate([rgba[0], rgba[-1], rgba[:, 0], rgba[:, -1]])
        border = border[border[:, 3] > 127][:, :3]
        fill = (255, 255, 255) if len(border) == 0 or border.mean() > 127 else (0, 0, 0)
        base = Image.new("RGB", img.size, fill)
        base.paste(img, mask=img.getchannel("A"))
        img = base
        if not opaque.any():
            raise PreprocessError("image is fully transparent: nothing to classify")
    img.info["orig_size"] = orig
    return img


def convert_paper(img: Image.Image) -> Preprocessed:
    """The paper's recipe on an RGB image (module docstring, steps 1-6)."""
    rgb = np.asarray(img)
    bg = corner_colour(rgb)
    light = float(bg.mean()) > 127.5
    box = trim_box(rgb, bg)
    img = img.crop(box)
    img = resize_longest(img)
    img = sharpen(img)
    img = pad_centre(img, tuple(int(round(c)) for c in bg))
    gray = np.asarray(img.convert("L"), dtype=np.float64)
    bg_gray = float(np.dot(bg, [0.299, 0.587, 0.114]))
    if light:
        gray = 255.0 - gray
        bg_gray = 255.0 - bg_gray
    # Real backgrounds are rarely pure white/black: stretch so the background lands on 0, as in
    # the dataset (its backgrounds are exactly 0). A no-op for the paper's pure-white inputs.
    if bg_gray > 0:
        gray = (gray - bg_gray) * 255.0 / max(255.0 - bg_gray, 1.0)
    out = np.clip(gray + 0.5, 0, 255).astype(np.uint8)
    if box == (0, 0, rgb.shape[1], rgb.shape[0]) and out.max() == out.min():
        # Nothing differs from the corners: the recipe has no item to trim to, and the model's
        # answer on a blank square means nothing.
        return Preprocessed(out, "light" if light else "dark", box, "paper", False,
                            "no clear item: the image is one colour")
    return Preprocessed(out, "light" if light else "dark", box, "paper")


def array_to_image(a: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 / float in [0, 1] -> PIL image."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise PreprocessError(f"array of shape {a.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    return Image.fromarray(to_uint8(a))


def to_uint8(a: np.ndarray) -> np.ndarray:
    """uint8 as is; floats in [0, 1] scaled to [0, 255]; anything else clipped to [0, 255]."""
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
        a = a * 255.0
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def dataset_image(x) -> np.ndarray | None:
    """The (28, 28) uint8 image to use as is when `x` is Fashion-MNIST-style already, else None
    (convert it as a photo). Fashion-MNIST-style: 28x28, grey, fully opaque, on a dark background.
    Grey however it was saved: one channel, or RGB / RGBA / palette whose channels are equal in
    every pixel (matplotlib's imsave writes RGBA, torchvision's save_image RGB). Any transparency
    means compositing, which the conversion does; a 28x28 thumbnail on white is converted too."""
    if isinstance(x, Image.Image):
        if x.size != (IMAGE_SIZE, IMAGE_SIZE) or x.mode not in ("L", "LA", "RGB", "RGBA", "P", "PA"):
            return None
        if x.mode in ("LA", "RGBA", "P", "PA") or "transparency" in x.info:
            x = x.convert("RGBA")   # a palette's colours and any transparency key, pixel by pixel
        a = np.asarray(x)
    elif isinstance(x, np.ndarray):
        if x.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE) or x.shape[2:] not in ((), (1,), (3,), (4,)):
            return None
        a = to_uint8(x)
    else:
        return None
    if a.ndim == 3:   # (28, 28, C): grey only if every colour channel is the first, opaque only if alpha is 255
        if a.shape[2] == 4 and (a[..., 3] != 255).any():
            return None
        if a.shape[2] >= 3 and not (np.array_equal(a[..., 1], a[..., 0]) and np.array_equal(a[..., 2], a[..., 0])):
            return None
        a = a[..., 0]
    if float(np.median(a[[0, 0, -1, -1], [0, -1, 0, -1]])) >= 128:
        return None
    return np.ascontiguousarray(a)


def is_dataset_style(x) -> bool:
    """Whether `x` is used as is (dataset_image), not converted as a photo."""
    return dataset_image(x) is not None


def iter_image_files(paths) -> list[Path]:
    """Expand folders (sorted, image extensions only, recursive); files are taken as given. A
    broken link inside a folder is kept, so that it is reported rather than skipped unseen."""
    out = []
    for raw in paths:
        if not str(raw):   # Path("") is ".": an empty argument would classify the whole folder
            raise ValueError("an empty path was given; name a file or a folder")
        p = Path(raw)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS
                          and (f.is_file() or (f.is_symlink() and not f.exists())))
        else:
            out.append(p)
    return out


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half a picture
