"""Banks without a server: scoring against a stored bank equals scoring the lot in one process; the store is
atomic, refuses other encoders and bad ids, and keeps the previous bank when a build dies mid-write."""

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from postprocess import bank_store as store_module
from postprocess.bank import BankError, build_bank, check_tensors, image_key, score_with_bank
from postprocess.bank_store import BankStore, check_bank_id
from postprocess.config import FULL_BANK, PAClipConfig
from conftest import BANK_STORAGE_TOL, assert_maps_within_contract, storage_tolerance, write_manifest
from postprocess import kernels as K
from postprocess.errors import RequestError
from postprocess.host import HostSettings
from postprocess.pipeline import LotScorer
from postprocess.serving import BankService, ScoreService, build_config


@pytest.fixture(scope="module")
def tiny(tiny_clip_112):
    return tiny_clip_112


@pytest.fixture(scope="module")
def scorer(tiny, lot):
    return LotScorer(tiny, lot, "washer", progress=False)


SMALL_BANKS = {"rescore": {"rescore_k": 3}, "pca": {"bank_dim": 12, "layers": (1, 3)},
               "random": {"bank_dim": 10, "bank_projection": "random"},
               "sampled": {"full_bank_images": 4, "full_coreset_ratio": 0.5, "rescore_k": 3}}


@pytest.mark.parametrize("mode", ["pad_mpam", "pad", "mutual", "baseline", "pad_mpam+rescore", "pad_mpam+pca",
                                  "pad+random", "pad_mpam+sampled", "mutual+sampled"])
def test_bank_scores_equal_in_process_lot_scores(scorer, tiny, tmp_path, mode):
    mode, _, extra = mode.partition("+")
    cfg = PAClipConfig.for_mode(mode, **SMALL_BANKS.get(extra, {}))
    expected = scorer.score(cfg)
    bank, report = build_bank(scorer, cfg, "washer", tiny.fingerprint)
    store = BankStore(tmp_path)
    store.save(bank)
    loaded = store.load("washer", tiny.fingerprint)
    ids = loaded.query_ids([image_key(img) for img in scorer.images])
    assert (ids == np.arange(len(ids))).all()
    result = score_with_bank(loaded, scorer.features, ids)
    tol = storage_tolerance(scorer.features.layer_tokens.shape[-1], cfg)
    assert_maps_within_contract(result.maps, expected.maps, served=False, storage_tol=tol)
    assert np.abs(result.scores - expected.scores).max() < tol
    assert_maps_within_contract(report.maps, expected.maps, served=False, storage_tol=tol)
    # one image at a time gives the same map as the whole lot at once
    single = score_with_bank(loaded, scorer.features.take(slice(4, 5)), ids[4:5])
    assert np.abs(single.maps[0] - result.maps[4]).max() < 1e-6


def test_a_projected_bank_stores_its_search_space_and_is_smaller(scorer, tiny, tmp_path):
    """bank_dim and layers shrink what is stored (entries of bank_dim values, only the scoring taps) and the bank
    keeps its bases, so that a new image is projected as the lot was."""
    full = build_bank(scorer, PAClipConfig(bank_dim_divisor=1), "washer", tiny.fingerprint)[0]
    small = build_bank(scorer, PAClipConfig(bank_dim=8, layers=(3,)), "washer", tiny.fingerprint)[0]
    n_taps, channels = scorer.features.layer_tokens.shape[1], scorer.features.layer_tokens.shape[3]
    for r in (1, 3, 5):
        assert full.full[r].shape[0] == n_taps and full.full[r].shape[-1] == channels and not full.bases
        assert small.full[r].shape[0] == 1 and small.full[r].shape[-1] == 8 and small.normal[r].shape[-1] == 8
        assert small.bases[r].shape == (1, channels, 8)
    assert small.nbytes * 4 < full.nbytes
    store = BankStore(tmp_path)
    store.save(small)
    loaded = store.load("washer", tiny.fingerprint)
    assert loaded.space.layers == (3,) and set(loaded.bases) == {1, 3, 5}
    with pytest.raises(RequestError, match="not below the encoder's feature width"):
        build_bank(scorer, PAClipConfig(bank_dim=channels), "washer", tiny.fingerprint)
    with pytest.raises(RequestError, match="taps the encoder does not have"):
        build_bank(scorer, PAClipConfig(layers=(0, n_taps)), "washer", tiny.fingerprint)


def test_a_lot_larger_than_the_full_bank_keeps_a_sample_and_scores_against_it(scorer, tiny, tmp_path):
    """full_bank_images: a lot of 10 keeps 4 of its images in the full bank (a seeded sample, recorded), each lot
    image is scored against those 4 (3 when it is one of them) and a new image against the same 4, with one k."""
    cfg = PAClipConfig(full_bank_images=4)
    bank, _ = build_bank(scorer, cfg, "washer", tiny.fingerprint)
    sample = K.to_numpy(bank.full_ids)
    assert len(sample) == 4 and list(sample) == sorted(set(sample.tolist()))
    assert all(v.shape[1] == 4 for v in bank.full.values()) and bank.manifest.interval_k == 1  # round(0.3 * 4)
    store = BankStore(tmp_path)
    store.save(bank)
    loaded = store.load("washer", tiny.fingerprint)
    np.testing.assert_array_equal(loaded.full_ids, sample)
    # a bank of the whole lot scores differently; a lot of 5 keeps every image (nothing to sample)
    whole = build_bank(scorer, PAClipConfig(), "washer", tiny.fingerprint)[0]
    assert whole.full_ids is None and next(iter(whole.full.values())).shape[1] == len(scorer.images)
    small = LotScorer(tiny, scorer.images[:5], "washer", progress=False, features=scorer.features.take(slice(0, 5)))
    assert build_bank(small, cfg, "washer", tiny.fingerprint)[0].full_ids is None
    # a sample that is not the one the settings draw is damage, not a bank
    tensors = {**loaded.tensors(), "full_ids": (sample + 1) % len(scorer.images)}
    with pytest.raises(BankError, match="not the sample"):
        check_tensors(loaded.manifest, tensors, "washer")


def test_a_sampled_lots_k_never_reaches_an_images_own_excluded_distance(scorer, tiny):
    """k sized by a lot of sample + 1 could be the whole sample, where an image of the sample sees one image fewer:
    its own, excluded as infinitely far, was averaged in and its score and map came out NaN."""
    from postprocess.pa_clip import lot_interval_k

    for cfg in (PAClipConfig(full_bank_images=2, k_min=2), PAClipConfig(full_bank_images=4, interval_fraction=1.0)):
        assert lot_interval_k(len(scorer.images), cfg) == cfg.full_bank_images - 1
        bank, report = build_bank(scorer, cfg, "washer", tiny.fingerprint)
        assert np.isfinite(np.asarray(report.scores)).all()
        result = score_with_bank(bank, scorer.features, bank.query_ids([image_key(i) for i in scorer.images]))
        assert np.isfinite(K.to_numpy(result.scores)).all() and np.isfinite(K.to_numpy(result.maps)).all()
    with pytest.raises(ValueError, match="full_bank_images must be 0 .* or at least 2"):
        PAClipConfig(full_bank_images=1)


def test_a_sampled_lot_sizes_its_interval_and_normal_set_by_the_sample(scorer):
    """Above full_bank_images the banks stop growing with the lot: the interval's k and the normal set are those of
    a lot of sample + 1 (what a sampled image sees), while the normal images are still chosen from the whole lot."""
    from postprocess.pa_clip import lot_interval_k, normal_count

    wide = PAClipConfig(normal_fraction=0.5, interval_fraction=0.5)
    sampled = wide.replace(full_bank_images=4)
    assert normal_count(10, wide) == 5 and normal_count(10, sampled) == 3  # ceil(0.5 * 5)
    assert lot_interval_k(10, wide) == 4 and lot_interval_k(10, sampled) == 2  # round(0.5 * 9), round(0.5 * 4)
    assert normal_count(5, sampled) == 3 and normal_count(1, wide.replace(min_normal=2)) == 1  # never more than the lot
    state = scorer.state(sampled)
    assert len(state.normal_indices) == 3 and len(scorer.state(wide).normal_indices) == 5
    assert set(state.normal_indices.tolist()) - set(K.to_numpy(state.full_references).tolist())  # chosen from all


def test_an_int8_full_bank_scores_like_the_float16_one(scorer, tiny, tmp_path):
    """int8 entries with a scale per entry: a quarter of float32's bytes, half of float16's, and the same maps
    within the quantisation's reach (|q - x| <= scale / 2 per value: about 0.4% of the entry's largest value)."""
    cfg = PAClipConfig(bank_dim=16, full_bank_storage="float16")
    half = build_bank(scorer, cfg, "washer", tiny.fingerprint)[0]
    quarter = build_bank(scorer, cfg.replace(full_bank_storage="int8"), "washer", tiny.fingerprint)[0]
    for r in (1, 3, 5):
        assert quarter.full[r].dtype == np.int8 and quarter.full_scale[r].shape == quarter.full[r].shape[:-1]
        assert quarter.full[r].nbytes * 2 == half.full[r].nbytes
    store = BankStore(tmp_path)
    store.save(quarter)
    loaded = store.load("washer", tiny.fingerprint)
    assert store.sizes("washer")["bytes_in_memory"] == loaded.nbytes  # int8 counted at a byte each
    ids = loaded.query_ids([image_key(img) for img in scorer.images])
    got = score_with_bank(loaded, scorer.features, ids)
    want = score_with_bank(half, scorer.features, ids)
    assert np.abs(got.maps - want.maps).max() < 5e-3
    assert not np.array_equal(got.maps, want.maps)


