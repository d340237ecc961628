"""client/images.py reads what cameras write: each case with a file this test writes, compared with what the
pixels should be."""

import numpy as np
import png  # pypng
import pytest
import tifffile
from PIL import ExifTags, Image

from client.images import decode, display_copy, image_size_of, model_input, read_rgb, significant_bits

RNG = np.random.default_rng(0)
GREY12 = (RNG.random((24, 40)) * 4095).astype(np.uint16)  # a 12-bit camera's values in a 16-bit container
COLOUR12 = (RNG.random((24, 40, 3)) * 4095).astype(np.uint16)


def scaled(values, bits):
    return np.round(values.astype(np.float64) * 255.0 / ((1 << bits) - 1)).astype(np.uint8)


def grey_rgb(grey):
    return np.repeat(grey[..., None], 3, axis=2)


def test_a_12_bit_grey_png_is_scaled_from_12_bits_not_cut(tmp_path):
    Image.fromarray(GREY12).save(tmp_path / "mono12.png")
    decoded = decode(tmp_path / "mono12.png")
    assert decoded.bits == 12 and decoded.source_mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(decoded.rgb), grey_rgb(scaled(GREY12, 12)))


def test_a_full_16_bit_grey_png_and_an_explicit_bit_depth(tmp_path):
    full = (GREY12.astype(np.uint32) * 16 + 15).astype(np.uint16)  # up to 65535
    Image.fromarray(full).save(tmp_path / "mono16.png")
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "mono16.png")), grey_rgb(scaled(full, 16)))
    dim = (GREY12 // 8).astype(np.uint16)  # a dark 12-bit image: the rule alone would call it 9 -> 10 bits
    Image.fromarray(dim).save(tmp_path / "dim12.png")
    assert decode(tmp_path / "dim12.png").bits == 10
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "dim12.png", bit_depth=12)),
                                  grey_rgb(scaled(dim, 12)))


def test_16_bit_colour_png_and_tiff_keep_their_low_bits(tmp_path):
    png.from_array(COLOUR12.reshape(24, -1), "RGB;16").save(tmp_path / "rgb12.png")
    tifffile.imwrite(tmp_path / "rgb12.tif", COLOUR12)
    for name in ("rgb12.png", "rgb12.tif"):
        decoded = decode(tmp_path / name)
        assert decoded.bits == 12, name
        np.testing.assert_array_equal(np.asarray(decoded.rgb), scaled(COLOUR12, 12), err_msg=name)


def test_grey_alpha_16_bit_png_drops_the_alpha(tmp_path):
    la = np.stack([GREY12, np.full_like(GREY12, 4095)], axis=-1)
    png.from_array(la.reshape(24, -1), "LA;16").save(tmp_path / "la.png")
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "la.png")), grey_rgb(scaled(GREY12, 12)))


def test_8_bit_modes_and_formats(tmp_path):
    rgb = (RNG.random((24, 40, 3)) * 255).astype(np.uint8)
    grey = rgb[..., 0]
    cases = {
        "grey.png": (Image.fromarray(grey, "L"), grey_rgb(grey)),
        "grey.bmp": (Image.fromarray(grey, "L"), grey_rgb(grey)),
        "rgb.tif": (Image.fromarray(rgb), rgb),
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full(grey.shape, 7, np.uint8)]), "RGBA"), rgb),
        "la.png": (Image.fromarray(np.dstack([grey, grey]), "LA"), grey_rgb(grey)),
        "palette.png": (Image.fromarray(rgb).quantize(16), None),
        "bits.png": (Image.fromarray(grey > 127), grey_rgb(np.where(grey > 127, 255, 0).astype(np.uint8))),
    }
    for name, (img, expected) in cases.items():
        img.save(tmp_path / name)
        got = np.asarray(read_rgb(tmp_path / name))
        assert got.shape == (24, 40, 3) and got.dtype == np.uint8, name
        if expected is None:  # palette: the palette's colours
            expected = np.asarray(img.convert("RGB"))
        np.testing.assert_array_equal(got, expected, err_msg=name)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert np.abs(np.asarray(read_rgb(tmp_path / "cmyk.jpg"), np.int16) - rgb).mean() < 12


def test_float_tiff_in_0_1(tmp_path):
    values = RNG.random((24, 40)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", values)
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "f.tif")),
                                  grey_rgb(np.round(values.astype(np.float64) * 255).astype(np.uint8)))


