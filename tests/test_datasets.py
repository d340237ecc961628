"""Data set layouts and bad input: corrupt images, mismatched masks, empty categories, unknown layouts."""

import warnings

import numpy as np
import pytest
from PIL import Image

from benchmarks.datasets import DatasetError, discover, load_category


def test_mvtec_layout_with_masks(mvtec_tree):
    (cat,) = discover(mvtec_tree, "mvtec")
    assert cat.name == "widget" and cat.has_masks
    lot = load_category(cat, 56)
    assert lot.images.shape == (10, 56, 56, 3) and lot.images.dtype == np.uint8
    assert lot.labels.tolist() == [0] * 6 + [1] * 4
    assert lot.masks.shape == (10, 56, 56)
    assert not lot.masks[:6].any() and all(m.any() for m in lot.masks[6:])


def test_corrupt_image_is_skipped_and_counted(mvtec_tree):
    bad = mvtec_tree / "widget/test/good/999.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (cat,) = discover(mvtec_tree, "mvtec")
    with pytest.warns(UserWarning, match="999.png"):
        lot = load_category(cat, 56)
    assert len(lot.images) == 10
    assert [p for p, _ in lot.skipped] == [str(bad)]


def test_mask_of_other_size_is_resized_with_warning(mvtec_tree):
    mask_path = next((mvtec_tree / "widget/ground_truth/scratch").iterdir())
    Image.open(mask_path).resize((40, 40), Image.NEAREST).save(mask_path)
    (cat,) = discover(mvtec_tree, "mvtec")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lot = load_category(cat, 56)
    assert any("resizing the mask" in str(w.message) for w in caught)
    assert lot.masks.shape == (10, 56, 56)


def test_a_large_jpeg_decoded_small_is_no_mask_mismatch(mvtec_tree):
    """A JPEG is decoded at a reduced scale for a small lot: its decoded size warned of every mask as mis-sized."""
    for image_path in (mvtec_tree / "widget/test/scratch").iterdir():
        mask_path = mvtec_tree / "widget/ground_truth/scratch" / f"{image_path.stem}_mask.png"
        Image.open(image_path).convert("RGB").resize((448, 448)).save(image_path.with_suffix(".jpg"), quality=95)
        Image.open(mask_path).resize((448, 448), Image.NEAREST).save(mask_path)
        image_path.unlink()
    (cat,) = discover(mvtec_tree, "mvtec")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lot = load_category(cat, 56)
    assert not [w for w in caught if "resizing the mask" in str(w.message)]
    assert all(m.any() for m in lot.masks[6:])


def test_a_mask_stored_as_0_and_1_is_not_read_empty(mvtec_tree):
    """Masks of some sets (VisA's as distributed) hold 0 and 1: read as > 127 every defect's mask was empty."""
    for mask_path in (mvtec_tree / "widget/ground_truth/scratch").iterdir():
        values = np.asarray(Image.open(mask_path).convert("L"))
        Image.fromarray((values > 127).astype(np.uint8)).save(mask_path)
    (cat,) = discover(mvtec_tree, "mvtec")
    lot = load_category(cat, 56)
    assert not lot.masks[:6].any() and all(m.any() for m in lot.masks[6:])


def test_a_mask_read_smaller_keeps_its_defects_area(tmp_path):
    """A defect's mask at the lot's size covers the defect's share of the image, as at full size: a blurring resize
    read as "any grey" would grow every defect by a ring of pixels, and the pixel metrics would credit maps that
    spill past it. A disc of about 2,900 pixels at 448 x 448, read at 112 x 112 (1/16 of the pixels): about 180."""
    from PIL import ImageDraw

    from benchmarks.datasets import read_mask

    mask = Image.new("L", (448, 448), 0)
    ImageDraw.Draw(mask).ellipse([100, 200, 160, 260], fill=255)
    source_area = int((np.asarray(mask) > 0).sum())
    assert abs(source_area - np.pi * 30 ** 2) < 0.05 * source_area  # the premise: a disc of radius 30
    mask.save(tmp_path / "mask.png")
    read = read_mask(tmp_path / "mask.png", (448, 448), (112, 112))
    assert read.shape == (112, 112) and read.dtype == bool
    assert abs(int(read.sum()) - source_area / 16) <= 0.1 * source_area / 16


def test_empty_category_and_unknown_layouts(tmp_path, mvtec_tree):
    empty = tmp_path / "empty_root" / "thing" / "test" / "good"
    empty.mkdir(parents=True)
    with pytest.raises(DatasetError, match="no test images"):
        discover(tmp_path / "empty_root", "mvtec")
    with pytest.raises(DatasetError, match="unknown data set layout"):
        discover(mvtec_tree, "kitti")
    with pytest.raises(DatasetError, match="not in the VisA layout"):
        discover(mvtec_tree, "visa")
    with pytest.raises(DatasetError, match="not in the MVTec AD layout"):
        discover(tmp_path, "mvtec")
    with pytest.raises(DatasetError, match="not found"):
        discover(mvtec_tree, "mvtec", ["bottle"])


def test_visa_layout(tmp_path):
    root = tmp_path / "visa"
    (root / "split_csv").mkdir(parents=True)
    (root / "candle/Data/Images/Normal").mkdir(parents=True)
    (root / "candle/Data/Images/Anomaly").mkdir(parents=True)
    (root / "candle/Data/Masks/Anomaly").mkdir(parents=True)
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        Image.new("RGB", (60, 40), (120, 120, 120)).save(root / f"candle/Data/Images/Normal/{i}.JPG")
        rows.append(f"candle,test,normal,candle/Data/Images/Normal/{i}.JPG,")
    Image.new("RGB", (60, 40), (10, 10, 10)).save(root / "candle/Data/Images/Anomaly/9.JPG")
    Image.new("L", (60, 40), 255).save(root / "candle/Data/Masks/Anomaly/9.png")
    rows.append("candle,test,anomaly,candle/Data/Images/Anomaly/9.JPG,candle/Data/Masks/Anomaly/9.png")
    rows.append("candle,train,normal,candle/Data/Images/Normal/0.JPG,")
    (root / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")
    (cat,) = discover(root, "visa")
    lot = load_category(cat, 28)
    assert lot.labels.tolist() == [0, 0, 0, 1]
    assert lot.masks[3].all() and not lot.masks[:3].any()


def test_plain_folder_has_no_labels(tmp_path):
    folder = tmp_path / "lot"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (30, 30), (i * 40, 0, 0)).save(folder / f"{i}.jpg")
    (folder / "notes.txt").write_text("not an image")
    (cat,) = discover(folder, "folder")
    lot = load_category(cat, 28)
    assert cat.name == "lot" and lot.labels is None and lot.masks is None and len(lot.images) == 3