def test_a_bank_reads_its_image_descriptors_once_and_scores_as_when_every_request_read_them(scorer, tiny,
                                                                                              monkeypatch):
    """With neighbours (the default: each new image against its 8 nearest bank images), the bank images' mean
    entries are read once per bank, not from every entry again per request, and choose the same neighbours."""
    from postprocess.pa_clip import full_scores_against

    bank = build_bank(scorer, PAClipConfig(), "washer", tiny.fingerprint)[0]
    n_bank = bank.full[1].shape[1]
    assert n_bank - 1 > bank.config.full_bank_neighbours  # the neighbours, not the whole bank, are searched
    queries = scorer.features.take(slice(0, 3))
    ids = np.full(3, -1)
    read = []
    real = K.image_descriptors
    monkeypatch.setattr(K, "image_descriptors", lambda e, *a, **kw: read.append(e.shape[0]) or real(e, *a, **kw))
    first = score_with_bank(bank, queries, ids)
    second = score_with_bank(bank, queries, ids)
    per_request = len(bank.space.layers) * len(bank.config.scales)
    assert read.count(n_bank) == per_request  # the first request's, kept
    assert read.count(3) == 2 * per_request  # the queries' own, every request
    np.testing.assert_array_equal(first.maps, second.maps)
    space, bank_ids, k = bank.space, K.to_numpy(bank.full_bank_ids), bank.manifest.interval_k
    for r in bank.config.scales:
        args = (queries, bank.full[r], bank_ids, ids, k, r, bank.config, space)
        np.testing.assert_array_equal(full_scores_against(*args, bank_scales=bank.full_scale.get(r)),
                                      full_scores_against(*args, bank_scales=bank.full_scale.get(r),
                                                          bank_descriptors=bank.full_descriptors(r)))


def test_a_lot_scored_for_a_float16_bank_is_scored_again_for_an_int8_one(scorer, tiny, lot):
    """The lot stage scores the lot against its entries as the bank stores them, so a scorer that served one
    storage does not hand its lot scores to the other (a stage-1 result shared across storages was stale)."""
    cfg = PAClipConfig(bank_dim=16, full_bank_storage="float16")
    int8 = cfg.replace(full_bank_storage="int8")
    shared = LotScorer(tiny, lot, "washer", progress=False, features=scorer.features)
    half = shared.state(cfg).full_scores
    reused = shared.state(int8).full_scores
    fresh = LotScorer(tiny, lot, "washer", progress=False, features=scorer.features).state(int8).full_scores
    for r in cfg.scales:
        np.testing.assert_array_equal(reused[r], fresh[r])
        assert not np.array_equal(half[r], fresh[r])


def test_the_bank_stores_the_entries_the_lot_was_scored_against_made_once(scorer, tiny, monkeypatch):
    """The lot stage makes the full bank's entries (projected, coreset, int8) to score the lot against; the bank
    stores those, not a second making of them."""
    for cfg in (PAClipConfig(), PAClipConfig(full_bank_storage="float16", bank_dim=16)):
        state = scorer.state(cfg)
        made = []
        real = K.quantize_rows
        monkeypatch.setattr(K, "quantize_rows", lambda values: made.append(values.shape) or real(values))
        bank = build_bank(scorer, cfg, "washer", tiny.fingerprint)[0]
        monkeypatch.setattr(K, "quantize_rows", real)
        assert made == []
        for r in cfg.scales:
            entries, scale = state.full_entries[r]
            np.testing.assert_array_equal(bank.full[r], entries)
            assert bank.full[r].dtype == (np.int8 if cfg.full_bank_storage == "int8" else np.float16)
            if scale is not None:
                np.testing.assert_array_equal(bank.full_scale[r], scale)


def test_a_non_square_lot_builds_a_bank_of_its_size_that_refuses_other_sizes(tiny, lot, tmp_path):
    wide = np.ascontiguousarray(lot[:, 28:84])  # 56 x 112: a 4 x 8 patch grid
    scorer = LotScorer(tiny, wide, "washer", progress=False)
    cfg = PAClipConfig(rescore_k=3)
    expected = scorer.score(cfg)
    assert expected.maps.shape == (len(wide), 56, 112) and scorer.features.grid == (4, 8)
    bank, _ = build_bank(scorer, cfg, "washer", tiny.fingerprint)
    assert bank.manifest.image_size == (56, 112) and bank.manifest.grid == (4, 8)
    store = BankStore(tmp_path)
    store.save(bank)
    loaded = store.load("washer", tiny.fingerprint)
    ids = loaded.query_ids([image_key(img) for img in wide])
    result = score_with_bank(loaded, scorer.features, ids)
    assert_maps_within_contract(result.maps, expected.maps, served=False)
    assert np.abs(result.scores - expected.scores).max() < BANK_STORAGE_TOL
    # a new image is scored against the whole lot: its score moves toward its 3 nearest lot images' map scores
    new = score_with_bank(loaded, tiny.encode(wide[:1, :, ::-1].copy()), [-1])
    assert new.scores[0] != new.map_scores[0]
    with pytest.raises(BankError, match=r"built on a \(4, 8\) grid"):
        score_with_bank(loaded, tiny.encode(lot[:1]), [-1])
    service = ScoreService(store, tiny.fingerprint)
    square = tiny.encode(lot[:1])
    with pytest.raises(BankError, match="scores 56x112 images"):
        service.score("washer", *square.outputs().values(), lot[:1])


def test_interval_k_of_the_bank_is_the_lots(scorer, tiny):
    """k = round(fraction * (N - 1)) over the N - 1 other lot images: with 0.3, 3 for this lot of 10 (2 for one
    image fewer); with the default 0.05, at least k_min = 1."""
    n = len(scorer.images)
    assert n == 10
    bank, _ = build_bank(scorer, PAClipConfig.for_mode("mutual", interval_fraction=0.3), "washer", tiny.fingerprint)
    assert bank.manifest.interval_k == 3 == K.interval_k(n, 0.3, 1, 64) != K.interval_k(n - 1, 0.3, 1, 64)
    assert build_bank(scorer, PAClipConfig.for_mode("mutual"), "washer", tiny.fingerprint)[0].manifest.interval_k == 1


def test_a_normal_image_scored_alone_never_matches_its_own_normal_bank_entries(scorer, tiny):
    cfg = PAClipConfig()
    expected = scorer.score(cfg)
    bank, _ = build_bank(scorer, cfg, "washer", tiny.fingerprint)
    ids = bank.query_ids([image_key(img) for img in scorer.images])
    normal = scorer.state(cfg).normal_indices
    assert len(normal) >= 2
    for i in normal:  # these images (and their augmentations) are in the normal bank
        alone = score_with_bank(bank, scorer.features.take(slice(i, i + 1)), ids[i:i + 1])
        assert_maps_within_contract(alone.maps[0], expected.maps[i], served=False)
        # as a stranger (id -1) it would find its own patches: the exclusion is what makes the two equal
        stranger = score_with_bank(bank, scorer.features.take(slice(i, i + 1)), np.array([-1]))
        assert np.abs(stranger.maps[0] - expected.maps[i]).max() > 10 * BANK_STORAGE_TOL



def test_full_bank_coreset_is_the_one_stage_one_scored_against(scorer, tiny):
    cfg = PAClipConfig(full_coreset_ratio=0.5)
    expected = scorer.score(cfg)
    bank, _ = build_bank(scorer, cfg, "washer", tiny.fingerprint)
    assert bank.manifest.full_bank_entries_per_image[1] < scorer.features.layer_tokens.shape[2]
    ids = bank.query_ids([image_key(img) for img in scorer.images])
    result = score_with_bank(bank, scorer.features, ids)
    assert_maps_within_contract(result.maps, expected.maps, served=False)


def test_host_settings_are_not_part_of_a_bank(scorer, tiny, lot, tmp_path):
    """A bank built with one memory budget scores the same under another; the manifest holds no host setting."""
    small = LotScorer(tiny, lot, "washer", features=scorer.features, progress=False,
                      host=HostSettings(memory_budget_mb=1))
    bank, _ = build_bank(small, PAClipConfig(), "washer", tiny.fingerprint)
    assert not set(bank.manifest.to_dict()["config"]) & set(HostSettings.__dataclass_fields__)
    ids = bank.query_ids([image_key(img) for img in lot])
    tight = score_with_bank(bank, scorer.features, ids, host=HostSettings(memory_budget_mb=1))
    roomy = score_with_bank(bank, scorer.features, ids, host=HostSettings(memory_budget_mb=4096))
    np.testing.assert_allclose(tight.maps, roomy.maps, atol=1e-6)
    with pytest.raises(BankError, match="memory_budget_mb is a setting of the host"):
        build_config({"memory_budget_mb": 64})
    # a bank written before host settings left the configuration still loads
    store = BankStore(tmp_path)
    store.save(bank)
    version = store.current_version("washer")
    manifest_path = tmp_path / "washer" / version / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["memory_budget_mb"] = 256
    write_manifest(manifest_path, json.dumps(manifest))
    assert store.load("washer", tiny.fingerprint).config == PAClipConfig()


