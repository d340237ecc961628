"""Banks you can trust on disk: every damage an independent probe made to a stored bank (issue 25) is a clear refusal
that names the bank and what to do, never a score and never an internal error; the store never leaves itself."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_manifest
from postprocess.bank import BankDamaged, BankError, build_bank
from postprocess.bank_store import BankStore
from postprocess.config import PAClipConfig
from postprocess.errors import RequestError
from postprocess.pipeline import LotScorer
from postprocess.serving import BankService, ScoreService


@pytest.fixture(scope="module")
def template(tiny_clip_112, lot, tmp_path_factory):
    """A store holding bank 'washer' (the full method with re-scoring), written once and copied per case."""
    root = tmp_path_factory.mktemp("integrity") / "banks"
    scorer = LotScorer(tiny_clip_112, lot, "washer", progress=False)
    bank, _ = build_bank(scorer, PAClipConfig(rescore_k=3), "washer", tiny_clip_112.fingerprint)
    BankStore(root).save(bank)
    return root, scorer


def version_dir(root: Path) -> Path:
    return root / "washer" / (root / "washer" / "CURRENT").read_text().strip()


def data_offset(path: Path) -> int:
    """Where a safetensors file's tensor data starts (after its 8-byte length and JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def patch_file(path: Path, at: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[at:at + len(data)] = data
    path.write_bytes(bytes(raw))


def flip_middle(path: Path) -> None:
    raw = path.read_bytes()
    middle = len(raw) // 2
    patch_file(path, middle, bytes(b ^ 0xFF for b in raw[middle:middle + 64]))


def fill_data(path: Path, value: np.float16, nbytes: int = 65536) -> None:
    at = data_offset(path)
    patch_file(path, at, np.full(nbytes // 2, value, np.float16).tobytes()[:len(path.read_bytes()) - at])


def edit_manifest(path: Path, **changes) -> None:
    """Change fields of a version's manifest and write its digest again: what the field checks, behind the
    digest, must refuse (a writer's fault, or a bank of a format before the manifest had a digest)."""
    manifest = json.loads((path / "manifest.json").read_text())
    for key, value in changes.items():
        target, *rest = key.split("__")
        if rest:
            manifest[target][rest[0]] = value
        else:
            manifest[target] = value
    write_manifest(path / "manifest.json", json.dumps(manifest, indent=1))


def replace_in_manifest(path: Path, old: str, new: str, digest_again: bool = True) -> None:
    """The manifest's text changed where JSON cannot write it (a number past float, nesting), or a bit flipped."""
    text = (path / "manifest.json").read_text()
    assert old in text
    if digest_again:
        write_manifest(path / "manifest.json", text.replace(old, new, 1))
    else:
        (path / "manifest.json").write_text(text.replace(old, new, 1))


def flip_bit_in_threshold(path: Path) -> None:
    """One bit of a tau_b value flipped on disk, the digest left as written."""
    manifest = json.loads((path / "manifest.json").read_text())
    value = json.dumps(manifest["tau_b"]["1"])
    digit = next(i for i, c in enumerate(value) if c in "123456789")
    replace_in_manifest(path, f'"1": {value}', f'"1": {value[:digit]}{chr(ord(value[digit]) ^ 1)}{value[digit + 1:]}',
                        digest_again=False)


def without_digests(path: Path) -> None:
    """What a format-1 bank looks like: no digests, no tensor record, no manifest digest (damage must then show
    in the tensors)."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("files"), manifest.pop("tensors")
    manifest["format_version"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (path / "manifest.sha256").unlink()


def digests_cut(path: Path, older: bool) -> None:
    """A manifest of a digested format whose ``files`` and ``tensors`` were cut out (with its own digest written
    again, or of format 5, which had none): it must not read as a format-1 bank, whose tensors are all it checks."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("files"), manifest.pop("tensors")
    if older:
        manifest["format_version"] = 5
        (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
        (path / "manifest.sha256").unlink()
    else:
        write_manifest(path / "manifest.json", json.dumps(manifest, indent=1))


def rewrite_tensor(path: Path, name: str, change) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path / "bank.safetensors"))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(path / "bank.safetensors"))


def point_current(root: Path, text: str) -> None:
    (root / "washer" / "CURRENT").write_text(text)