def test_the_exif_orientation_is_applied(tmp_path):
    """A landscape scene stored sideways with orientation 6 (turn 90 degrees clockwise to view) reads upright."""
    upright = np.zeros((30, 60, 3), np.uint8)
    upright[:, :30] = (255, 0, 0)  # red on the left
    upright[:, 30:] = (0, 0, 255)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 60 x 30, as a sideways camera writes
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    stored.save(tmp_path / "turned.jpg", exif=exif, quality=98)
    decoded = decode(tmp_path / "turned.jpg")
    got = np.asarray(decoded.rgb)
    assert decoded.orientation == 6 and got.shape == (30, 60, 3)
    assert image_size_of(tmp_path / "turned.jpg") == (60, 30)
    assert got[15, 5, 0] > 200 and got[15, 5, 2] < 60  # red still on the left
    assert got[15, 55, 2] > 200 and got[15, 55, 0] < 60


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_reads_as_pillows_own_exif_transpose(tmp_path, orientation):
    """Each of the eight orientations (mirrored ones included, 5 and 7 among them, which tests turning a quarter
    alone cannot tell apart) is undone as Pillow's reference ``exif_transpose`` undoes it. A lossless PNG with an
    eXIf chunk, and a picture with no symmetry (random pixels, 6 x 10), so that any wrong transposition shows."""
    from PIL import ImageOps

    rng = np.random.default_rng(orientation)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)).save(tmp_path / "turned.png", exif=exif)
    with Image.open(tmp_path / "turned.png") as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    decoded = decode(tmp_path / "turned.png")
    assert decoded.orientation == orientation
    np.testing.assert_array_equal(np.asarray(decoded.rgb), expected)
    assert image_size_of(tmp_path / "turned.png") == (expected.shape[1], expected.shape[0])


