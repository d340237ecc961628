"""Reading images the one way the encoder expects them: 8-bit RGB, the right way up, resized to the lot's
(height, width) with bicubic filtering.

The evaluation (``benchmarks.datasets``) and the server client (``client/infer.py``) both read through here, so
that an image scored through Triton gets the very pixels the in-process pipeline saw.

What cameras write, and how it is read:
- 8-bit grey, RGB, palette, CMYK, YCbCr (PNG, TIFF, BMP, JPEG, WebP): converted to RGB by Pillow; an alpha channel
  (LA, RGBA, PA) is dropped, not blended: a camera's alpha carries no part.
- More than 8 bits (16-bit PNG and TIFF, grey or colour; 32-bit integer and float TIFF): **the bit-depth rule**. A
  file states its container (16 bits), not how many bits the sensor filled: a 12-bit camera writes values up to
  4095 in a 16-bit PNG. The image's significant bits are ``bit_depth`` when given (``infer.py --bit-depth``), else the
  smallest of 8, 10, 12, 14 and 16 bits that holds its largest value; values are scaled from that range to 0-255
  (rounded), so a 12-bit image is neither 16x too dark nor clipped. Float images: 0-1 when their values lie there,
  else the integer rule on their rounded values. 16-bit colour PNGs are decoded with pypng and colour TIFFs with
  tifffile, because Pillow keeps only their top byte.
- The EXIF orientation (JPEG, TIFF, PNG eXIf) is applied: a camera held sideways gives an upright image.
- An embedded ICC colour profile (JPEG, PNG, TIFF, WebP) of an RGB or grey image is honoured: the pixels are
  converted from it to sRGB (LittleCMS through Pillow's ImageCms, perceptual intent), the space the encoder was
  trained on, so a camera that writes Adobe RGB or a grey gamma of its own gives the colours it means. A profile
  that cannot be read, or whose colour space is not the image's (a grey profile on an RGB image, CMYK, Lab), is left
  out, as browsers leave it: the samples are read as sRGB, as they were before.
- Large images are decoded small when the format allows it (JPEG: at 1/2, 1/4 or 1/8 scale, never below twice the
  size the image is sent at), so a 6000x4000 photo is not held at full size.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import png  # pypng
from PIL import ExifTags, Image, ImageCms, UnidentifiedImageError

from postprocess.contract import size_pair

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}  # a GIF: its first frame
STANDARD_DEPTHS = (8, 10, 12, 14, 16)
HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
# the source modes whose samples an ICC profile of each colour space describes (after the bit-depth rule)
PROFILE_MODES = {"RGB": {"RGB", "RGBA", "RGBX", "P", "PA"}, "GRAY": {"L", "LA", "1", *HIGH_DEPTH_MODES}}
# EXIF orientations that turn the picture a quarter: width and height swap
QUARTER_TURNS = {5, 6, 7, 8}
# EXIF orientation -> the transposition that makes the image upright (the TIFF/EXIF definition)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
# what Pillow and the decoders raise for a file that is not a readable image (a picture past Pillow's pixel limit,
# twice MAX_IMAGE_PIXELS, included: one such file is skipped with its reason, not the end of the run)
# pypng's and zlib's errors: a truncated 16-bit colour PNG or deflated TIFF, which those decoders read (tifffile's
# TiffFileError is a ValueError)
READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
               png.Error, zlib.error)


@dataclass(frozen=True)
class Decoded:
    """An image as read: ``rgb`` (8-bit RGB, upright), the significant bits it was scaled from (8 for 8-bit files),
    its EXIF orientation (1 = as stored) and the file's mode."""

    rgb: Image.Image
    bits: int
    orientation: int
    source_mode: str


def significant_bits(values: np.ndarray, bit_depth: int | None = None) -> int:
    """The bit-depth rule: ``bit_depth`` when given, else the smallest standard depth that holds the largest value."""
    if bit_depth is not None:
        if not 1 <= bit_depth <= 32:
            raise ValueError(f"bit depth must be between 1 and 32, got {bit_depth}")
        return bit_depth
    top = int(values.max()) if values.size else 0
    for bits in STANDARD_DEPTHS:
        if top < (1 << bits):
            return bits
    return 32


def to_8bit(values: np.ndarray, bit_depth: int | None = None) -> tuple[np.ndarray, int]:
    """Integer or float samples -> uint8 by the bit-depth rule; (array, significant bits). Bilevel samples (bool,
    as tifffile gives a 1-bit TIFF) are black and white: 0 and 255."""
    if values.dtype == np.bool_:
        return np.where(values, 255, 0).astype(np.uint8), 1
    if values.dtype.kind == "f":
        finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if bit_depth is None and finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            return np.round(finite * 255.0).astype(np.uint8), 0
        values = np.round(np.clip(finite, 0, None)).astype(np.uint64)
    values = np.clip(values, 0, None)
    bits = significant_bits(values, bit_depth)
    if bits == 8:
        return np.clip(values, 0, 255).astype(np.uint8), 8
    scale = 255.0 / float((1 << bits) - 1)
    return np.clip(np.round(values.astype(np.float64) * scale), 0, 255).astype(np.uint8), bits


