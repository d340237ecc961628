"""The bank manifest: a typed, versioned BankManifest that reads the banks already on a store (format 1, as the code
before it wrote them: tests/fixtures/bank_store_format1; format 6, as commit 01a982a wrote it, with what that code
scored and decided: tests/fixtures/bank_store_format6) and writes them back the same, refusing formats it cannot read
and damaged files."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import BANK_STORAGE_TOL, LOT_IMAGE_SIZE, assert_maps_within_contract
from postprocess.bank import (ABSENT_SETTINGS, FORMAT_VERSION, BankError, BankManifest, build_bank, image_key,
                              score_with_bank)
from postprocess.bank_store import BankStore
from postprocess.config import PAClipConfig
from postprocess.decision import DEFAULT_METHOD, Calibration, Decider
from postprocess.pipeline import LotScorer, encode_images
from postprocess.serving import BankService, ScoreService

FIXTURE = Path(__file__).parent / "fixtures" / "bank_store_format1"
# bank 'washer' as the last code writing format 6 (commit 01a982a) built it, and what that code scored and decided for
# the queries of format6_queries (tests/fixtures/write_bank_store_format6.py made both, run under that commit)
FIXTURE_6 = Path(__file__).parent / "fixtures" / "bank_store_format6"
OLD_RESULTS_6 = Path(__file__).parent / "fixtures" / "bank_store_format6.json"


@pytest.fixture
def old_store(tmp_path):
    """A copy of a store holding bank 'washer' as written before the manifest was a dataclass."""
    shutil.copytree(FIXTURE, tmp_path / "banks")
    store = BankStore(tmp_path / "banks")
    return store, tmp_path / "banks" / "washer" / store.current_version("washer") / "manifest.json"


def test_a_format_1_manifest_reads_into_typed_fields_and_writes_back_the_same_as_the_current_format(old_store):
    store, path = old_store
    text = path.read_text()
    manifest = store.manifest("washer")
    assert json.loads(text)["format_version"] == 1 and manifest.format_version == FORMAT_VERSION
    assert manifest.files is None and manifest.tensors is None  # format 1 recorded no digests
    assert manifest.ood is None  # nor format 2 an out-of-distribution calibration
    # the settings it was built with, not today's defaults (interval fraction 0.3 and re-scoring were the defaults
    # then; float16 entries at every channel, every lot image read, before issue 26)
    assert manifest.config == PAClipConfig(scales=(1, 3), full_coreset_ratio=0.25, interval_fraction=0.3,
                                           rescore_k=20, full_bank_storage="float16", full_bank_neighbours=0,
                                           bank_dim_divisor=1, full_bank_images=0)
    assert (manifest.bank, manifest.category, manifest.grid, manifest.image_size) == ("washer", "washer", (8, 8),
                                                                                      (112, 112))
    assert manifest.n_images == len(manifest.image_keys) == 10 and manifest.interval_k == 3
    assert set(manifest.tau_b) == {1, 3} and all(isinstance(v, float) for v in manifest.tau_b.values())
    assert manifest.full_bank_entries_per_image == {1: 16, 3: 16} and manifest.normal_bank_entries == {1: 64, 3: 64}
    assert manifest.n_augmented == 8 and manifest.cada["strategy"] and manifest.version == path.parent.name
    assert Calibration.from_dict(manifest.decision).threshold == pytest.approx(manifest.decision["threshold"],
                                                                             rel=1e-12)
    # what the info and list actions send is what the file holds; written again, it is the same file but for the
    # format's number and the settings added since, written as what the bank did (ABSENT_SETTINGS, else their defaults)
    stored = json.loads(text)
    added = {k: v for k, v in manifest.config.to_dict().items() if k not in stored["config"]}
    assert set(added) == {"layers", "full_bank_images", "full_bank_neighbours", "bank_dim", "bank_dim_divisor",
                          "bank_projection", "full_bank_storage"}
    assert {k: added[k] for k in ABSENT_SETTINGS} == ABSENT_SETTINGS  # what the bank did, not today's defaults
    want = {**stored, "format_version": FORMAT_VERSION, "config": {**stored["config"], **json.loads(json.dumps(added))}}
    assert manifest.to_dict() == want
    assert list(json.loads(manifest.to_json())) == list(stored)  # the fields in the order they were written
    assert store.verify("washer")["verified"] == "tensors (format 1: no digests recorded)"
    assert BankManifest.from_json(manifest.to_json()) == manifest


def augmented_as_then(image, aug):
    """``cada.apply_augmentation`` as it was when the format-1 fixture was written: a turn's corners took the
    original image's border colour (since mended: the adjusted image's). The fixture's normal bank holds such copies;
    what is compared here is the format, so the bank built now is made of the same copies."""
    from PIL import Image

    from postprocess import cada

    out = cada.apply_augmentation(image, cada.Augmentation(aug.brightness, aug.contrast, None))
    if aug.matrix is None:
        return out
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(out).transform((w, h), Image.AFFINE, aug.matrix, resample=Image.BILINEAR,
                                                     fillcolor=cada._border_colour(image)))


def ranked_as_then(features, text_embeds, tau):
    """How normal images were ranked when the format-1 fixture was written: P(normal), a softmax against the
    defective prompt (since: Eq. 3, the cosine to the normal prompt alone)."""
    from postprocess import kernels

    return 1.0 - kernels.text_defect_probability(features, text_embeds, tau)


def test_a_format_1_bank_scores_like_one_built_now(old_store, tiny_clip_112, lot, monkeypatch):
    import postprocess.pipeline
    from postprocess import kernels

    monkeypatch.setattr(postprocess.pipeline, "apply_augmentation", augmented_as_then)
    monkeypatch.setattr(kernels, "normal_prompt_similarity", ranked_as_then)
    store, _ = old_store
    old = store.load("washer", tiny_clip_112.fingerprint)
    scorer = LotScorer(tiny_clip_112, lot, "washer", progress=False)
    fresh, _ = build_bank(scorer, old.config, "washer", tiny_clip_112.fingerprint)
    # the same lot, the same settings: the same manifest (but for when it was saved)
    got, want = old.manifest.to_dict(), fresh.manifest.to_dict()
    assert {k for k in got if k not in want} == {"version", "built_at"}
    assert {k for k in want if k not in got} == {"ood"}  # a bank of format 1 has no out-of-distribution calibration
    want.pop("ood")
    # the same method as when that bank was written; a calibration now keeps the lot scores it read, an old one
    # without them still reads and decides the same
    then, now = Calibration.from_dict(got.pop("decision")), Calibration.from_dict(want.pop("decision"))
    assert then.method == now.method == DEFAULT_METHOD == "quartile_exponential"
    assert not then.reference and len(now.reference) == len(lot)
    assert then.threshold == pytest.approx(now.threshold, rel=1e-4)
    # torch's encoder records where its positions come from now: the size it was configured at then too
    assert want.pop("encoder") == {**got.pop("encoder"), "positions_from": 112}
    for key in want:
        if key in ("tau_b", "map_range", "lot_scores", "cada"):
            assert json.dumps(got[key]) == json.dumps(want[key]) or \
                np.allclose(*(np.array(list(d.values()) if isinstance(d, dict) else d, dtype=float)
                              for d in (got[key], want[key])), rtol=1e-5), key
        else:
            assert got[key] == want[key], key
    assert sorted(old.tensors()) == sorted(fresh.tensors())
    ids = old.query_ids([image_key(img) for img in lot])
    assert (ids == np.arange(len(lot))).all()
    for features, query in ((scorer.features, ids), (tiny_clip_112.encode(lot[:2, :, ::-1].copy()), [-1, -1])):
        then, now = score_with_bank(old, features, query), score_with_bank(fresh, features, query)
        assert_maps_within_contract(then.maps, now.maps, served=False)
        assert np.abs(then.scores - now.scores).max() < BANK_STORAGE_TOL


def test_legacy_host_fields_in_the_config_are_dropped_on_load(old_store, tiny_clip_112):
    store, path = old_store
    raw = json.loads(path.read_text())
    raw["config"]["memory_budget_mb"] = 256  # banks built before host settings left PAClipConfig
    path.write_text(json.dumps(raw, indent=1))
    assert store.load("washer", tiny_clip_112.fingerprint).config == PAClipConfig(
        scales=(1, 3), full_coreset_ratio=0.25, interval_fraction=0.3, rescore_k=20, **ABSENT_SETTINGS)
    assert "memory_budget_mb" not in store.manifest("washer").to_dict()["config"]


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, None, "1", True, str(FORMAT_VERSION)])
def test_formats_this_code_does_not_read_are_refused_with_what_to_do(old_store, tiny_clip_112, version):
    store, path = old_store
    raw = json.loads(path.read_text())
    raw["format_version"] = version
    path.write_text(json.dumps(raw))
    for read in (lambda: store.load("washer", tiny_clip_112.fingerprint), lambda: store.manifest("washer")):
        # a newer server's bank: serve it there or rebuild; any other value (a "7" among them) named as it is
        expected = (f"has format {version}, newer than this server reads \\({FORMAT_VERSION}\\): serve it with the "
                    "newer server that wrote it, or rebuild it" if version == FORMAT_VERSION + 1 else
                    f"has format {re.escape(repr(version))}, not one this server reads \\(up to {FORMAT_VERSION}\\)"
                    ": the manifest is damaged; rebuild it")
        with pytest.raises(BankError, match=f"bank 'washer' {expected}"):
            read()
    # the bank action 'list' still answers, naming the bank it cannot read and why
    service = BankService(store, tiny_clip_112.fingerprint, encode_images=None)
    (listed,) = service.handle("list")["banks"]
    assert listed["bank"] == "washer" and "rebuild it" in listed["error"]


def test_damaged_manifests_are_refused_as_damage_not_guessed(old_store):
    store, path = old_store
    text = path.read_text()
    path.write_text(text.replace('"bank": "washer",', '"bank": "washer",\n "bank": "other",', 1))
    with pytest.raises(BankError, match="bank 'washer' version v-.* is damaged .*duplicate key 'bank'"):
        store.manifest("washer")
    raw = json.loads(text)
    for change in ({"surprise": 1}, {"tau_b": None}):
        damaged = {k: v for k, v in {**raw, **change}.items() if v is not None}
        path.write_text(json.dumps(damaged))
        with pytest.raises(BankError, match=r"is damaged .*(unknown fields \['surprise'\] and lacks \[\]|unknown "
                                             r"fields \[\] and lacks \['tau_b'\])"):
            store.manifest("washer")
    path.write_text("{ not json")
    with pytest.raises(BankError, match="is damaged .*manifest.json"):
        store.manifest("washer")


def test_a_new_manifest_round_trips_and_its_optional_fields_stay_out_until_set(tiny_clip_112, lot, tmp_path):
    scorer = LotScorer(tiny_clip_112, lot[:4], "washer", progress=False)
    bank, _ = build_bank(scorer, PAClipConfig.for_mode("mutual"), "washer", tiny_clip_112.fingerprint)
    written = bank.manifest.to_dict()
    assert list(written)[0] == "format_version" and written["format_version"] == FORMAT_VERSION
    assert not {"cada", "n_augmented", "version", "built_at"} & set(written)  # no augmentation, not saved yet
    assert written == json.loads(bank.manifest.to_json())
    assert BankManifest.from_json(bank.manifest.to_json()) == bank.manifest
    version = BankStore(tmp_path).save(bank)
    assert bank.manifest.version == version and bank.manifest.built_at
    assert BankStore(tmp_path).manifest("washer") == bank.manifest


def format6_queries(tmp_path: Path) -> np.ndarray:
    """The queries the format-6 fixture's results are for, made again as the writer made them: 6 new demo washers (2
    defective), the bank's lot's first 2 sent again, the first new one darkened, one of noise (uint8 [10,112,112,3])."""
    from client.demo_lot import write_demo_lot
    from client.infer import load_image

    def demo(n, n_defective, seed):
        folder = write_demo_lot(tmp_path / f"demo-{seed}", n_images=n, n_defective=n_defective, size=128, seed=seed)
        return np.stack([load_image(p, LOT_IMAGE_SIZE)[1] for p in sorted(folder.glob("*.png"))])

    lot, new = demo(12, 2, 7), demo(6, 2, 11)
    dark = (new[:1].astype(np.float32) * 0.3).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, LOT_IMAGE_SIZE, LOT_IMAGE_SIZE, 3), dtype=np.uint8)
    return np.concatenate([new, lot[:2], dark, noise])


def test_a_format_6_bank_written_by_the_old_code_scores_decides_and_grows_as_it_did(tmp_path, tiny_clip_112):
    shutil.copytree(FIXTURE_6, tmp_path / "banks")
    old = json.loads(OLD_RESULTS_6.read_text())
    store = BankStore(tmp_path / "banks")
    version = store.current_version("washer")
    path = tmp_path / "banks" / "washer" / version
    raw_text = (path / "manifest.json").read_text()
    assert version == old["version"] and not (tmp_path / "banks" / "washer" / "monitor").exists()
    # read as today's format; the manifest's own digest (format 6) is checked, and so are the files' and tensors'
    manifest = store.manifest("washer")
    assert json.loads(raw_text)["format_version"] == old["format_version"] == 6
    assert manifest.format_version == FORMAT_VERSION
    assert (path / "manifest.sha256").exists() and manifest.files and manifest.tensors and manifest.ood
    assert manifest.accept_level is None and manifest.n_images == old["n_images"] == 12  # format 7's field: unset
    assert store.verify("washer")["verified"] == "manifest, digests and tensors"

    def encode(images):
        return encode_images(tiny_clip_112, images, 8)

    service = BankService(store, tiny_clip_112.fingerprint, encode, tiny_clip_112.encode_text)
    assert service.handle("verify", "washer")["banks"][0]["ok"]
    info = service.handle("info", "washer")
    assert info["format_version"] == FORMAT_VERSION and info.get("accept_level") is None

    # scores, calibrated scores and decisions (the default false-alarm rate's and another's) as the old code's
    queries = format6_queries(tmp_path)
    features = encode(queries)
    maps, scores = ScoreService(store, tiny_clip_112.fingerprint).score(
        "washer", features.layer_tokens, features.patch_embeds, features.image_embeds, queries)
    np.testing.assert_allclose(scores, old["scores"], rtol=0, atol=1e-5)
    for rate, key, threshold in ((None, "decisions", "threshold"),
                                 (old["other_false_alarm_rate"], "decisions_other", "threshold_other")):
        decider = Decider.for_bank(info, rate)
        assert decider.raw_threshold == pytest.approx(old[threshold], abs=1e-5), key
        got = [decider.decide(float(s), m, img) for s, m, img in zip(scores, maps, queries)]
        assert [d["decision"] for d in got] == [d["decision"] for d in old[key]], key
        np.testing.assert_allclose([d["calibrated"] for d in got], [d["calibrated"] for d in old[key]], rtol=0,
                                   atol=1e-5, err_msg=key)
    # the queries span the decisions: normal, anomalous at the looser rate, out of distribution (the dark, the noise)
    assert {d["decision"] for d in old["decisions_other"]} == {"normal", "anomalous", "out_of_distribution"}

    # growth (the update action) with today's code: a new version of today's format, its accept_level fixed at the
    # first update (the lot's 75th-percentile reference as built); the dark part is left out as out of distribution
    grow = queries[[0, 1, 2, 3, 4, 5, 8]]
    service.handle("add", "washer", "washer", grow, {"reset": True})
    out = service.handle("update", "washer")
    report = out["update"]
    assert report["written"] and report["scored"] == len(grow)
    assert report["folded_in"] >= 1 and report["folded_in"] + len(report["left_out"]) == len(grow)
    assert any(i["index"] == 6 and "out of distribution" in i["why"] for i in report["left_out"])
    assert out["n_images"] == 12 + report["folded_in"] and out["format_version"] == FORMAT_VERSION
    grown_version = store.current_version("washer")
    assert grown_version != version and out["version"] == grown_version
    assert isinstance(out["accept_level"], float) and 0 < out["accept_level"] < old["threshold"]
    written = json.loads((tmp_path / "banks" / "washer" / grown_version / "manifest.json").read_text())
    assert written["format_version"] == FORMAT_VERSION and written["accept_level"] == out["accept_level"]
    assert (path / "manifest.json").read_text() == raw_text  # the old version stays as it was written
    # today's code verifies, loads and scores the version it wrote
    assert store.verify("washer")["verified"] == "manifest, digests and tensors"
    reopened = BankStore(tmp_path / "banks")
    grown = reopened.load("washer", tiny_clip_112.fingerprint)
    assert grown.manifest.version == grown_version and grown.manifest.accept_level == out["accept_level"]
    _, after = ScoreService(reopened, tiny_clip_112.fingerprint).score(
        "washer", features.layer_tokens, features.patch_embeds, features.image_embeds, queries)
    assert np.isfinite(after).all() and len(after) == len(queries)
