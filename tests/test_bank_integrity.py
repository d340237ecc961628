"""Banks you can trust on disk: every damage an independent probe made to a stored bank (issue 25) is a clear refusal
that names the bank and what to do, never a score and never an internal error; the store never leaves itself."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from postprocess.bank import BankDamaged, BankError, build_bank
from postprocess.bank_store import BankStore
from postprocess.config import PAClipConfig
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
    manifest = json.loads((path / "manifest.json").read_text())
    for key, value in changes.items():
        target, *rest = key.split("__")
        if rest:
            manifest[target][rest[0]] = value
        else:
            manifest[target] = value
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))


def without_digests(path: Path) -> None:
    """What a format-1 bank looks like: no digests, no tensor record (damage must then show in the tensors)."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("files"), manifest.pop("tensors")
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))


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
    ("manifest scales [7]", lambda r: edit_manifest(version_dir(r), config__scales=[7]), "scales"),
    ("thresholds at 1e30", lambda r: edit_manifest(version_dir(r), tau_b={"1": 1e30, "3": 1e30, "5": 1e30}),
     "tau_b holds"),
    ("decision threshold at 1e30", lambda r: edit_manifest(version_dir(r), decision__centre=1e30), "decision"),
    ("n_images 0", lambda r: edit_manifest(version_dir(r), n_images=0), "n_images 0"),
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
    ("manifest of another bank", lambda r: edit_manifest(version_dir(r), bank="other"),
     "its manifest is for bank 'other'"),
    ("a tensor's recorded shape", lambda r: edit_manifest(version_dir(r), tensors__lot_map_scores={
        "shape": [3], "dtype": "F32"}), "its manifest records F32 [3]"),
    ("normal entries miscounted", lambda r: edit_manifest(version_dir(r), normal_bank_entries={"1": 5, "3": 5, "5": 5}),
     "normal"),
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
    assert checked["ok"] and checked["verified"] == "digests and tensors", checked
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