def _rgb_from_array(values: np.ndarray, bit_depth: int | None) -> tuple[Image.Image, int]:
    """(H, W) or (H, W, channels) samples -> 8-bit RGB; a second or fourth channel (alpha) is dropped."""
    if values.ndim == 3 and values.shape[2] in (2, 4):
        values = values[..., :-1]
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[..., 0]
    pixels, bits = to_8bit(values, bit_depth)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"unsupported layout of samples {values.shape}")
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB"), bits


def _wide_colour_samples(img: Image.Image, path: Path) -> np.ndarray | None:
    """The full-depth samples of a colour PNG or TIFF with more than 8 bits per sample, which Pillow would cut to
    their top byte; None for every other image."""
    if img.format == "PNG" and img.mode in ("RGB", "RGBA") and any(
            str(tile.args[0] if isinstance(tile.args, tuple) else tile.args).endswith(";16B") for tile in img.tile):
        width, height, rows, info = png.Reader(filename=str(path)).asDirect()
        planes = info["planes"]
        return np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, planes)
    if img.format == "TIFF" and img.mode in ("RGB", "RGBA", "RGBX"):
        per_sample = img.tag_v2.get(258)  # BitsPerSample
        if per_sample and max(per_sample if isinstance(per_sample, tuple) else (per_sample,)) > 8:
            return _tiff_samples(path)
    return None


def _tiff_samples(path: Path) -> np.ndarray:
    """The first page's samples as stored, (H, W) or (H, W, samples): a planar ("separate") page's sample axis moved
    last (tifffile gives it first, and the image was refused)."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        page = tif.pages[0]
        values = np.asarray(page.asarray())
        if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and values.ndim == 3 and page.samplesperpixel > 1:
            values = np.moveaxis(values, 0, -1)
    return values


# how a TIFF value of each type writes the number 1 (BYTE, SHORT, LONG, RATIONAL, SBYTE, SSHORT, SLONG, SRATIONAL,
# FLOAT, DOUBLE, LONG8): where an orientation is rewritten, in the file's byte order
TIFF_ONE = {1: "B", 3: "H", 4: "I", 5: "II", 6: "b", 8: "h", 9: "i", 10: "ii", 11: "f", 12: "d", 16: "Q"}


def _unturned_tiff(path: Path) -> Image.Image | None:
    """A TIFF that carries an orientation, opened by Pillow as it is stored: Pillow 13 turns a TIFF itself while
    loading it, wrongly for grey, palette and CMYK ones (the size turned, the samples not: the picture came out
    scrambled). The orientation is set to 1 in a copy held in memory, at the place tifffile reads it from, and the
    image is turned once, by ``decode``. None when the tag is not one to rewrite."""
    import io
    import struct

    import tifffile

    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tag = tif.pages[0].tags.get(ExifTags.Base.Orientation)
        order = tif.byteorder
    layout = TIFF_ONE.get(int(tag.dtype)) if tag is not None and tag.count == 1 else None
    if layout is None:
        return None
    one = struct.pack(order + layout, *([1] * len(layout)))  # a rational is 1/1
    data[tag.valueoffset:tag.valueoffset + len(one)] = one
    return Image.open(io.BytesIO(bytes(data)))


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation of an open image, 1 to 8; anything else (a string, 0, 9, 6.5) reads as 1, as Pillow's own
    ``exif_transpose`` reads it (``decode`` and ``image_size_of`` read it alike: one turned an image
    the other did not, and a readable image with a tag of text was skipped)."""
    value = img.getexif().get(ExifTags.Base.Orientation, 1)
    try:  # a number equal to one of 1-8 (a rational 6/1, a float 6.0: Pillow turns by them too), nothing else
        number = float(value) if not isinstance(value, (str, bytes, bool)) else math.nan
    except (TypeError, ValueError, ZeroDivisionError):
        return 1
    return int(number) if number in UPRIGHT else 1


