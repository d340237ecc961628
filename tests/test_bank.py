"""Banks without a server: scoring against a stored bank equals scoring the lot in one process; the store is
atomic, refuses other encoders and bad ids, and keeps the previous bank when a build dies mid-write."""

import json

import numpy as np
import pytest

from postprocess import bank as bank_module
from postprocess.bank import BankError, BankStore, build_bank, image_key, score_with_bank
from postprocess.config import PAClipConfig
from postprocess.errors import RequestError
from postprocess.pipeline import LotScorer
from postprocess.serving import BankService, ScoreService, build_config


@pytest.fixture(scope="module")
def tiny(tiny_clip_112):
    return tiny_clip_112


@pytest.fixture(scope="module")
def lot(demo_lot):
    return demo_lot


@pytest.fixture(scope="module")
def scorer(tiny, lot):
    return LotScorer(tiny, lot, "washer", progress=False)


@pytest.mark.parametrize("mode", ["pad_mpam", "pad", "mutual", "baseline"])
def test_bank_scores_equal_in_process_lot_scores(scorer, tiny, tmp_path, mode):
    cfg = PAClipConfig.for_mode(mode)
    expected = scorer.score(cfg)
    bank, report = build_bank(scorer, cfg, "washer", tiny.fingerprint)
    store = BankStore(tmp_path)
    store.save(bank)
    loaded = store.load("washer", tiny.fingerprint)
    ids = loaded.query_ids([image_key(img) for img in scorer.images])
    assert (ids == np.arange(len(ids))).all()
    result = score_with_bank(loaded, scorer.features, ids)
    assert np.abs(result.maps - expected.maps).max() < 1e-3
    assert np.abs(result.scores - expected.scores).max() < 1e-3
    assert np.abs(report.maps - expected.maps).max() < 1e-3
    # one image at a time gives the same map as the whole lot at once
    single = score_with_bank(loaded, scorer.features.take(slice(4, 5)), ids[4:5])
    assert np.abs(single.maps[0] - result.maps[4]).max() < 1e-5



def test_full_bank_coreset_is_the_one_stage_one_scored_against(scorer, tiny):
    cfg = PAClipConfig(full_coreset_ratio=0.5)
    expected = scorer.score(cfg)
    bank, _ = build_bank(scorer, cfg, "washer", tiny.fingerprint)
    assert bank.manifest["full_bank_entries_per_image"]["1"] < scorer.features.layer_tokens.shape[2]
    ids = bank.query_ids([image_key(img) for img in scorer.images])
    result = score_with_bank(bank, scorer.features, ids)
    assert np.abs(result.maps - expected.maps).max() < 1e-3

def test_new_image_is_scored_against_every_lot_image(scorer, tiny, tmp_path):
    cfg = PAClipConfig()
    bank, _ = build_bank(scorer, cfg, "washer", tiny.fingerprint)
    in_lot = score_with_bank(bank, scorer.features.take(slice(0, 1)), np.array([0]))
    as_new = score_with_bank(bank, scorer.features.take(slice(0, 1)), np.array([-1]))
    # as a stranger, the image finds itself in the full bank: distance 0 lowers its score
    assert as_new.scores[0] < in_lot.scores[0]
    assert bank.query_ids(["not-a-lot-image"]).tolist() == [-1]


def test_store_refuses_other_encoder_unknown_bank_and_bad_ids(scorer, tiny, tmp_path):
    bank, _ = build_bank(scorer, PAClipConfig.for_mode("mutual"), "washer", tiny.fingerprint)
    store = BankStore(tmp_path)
    store.save(bank)
    other = {**tiny.fingerprint, "weights": "sha256:something-else"}
    with pytest.raises(BankError, match="built with encoder .* rebuild"):
        store.load("washer", other)
    store.load("washer", {**tiny.fingerprint, "precision": "fp16"})  # precision alone is the same encoder
    with pytest.raises(BankError, match="unknown bank 'bottle'; banks on this server: washer"):
        store.load("bottle")
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(BankError, match="invalid bank id"):
            store.load(bad)