@pytest.mark.parametrize("samples", ["grey8", "grey12", "rgb8", "rgb12"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_tiffs_orientation_is_applied_once(tmp_path, samples, orientation):
    """Pillow 13 turns a TIFF itself while loading it (and a grey one wrongly: its size turned, its samples not):
    each orientation reads upright once, its size is the upright one, and no picture comes out scrambled."""
    upright = {"grey8": (GREY12 >> 4).astype(np.uint8), "grey12": GREY12, "rgb8": (COLOUR12 >> 4).astype(np.uint8),
               "rgb12": COLOUR12}[samples]
    undo = {3: 2, 6: 1, 8: -1}[orientation]  # quarter turns (counter-clockwise) that store it as a camera would
    tifffile.imwrite(tmp_path / "turned.tif", np.ascontiguousarray(np.rot90(upright, undo)),
                     photometric="rgb" if upright.ndim == 3 else "minisblack",
                     extratags=[(ExifTags.Base.Orientation, "H", 1, orientation, True)])
    expected = np.asarray(read_rgb_of(upright))
    decoded = decode(tmp_path / "turned.tif")
    assert decoded.orientation == orientation
    np.testing.assert_array_equal(np.asarray(decoded.rgb), expected)
    assert image_size_of(tmp_path / "turned.tif") == (upright.shape[1], upright.shape[0])


def read_rgb_of(values):
    """What an unturned file of these samples reads as (the bit-depth rule on the same values)."""
    from client.images import _rgb_from_array

    return _rgb_from_array(values, None)[0]


def test_a_large_jpeg_is_decoded_small_but_never_below_twice_the_size_sent(tmp_path):
    Image.fromarray((RNG.random((2000, 3000, 3)) * 255).astype(np.uint8)).save(tmp_path / "big.jpg")
    small = read_rgb(tmp_path / "big.jpg", min_size=(224, 336))
    assert small.size == (750, 500)  # 1/4 scale: 1/8 would be 375 x 250, under 2 x (336, 224)
    assert read_rgb(tmp_path / "big.jpg").size == (3000, 2000)
    assert model_input(small, (224, 336)).shape == (224, 336, 3)
    assert display_copy(read_rgb(tmp_path / "big.jpg"), 1600).shape == (1067, 1600, 3)


def test_unreadable_files_name_themselves(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("broken.png", "text.jpg"):
        with pytest.raises(ValueError, match=name):
            read_rgb(tmp_path / name)
        assert image_size_of(tmp_path / name) is None


def test_a_truncated_16_bit_colour_png_or_deflated_tiff_is_an_unreadable_image_not_a_crash(tmp_path):
    """Those are read by pypng and tifffile, whose errors (png.ChunkError, zlib.error) ended the whole run."""
    big = (RNG.random((240, 320, 3)) * 4095).astype(np.uint16)
    png.from_array(big.reshape(240, -1), "RGB;16").save(tmp_path / "cut.png")
    tifffile.imwrite(tmp_path / "cut.tif", big, compression="zlib")
    for name in ("cut.png", "cut.tif"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:len(data) // 2])
        with pytest.raises(ValueError, match=name):
            read_rgb(tmp_path / name)


def test_a_turned_bilevel_tiff_reads_black_and_white(tmp_path):
    """A 1-bit TIFF with an orientation is read by tifffile (as bool): white is 255, as Pillow reads it unturned."""
    mask = np.zeros((30, 40), dtype=bool)
    mask[:, 20:] = True
    tifffile.imwrite(tmp_path / "plain.tif", mask, photometric="minisblack")
    tifffile.imwrite(tmp_path / "turned.tif", np.ascontiguousarray(np.rot90(mask)), photometric="minisblack",
                     extratags=[(ExifTags.Base.Orientation, "H", 1, 6, True)])
    plain = np.asarray(read_rgb(tmp_path / "plain.tif"))
    assert plain.max() == 255
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "turned.tif")), plain)


def test_an_image_past_pillows_pixel_limit_is_an_unreadable_image_not_a_crash(tmp_path, monkeypatch):
    """Pillow refuses an image of more than twice ``MAX_IMAGE_PIXELS`` (179 million by default) with an error
    that is not an OSError: it crashed the whole run, with nothing written, instead of skipping the one image."""
    Image.new("RGB", (100, 80)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 8,000 pixels: past twice the limit
    with pytest.raises(ValueError, match="huge.png"):
        read_rgb(tmp_path / "huge.png")


def test_the_bit_depth_rule():
    assert significant_bits(np.array([0, 255])) == 8
    assert significant_bits(np.array([256])) == 10
    assert significant_bits(np.array([4095])) == 12
    assert significant_bits(np.array([4096])) == 14
    assert significant_bits(np.array([65535])) == 16
    assert significant_bits(np.array([5]), bit_depth=12) == 12
    with pytest.raises(ValueError, match="between 1 and 32"):
        significant_bits(np.array([5]), bit_depth=0)


@pytest.mark.parametrize("kind", ["palette", "cmyk", "grey lzw", "rgb lzw", "grey deflate"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_every_kind_of_tiff_with_an_orientation_reads_upright_once(tmp_path, kind, orientation):
    """From a review of the readers: a palette or CMYK TIFF turned a quarter came out scrambled (Pillow 13 turns
    them while loading, their size but not their samples), and an LZW-compressed one was skipped as unreadable
    (tifffile decodes LZW only with imagecodecs)."""
    rng = np.random.default_rng(orientation)
    picture = Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8))
    picture = {"palette": picture.quantize(16), "cmyk": picture.convert("CMYK"), "grey lzw": picture.convert("L"),
               "rgb lzw": picture, "grey deflate": picture.convert("L")}[kind]
    options = {"compression": "tiff_lzw"} if "lzw" in kind else {"compression": "tiff_adobe_deflate"} \
        if "deflate" in kind else {}
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    picture.save(tmp_path / "stored.tif", **options)
    picture.save(tmp_path / "turned.tif", exif=exif, **options)
    from client.images import UPRIGHT

    expected = np.asarray(Image.open(tmp_path / "stored.tif").convert("RGB").transpose(UPRIGHT[orientation]))
    decoded = decode(tmp_path / "turned.tif")
    assert decoded.orientation == orientation
    np.testing.assert_array_equal(np.asarray(decoded.rgb), expected)
    assert image_size_of(tmp_path / "turned.tif") == (expected.shape[1], expected.shape[0])


def test_white_is_zero_planar_and_signed_tiffs_read_as_they_are_stored(tmp_path):
    """A 16-bit white-is-zero TIFF was not inverted (its 8-bit kind was), a planar one was refused, and signed 8-bit
    samples read as unsigned (-92 as 164; the bit-depth rule puts negatives at 0, as for 16 bits)."""
    stored = np.array([[0, 65535, 32768]], np.uint16)  # 0 is white, the container's largest black (TIFF 6.0)
    tifffile.imwrite(tmp_path / "white.tif", stored, photometric="miniswhite")
    assert np.asarray(read_rgb(tmp_path / "white.tif"))[0, :, 0].tolist() == [255, 0, 127]
    planar = np.random.default_rng(1).integers(0, 4096, (3, 6, 10), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "planar.tif")),
                                  np.asarray(read_rgb_of(np.moveaxis(planar, 0, -1))))
    tifffile.imwrite(tmp_path / "signed.tif", np.array([[-92, 85, 12, 87, -95]], np.int8))
    assert np.asarray(read_rgb(tmp_path / "signed.tif"))[0, :, 0].tolist() == [0, 85, 12, 87, 0]