def test_host_settings_from_model_parameters():
    host = HostSettings.from_parameters({"memory_budget_mb": "64", "array_module": "numpy", "bank_cache_mb": ""})
    assert host == HostSettings(memory_budget_mb=64, array_module="numpy")
    assert host.budget_bytes == 64 << 20
    with pytest.raises(ValueError, match="memory_budget_mb must be an integer"):
        HostSettings.from_parameters({"memory_budget_mb": "lots"})
    with pytest.raises(ValueError, match="array_module must be one of"):
        HostSettings.from_parameters({"array_module": "torch"})
    with pytest.raises(ValueError, match=r"build_nice must be in \[0, 19\]"):
        HostSettings.from_parameters({"build_nice": "-5"})
    with pytest.raises(ValueError, match="cpu_matmul must be one of float32, bfloat16"):
        HostSettings.from_parameters({"cpu_matmul": "int4"})
    assert HostSettings.from_parameters({}).cpu_matmul == "float32"  # the exact products unless a host asks


def test_a_bfloat16_host_refuses_to_start_where_it_cannot_multiply_in_bfloat16(monkeypatch):
    from postprocess import kernels as K

    monkeypatch.setattr(K, "bfloat16_available", lambda: False)
    with pytest.raises(ValueError, match="cpu_matmul=bfloat16 needs torch"):
        HostSettings(cpu_matmul="bfloat16")


def test_lower_priority_reaches_every_thread_of_the_process():
    """The bank model lowers its own priority after NumPy's BLAS threads exist: each of them must be lowered too."""
    import subprocess
    import sys

    script = ("import os, threading, numpy as np\n"
              "from postprocess.host import lower_priority\n"
              "np.ones((256, 256)) @ np.ones((256, 256))\n"  # BLAS threads up
              "changed = lower_priority(5)\n"
              # a thread started later reads its own priority while it runs (after a join its task may still be
              # listed for a moment, then gone: threads that ended meanwhile are skipped)
              "later = []\n"
              "t = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, "
              "threading.get_native_id()))); t.start(); t.join()\n"
              "nice = []\n"
              "for tid in os.listdir('/proc/self/task'):\n"
              "    try:\n"
              "        nice.append(os.getpriority(os.PRIO_PROCESS, int(tid)))\n"
              "    except ProcessLookupError:\n"
              "        pass\n"
              "print(changed, *later, *nice)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    changed, nice = int(out[0]), [int(n) for n in out[1:]]
    assert 1 <= changed <= len(nice) and set(nice) == {min(19, base + 5)}  # a thread started later inherits it


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
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 200, "washer\n", "probe-nl\n"):
        with pytest.raises(BankError, match="invalid bank id"):
            store.load(bad)


def test_reset_must_be_a_boolean(tiny, lot, tmp_path):
    service = BankService(BankStore(tmp_path), tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    assert service.handle("add", "washer", "washer", lot[:3], {"reset": True})["lot_size"] == 3
    for value in ("no", 1, None, "false"):
        with pytest.raises(BankError, match="'reset' must be true or false"):
            service.handle("add", "washer", "washer", lot[3:5], {"reset": value})
    assert service.handle("add", "washer", "washer", lot[3:5], {"reset": False})["lot_size"] == 5  # kept
    with pytest.raises(BankError, match=r"add takes the options 'reset' and 'lot', got \['rest'\]"):
        service.handle("add", "washer", "washer", lot[3:5], {"rest": True})  # a misspelt reset: the lot grew on
    assert service.store.lot_size("washer") == 5


def test_options_nested_past_reading_and_echoed_values_past_grpcs_header_are_refused_with_a_bounded_reason():
    """Options nested 5,000 deep were an internal error (RecursionError); a 20,000-character bank id, echoed in its
    refusal, made a message gRPC could not carry (RESOURCE_EXHAUSTED, the reason lost)."""
    from postprocess.serving import MAX_MESSAGE_CHARS, describe_failure, parse_options

    for text in ("[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000):
        with pytest.raises(RequestError, match="nested too deeply"):
            parse_options(text)
    with pytest.raises(BankError) as refused:
        check_bank_id("x" * 20000)
    message, internal = describe_failure("pa_clip_bank", refused.value, log_error=None)
    assert not internal and message.startswith("pa_clip_bank: invalid bank id 'xxx")
    assert len(message) < MAX_MESSAGE_CHARS + 100 and message.endswith("more characters)")


def test_crash_while_writing_keeps_previous_bank(scorer, tiny, tmp_path, monkeypatch):
    store = BankStore(tmp_path)
    first, _ = build_bank(scorer, PAClipConfig.for_mode("mutual"), "washer", tiny.fingerprint)
    version = store.save(first)
    second, _ = build_bank(scorer, PAClipConfig(), "washer", tiny.fingerprint)

    def dies(path, tensors, metadata=None):
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(store_module, "_save_tensors", dies)
    with pytest.raises(KeyboardInterrupt):
        store.save(second)
    monkeypatch.undo()
    assert store.current_version("washer") == version
    assert store.load("washer", tiny.fingerprint).manifest.config.use_normal_bank is False
    store.clean()
    assert not list((tmp_path / "washer").glob(".tmp-*"))
    # a later build replaces it, and only the live and the previous versions stay on disk
    store.save(second)
    store.save(first)
    assert len(list((tmp_path / "washer").glob("v-*"))) == 2
    store.delete("washer")
    assert store.bank_ids() == []


def test_current_is_replaced_by_rename_never_rewritten_in_place(scorer, tiny, tmp_path, monkeypatch):
    """The commit of a build: CURRENT must be a new file renamed over the old one, so that a reader (or a crash)
    sees the old name or the new one, never an empty or half-written file."""
    store = BankStore(tmp_path)
    bank, _ = build_bank(scorer, PAClipConfig.for_mode("mutual"), "washer", tiny.fingerprint)
    first = store.save(bank)
    current = tmp_path / "washer" / "CURRENT"
    before = os.stat(current).st_ino
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(os.path.basename(b)), real_replace(a, b))[1])
    second = store.save(bank)
    assert "CURRENT" in renamed and os.stat(current).st_ino != before
    assert store.current_version("washer") == second != first

    # a crash while the new name is being written (the bank folder itself is complete): the previous bank stays live
    real_fsync = os.fsync

    def dies_on_current(fd):
        if re.search(r"/\.tmp-[^/]*-CURRENT-[^/]*$", os.readlink(f"/proc/self/fd/{fd}")):
            raise KeyboardInterrupt("killed while committing")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", dies_on_current)
    with pytest.raises(KeyboardInterrupt):
        store.save(bank)
    monkeypatch.undo()
    assert store.current_version("washer") == second
    assert store.load("washer", tiny.fingerprint).manifest.version == second


def test_score_service_sees_rebuilds_and_deletes_and_keeps_banks_within_its_byte_budget(scorer, tiny, lot, tmp_path):
    store = BankStore(tmp_path)
    mutual, _ = build_bank(scorer, PAClipConfig.for_mode("mutual"), "washer", tiny.fingerprint)
    full, _ = build_bank(scorer, PAClipConfig(), "washer", tiny.fingerprint)
    store.save(mutual)
    service = ScoreService(store, tiny.fingerprint, HostSettings(array_module="numpy"))
    features = scorer.features.take(slice(0, 3))
    outputs = (features.layer_tokens, features.patch_embeds, features.image_embeds, lot[:3])
    first, _ = service.score("washer", *outputs)
    store.save(full)  # a rebuild commits a new version: the next request must see it
    maps, _ = service.score("washer", *outputs)
    assert_maps_within_contract(maps, scorer.score(PAClipConfig()).maps[:3])
    assert np.abs(maps.astype(np.float32) - first).max() > 1e-3
    store.delete("washer")
    with pytest.raises(BankError, match="unknown bank 'washer'"):
        service.score("washer", *outputs)

    # byte budget: the least recently used bank goes first, the one in use always stays
    for name in ("a", "b"):
        mutual.manifest = mutual.manifest.replace(bank=name)
        store.save(mutual)
    roomy = ScoreService(store, tiny.fingerprint, HostSettings(array_module="numpy", bank_cache_mb=1024))
    roomy.score("a", *outputs), roomy.score("b", *outputs)
    assert list(roomy._cache) == ["a", "b"] and roomy.cached_bytes() > 0
    tight = ScoreService(store, tiny.fingerprint, HostSettings(array_module="numpy", bank_cache_mb=0))
    tight.score("a", *outputs), tight.score("b", *outputs)
    assert list(tight._cache) == ["b"]

    # what the budget counts is what a bank holds: its arrays and the descriptors scoring keeps (computed on load)
    store.save(full)
    counting = ScoreService(store, tiny.fingerprint, HostSettings(array_module="numpy", bank_cache_mb=1024))
    held = counting.bank("washer")
    assert held.config.full_bank_neighbours > 0
    loaded = counting.cached_bytes()
    assert loaded > held.nbytes
    counting.score("washer", *outputs)
    assert counting.cached_bytes() == loaded  # scoring added nothing the budget did not count