def test_crash_while_writing_keeps_previous_bank(scorer, tiny, tmp_path, monkeypatch):
    store = BankStore(tmp_path)
    first, _ = build_bank(scorer, PAClipConfig.for_mode("mutual"), "washer", tiny.fingerprint)
    version = store.save(first)
    second, _ = build_bank(scorer, PAClipConfig(), "washer", tiny.fingerprint)

    def dies(path, tensors, metadata=None):
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(bank_module, "_save_tensors", dies)
    with pytest.raises(KeyboardInterrupt):
        store.save(second)
    monkeypatch.undo()
    assert store.current_version("washer") == version
    assert store.load("washer", tiny.fingerprint).manifest["config"]["use_normal_bank"] is False
    store.clean()
    assert not list((tmp_path / "washer").glob(".tmp-*"))
    # a later build replaces it, and only the live and the previous versions stay on disk
    store.save(second)
    store.save(first)
    assert len(list((tmp_path / "washer").glob("v-*"))) == 2
    store.delete("washer")
    assert store.bank_ids() == []


def test_bank_service_lifecycle_and_score_service(scorer, tiny, lot, tmp_path):
    store = BankStore(tmp_path)
    service = BankService(store, tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    with pytest.raises(BankError, match="no images to build from"):
        service.handle("build", "washer")
    with pytest.raises(RequestError, match="resized to 112x112"):
        service.handle("add", "washer", "washer", lot[:, :56, :56])
    assert service.handle("add", "washer", "washer", lot[:5], {"reset": True})["lot_size"] == 5
    with pytest.raises(BankError, match="for category 'washer', not 'bottle'"):
        service.handle("add", "washer", "bottle", lot[5:])
    assert service.handle("add", "washer", "washer", lot[5:])["lot_size"] == len(lot)
    built = service.handle("build", "washer", options={"mode": "pad_mpam"})
    assert built["n_images"] == len(lot) and "image_keys" not in built
    assert not (tmp_path / "washer" / "lot").exists()  # the lot is consumed by the build
    assert [b["bank"] for b in service.handle("list")["banks"]] == ["washer"]

    scores = ScoreService(store, tiny.fingerprint)
    features = tiny.encode(lot[:3])
    request = {"layer_tokens": features.layer_tokens, "patch_embeds": features.patch_embeds,
               "image_embeds": features.image_embeds, "images": lot[:3], "bank": np.array([[b"washer"]] * 3)}
    bad = dict(request, bank=np.array([[b"nope"]] * 3))
    results = scores.score_requests([request, bad, dict(request, images=lot[:3].astype(np.float32))])
    maps, image_scores = results[0]
    expected = scorer.score(PAClipConfig())
    assert np.abs(maps.astype(np.float32) - expected.maps[:3]).max() < 2e-3  # float16 maps
    assert np.abs(image_scores - expected.scores[:3]).max() < 1e-3
    assert isinstance(results[1], BankError) and "unknown bank 'nope'" in str(results[1])
    assert isinstance(results[2], ValueError) and "uint8" in str(results[2])
    service.handle("delete", "washer")
    with pytest.raises(BankError, match="unknown bank"):
        service.handle("info", "washer")


def test_build_options_are_checked():
    assert build_config({"mode": "pad", "alpha": 0.3}).alpha == 0.3
    with pytest.raises(BankError, match="unknown mode"):
        build_config({"mode": "best"})
    with pytest.raises(BankError, match="unknown PA-CLIP settings"):
        build_config({"alpha_": 1})
    with pytest.raises(BankError, match="alpha must lie"):
        build_config({"alpha": 3})


def test_manifest_is_json_and_tensors_safetensors(scorer, tiny, tmp_path):
    store = BankStore(tmp_path)
    bank, _ = build_bank(scorer, PAClipConfig(), "washer", tiny.fingerprint)
    version = store.save(bank)
    folder = tmp_path / "washer" / version
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["encoder"] == tiny.fingerprint and manifest["n_images"] == len(scorer.images)
    assert sorted(p.name for p in folder.iterdir()) == ["bank.safetensors", "manifest.json"]
    with open(folder / "bank.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["full.r1"]["dtype"] == "F16" and header["full.r1"]["shape"][:2] == [4, len(scorer.images)]