def test_an_orientation_that_is_not_a_number_is_read_alike_everywhere_and_a_fifo_is_no_image(tmp_path):
    """A tag of text turned the image in one reader and not the other (the lot checks missed a portrait part), or
    skipped a readable image; a FIFO named like an image held the run for ever."""
    import os

    from client.infer import find_images

    tifffile.imwrite(tmp_path / "text.tif", np.full((6, 10), 90, np.uint8),
                     extratags=[(ExifTags.Base.Orientation, "s", 0, "6", True)])
    decoded = decode(tmp_path / "text.tif")
    assert decoded.orientation == 1 and decoded.rgb.size == (10, 6) == image_size_of(tmp_path / "text.tif")
    Image.new("RGB", (10, 6), (50, 100, 150)).save(tmp_path / "text.png")
    stored = np.random.default_rng(2).integers(0, 256, (20, 30), dtype=np.uint8)
    for kind, value in (("2I", (6, 1)), ("f", 6.0)):  # a rational 6/1 or a float 6.0: Pillow turns by them too
        tifffile.imwrite(tmp_path / "number.tif", stored, extratags=[(ExifTags.Base.Orientation, kind, 1, value, True)])
        decoded = decode(tmp_path / "number.tif")
        assert decoded.orientation == 6 and image_size_of(tmp_path / "number.tif") == (20, 30)
        np.testing.assert_array_equal(np.asarray(decoded.rgb)[..., 0], np.rot90(stored, -1))
    os.mkfifo(tmp_path / "waiting.png")
    assert image_size_of(tmp_path / "waiting.png") is None
    with pytest.raises(ValueError, match="not a file"):
        decode(tmp_path / "waiting.png")
    assert find_images(str(tmp_path / "*.png")) == [tmp_path / "text.png"]


def test_a_very_long_image_keeps_a_pixel_of_its_short_side_in_the_overlay():
    assert display_copy(Image.new("RGB", (100000, 1)), 1600).shape == (1, 1600, 3)


def test_an_overlay_panel_is_at_most_1600_pixels_long_by_default_and_a_small_image_is_left_as_it_is():
    """infer draws its panels with display_copy's default: a lot of large photos is held at 1600 px a side at most,
    aspect kept; an image already smaller is not resized (upscaling would only cost memory)."""
    assert display_copy(Image.new("RGB", (4000, 3000))).shape == (1200, 1600, 3)
    assert display_copy(Image.new("RGB", (1000, 5000))).shape == (1600, 320, 3)
    assert display_copy(Image.new("RGB", (1600, 900))).shape == (900, 1600, 3)
    assert display_copy(Image.new("RGB", (300, 200))).shape == (200, 300, 3)


# sRGB's primaries as an ICC profile holds them (adapted to D50), and the D50 white
SRGB_RED, SRGB_GREEN, SRGB_BLUE = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
D50 = (0.9642, 1.0, 0.8249)