# (name, damage(root), the words the refusal must hold)
DAMAGE = [
    ("64 flipped bytes in the data", lambda r: flip_middle(version_dir(r) / "bank.safetensors"), "digest differs"),
    ("+Inf over 64 KB of data", lambda r: fill_data(version_dir(r) / "bank.safetensors", np.float16("inf")),
     "digest differs"),
    ("NaN over 64 KB of data", lambda r: fill_data(version_dir(r) / "bank.safetensors", np.float16("nan")),
     "digest differs"),
    ("bank.safetensors truncated", lambda r: (version_dir(r) / "bank.safetensors").write_bytes(
        (version_dir(r) / "bank.safetensors").read_bytes()[:5000]), "bytes, its manifest records"),
    ("bank.safetensors emptied", lambda r: (version_dir(r) / "bank.safetensors").write_bytes(b""),
     "0 bytes, its manifest records"),
    ("bank.safetensors missing", lambda r: (version_dir(r) / "bank.safetensors").unlink(),
     "bank.safetensors is missing"),
    ("garbled header", lambda r: patch_file(version_dir(r) / "bank.safetensors", 8, b"#" * 40), "digest differs"),
    ("bank.safetensors a link to /dev/zero", lambda r: (
        (version_dir(r) / "bank.safetensors").unlink(), (version_dir(r) / "bank.safetensors").symlink_to("/dev/zero")),
     "is a link or not a file"),
    ("garbled manifest", lambda r: patch_file(version_dir(r) / "manifest.json", 10, b"\xff\x00{{"), "manifest.json"),
    ("truncated manifest", lambda r: (version_dir(r) / "manifest.json").write_text(
        (version_dir(r) / "manifest.json").read_text()[:300]), "manifest.json"),
    ("empty manifest", lambda r: (version_dir(r) / "manifest.json").write_text(""), "manifest.json"),
    ("missing manifest", lambda r: (version_dir(r) / "manifest.json").unlink(), "manifest.json is missing"),
    ("a flipped bit in a threshold", lambda r: flip_bit_in_threshold(version_dir(r)), "manifest.json digest differs"),
    ("a flipped bit in an image key", lambda r: replace_in_manifest(version_dir(r), '"image_keys": [\n  "',
                                                                   '"image_keys": [\n  "\x01', digest_again=False),
     "manifest.json digest differs"),
    ("manifest digest missing", lambda r: (version_dir(r) / "manifest.sha256").unlink(), "manifest.sha256 is missing"),
    ("manifest digest missing, its format flipped to 5 (which had none)", lambda r: (
        (version_dir(r) / "manifest.sha256").unlink(),
        replace_in_manifest(version_dir(r), '"format_version": 7', '"format_version": 5', digest_again=False)),
     "bank.safetensors was written as format 7; its manifest says 5"),
    ("manifest digest garbled", lambda r: (version_dir(r) / "manifest.sha256").write_text("0" * 64),
     "manifest.json digest differs"),
    ("digests cut out of the manifest", lambda r: digests_cut(version_dir(r), older=False), "lacks the files' digests"),
    ("digests cut out of a format-5 manifest", lambda r: digests_cut(version_dir(r), older=True),
     "lacks the files' digests"),
    ("an image key that is not hex", lambda r: edit_manifest(version_dir(r), image_keys=["z" * 64] * 10),
     "an image key is not a SHA-256"),
    ("a lot size past float", lambda r: replace_in_manifest(version_dir(r), '"n_images": 10', '"n_images": 1e999'),
     "OverflowError"),
    ("a manifest nested past reading", lambda r: replace_in_manifest(version_dir(r), '"category": "washer"',
                                                                     '"category": ' + "[" * 100000 + "]" * 100000),
     "RecursionError"),
    ("a file digest that is a number", lambda r: edit_manifest(version_dir(r), files={"bank.safetensors": 5}),
     "records no digest of bank.safetensors"),
    ("a tensor record that is a number", lambda r: edit_manifest(version_dir(r), tensors__lot_map_scores=5),
     "its tensors against its manifest"),
    ("manifest scales [7]", lambda r: edit_manifest(version_dir(r), config__scales=[7]), "scales"),
    ("thresholds at 1e30", lambda r: edit_manifest(version_dir(r), tau_b={"1": 1e30, "3": 1e30, "5": 1e30}),
     "tau_b holds"),
    ("decision threshold at 1e30", lambda r: edit_manifest(version_dir(r), decision__centre=1e30), "decision"),
    ("n_images 0", lambda r: edit_manifest(version_dir(r), n_images=0), "n_images 0"),
    ("the 8x8 grid as 1x64 (as many patches, other neighbours)", lambda r: edit_manifest(version_dir(r), grid=[1, 64]),
     "grid (1, 64) for 112x112 images of 14-pixel patches"),
    ("sample_growth a string", lambda r: edit_manifest(version_dir(r), sample_growth="123"),
     "sample_growth is a list of lot sizes"),
    ("sample_growth of fractions", lambda r: edit_manifest(version_dir(r), sample_growth=[200.5, 300.0]),
     "sample_growth is a list of lot sizes"),
    ("sample_growth on a lot that keeps every image", lambda r: edit_manifest(version_dir(r), sample_growth=[10, 12]),
     "sample_growth [10, 12]"),
    ("left_out_keys a string", lambda r: edit_manifest(version_dir(r), left_out_keys="ab"),
     "left_out_keys is a list of image keys"),
    ("a left-out key that is no SHA-256", lambda r: edit_manifest(version_dir(r), left_out_keys=["ab"]),
     "a left-out part's key is not a SHA-256"),
    ("a left-out part also in the lot", lambda r: edit_manifest(version_dir(r), left_out_keys=json.loads(
        (version_dir(r) / "manifest.json").read_text())["image_keys"][:1]), "also in the lot"),
    ("accept_level a string", lambda r: edit_manifest(version_dir(r), accept_level="0.1"),
     "accept_level is a number"),
    ("accept_level past float", lambda r: edit_manifest(version_dir(r), accept_level=1e300),
     "its acceptance level is 1e+300"),
    ("manifest of another bank", lambda r: edit_manifest(version_dir(r), bank="other"),
     "its manifest is for bank 'other'"),
    ("a tensor's recorded shape", lambda r: edit_manifest(version_dir(r), tensors__lot_map_scores={
        "shape": [3], "dtype": "F32"}), "its manifest records F32 [3]"),
    ("normal entries miscounted", lambda r: edit_manifest(version_dir(r), normal_bank_entries={"1": 5, "3": 5, "5": 5}),
     "normal"),
    ("CURRENT emptied", lambda r: point_current(r, ""), "CURRENT is empty"),
    ("CURRENT removed", lambda r: (r / "washer" / "CURRENT").unlink(), "CURRENT is missing"),
    ("CURRENT names a missing version", lambda r: point_current(r, "v-20260101T000000-x-000000000000"),
     "not on disk"),
    ("CURRENT names ../", lambda r: point_current(r, "../other/v-1"), "not a version folder of this bank"),
    ("CURRENT names an absolute path", lambda r: point_current(r, str(version_dir(r))),
     "not a version folder of this bank"),
    ("CURRENT a link", lambda r: (
        (r / "washer" / "CURRENT").rename(r / "washer" / "CURRENT.real"),
        (r / "washer" / "CURRENT").symlink_to(r / "washer" / "CURRENT.real")), "CURRENT is a symbolic link"),
    ("+Inf in a format-1 bank", lambda r: (without_digests(version_dir(r)), rewrite_tensor(
        version_dir(r), "normal.r1", lambda a: np.where(np.arange(a.size).reshape(a.shape) < 99, np.inf, a).astype(
            a.dtype))), "holds NaN or infinite values"),
    ("NaN in a format-1 bank", lambda r: (without_digests(version_dir(r)), rewrite_tensor(
        version_dir(r), "lot_map_scores", lambda a: np.full_like(a, np.nan))), "holds NaN or infinite values"),
    ("source ids outside the lot", lambda r: (without_digests(version_dir(r)), rewrite_tensor(
        version_dir(r), "normal_ids.r1", lambda a: a + 1000)), "outside"),
    ("a tensor missing, format 1", lambda r: (without_digests(version_dir(r)), rewrite_tensor(
        version_dir(r), "full.r3", lambda a: a[:, :2])), "full.r3 is I8 [4, 2,"),
]


