"""client/lot_checks.py and how client/infer.py uses it: lots too small, images the other way round or of another
shape, the same file twice, mixed bit depths."""

from pathlib import Path

import numpy as np
from PIL import Image

from client import infer, lot_checks
from client.infer import bit_depth_warning, load_images


def test_a_lot_below_the_minimum_is_refused_and_a_small_one_warned():
    assert lot_checks.check_lot_size(lot_checks.MIN_LOT_IMAGES - 1).refusal
    assert "at least" in lot_checks.check_lot_size(2).refusal
    small = lot_checks.check_lot_size(lot_checks.MIN_LOT_IMAGES)
    assert small.refusal is None and small.warnings
    enough = lot_checks.check_lot_size(lot_checks.WEAK_LOT_IMAGES)
    assert enough.refusal is None and not enough.warnings


def test_infer_refuses_a_two_image_lot_before_it_contacts_a_server(tmp_path, capsys):
    for i in range(2):
        Image.fromarray(np.full((32, 48, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    # no server runs on this port: the refusal comes first
    code = infer.main(["--images", str(tmp_path), "--category", "bottle", "--build", "--url", "127.0.0.1:9",
                       "--quiet", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "a lot of 2 image(s) cannot be scored" in capsys.readouterr().err


def test_a_lot_of_copies_counts_its_different_images_and_is_refused_before_a_server_is_asked(tmp_path, capsys):
    """Copies of one image are one image to the server (none is scored against its copy): 12 copies of one were
    refused by it (exit 4, no advice) only after the upload and the build's start; 11 copies and one other image
    (2 different) were scored."""
    assert "(1 different: copies of an image are one) cannot be scored" in lot_checks.check_lot_size(12, 1).refusal
    assert lot_checks.check_lot_size(12, 2).refusal and lot_checks.check_lot_size(12, 3).refusal is None
    assert "(4 different)" in lot_checks.check_lot_size(12, 4).warnings[0]
    lot = tmp_path / "lot"
    lot.mkdir()
    for i in range(11):
        Image.fromarray(np.full((32, 48, 3), 90, np.uint8)).save(lot / f"copy{i}.png")
    Image.fromarray(np.full((32, 48, 3), 10, np.uint8)).save(lot / "other.png")
    code = infer.main(["--images", str(lot), "--category", "bottle", "--build", "--url", "127.0.0.1:9", "--quiet",
                       "--out", str(tmp_path / "out")])  # no server on this port: the refusal comes first
    assert code == 2
    assert "a lot of 12 image(s) (2 different: copies of an image are one) cannot be scored" in capsys.readouterr().err


def test_a_folder_says_which_files_it_does_not_read_and_reads_gifs(tmp_path):
    """A GIF was left out of a lot without a word (the count of scored images was silently short); other files are
    named by kind, once."""
    lot = tmp_path / "lot"
    (lot / "sub").mkdir(parents=True)
    picture = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(picture).convert("P", palette=Image.Palette.ADAPTIVE).save(lot / "sub" / "part.gif")
    Image.fromarray(picture).save(lot / "part.png")
    for name in ("notes.txt", "more.txt", "frame.heic", ".DS_Store"):
        (lot / name).write_text("x")
    assert {p.name for p in infer.find_images(str(lot))} == {"part.gif", "part.png"}
    decoded = infer.decode(lot / "sub" / "part.gif")
    assert np.array_equal(np.asarray(decoded.rgb), np.asarray(Image.open(lot / "sub" / "part.gif").convert("RGB")))
    note = infer.unread_note(str(lot))
    assert note.startswith("3 other file(s)") and ".txt x2" in note and ".heic x1" in note and ".gif" in note
    (lot / "notes.txt").unlink(), (lot / "more.txt").unlink(), (lot / "frame.heic").unlink()
    assert infer.unread_note(str(lot)) is None and infer.unread_note(str(lot / "part.png")) is None


def test_the_demo_lots_truth_is_beside_its_folder_and_draws_no_note(tmp_path):
    """./run.sh main with no --images noted "1 other file(s) in 'out/main/demo_lot' are not read (.json x1)" on every
    run: the demo's truth.json was written into the lot it scores."""
    import json

    from client.demo_lot import truth_path, write_demo_lot

    (tmp_path / "demo_lot").mkdir()
    (tmp_path / "demo_lot" / "truth.json").write_text("{}")  # what an older version left in an --out used again
    folder = write_demo_lot(tmp_path / "demo_lot", n_images=6, n_defective=2, size=64)
    assert infer.unread_note(str(folder)) is None
    truth = json.loads(truth_path(folder).read_text())
    assert truth_path(folder).parent == tmp_path and sorted(truth) == sorted(p.name for p in folder.glob("*.png"))
    assert sum(v != "good" for v in truth.values()) == 2


def test_images_the_other_way_round_are_named_and_turned_on_request():
    sizes = {f"land{i}.png": (300, 200) for i in range(5)} | {"up.png": (200, 300), "sq.png": (250, 251)}
    kept = lot_checks.check_orientation(sizes, "keep")
    assert not kept.turn and "up.png" in kept.warnings[0] and "--orientation majority" in kept.warnings[0]
    assert "land0.png" not in kept.warnings[0] and "sq.png" not in kept.warnings[0]
    turned = lot_checks.check_orientation(sizes, "majority")
    assert turned.turn == {"up.png"}
    # against a bank of portrait images the landscape ones are the odd ones
    assert lot_checks.check_orientation(sizes, "majority", "portrait").turn == {f"land{i}.png" for i in range(5)}
    assert not lot_checks.check_orientation({"a": (300, 200), "b": (310, 200)}, "keep").warnings


def test_an_image_of_another_shape_is_named():
    sizes = {f"{i}.png": (400, 300) for i in range(6)} | {"wide.png": (6000, 1000), "up.png": (300, 400)}
    warning = lot_checks.check_aspect(sizes, turned=set())
    assert len(warning) == 1 and "wide.png" in warning[0] and "up.png" in warning[0] and "0.png" not in warning[0]
    assert "up.png" not in lot_checks.check_aspect(sizes, turned={"up.png"})[0]  # turned, it fits


def test_identical_files_are_named(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    Image.fromarray(np.ones((8, 8, 3), np.uint8)).save(tmp_path / "c.png")
    hashes = {p: lot_checks.sha256_of(p) for p in sorted(tmp_path.glob("*.png"))}
    found = lot_checks.check_duplicates(hashes)
    assert len(found) == 1 and "a.png, b.png" in found[0] and "c.png" not in found[0]


def test_files_that_differ_only_past_their_first_blocks_are_not_identical(tmp_path):
    """Two large images that share a header and their first rows (the same camera, the same background) differ
    further on: the whole file is hashed, so only the true copy is named."""
    rng = np.random.default_rng(0)
    head = rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    (tmp_path / "a.bin").write_bytes(head + rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    (tmp_path / "b.bin").write_bytes(head + rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    (tmp_path / "c.bin").write_bytes((tmp_path / "a.bin").read_bytes())
    hashes = {p: lot_checks.sha256_of(p) for p in sorted(tmp_path.glob("*.bin"))}
    found = lot_checks.check_duplicates(hashes)
    assert len(found) == 1 and "a.bin, c.bin" in found[0] and "b.bin" not in found[0]


def test_a_turned_image_is_sent_turned_and_its_overlay_is_upright(tmp_path):
    scene = np.zeros((40, 60, 3), np.uint8)
    scene[:, :10] = 255  # a white stripe on the left
    Image.fromarray(scene).save(tmp_path / "land.png")
    Image.fromarray(scene).transpose(Image.Transpose.ROTATE_270).save(tmp_path / "up.png")  # stored portrait
    loaded, _ = load_images([tmp_path / "land.png", tmp_path / "up.png"], (40, 60), False,
                            turn={tmp_path / "up.png"})
    (_, land_show, land_sent, land_info), (_, up_show, up_sent, up_info) = loaded
    assert up_info["turned"] and not land_info["turned"]
    assert up_show.shape == (60, 40, 3)  # the overlay shows the file as it lies
    np.testing.assert_array_equal(up_sent, land_sent)  # turned counter-clockwise it is the landscape scene again
    # the map of the turned image, turned back (as score_all does), lies on the file as it lies
    assert np.rot90(np.asarray(up_sent[..., 0]), -1).shape == up_show.shape[:2]
    np.testing.assert_array_equal(np.rot90(up_sent, -1), up_show)


def test_mixed_bit_depths_are_warned(tmp_path):
    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(tmp_path / "bright.png")
    Image.fromarray(np.full((8, 8), 900, np.uint16)).save(tmp_path / "dark.png")
    loaded, _ = load_images(sorted(tmp_path.glob("*.png")), (8, 8), False)
    assert "--bit-depth" in bit_depth_warning(loaded)
    loaded, _ = load_images(sorted(tmp_path.glob("*.png")), (8, 8), False, bit_depth=12)
    assert bit_depth_warning(loaded) is None


def test_infer_refuses_bad_thresholds_budgets_and_bit_depths_before_it_reads_anything(tmp_path, capsys):
    for flags, words in ((["--threshold", "5"], "between 0 and 1"), (["--threshold", "nan"], "between 0 and 1"),
                         (["--false-alarm-rate", "2"], "a number in [1e-06, 0.5)"), (["--bit-depth", "40"], "[1, 16]")):
        try:  # the ranges of numbers are argparse's to refuse (exit status 2), the threshold's text the command's
            code = infer.main(["--images", str(tmp_path / "none"), "--bank", "b", "--url", "127.0.0.1:9", *flags])
        except SystemExit as stopped:
            code = stopped.code
        assert code == 2 and words in capsys.readouterr().err, flags


def test_a_files_digest_is_read_once_and_again_when_the_file_is_written(tmp_path, monkeypatch):
    """The main job's check and the run it starts both hash the lot: read once per version of a file. A file written
    since, even to the same size, is read again (a digest kept for the old bytes would call a new part a copy)."""
    import builtins
    import os

    from client import lot_checks

    part = tmp_path / "part.png"
    part.write_bytes(b"a" * 5000)
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    first = lot_checks.sha256_of(part)
    assert lot_checks.sha256_of(part) == first and opened.count(str(part)) == 1
    part.write_bytes(b"b" * 5000)
    stat = part.stat()
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a write the clock tells apart
    assert lot_checks.sha256_of(part) != first and opened.count(str(part)) == 2
    moved = tmp_path / "moved.png"  # another file put in its place: another inode
    moved.write_bytes(b"c" * 5000)
    os.utime(moved, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns))
    os.replace(moved, part)
    assert lot_checks.sha256_of(part) == __import__("hashlib").sha256(b"c" * 5000).hexdigest()


def test_a_run_walks_its_folder_once_and_a_refused_run_leaves_no_out_folder_it_made(tmp_path, monkeypatch, capsys):
    """A run listed its folder twice (its parts, then the note on its other files): on a share of 100,000 parts each
    walk costs seconds. Both now read one walk, and the note still counts what the folder holds."""
    lot = tmp_path / "lot"
    lot.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(lot / "part.png")
    (lot / "notes.txt").write_text("x")
    walks = []
    real_rglob = Path.rglob

    def counted_rglob(self, pattern):
        walks.append(self)
        return real_rglob(self, pattern)

    monkeypatch.setattr(Path, "rglob", counted_rglob)
    # nothing listens on port 1: the run stops at the server, after the folder was read and the note given
    assert infer.main(["--images", str(lot), "--bank", "washer", "--out", str(tmp_path / "out"),
                       "--url", "127.0.0.1:1", "--timeout", "5", "--quiet"]) != 0
    assert "1 other file(s)" in capsys.readouterr().err
    assert walks == [lot]
    # the --out it made holds nothing of a run refused before it wrote: it is not left behind with its lock file
    assert not (tmp_path / "out").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert infer.main(["--images", str(lot), "--bank", "washer", "--out", str(kept), "--url", "127.0.0.1:1",
                       "--timeout", "5", "--quiet"]) != 0
    assert kept.is_dir()  # a folder the user made stays