def test_bank_service_lifecycle_and_score_service(scorer, tiny, lot, tmp_path):
    store = BankStore(tmp_path)
    service = BankService(store, tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    with pytest.raises(BankError, match="no images to build from"):
        service.handle("build", "washer")
    with pytest.raises(RequestError, match="multiples of the patch size 14, got 50x56"):
        service.handle("add", "washer", "washer", lot[:, :50, :56])
    assert service.handle("add", "washer", "washer", lot[:5, :56], {"reset": True})["lot_size"] == 5  # 56 x 112
    with pytest.raises(BankError, match="holds images of another size"):
        service.handle("add", "washer", "washer", lot[5:])
    assert service.handle("add", "washer", "washer", lot[:5], {"reset": True})["lot_size"] == 5
    with pytest.raises(BankError, match="for category 'washer', not 'bottle'"):
        service.handle("add", "washer", "bottle", lot[5:])
    assert service.handle("add", "washer", "washer", lot[5:])["lot_size"] == len(lot)
    built = service.handle("build", "washer", options={"mode": "pad_mpam"})
    assert built["n_images"] == len(lot) and "image_keys" not in built
    assert not (tmp_path / "washer" / "lot").exists()  # the lot is consumed by the build
    assert [b["bank"] for b in service.handle("list")["banks"]] == ["washer"]
    info = service.handle("info", "washer")
    loaded = store.load("washer")
    assert info["bytes_in_memory"] == loaded.nbytes > 0  # what the scoring service will hold (float16 entries)
    version_dir = tmp_path / "washer" / info["version"]
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in version_dir.iterdir()) > info["bytes_in_memory"]

    scores = ScoreService(store, tiny.fingerprint)
    features = tiny.encode(lot[:3])
    request = {**features.outputs(), "images": lot[:3], "bank": np.array([[b"washer"]] * 3)}
    bad = dict(request, bank=np.array([[b"nope"]] * 3))
    results = scores.score_requests([request, bad, dict(request, images=lot[:3].astype(np.float32))])
    maps, image_scores = results[0]
    expected = scorer.score(PAClipConfig())
    assert_maps_within_contract(maps, expected.maps[:3])  # float16 maps
    assert np.abs(image_scores - expected.scores[:3]).max() < BANK_STORAGE_TOL
    assert isinstance(results[1], BankError) and "unknown bank 'nope'" in str(results[1])
    assert isinstance(results[2], RequestError) and "uint8" in str(results[2])
    service.handle("delete", "washer")
    with pytest.raises(BankError, match="unknown bank"):
        service.handle("info", "washer")


def test_build_options_are_checked():
    assert build_config({"mode": "pad", "alpha": 0.3}).alpha == 0.3
    with pytest.raises(BankError, match="unknown mode"):
        build_config({"mode": "best"})
    with pytest.raises(BankError, match="unknown PA-CLIP settings"):
        build_config({"alpha_": 1})
    # each range is stated in the answer; booleans and integers are strict (what a probe sent and got a 500 or a
    # bank for)
    for options, words in [({"alpha": 3}, "alpha must be a number in [0.0, 1.0], got 3"),
                           ({"tau_quantile": 7}, "tau_quantile must be a number in [0.0, 1.0]"),
                           ({"scales": []}, "scales must be 1 to 8 odd integers in [1, 15]"),
                           ({"scales": [1, 2]}, "odd integers"), ({"scales": [1, 99]}, "odd integers"),
                           ({"scale_weights": [0, 0, 0]}, "positive sum"),
                           ({"scale_weights": [1, -1, 1]}, "non-negative"),
                           ({"scale_weights": [10 ** 400, 1, 1]}, "up to 1e+06"),  # its float sum overflowed
                           ({"scale_weights": [1.7e308, 1.7e308, 0]}, "relative weights"),  # summed to inf: all 0
                           ({"seed": "x"}, "seed must be an integer in [0, 4294967295]"),
                           ({"seed": 1.5}, "seed must be an integer"), ({"seed": True}, "seed must be an integer"),
                           ({"normal_k": -3}, "normal_k must be an integer in [1, 64]"),
                           ({"normal_k": 65}, "normal_k must be an integer in [1, 64]"),
                           ({"n_augment": -1}, "n_augment must be an integer in [0, 64]"),
                           ({"interval_fraction": 5}, "interval_fraction must be a number in (0.0, 1.0]"),
                           ({"interval_fraction": 0}, "interval_fraction must be a number in (0.0, 1.0]"),
                           ({"smooth_sigma": -1}, "smooth_sigma must be a number in [0.0, 64.0]"),
                           ({"coreset_dim": 0}, "coreset_dim must be an integer in [1, 4096]"),
                           ({"augment": "no"}, "augment must be true or false"),
                           ({"augment": 1}, "augment must be true or false"),
                           ({"k_min": 9, "k_max": 3}, "k_min <= k_max"),
                           ({"feature_norm": 3}, "feature_norm must be text")]:
        with pytest.raises(BankError, match=re.escape(words)):
            build_config(options)
    assert build_config({"interval_fraction": 1, "seed": 7, "scale_weights": [0, 1, 2]}).interval_fraction == 1