@pytest.mark.parametrize("name,damage,words", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damage_is_a_clear_refusal_that_names_the_bank(template, tiny_clip_112, tmp_path, name, damage, words):
    root, scorer = template
    shutil.copytree(root, tmp_path / "banks", symlinks=True)
    store = BankStore(tmp_path / "banks")
    damage(tmp_path / "banks")
    with pytest.raises(BankDamaged) as refused:
        store.load("washer", tiny_clip_112.fingerprint)
    message = str(refused.value)
    assert message.startswith("bank 'washer' version ") and "is damaged (" in message and words in message, message
    assert "rebuild it" in message
    # the scoring model refuses it (a 400 through Triton: a BankError is the caller's), never scores with it
    service = ScoreService(store, tiny_clip_112.fingerprint)
    features = scorer.features.take(slice(0, 1))
    with pytest.raises(BankError, match="is damaged"):
        service.score("washer", features.layer_tokens, features.patch_embeds, features.image_embeds, scorer.images[:1])
    # the bank model: verify names it; info and list (which read the manifest and the file's header, not the data)
    # refuse what they read damaged, and list still answers for the store
    bank_service = BankService(store, tiny_clip_112.fingerprint, encode_images=None)
    (checked,) = bank_service.handle("verify")["banks"]
    assert checked["ok"] is False and checked["bank"] == "washer" and words in checked["error"]
    try:
        bank_service.handle("info", "washer")
        info_refused = False
    except BankError as err:
        assert "is damaged" in str(err)
        info_refused = True
    (listed,) = bank_service.handle("list")["banks"]
    assert listed["bank"] == "washer" and ("is damaged" in listed.get("error", "")) == info_refused


def test_an_intact_bank_verifies_and_its_manifest_records_what_was_written(template, tiny_clip_112):
    root, _ = template
    store = BankStore(root)
    checked = store.verify("washer")
    assert checked["ok"] and checked["verified"] == "manifest, digests and tensors", checked
    manifest = store.manifest("washer")
    data = version_dir(root) / "bank.safetensors"
    import hashlib

    assert manifest.files == {"bank.safetensors": {"sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                                                   "bytes": data.stat().st_size}}
    assert set(manifest.tensors) == set(store.load("washer").tensors())


def test_a_linked_bank_folder_is_refused_listed_by_its_own_name_and_deleted_as_a_link(template, tiny_clip_112,
                                                                                        tmp_path):
    root, _ = template
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root, elsewhere)
    store = BankStore(tmp_path / "banks")
    os.symlink(elsewhere / "washer", tmp_path / "banks" / "linked")
    with pytest.raises(BankDamaged, match="bank 'linked' version \\? is damaged \\(its folder is a symbolic link"):
        store.load("linked", tiny_clip_112.fingerprint)
    service = BankService(store, tiny_clip_112.fingerprint, encode_images=None)
    (listed,) = service.handle("list")["banks"]
    assert listed["bank"] == "linked" and "symbolic link" in listed["error"]  # the folder's id, not the manifest's
    with pytest.raises(BankError, match="symbolic link"):
        store.add_to_lot("linked", "washer", np.zeros((1, 112, 112, 3), np.uint8), None)
    service.handle("delete", "linked")
    assert not (tmp_path / "banks" / "linked").exists() and not (tmp_path / "banks" / "linked").is_symlink()
    assert not list((tmp_path / "banks").glob(".trash-*"))  # no link left behind for good
    assert BankStore(elsewhere).verify("washer")["ok"]  # what it pointed at is untouched


def test_the_verification_benchmark_prints_a_row_per_bank(template, capsys):
    from benchmarks import bank_verify

    root, _ = template
    assert bank_verify.main(["--banks", str(root), "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| washer |")]
    assert len(rows) == 1 and rows[0].endswith("|") and " x" in rows[0]


def copied_store(template, tmp_path) -> BankStore:
    root, _ = template
    shutil.copytree(root, tmp_path / "banks", symlinks=True)
    return BankStore(tmp_path / "banks")


def test_a_bank_whose_current_is_damaged_is_rebuilt_as_its_refusal_says_and_keeps_its_versions(template, tiny_clip_112,
                                                                                                tmp_path):
    store = copied_store(template, tmp_path)
    bank = store.load("washer", tiny_clip_112.fingerprint)
    before = version_dir(store.root).name
    point_current(store.root, "v-20260101T000000-x-000000000000")
    with pytest.raises(BankDamaged, match="rebuild it"):
        store.load("washer", tiny_clip_112.fingerprint)
    version = store.save(bank)  # the commit does not stop at the damaged CURRENT it replaces
    assert store.load("washer", tiny_clip_112.fingerprint).manifest.version == version != before
    assert (store.root / "washer" / before).is_dir()  # which version was live is not known: none is removed


def test_prune_keeps_the_versions_of_a_bank_whose_current_went_missing(template, tmp_path):
    store = copied_store(template, tmp_path)
    version = version_dir(store.root)
    (store.root / "washer" / "CURRENT").unlink()
    long_ago = version.stat().st_mtime - 2 * BankStore.PRUNE_AFTER_S
    os.utime(version, (long_ago, long_ago))
    store.prune()
    assert version.is_dir() and store.verify("washer")["ok"] is False
    (store.root / "washer" / "CURRENT").write_text(version.name)  # what the refusal says to restore
    assert store.verify("washer")["ok"]


def test_list_answers_for_the_store_when_a_header_or_a_lot_part_is_damaged(template, tiny_clip_112, tmp_path):
    root, scorer = template
    store = copied_store(template, tmp_path)
    data = version_dir(store.root) / "bank.safetensors"
    raw = bytearray(data.read_bytes())
    at = raw.index(b'"F16"', 8, data_offset(data))
    raw[at + 1] = ord("I")  # a header that still parses, of a type no bank holds
    data.write_bytes(bytes(raw))
    store.add_to_lot("bolt", "bolt", scorer.images[:2], scorer.features.take(slice(0, 2)))
    (part,) = (store.root / "bolt" / "lot").glob("part-*.safetensors")
    part.write_bytes(part.read_bytes()[:40])
    service = BankService(store, tiny_clip_112.fingerprint, encode_images=None)
    listed = service.handle("list")
    (washer,) = [b for b in listed["banks"] if b["bank"] == "washer"]
    assert "is damaged" in washer["error"] and "no bank's" in washer["error"]
    (pending,) = listed["pending"]
    assert pending["bank"] == "bolt" and "cannot be read" in pending["error"]


def test_prune_never_removes_what_a_linked_bank_or_lot_leads_to(template, tmp_path):
    store = copied_store(template, tmp_path)
    outside = tmp_path / "outside"
    (outside / ".trash-lot-keep").mkdir(parents=True)
    (outside / ".trash-lot-keep" / "precious.txt").write_text("x")
    (outside / ".trash-lock-keep").write_text("y")
    (outside / "lot").mkdir()
    old = outside / "lot" / ".tmp-data.bin"
    old.write_text("z")
    os.utime(old, (old.stat().st_mtime - 2 * BankStore.STALE_AFTER_S,) * 2)  # someone else's file, long untouched
    (store.root / "linked").symlink_to(outside)
    (store.root / "washer" / "lot").symlink_to(outside / "lot")
    store.prune()
    assert (outside / ".trash-lot-keep" / "precious.txt").exists() and (outside / ".trash-lock-keep").exists()
    assert old.exists()


def test_a_lot_that_two_adds_at_once_made_of_two_products_is_refused(template, tmp_path):
    """Two adds to an empty lot each find no part to match theirs: the lot they leave is refused when read."""
    _, scorer = template
    store = copied_store(template, tmp_path)
    store.add_to_lot("mixed", "washer", scorer.images[:2], scorer.features.take(slice(0, 2)))
    store.add_to_lot("elsewhere", "bolt", scorer.images[2:4], scorer.features.take(slice(2, 4)))
    (other,) = (store.root / "elsewhere" / "lot").glob("part-*.safetensors")
    other.rename(store.root / "mixed" / "lot" / other.name.replace("part-000000", "part-000001"))
    with pytest.raises(BankError, match="mixes categories or image sizes .*bolt.*washer"):
        store.load_lot("mixed")


def nan_in_part(part: Path) -> None:
    """One number of a part's image embedding made NaN, the rest of the file (its metadata too) as written."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(part), framework="numpy") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["image_embeds"][0, 0] = np.nan
    save_file(tensors, str(part), metadata=meta)


def linked_to_a_copy(part: Path) -> None:
    copy = part.parent.parent / "elsewhere.safetensors"
    shutil.copy(part, copy)
    part.unlink()
    part.symlink_to(copy)


# (name, damage(part), the words the refusal must hold)
LOT_DAMAGE = [
    ("64 flipped bytes", flip_middle, "its bytes are not those it was written with"),
    ("a NaN in the features", nan_in_part, "its bytes are not those it was written with"),
    ("a link to an intact copy", linked_to_a_copy, "a link or not a file"),
    ("cut short", lambda part: part.write_bytes(part.read_bytes()[:40]), "add the lot again with reset"),
    ("renamed without its digest", lambda part: part.rename(part.with_name("part-000000-0123abcd.safetensors")),
     "its name carries no digest"),
]


@pytest.mark.parametrize("name,damage,words", LOT_DAMAGE, ids=[d[0] for d in LOT_DAMAGE])
def test_a_damaged_part_of_a_pending_lot_is_refused_by_the_build_and_the_update(template, tiny_clip_112, tmp_path,
                                                                               name, damage, words):
    """What an add left on disk is read back as it was written, or refused naming the part: a flipped byte or a NaN
    in a part built a different bank (or grew the live one wrongly, a part left out for good) without a word."""
    _, scorer = template
    store = copied_store(template, tmp_path)
    service = BankService(store, tiny_clip_112.fingerprint, tiny_clip_112.encode, tiny_clip_112.encode_text,
                          log=lambda _: None)
    before = store.manifest("washer")
    refusal = rf"part part-\d+-\w+\.safetensors of the pending lot of bank '{{bank}}' is damaged .*{words}"
    for bank_id, action, options in (("bolt", "build", {}), ("washer", "update", None)):
        service.handle("add", bank_id, "washer", scorer.images[:4], {"reset": True})
        (part,) = (store.root / bank_id / "lot").glob("part-*.safetensors")
        damage(part)
        with pytest.raises(BankError, match=refusal.format(bank=bank_id)):
            service.handle(action, bank_id, options=options)
        # the listing names the lot's damage; an add to it is refused as the caller's, not an internal error
        (pending,) = [p for p in service.handle("list")["pending"] if p["bank"] == bank_id]
        if "written with" not in words:  # what the header or the name shows: said before a build reads the lot
            assert "cannot be read" in pending["error"]
            with pytest.raises(BankError, match=refusal.format(bank=bank_id)):
                service.handle("add", bank_id, "washer", scorer.images[4:5])
        service.handle("add", bank_id, "washer", scorer.images[:4], {"reset": True})  # what the refusal says
    assert not store.exists("bolt") and store.manifest("washer").version == before.version
    service.handle("build", "bolt", options={})
    assert store.load("bolt", tiny_clip_112.fingerprint).manifest.n_images == 4


def test_an_add_whose_encoder_gives_nan_keeps_nothing(template, tiny_clip_112, tmp_path):
    """An encoder that gives NaN (a broken export) is refused at the add: a lot kept with it built a bank that
    could not be loaded."""
    _, scorer = template

    def broken(images):
        features = tiny_clip_112.encode(images)
        features.patch_embeds[...] = np.nan
        return features

    store = copied_store(template, tmp_path)
    service = BankService(store, tiny_clip_112.fingerprint, broken, tiny_clip_112.encode_text, log=lambda _: None)
    with pytest.raises(RequestError, match="'patch_embeds' holds NaN or infinite values: the encoder output is broken"):
        service.handle("add", "bolt", "washer", scorer.images[:2], {"reset": True})
    assert store.pending_lots() == []


def test_a_build_slot_taken_a_moment_ago_is_named_as_just_started_not_as_bank_question_mark(tmp_path, monkeypatch):
    """The slot's holder writes its bank's name just after it takes the slot: a build refused in that moment said
    "building bank '?' (started ?)"."""
    import fcntl
    import os

    from postprocess import bank_store
    from postprocess.errors import ServerBusy

    monkeypatch.setattr(bank_store, "BUILD_SLOT", tmp_path / "slot")
    fd = os.open(tmp_path / "slot", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # taken, nothing written yet
        with pytest.raises(ServerBusy, match=r"this host is building a bank \(its build has just started\); "):
            with bank_store.build_slot("washer"):
                pass
    finally:
        os.close(fd)
    with bank_store.build_slot("washer"):  # released: free again
        pass