def icc_profile(space: str, gamma: float, colorants=None) -> bytes:
    """A version-2 display profile written by the ICC layout (a header, a tag table, the tags): an RGB one with the
    given colorants and one gamma curve per channel, or a grey one with its gamma. The only way to hold a profile
    other than sRGB here: Pillow's ImageCms makes sRGB and Lab ones only."""
    import struct

    def xyz(values):
        return b"XYZ " + bytes(4) + b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)  # u8Fixed8, padded to 4
    text = b"test profile\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    desc += bytes(-len(desc) % 4)
    tags = [(b"desc", desc), (b"wtpt", xyz(D50))]
    if space == "GRAY":
        tags.append((b"kTRC", curve))
    else:
        tags += [(b"rXYZ", xyz(colorants[0])), (b"gXYZ", xyz(colorants[1])), (b"bXYZ", xyz(colorants[2])),
                 (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for signature, body in tags:
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntr"
              + (b"GRAY" if space == "GRAY" else b"RGB ") + b"XYZ " + bytes(12) + b"acsp" + bytes(24)
              + struct.pack(">I", 0) + b"".join(struct.pack(">i", round(v * 65536)) for v in D50) + bytes(48))
    assert len(header) == 128
    return header + table + data


def test_an_embedded_colour_profile_is_honoured_and_one_that_does_not_fit_is_left_out(tmp_path):
    """Pixels are what their profile says they mean, in sRGB: a profile whose red is sRGB's blue turns a red sample
    blue; a grey gamma of 1.0 puts a mid sample's light well above sRGB's mid grey. Before, profiles were ignored and
    the samples read as sRGB. An unreadable profile, or a grey one on an RGB image, is left out, as browsers do."""
    swapped = icc_profile("RGB", 2.2, (SRGB_BLUE, SRGB_GREEN, SRGB_RED))
    colours = np.zeros((8, 8, 3), np.uint8)
    colours[:, :4, 0] = 255  # left half red as stored
    Image.fromarray(colours).save(tmp_path / "swapped.png", icc_profile=swapped)
    Image.fromarray(colours).save(tmp_path / "swapped.jpg", icc_profile=swapped, quality=100)
    for name in ("swapped.png", "swapped.jpg"):
        red = np.asarray(read_rgb(tmp_path / name))[0, 0].astype(int)
        assert red[2] > 240 and red[0] < 15 and red[1] < 15, (name, red)
    grey = np.full((8, 8), 128, np.uint8)
    Image.fromarray(grey).save(tmp_path / "linear.png", icc_profile=icc_profile("GRAY", 1.0))
    light = np.asarray(read_rgb(tmp_path / "linear.png"))
    assert light.shape == (8, 8, 3) and 180 <= light.min() <= light.max() <= 195  # sRGB's code for half the light
    Image.fromarray(grey).save(tmp_path / "srgb_gamma.png", icc_profile=icc_profile("GRAY", 2.2))
    assert abs(int(np.asarray(read_rgb(tmp_path / "srgb_gamma.png"))[0, 0, 0]) - 128) <= 6
    # left out: a damaged profile, a grey profile on an RGB image
    Image.fromarray(colours).save(tmp_path / "damaged.png", icc_profile=swapped[:200])
    Image.fromarray(colours).save(tmp_path / "mismatch.png", icc_profile=icc_profile("GRAY", 1.0))
    for name in ("damaged.png", "mismatch.png"):
        np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / name)), colours)
    # a 16-bit grey image's profile too, after the bit-depth rule
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(tmp_path / "wide.png",
                                                               icc_profile=icc_profile("GRAY", 1.0))
    decoded = decode(tmp_path / "wide.png")
    assert decoded.bits == 16 and 180 <= np.asarray(decoded.rgb).min() <= np.asarray(decoded.rgb).max() <= 195


def test_colour_profiles_are_kept_by_digest_and_only_the_newest_few(tmp_path):
    """Each profile read once (a lot shares its camera's), held by its digest and at most PROFILES_KEPT of them:
    kept by their bytes, 16 profiles of 20 MB held 420 MB. A profile of other bytes is read as its own."""
    from client import images

    grey = np.full((4, 4), 128, np.uint8)
    for i in range(images.PROFILES_KEPT + 4):  # gammas 1.0, 1.1, ...: each its own profile
        Image.fromarray(grey).save(tmp_path / f"g{i}.png", icc_profile=icc_profile("GRAY", 1.0 + i / 10))
        read = np.asarray(read_rgb(tmp_path / f"g{i}.png"))[0, 0, 0]
        assert len(images._PROFILES) <= images.PROFILES_KEPT
        assert all(len(key) == 32 for key in images._PROFILES)  # digests, not the profiles' bytes
        if i == 0:
            assert read > 175  # gamma 1.0: half the light
    assert abs(int(read) - 128) < 30 and read < 175  # the last, gamma 2.9, read with its own curve