def test_manifest_is_json_and_tensors_safetensors(scorer, tiny, tmp_path):
    store = BankStore(tmp_path)
    bank, _ = build_bank(scorer, PAClipConfig(), "washer", tiny.fingerprint)
    version = store.save(bank)
    folder = tmp_path / "washer" / version
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["encoder"] == tiny.fingerprint and manifest["n_images"] == len(scorer.images)
    assert sorted(p.name for p in folder.iterdir()) == ["bank.safetensors", "manifest.json", "manifest.sha256"]
    with open(folder / "bank.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    # int8 entries with a float32 scale each, at an eighth of the channels (the defaults since issue 26)
    assert header["full.r1"]["dtype"] == "I8" and header["full.r1"]["shape"][:2] == [4, len(scorer.images)]
    assert header["full_scale.r1"]["dtype"] == "F32" and header["basis.r1"]["dtype"] == "F32"


def test_score_requests_are_checked_against_the_contract_and_the_bank_one_by_one(scorer, tiny, lot, tmp_path):
    store = BankStore(tmp_path)
    bank, _ = build_bank(scorer, PAClipConfig(), "washer", tiny.fingerprint)
    store.save(bank)
    service = ScoreService(store, tiny.fingerprint, HostSettings(array_module="numpy"))
    pair = lot[[0, 8]]  # a good washer and a defective one: their maps differ, so a mix-up shows
    features = tiny.encode(pair)
    good = {**features.outputs(), "images": pair, "bank": np.array([[b"washer"]] * 2)}
    nan_tokens = features.layer_tokens.copy()
    nan_tokens[0, 0, 0, 0] = np.nan
    inf_cls = features.image_embeds.copy()
    inf_cls[1, 3] = np.inf
    bad = {
        "NaN or infinite": dict(good, layer_tokens=nan_tokens),
        "'image_embeds' holds NaN": dict(good, image_embeds=inf_cls),
        "must hold 4 layers": dict(good, layer_tokens=features.layer_tokens[:, :2].copy()),
        "features 64 wide": dict(good, layer_tokens=np.zeros((2, 4, 64, 32), np.float16)),
        "patches \\(L\\) and the embedding width": dict(good, patch_embeds=features.patch_embeds[:, :, :16].copy()),
        "scores 112x112 images": dict(good, images=np.zeros((2, 1, 1, 3), np.uint8)),
        "expects 8x8 patches": dict(good, layer_tokens=features.layer_tokens[:, :, :60].copy(),
                                    patch_embeds=features.patch_embeds[:, :60].copy()),
    }
    # the last request holds the same two images the other way round: its results must be its own
    swapped = dict(good, **{k: v[::-1].copy() for k, v in good.items() if k != "bank"})
    results = service.score_requests([good, *bad.values(), swapped])
    for (message, _), result in zip(bad.items(), results[1:-1]):
        assert isinstance(result, RequestError), (message, result)
        assert re.search(message, str(result)), (message, str(result))
    # the good requests around them are scored, as if alone: scored together, the matrix products run on 4 images
    # instead of 2, which BLAS may sum in another order: the float16 patch scores may land one unit in the last place
    # (at the map's scale) away, and upsampling carries that unit to maps near zero
    for request, result in ((good, results[0]), (swapped, results[-1])):
        alone = service.score_requests([request])[0]
        unit = float(np.abs(alone[0]).max()) * 2.0 ** -10
        np.testing.assert_allclose(result[0].astype(np.float32), alone[0].astype(np.float32), rtol=0, atol=unit)
        np.testing.assert_allclose(result[1], alone[1], rtol=1e-5)
    np.testing.assert_allclose(results[-1][1], results[0][1][::-1], rtol=1e-5)  # scores follow their images
    assert np.abs(results[0][0][0].astype(np.float32) - results[0][0][1]).max() > 0.01  # the two maps differ


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_replicas_on_one_store_build_one_bank_id_at_a_time(scorer, tiny, lot, tmp_path):
    from postprocess.atomic import HOST

    store = BankStore(tmp_path)
    service = BankService(store, tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    service.handle("add", "washer", "washer", lot, {"reset": True})
    with store.building("washer"):  # another replica's build in progress
        with pytest.raises(BankError, match="a build of bank 'washer' is in progress"):
            service.handle("build", "washer")
    lock = tmp_path / "washer" / ".build-lock"
    for holder, refused in [({"host": HOST, "pid": _dead_pid(), "started": time.time()}, False),  # dead here
                            ({"host": "otherhost", "pid": 1, "started": time.time()}, True),  # alive elsewhere
                            ({"host": "otherhost", "pid": 1, "started": time.time() - 7 * 3600}, False)]:  # stale
        lock.write_text(json.dumps(holder))
        if refused:
            with pytest.raises(BankError, match="in progress"):
                service.handle("build", "washer")
            lock.unlink()
        else:
            with store.building("washer"):
                pass
    built = service.handle("build", "washer")
    assert f"-{HOST}-" in built["version"] and not lock.exists()
    assert not list((tmp_path / "washer").glob(".trash-lock-*"))  # taken-over locks leave nothing behind


def test_two_replicas_taking_over_one_dead_lock_do_not_both_build(tmp_path, monkeypatch):
    """Two replicas judge the same dead build's lock; the first moves it away and places its own. The second must
    not then move the first's lock away as if it were the dead one (both built, each without a lock)."""
    from postprocess.bank_store import HOST

    store = BankStore(tmp_path)
    folder = tmp_path / "washer"
    folder.mkdir()
    lock = folder / ".build-lock"
    lock.write_text(json.dumps({"host": HOST, "pid": _dead_pid(), "started": time.time()}))
    first = {"host": HOST, "pid": os.getpid(), "started": time.time(), "replica": "first"}
    read_lock = BankStore._read_lock
    raced = []

    def judged_dead_then_the_first_replica_took_over(path):
        result = read_lock(path)
        if not raced:  # between this replica's reading and its moving: the first takes the lock over
            raced.append(True)
            placed = folder / ".first-holder"
            placed.write_text(json.dumps(first))
            lock.unlink()
            os.link(placed, lock)
            placed.unlink()
        return result

    monkeypatch.setattr(BankStore, "_read_lock", staticmethod(judged_dead_then_the_first_replica_took_over))
    with pytest.raises(BankError, match="in progress"):
        with store.building("washer"):
            pass
    assert raced and json.loads(lock.read_text()) == first  # the first replica's lock stands, where it was
    assert sorted(p.name for p in folder.iterdir()) == [".build-lock"]  # nothing moved aside is left behind


def test_an_image_past_the_encoders_longest_side_is_the_callers_to_fix(tiny, tmp_path):
    """Past it clip_vision refuses the image, which the bank model's BLS call turned into an internal error (500):
    refused before encoding now, a 400 that says what to send."""
    from postprocess import contract as C
    from postprocess.serving import BankService, describe_failure

    service = BankService(BankStore(tmp_path), tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    patch = int(tiny.fingerprint["patch_size"])
    side = (C.max_image_side(tiny.fingerprint) // patch + 1) * patch
    with pytest.raises(RequestError, match="at most .* pixels a side") as refused:
        service.handle("add", "washer", "washer", np.zeros((1, side, patch, 3), np.uint8), {"reset": True})
    assert describe_failure("pa_clip_bank", refused.value, lambda *_: None)[1] is False  # not internal


def test_builds_of_made_up_bank_ids_add_no_metric_series(tiny, lot, tmp_path):
    """Each refused build or update of an id the store has neither a bank nor a lot of added two series to /metrics
    that stayed (a client could add them without end); a bank's own builds keep its label."""
    from postprocess.serving import UNKNOWN_BANK_LABEL, BankService
    from postprocess.telemetry import RecordingTelemetry

    service = BankService(BankStore(tmp_path), tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    service.telemetry = RecordingTelemetry()
    for i in range(50):
        for action in ("build", "update"):
            with pytest.raises(BankError):
                service.handle(action, f"junk{i}")
    assert {dict(labels)["bank"] for _, labels in service.telemetry.values} == {UNKNOWN_BANK_LABEL}
    service.handle("add", "washer", "washer", lot[:4], {"reset": True})
    service.handle("build", "washer", "", None, {"mode": "mutual"})
    assert service.telemetry.values[("pa_clip_bank_builds_total", (("bank", "washer"), ("outcome", "built")))] == 1


def test_one_build_at_a_time_per_host_and_no_add_into_a_lot_being_built(tiny, lot, tmp_path):
    import subprocess
    import sys

    from postprocess.bank_store import build_slot
    from postprocess.errors import ServerBusy

    holder, other = BankStore(tmp_path), BankStore(tmp_path)  # the two instances of the bank model on one host
    service = BankService(other, tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    service.handle("add", "washer", "washer", lot, {"reset": True})
    from postprocess.telemetry import RecordingTelemetry

    service.telemetry = RecordingTelemetry()
    with build_slot("bottle"):  # another instance's, or another server's on this host
        with pytest.raises(ServerBusy, match="server busy: this host is building bank 'bottle' "):
            service.handle("build", "washer")
    # refused before it started: not a failed build (the client sends it again every 2 s)
    assert service.telemetry.values[("pa_clip_bank_builds_total", (("bank", "washer"), ("outcome", "busy")))] == 1
    assert not [k for k in service.telemetry.values if ("outcome", "failed") in k[1]]
    assert other.lot_size("washer") == len(lot)  # the refused build kept its lot
    with holder.building("washer"):  # its build has started: what it reads is the lot it started with
        with pytest.raises(BankError, match="bank 'washer' is being built right now"):
            service.handle("add", "washer", "washer", lot[:2])
    # a killed build releases the slot with its process (a flock, no stale file to take over)
    script = ("import time; from postprocess.bank_store import build_slot\n"
              "with build_slot('bottle'):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(ServerBusy, match="building bank 'bottle'"):
        with build_slot("washer"):
            pass
    proc.kill()
    proc.wait()
    with build_slot("washer"):
        pass
    # a part that lands after a build read the lot stays for the next build
    _, _, _, parts = other.load_lot("washer")
    other.add_to_lot("washer", "washer", lot[:3], tiny.encode(lot[:3]))
    other.clear_lot("washer", parts)
    assert other.lot_size("washer") == 3
    assert service.handle("build", "washer")["n_images"] == 3 and not (tmp_path / "washer" / "lot").exists()


def test_a_build_lock_is_never_left_empty_and_an_empty_one_from_a_crash_expires(tiny, lot, tmp_path):
    """The lock appears with its holder written in it; an empty lock (left by a server that wrote it in two steps
    and died between them) blocked the bank for good: it is a live holder only while it is that new."""
    from postprocess.atomic import pid_alive

    store = BankStore(tmp_path)
    folder = tmp_path / "washer"
    folder.mkdir()
    lock = folder / ".build-lock"
    with store.building("washer"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]  # the holder was linked, not copied
    folder.mkdir(exist_ok=True)  # a build that wrote nothing leaves no folder
    lock.write_text("")
    with pytest.raises(BankError, match="in progress"):  # just written: maybe its writer is still at it
        with store.building("washer"):
            pass
    old = time.time() - 2 * BankStore.LOCK_UNREADABLE_GRACE_S
    os.utime(lock, (old, old))
    assert store.build_holder("washer") is None
    with store.building("washer"):
        pass
    assert not pid_alive(0) and not pid_alive(-1)  # never a group, or every process, taken for a holder


def test_a_store_on_a_file_system_without_hard_links_still_locks_and_adds(tiny, lot, tmp_path, monkeypatch):
    import errno

    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted", str(target))

    monkeypatch.setattr(store_module.os, "link", no_links)
    store = BankStore(tmp_path)
    store.add_to_lot("washer", "washer", lot[:2], tiny.encode(lot[:2]))
    store.add_to_lot("washer", "washer", lot[2:4], tiny.encode(lot[2:4]))
    assert store.lot_size("washer") == 4
    with store.building("washer"):
        assert json.loads((tmp_path / "washer" / ".build-lock").read_text())["pid"] == os.getpid()
        with pytest.raises(BankError, match="in progress"):
            with store.building("washer"):
                pass
    assert not [p for p in (tmp_path / "washer").rglob(".tmp-*")]


def test_a_lot_or_monitor_folder_that_is_a_link_is_never_written_through(tiny, lot, tmp_path):
    store = BankStore(tmp_path / "store")
    store.add_to_lot("washer", "washer", lot[:2], tiny.encode(lot[:2]))
    outside = tmp_path / "outside"
    outside.mkdir()
    lot_dir = tmp_path / "store" / "washer" / "lot"
    import shutil

    shutil.rmtree(lot_dir)
    lot_dir.symlink_to(outside)
    with pytest.raises(BankError, match="is a symbolic link in the store"):
        store.add_to_lot("washer", "washer", lot[:2], tiny.encode(lot[:2]))
    assert store.pending_lots() == [] and store.clean() == []  # not listed as a lot, nothing removed through it
    (tmp_path / "store" / "washer" / "monitor").symlink_to(outside)
    store.write_monitor("washer", {"window": 1})
    assert list(outside.iterdir()) == []
    (outside / "planted.json").write_text(json.dumps({"window": 999, "alarm": True}))
    assert store.monitors("washer") == []  # nor read through it for info


def test_a_version_replaced_and_removed_while_current_is_read_is_followed_not_called_damaged(scorer, tmp_path,
                                                                                                monkeypatch):
    """Two commits back to back remove the version a reader had just read from CURRENT: the reader follows CURRENT
    to the live version (it said "CURRENT names a version that is not on disk": a healthy bank called damaged)."""
    store = BankStore(tmp_path)
    bank, _ = build_bank(scorer, PAClipConfig(), "washer", scorer.backbone.fingerprint)
    store.save(bank)
    live = store.current_version("washer")
    current = tmp_path / "washer" / "CURRENT"
    removed = live[:-4] + "0000" if not live.endswith("0000") else live[:-4] + "1111"
    current.write_text(removed)  # what the reader read: a version the commits have removed since
    now = BankStore._current_now

    def the_commit_lands(path):
        path.write_text(live)
        return now(path)

    monkeypatch.setattr(BankStore, "_current_now", staticmethod(the_commit_lands))
    assert store.current_version("washer") == live
    monkeypatch.setattr(BankStore, "_current_now", staticmethod(now))
    current.write_text(removed)  # CURRENT itself names a missing version: that is damage
    with pytest.raises(BankError, match="not on disk"):
        store.current_version("washer")


def test_a_delete_holds_the_build_lock_while_the_bank_goes(scorer, tmp_path, monkeypatch):
    """A build that starts between delete's check and its move would write the bank back after the delete said it
    was gone: the delete holds the bank's build lock while it moves the folder away."""
    store, other = BankStore(tmp_path), BankStore(tmp_path)
    store.save(build_bank(scorer, PAClipConfig(), "washer", scorer.backbone.fingerprint)[0])
    replace = store_module.os.replace
    refused = []

    def moving(source, target):
        if Path(source) == tmp_path / "washer":  # the moment a build could start
            with pytest.raises(BankError, match="in progress"):
                with other.building("washer"):
                    pass
            refused.append(True)
        return replace(source, target)

    monkeypatch.setattr(store_module.os, "replace", moving)
    store.delete("washer")
    assert refused and not (tmp_path / "washer").exists() and store.bank_ids() == []


def test_a_bank_being_built_is_not_deleted_and_a_lot_started_over_frees_what_it_replaces(tiny, lot, tmp_path):
    """A delete during a build was undone by the build writing the bank back; a store with room for one lot refused
    to take it again from the start (the old lot, about to go, was counted)."""
    store = BankStore(tmp_path)
    store.add_to_lot("washer", "washer", lot[:2], tiny.encode(lot[:2]))
    with store.building("washer"):
        with pytest.raises(BankError, match="being built right now"):
            store.delete("washer")
    store.delete("washer")
    tight = BankStore(tmp_path / "tight")
    tight.add_to_lot("washer", "washer", lot[:4], tiny.encode(lot[:4]))
    tight.max_bytes = tight.total_bytes() + 1000
    tight.add_to_lot("washer", "washer", lot[:4], tiny.encode(lot[:4]), reset=True)
    assert tight.lot_size("washer") == 4


def test_two_clients_on_one_bank_each_build_and_update_the_images_they_added(tiny, lot, tmp_path):
    """Concurrent updates shared the pending lot: client B's first add (reset) removed the images A had added, A's
    update or build then took B's images (a rebuilt bank of B's few parts), and B's found nothing to build. A lot
    session (option "lot", one per client run) is that client's own: added to, started over, built and cleared apart
    from any other's."""
    store = BankStore(tmp_path)
    service = BankService(store, tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    keys = lambda images: {image_key(i) for i in images}  # noqa: E731
    # A rebuilds the bank from lot[:6] (two chunks) while B adds lot[6:10] to grow it: their adds interleave
    service.handle("add", "washer", "washer", lot[:3], {"reset": True, "lot": "a"})
    service.handle("add", "washer", "washer", lot[6:8], {"reset": True, "lot": "b"})
    assert service.handle("add", "washer", "washer", lot[3:6], {"lot": "a"})["lot_size"] == 6
    with store.building("washer", lot="a"):  # A's build runs: B's add goes on, an add to the lot being read waits
        assert service.handle("add", "washer", "washer", lot[8:10], {"lot": "b"})["lot_size"] == 4
        with pytest.raises(BankError, match="being built right now"):
            service.handle("add", "washer", "washer", lot[:1], {"lot": "a"})
    built = service.handle("build", "washer", "", None, {"mode": "mutual", "lot": "a"})
    assert built["n_images"] == 6 and set(store.manifest("washer").image_keys) == keys(lot[:6])
    assert store.lot_size("washer", "b") == 4 and not (tmp_path / "washer" / "lot-a").exists()
    service.handle("add", "washer", "washer", lot[:2], {"reset": True})  # a client without a session: the shared lot
    assert sorted((p["lot"] or "", p["images"]) for p in store.pending_lots()) == [("", 2), ("b", 4)]
    grown = service.handle("update", "washer", "", None, {"lot": "b"})
    assert grown["update"]["scored"] == 4 and grown["update"]["already_in_lot"] == 0
    assert keys(lot[:6]) < set(store.manifest("washer").image_keys) <= keys(lot)
    assert store.lot_size("washer") == 2 and not (tmp_path / "washer" / "lot-b").exists()
    with pytest.raises(BankError, match="no images to build from in lot 'b'"):
        service.handle("update", "washer", "", None, {"lot": "b"})
    for bad in ("../x", "a.b", "", 7):
        with pytest.raises(BankError, match="invalid lot session"):
            service.handle("add", "washer", "washer", lot[:1], {"lot": bad})
    # a run whose build failed gives its lot back, never one a build is reading
    service.handle("add", "washer", "washer", lot[:2], {"reset": True, "lot": "c"})
    with store.building("washer", lot="c"):
        with pytest.raises(BankError, match="being built from that lot right now"):
            service.handle("discard", "washer", "", None, {"lot": "c"})
    assert service.handle("discard", "washer", "", None, {"lot": "c"}) == {"bank": "washer", "discarded": "c"}
    assert not (tmp_path / "washer" / "lot-c").exists() and store.lot_size("washer") == 2  # the shared lot stays


def test_parts_added_at_once_are_both_kept_and_a_build_clears_only_the_parts_it_read(tiny, lot, tmp_path,
                                                                                    monkeypatch):
    """Two adds at once (the bank model runs two instances) once chose the same part name and the second replaced
    the first; a build's clear of the parts it read removed a part added after it under a name reused."""
    import threading

    store = BankStore(tmp_path)
    features = tiny.encode(lot[:4])
    both_written = threading.Barrier(2, timeout=30)
    real = store_module._save_tensors

    def written_then_wait(path, tensors, metadata=None):  # both parts written before either is named
        real(path, tensors, metadata)
        both_written.wait()

    monkeypatch.setattr(store_module, "_save_tensors", written_then_wait)
    threads = [threading.Thread(target=store.add_to_lot, args=("washer", "washer", lot[i:i + 2],
                                                                features.take(slice(i, i + 2))))
               for i in (0, 2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    monkeypatch.setattr(store_module, "_save_tensors", real)
    assert store.lot_size("washer") == 4
    # a build read the lot; meanwhile the lot was started over: the new part stays when the build clears its own
    _, _, _, parts = store.load_lot("washer")
    store.add_to_lot("washer", "washer", lot[:3], tiny.encode(lot[:3]), reset=True)
    store.clear_lot("washer", parts)
    assert store.lot_size("washer") == 3


def test_starting_a_lot_over_is_all_or_nothing_and_a_reader_follows_current_past_a_removed_version(
        scorer, tiny, lot, tmp_path, monkeypatch):
    """A crash while an add with reset removed the old lot left part of it, later built as if whole; a version
    removed (by a prune or the next save) while a reader had just read CURRENT was reported as damage."""
    store = BankStore(tmp_path)
    for i in range(0, 8, 2):
        store.add_to_lot("washer", "washer", lot[i:i + 2], tiny.encode(lot[i:i + 2]))

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt("killed while removing the old lot")

    monkeypatch.setattr(store_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        store.add_to_lot("washer", "washer", lot[:2], tiny.encode(lot[:2]), reset=True)
    monkeypatch.undo()
    assert store.pending_lots() == []  # none of the old lot is left to build
    assert any(".trash-lot-" in p for p in store.clean())
    bank = build_bank(scorer, PAClipConfig(), "washer", tiny.fingerprint)[0]
    first = store.save(bank)
    stale = (first, tmp_path / "washer" / first)
    second = store.save(build_bank(scorer, PAClipConfig(alpha=0.5), "washer", tiny.fingerprint)[0])
    import shutil

    shutil.rmtree(stale[1])  # what a prune does to the version that was live a moment ago
    live = store._live
    calls = iter([stale])
    monkeypatch.setattr(store, "_live", lambda bank_id: next(calls, None) or live(bank_id))
    assert store.load("washer", tiny.fingerprint).manifest.version == second


def test_clean_removes_only_leftovers_whose_owner_is_gone(tmp_path):
    from postprocess.atomic import HOST

    store = BankStore(tmp_path)
    folder = tmp_path / "washer"
    (folder / "lot").mkdir(parents=True)
    old = time.time() - 7 * 3600
    live = folder / f".tmp-{HOST}.{os.getpid()}-v-building"  # this process: a build in progress
    dead = folder / f".tmp-{HOST}.{_dead_pid()}-v-crashed"
    elsewhere = folder / ".tmp-otherhost.42-v-building"  # another replica, recent: it may be writing
    abandoned = folder / ".tmp-otherhost.42-v-old"
    unowned_old = folder / "lot" / ".tmp-part-000001.safetensors-x"
    for path in (live, dead, elsewhere, abandoned):
        path.mkdir()
    unowned_old.write_bytes(b"half")
    for path in (abandoned, unowned_old):
        os.utime(path, (old, old))
    taken_over = folder / ".trash-lock-0123abcd"  # what a take-over cut short (before its unlink) leaves
    taken_over.write_text("{}")
    store.clean()
    assert sorted(p.name for p in folder.glob(".tmp-*")) == sorted([live.name, elsewhere.name])
    assert not unowned_old.exists() and not taken_over.exists()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                               'message: "No space left on device" })')])
def test_a_full_disk_says_what_to_free_and_changes_nothing(scorer, tiny, lot, tmp_path, monkeypatch, failure):
    """Python's own ENOSPC, and safetensors' words for it (what the probe's full disk answered as an internal
    error), become a StoreFull naming the store; the bank and the lot stay as they were."""
    store = BankStore(tmp_path)
    service = BankService(store, tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    service.handle("add", "washer", "washer", lot, {"reset": True})
    first = service.handle("build", "washer")["version"]
    service.handle("add", "washer", "washer", lot, {"reset": True})

    def full(*_args, **_kwargs):
        raise failure

    monkeypatch.setattr("safetensors.numpy.save_file", full)
    for action, options in (("build", {}), ("add", {})):
        with pytest.raises(store_module.StoreFull, match=re.escape(f"no space left on the volume of the bank store "
                                                                  f"({tmp_path / 'washer'}")):
            service.handle(action, "washer", "washer", lot if action == "add" else None, options)
    assert store.current_version("washer") == first and store.lot_size("washer") == len(lot)
    assert not [p for p in (tmp_path / "washer").rglob("*") if ".tmp-" in p.name]
    monkeypatch.setattr("safetensors.numpy.save_file", lambda *a, **k: (_ for _ in ()).throw(ValueError("other")))
    with pytest.raises(ValueError, match="other"):  # anything else stays what it is
        service.handle("build", "washer")


def test_pending_lots_are_listed_and_expire(tiny, lot, tmp_path):
    store = BankStore(tmp_path, pending_ttl_s=3600)
    service = BankService(store, tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    service.handle("add", "washer", "washer", lot[:1], {"reset": True})
    with pytest.raises(RequestError, match="at least 2 images"):  # a failed build keeps its lot: visible
        service.handle("build", "washer")
    (pending,) = service.handle("list")["pending"]
    assert pending["bank"] == "washer" and pending["images"] == 1 and 0 < pending["expires_in_s"] <= 3600
    old = time.time() - 2 * 3600
    for part in (tmp_path / "washer" / "lot").glob("part-*"):
        os.utime(part, (old, old))
    assert service.handle("list")["pending"] == [] and not (tmp_path / "washer" / "lot").exists()


def test_failed_builds_leave_nothing_and_prune_removes_old_versions(tiny, lot, tmp_path, monkeypatch):
    store = BankStore(tmp_path)
    service = BankService(store, tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    with pytest.raises(RequestError, match="no images to build from"):  # never added: no folder stays behind
        service.handle("build", "one")
    assert not (tmp_path / "one").exists()
    service.handle("add", "washer", "washer", lot, {"reset": True})
    first = service.handle("build", "washer")["version"]
    service.handle("add", "washer", "washer", lot, {"reset": True})
    second = service.handle("build", "washer")["version"]
    info = service.handle("info", "washer")
    assert [v["version"] for v in info["versions"]] == [second, first] and info["versions"][0]["live"]
    kept = service.handle("prune")  # the one before may still be loading somewhere: kept a while, and said so
    assert kept["removed"] == [] and kept["kept_recent"] == [str(tmp_path / "washer" / first)]
    assert kept["kept_after_s"] == BankStore.PRUNE_AFTER_S
    monkeypatch.setattr(BankStore, "PRUNE_AFTER_S", 0.0)
    (tmp_path / "empty").mkdir()  # what a failed build used to leave
    pruned = service.handle("prune")
    assert sorted(pruned["removed"]) == sorted([str(tmp_path / "washer" / first), str(tmp_path / "empty")])
    assert pruned["kept_recent"] == []
    assert pruned["freed_bytes"] > 0 and store.current_version("washer") == second
    listed = service.handle("list")
    assert listed["banks"][0]["bytes_on_disk"] > 0 and listed["store_bytes"] == store.total_bytes()


def test_a_store_limit_refuses_adds_and_builds_past_it(tiny, lot, tmp_path):
    store = BankStore(tmp_path, max_bytes=1 << 30)
    service = BankService(store, tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    service.handle("add", "washer", "washer", lot, {"reset": True})
    held = store.total_bytes()
    store.max_bytes = held + 1000  # the lot fits; the bank it builds does not
    with pytest.raises(store_module.StoreFull, match=r"keeps at most .* MB \(python -m serve --max-store-gb\)"):
        service.handle("build", "washer")
    assert store.current_version("washer") is None and store.lot_size("washer") == len(lot)  # lot kept
    store.max_bytes = held  # nothing more fits: a further add is refused before it touches the lot
    with pytest.raises(store_module.StoreFull, match="delete banks you no longer need"):
        service.handle("add", "washer", "washer", lot)
    assert store.lot_size("washer") == len(lot) and store.total_bytes() == held


def test_a_smoothing_wider_than_the_map_is_refused_before_the_lot_stage(tiny, lot, tmp_path, monkeypatch):
    """RANGES takes smooth_sigma up to 64, but its kernel must fit the map's short side: past it the build ran the
    lot stage and then failed in the maps as an internal error (a 500), where it is the caller's setting (a 400)."""
    from postprocess import pipeline

    stages = []
    monkeypatch.setattr(pipeline, "lot_stage", lambda *args, **kwargs: stages.append(1))
    wide = np.ascontiguousarray(lot[:4, 28:84])  # maps of 56 x 112: the short side decides
    scorer = LotScorer(tiny, wide, "washer", progress=False)
    with pytest.raises(RequestError, match=r"smooth_sigma 14 is too large for maps of 56x112: it must be below 13.875"):
        build_bank(scorer, PAClipConfig(smooth_sigma=14.0), "washer", tiny.fingerprint)
    assert not stages
    monkeypatch.undo()
    bank, report = build_bank(scorer, PAClipConfig(smooth_sigma=13.8), "washer", tiny.fingerprint)  # just fits
    assert np.isfinite(report.maps).all()


def test_the_full_banks_descriptors_are_read_within_the_hosts_memory_budget(scorer, tiny, monkeypatch):
    """They were dequantised in chunks of the kernel's default 64 MiB whatever the host's budget (a 1 MB budget
    peaked at 27 MB on a 13 MB int8 bank's first request)."""
    bank, _ = build_bank(scorer, PAClipConfig(), "washer", tiny.fingerprint)
    assert bank.config.full_bank_neighbours > 0
    budgets, real = [], K.image_descriptors
    monkeypatch.setattr(K, "image_descriptors", lambda *args: budgets.append(args[2]) or real(*args))
    host = HostSettings(array_module="numpy", memory_budget_mb=1)
    bank.prepare(host)
    assert budgets and set(budgets) == {host.budget_bytes}
    budgets.clear()
    fresh, _ = build_bank(scorer, PAClipConfig(), "washer", tiny.fingerprint)
    score_with_bank(fresh, scorer.features.take(slice(0, 2)), [-1, -1], host=host)  # read on first use
    assert budgets and max(budgets) <= host.budget_bytes  # the bank's and the queries' (half of it)


@pytest.mark.parametrize("settings", [{}, FULL_BANK, {"full_bank_images": 4}, {"mode": "mutual"}])
def test_copies_of_one_image_in_a_lot_score_as_the_lot_scored_them(tiny, lot, settings):
    """A lot holding one image twice (the client only warns) gave a copy chosen as normal an exact match for its
    twin in the lot, and the bank, taking both for the last copy, another (maps 0.02-0.17 apart); with a sampled full
    bank holding the first copy only, the later one matched it in the lot and not when served. Copies go by the
    first one's index against every bank, in the lot and in the bank alike."""
    copies = lot[np.asarray([0, 1, 2, 3, 4, 2, 6, 7, 2, 0])]
    scorer = LotScorer(tiny, copies, "washer", progress=False)
    assert scorer.lot_ids.tolist() == [0, 1, 2, 3, 4, 2, 6, 7, 2, 0]
    settings = dict(settings)
    cfg = PAClipConfig.for_mode(settings.pop("mode")) if "mode" in settings else PAClipConfig(**settings)
    bank, report = build_bank(scorer, cfg, "washer", tiny.fingerprint)
    ids = bank.query_ids([image_key(img) for img in copies])
    assert ids.tolist() == scorer.lot_ids.tolist()
    assert set(np.unique(np.concatenate([v for v in bank.normal_ids.values()] or [[0]]))) <= {0, 1, 2, 3, 4, 6, 7}
    again = score_with_bank(bank, scorer.features, ids)
    np.testing.assert_allclose(again.maps, report.maps, atol=BANK_STORAGE_TOL)
    np.testing.assert_allclose(again.maps[[2, 5, 8]], again.maps[[5, 8, 2]], atol=1e-5)  # copies alike


def test_an_add_landing_after_an_empty_folders_check_keeps_its_lot(tiny, lot, tmp_path, monkeypatch):
    """A failed first build (and prune) removed a bank folder it had found empty with its whole tree: an add to
    another lot session landing between the check and the removal was answered, then its lot was gone."""
    store = BankStore(tmp_path)
    service = BankService(store, tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    real, added = store_module._holds_nothing, []

    def then_an_add(folder):
        empty = real(folder)
        if empty and not added:
            added.append(service.handle("add", folder.name, "washer", lot[:3], {"reset": True, "lot": "a"}))
        return empty

    monkeypatch.setattr(store_module, "_holds_nothing", then_an_add)
    with pytest.raises(BankError, match="no images to build from in lot 'b'"):
        service.handle("build", "washer", "", None, {"lot": "b"})
    assert added and store.lot_size("washer", "a") == 3
    added.clear()
    (tmp_path / "empty").mkdir()
    store.prune()
    assert added and store.lot_size("empty", "a") == 3


def test_a_lot_whose_copies_leave_too_few_others_builds_with_a_smaller_k_or_is_refused(tiny, lot):
    """k counted images, not the different ones a copy may be compared with (copies exclude each other): past them
    its own excluded (infinite) distances went into its score, NaN, and the calibration failed (a 500) or kept NaN
    lot scores. k stops at the fewest others any lot image finds; a sample of copies of one image is refused."""
    from postprocess.pa_clip import lot_interval_k

    copies = lot[np.asarray([0, 0, 0, 1])]
    scorer = LotScorer(tiny, copies, "washer", progress=False)
    assert lot_interval_k(4, PAClipConfig(k_min=3), scorer.lot_ids) == 1  # image 1 finds... image 0's three copies
    bank, report = build_bank(scorer, PAClipConfig(k_min=3), "washer", tiny.fingerprint)
    assert np.isfinite(report.scores).all() and bank.manifest.interval_k == 1
    again = score_with_bank(bank, scorer.features, bank.query_ids([image_key(img) for img in copies]))
    np.testing.assert_allclose(again.maps, report.maps, atol=BANK_STORAGE_TOL)
    paired = lot[np.asarray([0, 1, 0, 1, 2, 2])]
    assert np.isfinite(build_bank(LotScorer(tiny, paired, "washer", progress=False), PAClipConfig(full_bank_images=3),
                                  "washer", tiny.fingerprint)[1].scores).all()
    with pytest.raises(RequestError, match="copies of one image only"):
        lot_interval_k(6, PAClipConfig(), np.zeros(6, dtype=np.int64))


def test_the_text_baseline_on_an_encoder_without_text_is_the_callers_error(tiny, lot, tmp_path):
    """It was a plain ValueError raised past build_config: the server answered a 500 "internal error"."""
    from postprocess.serving import describe_failure

    store = BankStore(tmp_path)
    service = BankService(store, tiny.fingerprint, tiny.encode, None, log=lambda _: None)  # no text tower served
    service.handle("add", "washer", "washer", lot[:4], {"reset": True})
    with pytest.raises(RequestError, match="needs a text encoder; this server's has none") as refused:
        service.handle("build", "washer", "", None, {"mode": "baseline"})
    assert describe_failure("pa_clip_bank", refused.value, lambda _: None)[1] is False  # not an internal error


def test_discard_and_update_refuse_options_they_do_not_take(tiny, lot, tmp_path):
    """discard takes only 'lot' and update only 'lot' (it keeps the bank's settings): an option they would ignore
    (a build's 'mode' sent to update, a 'reset' sent with discard) is refused, not dropped without a word."""
    service = BankService(BankStore(tmp_path), tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    service.handle("add", "washer", "washer", lot[:2], {"reset": True, "lot": "c"})
    with pytest.raises(BankError, match="discard takes one option, 'lot'"):
        service.handle("discard", "washer", "", None, {"lot": "c", "reset": True})
    assert service.store.lot_size("washer", "c") == 2  # nothing discarded
    with pytest.raises(BankError, match=r"update takes no options but 'lot'.*\['mode'\]"):
        service.handle("update", "washer", "", None, {"mode": "mutual", "lot": "c"})
    assert service.store.lot_size("washer", "c") == 2


def test_a_category_name_with_control_characters_or_past_200_characters_is_refused(tiny, lot, tmp_path):
    """The category goes into the text prompts: a newline or NUL in it, or a name far past CLIP's 77 tokens, is
    refused before anything is encoded or kept in a lot."""
    service = BankService(BankStore(tmp_path), tiny.fingerprint, tiny.encode, tiny.encode_text, log=lambda _: None)
    for bad in ("wash\ner", "washer\0", "tab\there", "x" * 201):
        with pytest.raises(BankError, match="no control characters"):
            service.handle("add", "washer", bad, lot[:2], {"reset": True})
    assert service.store.lot_size("washer") == 0
    assert service.handle("add", "washer", "x" * 200, lot[:2], {"reset": True})["lot_size"] == 2


def test_a_long_refusal_fits_grpcs_16_kb_message_header_even_percent_encoded_and_says_how_much_was_cut():
    """gRPC carries the reason in a header of at most 16 KB, percent-encoded at up to 12 bytes a character: a longer
    one became RESOURCE_EXHAUSTED and the client lost the reason. What was cut is counted, so the client knows."""
    from urllib.parse import quote

    from postprocess.serving import describe_failure

    reason = "\U0001f642" * 20000  # 4 UTF-8 bytes each: 12 bytes a character once percent-encoded
    message, internal = describe_failure("pa_clip_bank", RequestError(reason), log_error=None)
    assert not internal
    assert len(quote(message, safe="").encode()) <= 16 * 1024
    kept = message.removeprefix("pa_clip_bank: ").split("...")[0]
    assert kept and reason.startswith(kept)
    assert message.endswith(f"({len(reason) - len(kept)} more characters)")
    short = "bank 'x' is not known"
    assert describe_failure("pa_clip_bank", RequestError(short), log_error=None)[0] == f"pa_clip_bank: {short}"


def test_write_atomic_flushes_the_file_before_the_rename_and_the_folder_after_it(tmp_path, monkeypatch):
    """The module's promise (postprocess.atomic): fsync the new file, rename it over the old, fsync the folder. A
    rename reaching disk before the data leaves an empty file after a power cut; an unsynced folder, the old one."""
    import stat

    from postprocess import atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    (tmp_path / "CURRENT").write_text("v-old")
    atomic.write_atomic(tmp_path / "CURRENT", "v-new")
    assert events == [("fsync", "file"), ("replace", "CURRENT"), ("fsync", "dir")]
    assert (tmp_path / "CURRENT").read_text() == "v-new"
    assert [p.name for p in tmp_path.iterdir()] == ["CURRENT"]


def test_write_atomic_that_fails_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    """Readers see the old file or the whole new one; a failed write (a library raising mid-file) leaves nothing."""
    from postprocess import atomic

    (tmp_path / "manifest.json").write_text("old")

    def half_written(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_atomic(tmp_path / "manifest.json", half_written)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert (tmp_path / "manifest.json").read_text() == "old"


def test_written_files_and_model_folders_get_the_umasks_permissions_and_a_replaced_file_keeps_its_own(tmp_path):
    """tempfile makes private files (0600) and folders (0700), and the rename into place kept that: a group sharing
    results, banks or a model repository by its umask could not read them."""
    from export.onnx_export import write_model_dir
    from postprocess import atomic

    old_umask = os.umask(0o027)
    try:
        atomic.write_atomic(tmp_path / "results.json", "{}")
        model = write_model_dir(tmp_path / "repo", "clip_vision", {"config.pbtxt": "x"})
        (tmp_path / "private.json").write_text("old")
        os.chmod(tmp_path / "private.json", 0o600)
        atomic.write_atomic(tmp_path / "private.json", "new")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o640
    assert model.stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "private.json").read_text() == "new"


def test_one_far_image_in_a_lot_does_not_set_the_heat_maps_colour_scale(tiny_clip_112, lot):
    """A black frame in a lot of 36 is 2.7% of its pixels, all far above the rest: read from every pixel, its level
    was the scale's top and every other map came out blue. The scale is read from the images within the far fence."""
    from postprocess.bank import colour_scale

    rng = np.random.default_rng(3)
    maps = rng.normal(0.2, 0.05, size=(36, 16, 16))
    alone = colour_scale(maps)
    far = np.concatenate([maps, np.full((1, 16, 16), 5.0)])
    assert colour_scale(far)[1] == pytest.approx(alone[1])
    assert alone[1] == pytest.approx(np.quantile(maps, 0.999))  # nothing far: every pixel read
    assert alone[0] == pytest.approx(np.quantile(maps, 0.5))
    # a build's scale is read this way
    bank, report = build_bank(LotScorer(tiny_clip_112, lot, "washer", progress=False), PAClipConfig(), "scale",
                              tiny_clip_112.fingerprint)
    assert bank.manifest.map_range == colour_scale(report.maps)


def test_an_add_still_on_its_way_when_its_client_gave_the_lot_back_leaves_nothing(tiny, lot, tmp_path, monkeypatch):
    """Ctrl-C during an add: the client gives its lot session back at once, while the add it sent is still being
    written on the server; that add landed after the discard and its images stayed for a day (seen on a real server:
    three interrupted runs, three lots of 8 left). Whichever lands first, nothing stays, and a later add to the
    session given back is refused."""
    store = BankStore(tmp_path)
    features = tiny.encode(lot[:2])
    store.add_to_lot("washer", "washer", lot[:2], features, session="s1")
    real = store_module._save_tensors

    def given_back_meanwhile(path, *args, **kwargs):  # the discard runs while the second part is written
        real(path, *args, **kwargs)
        store.discard_lot("washer", "s1")

    monkeypatch.setattr(store_module, "_save_tensors", given_back_meanwhile)
    with pytest.raises(BankError, match="was given back by its client"):
        store.add_to_lot("washer", "washer", lot[:2], features, session="s1")
    monkeypatch.setattr(store_module, "_save_tensors", real)
    assert store.pending_lots() == [] and not (tmp_path / "washer" / "lot-s1").exists()
    with pytest.raises(BankError, match="was given back by its client"):  # an add arriving after it
        store.add_to_lot("washer", "washer", lot[:2], features, session="s1")
    assert store.pending_lots() == [] and not (tmp_path / "washer").exists()  # nor an empty bank folder
    store.add_to_lot("washer", "washer", lot[:2], features, session="s2")  # another session, and the shared lot
    store.add_to_lot("washer", "washer", lot[:2], features)
    assert sorted(p["lot"] or "" for p in store.pending_lots()) == ["", "s2"]
    # the marks go with the day a lot would have waited
    assert store.clean() == []
    store.pending_ttl_s = 0
    mark = tmp_path / ".given-back-lots" / "washer" / "s1"
    assert str(mark) in store.clean() and not mark.exists()