def decode(path: str | Path, bit_depth: int | None = None, min_size=None) -> Decoded:
    """The image at ``path`` as 8-bit RGB, upright (see the module's notes). ``min_size`` (height, width): the image
    may be decoded at a reduced scale as long as both sides stay at least twice this. ValueError naming the file when
    it cannot be read."""
    path = Path(path)
    try:
        if not path.is_file():  # plain files only (a link to one too): a FIFO named x.png held the run for ever
            raise ValueError("not a file")
        with contextlib.ExitStack() as opened:
            img = opened.enter_context(Image.open(path))
            unturned = None
            if img.format == "TIFF" and (orientation := exif_orientation(img)) in UPRIGHT:
                unturned = _unturned_tiff(path)
                if unturned is not None:
                    img = opened.enter_context(unturned)
            source_mode = img.mode
            wide = _wide_colour_samples(img, path)  # before getexif: a PNG's getexif decodes it
            if unturned is None:
                orientation = exif_orientation(img)
            if wide is None and _tiff_signed(img):  # Pillow reads signed 8-bit samples as unsigned (-92 as 164)
                wide = _tiff_samples(path)
            if min_size is not None and img.format == "JPEG":
                height, width = size_pair(min_size)
                if orientation in QUARTER_TURNS:
                    height, width = width, height
                img.draft("RGB", (2 * width, 2 * height))  # JPEG decodes at the smallest scale that keeps these
            if wide is not None:
                rgb, bits = _rgb_from_array(wide, bit_depth)
            elif img.mode in HIGH_DEPTH_MODES:
                img.load()
                values = np.asarray(img)
                if img.format == "TIFF" and img.tag_v2.get(262) == 0 and values.dtype.kind in "iu":
                    # white is zero: Pillow inverts 8-bit ones, not these (stored 4095 of 12 bits came out white)
                    per_sample = img.tag_v2.get(258, 16)
                    top = (1 << int(per_sample[0] if isinstance(per_sample, tuple) else per_sample)) - 1
                    values = top - np.clip(values.astype(np.int64), 0, top)
                rgb, bits = _rgb_from_array(values, bit_depth)
            else:
                img.load()
                rgb, bits = img.convert("RGB"), 8
            rgb = in_srgb(rgb, img.info.get("icc_profile"), source_mode)
    except READ_ERRORS as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    if orientation in UPRIGHT:
        rgb = rgb.transpose(UPRIGHT[orientation])
    return Decoded(rgb, bits, orientation, source_mode)


def in_srgb(rgb: Image.Image, icc_profile: bytes | None, source_mode: str) -> Image.Image:
    """8-bit RGB samples of an image whose file embeds ``icc_profile`` converted to sRGB (see the module's notes):
    a grey image's through its grey profile, an RGB image's through its RGB one; as they are otherwise."""
    if not icc_profile:
        return rgb
    try:
        space, transform = _to_srgb(bytes(icc_profile))
    except (ImageCms.PyCMSError, OSError, ValueError):  # a damaged profile: left out, the samples read as sRGB
        return rgb
    if space is None or source_mode not in PROFILE_MODES[space]:
        return rgb
    return ImageCms.applyTransform(rgb.convert("L") if space == "GRAY" else rgb, transform)


PROFILES_KEPT = 16
_PROFILES: dict = {}  # a profile's SHA-256 -> its colour space and transform; the newest PROFILES_KEPT of them


def _to_srgb(icc_profile: bytes) -> tuple:
    """(colour space: 'RGB', 'GRAY' or None for any other, its transform to sRGB or None), read by LittleCMS once
    per profile (a lot's images share their camera's). Kept by digest: kept by their bytes, 16 profiles of 20 MB
    held 420 MB."""
    key = hashlib.sha256(icc_profile).digest()
    if key not in _PROFILES:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        space = profile.profile.xcolor_space.strip()
        kept = (space, ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), "L" if space == "GRAY"
                                               else "RGB", "RGB")) if space in PROFILE_MODES else (None, None)
        while len(_PROFILES) >= PROFILES_KEPT:
            _PROFILES.pop(next(iter(_PROFILES)), None)
        _PROFILES[key] = kept
    return _PROFILES[key]


def _tiff_signed(img: Image.Image) -> bool:
    """A TIFF of signed integer samples (SampleFormat 2), which the bit-depth rule reads (negatives at 0)."""
    if img.format != "TIFF":
        return False
    sample_format = img.tag_v2.get(339, 1)
    return 2 in (sample_format if isinstance(sample_format, tuple) else (sample_format,))


def read_rgb(path: str | Path, bit_depth: int | None = None, min_size=None) -> Image.Image:
    """The image as 8-bit RGB, upright; ValueError naming the file when it cannot be read."""
    return decode(path, bit_depth, min_size).rgb


def image_size_of(path: str | Path) -> tuple[int, int] | None:
    """(width, height) of the upright image, from the file's header (nothing decoded), or None when it cannot be
    read."""
    try:
        if not Path(path).is_file():  # plain files only (a FIFO held the run for ever)
            return None
        with Image.open(path) as img:
            width, height = img.size
            stored = (img.tag_v2.get(256), img.tag_v2.get(257)) if img.format == "TIFF" else (width, height)
            # Pillow 13 gives a TIFF's size already turned: the stored width and length say whether it did
            if exif_orientation(img) in QUARTER_TURNS and (width, height) == stored:
                width, height = height, width
            return width, height
    except READ_ERRORS:
        return None


def model_input(rgb: Image.Image, size) -> np.ndarray:
    """(height, width, 3) uint8: what clip_vision takes (``size``: (height, width), or one number for a square)."""
    height, width = size_pair(size)
    return np.asarray(rgb.resize((width, height), Image.BICUBIC), dtype=np.uint8)


def display_copy(rgb: Image.Image, long_side: int = 1600) -> np.ndarray:
    """The image for an overlay panel, its long side at most ``long_side``: a lot of large photos is not held at
    full size while it is scored."""
    if max(rgb.size) > long_side:
        scale = long_side / max(rgb.size)  # the short side at least a pixel (a 100000x1 image's panel came out empty)
        rgb = rgb.resize(tuple(max(1, round(side * scale)) for side in rgb.size), Image.BICUBIC)
    return np.asarray(rgb)
