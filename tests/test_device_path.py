"""The whole scoring path in one array module: run on a strict stand-in device (tests/strict_xp.py) that, like
CuPy, refuses implicit conversion to NumPy, it gives NumPy's results and brings back only maps and scores."""

import numpy as np
import pytest

import strict_xp
from postprocess import kernels as K
from postprocess.bank import build_bank, image_key, score_with_bank
from postprocess.bank_store import BankStore
from postprocess.config import FULL_BANK, MODES, PAClipConfig
from postprocess.host import HostSettings
from postprocess.pipeline import LotScorer
from postprocess.serving import ScoreService
from strict_xp import ImplicitTransfer, strict


class DeviceBackbone:
    """The tiny CLIP whose image features arrive on the device (as DLPack hands them over); text stays host-side,
    as ONNX Runtime returns it."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.has_text = backbone.has_text

    def encode(self, images):
        return self.backbone.encode(images).to(strict)

    def encode_text(self, prompts):
        return self.backbone.encode_text(prompts)


@pytest.fixture(scope="module")
def scorers(tiny_clip_112, lot):
    host = LotScorer(tiny_clip_112, lot, "washer", progress=False, xp=np)
    device = LotScorer(DeviceBackbone(tiny_clip_112), lot, "washer", progress=False, xp=strict)
    return host, device


def test_the_strict_device_refuses_implicit_transfers():
    x = strict.asarray(np.arange(6.0))
    for implicit in (lambda: np.asarray(x), lambda: np.concatenate([x, x]), lambda: x + np.ones(6),
                     lambda: x[np.array([0, 1])], lambda: np.exp(x)):
        with pytest.raises(TypeError):
            implicit()
    assert float(x.sum()) == 15.0 and isinstance(strict.exp(x), strict_xp.StrictArray)
    np.testing.assert_array_equal(K.to_numpy(x), np.arange(6.0))


def test_the_strict_device_has_only_what_cupy_has():
    x = strict.asarray(np.arange(6.0))
    for numpy_only in (lambda: strict.nanpercentile(x, 50), lambda: strict.errstate(), lambda: x.resize(6),
                       lambda: x.itemset(0, 1.0)):
        with pytest.raises(strict_xp.NotInCuPy):
            numpy_only()
    assert float(strict.quantile(x, 0.5)) == 2.5 and float(x.max()) == 5.0


def test_the_cupy_names_are_those_of_the_cupy_installed():
    cupy = pytest.importorskip("cupy", reason="cupy is not installed here (a GPU machine's `pip install .[gpu]`)")
    assert strict_xp.CUPY_MODULE_NAMES <= set(dir(cupy)), "a name listed that this CuPy lacks: write the list again"
    assert strict_xp.CUPY_ARRAY_NAMES <= set(dir(cupy.ndarray))


@pytest.mark.parametrize("mode", MODES)
def test_lot_scoring_on_the_device_matches_numpy_and_returns_only_maps_and_scores(scorers, lot, mode):
    host, device = scorers
    cfg = PAClipConfig.for_mode(mode, full_coreset_ratio=0.5)
    expected = host.score(cfg)
    strict_xp.TRANSFERS.clear()
    got = device.score(cfg)
    n, channels = len(lot), host.features.layer_tokens.shape[-1]
    # maps, scores, and the PCA's (C, C) Gram matrices (the search space at C/8: decomposed on the host, small)
    assert set(strict_xp.TRANSFERS) <= {(n, *lot.shape[1:3]), (n,), (channels, channels)}, strict_xp.TRANSFERS
    np.testing.assert_allclose(got.maps, expected.maps, atol=1e-6)
    np.testing.assert_array_equal(got.normal_indices, expected.normal_indices)
    assert got.info == expected.info


def test_a_non_square_lot_with_rescoring_stays_on_the_device(tiny_clip_112, lot):
    wide = np.ascontiguousarray(lot[:, 28:84])
    cfg = PAClipConfig(rescore_k=3, full_coreset_ratio=0.5)
    expected = LotScorer(tiny_clip_112, wide, "washer", progress=False, xp=np).score(cfg)
    device = LotScorer(DeviceBackbone(tiny_clip_112), wide, "washer", progress=False, xp=strict)
    strict_xp.TRANSFERS.clear()
    got = device.score(cfg)
    channels = device.features.layer_tokens.shape[-1]  # the PCA's Gram matrices are decomposed on the host
    assert set(strict_xp.TRANSFERS) <= {(len(wide), 56, 112), (len(wide),), (channels, channels)}, strict_xp.TRANSFERS
    np.testing.assert_allclose(got.maps, expected.maps, atol=1e-6)
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-6)


@pytest.mark.parametrize("settings", [{}, {"bank_dim": 12, "layers": (0, 2), "full_bank_neighbours": 3}, FULL_BANK,
                                      {"full_bank_images": 5, "normal_fraction": 0.5}])  # a sampled lot
def test_bank_build_and_scoring_on_the_device(scorers, tiny_clip_112, lot, tmp_path, settings):
    host, device = scorers
    cfg = PAClipConfig(**settings)
    bank, report = build_bank(device, cfg, "washer", tiny_clip_112.fingerprint)
    assert all(isinstance(v, strict_xp.StrictArray) for v in bank.full.values())
    full_dtype = np.int8 if cfg.full_bank_storage == "int8" else np.float16
    assert all(v.dtype == full_dtype for v in bank.full.values())
    assert all(v.dtype == np.float16 for v in bank.normal.values())
    projected = cfg.search_dim(host.features.layer_tokens.shape[-1]) > 0
    assert bool(bank.bases) == projected and bool(bank.full_scale) == (full_dtype == np.int8)
    assert (bank.full_ids is not None) == (0 < cfg.full_bank_images < len(lot) - 1)  # the sampled case samples
    store = BankStore(tmp_path)
    store.save(bank)  # bank files leave the device here
    expected, _ = build_bank(host, cfg, "washer", tiny_clip_112.fingerprint)
    ids = np.asarray([int(i) for i in expected.query_ids([image_key(img) for img in lot])])
    want = score_with_bank(expected, host.features, ids)
    strict_xp.TRANSFERS.clear()
    got = score_with_bank(store.load("washer").to(strict), device.features, ids)
    assert strict_xp.TRANSFERS == []  # nothing left the device while scoring
    np.testing.assert_allclose(K.to_numpy(got.maps), want.maps, atol=1e-6)
    # the scoring service: host inputs in, maps and scores out
    service = ScoreService(store, tiny_clip_112.fingerprint, HostSettings(), xp=strict)
    features = tiny_clip_112.encode(lot[:2])
    maps, scores = service.score("washer", *features.outputs().values(), lot[:2])
    np.testing.assert_allclose(maps, want.maps[:2], atol=1e-3)


def test_a_stray_numpy_call_in_the_device_path_fails(scorers, monkeypatch):
    """What the strict module is for: put back the old bug (a NumPy concatenation of device features)."""
    from postprocess import pipeline

    _, device = scorers
    monkeypatch.setattr(pipeline.K, "get_xp", lambda *arrays: np)
    with pytest.raises(ImplicitTransfer):
        pipeline.encode_images(DeviceBackbone(device.backbone.backbone), np.zeros((2, 112, 112, 3), np.uint8))


class HostTensor:
    """What a Triton Python-backend tensor in host memory offers (is_cpu, as_numpy)."""

    def __init__(self, array):
        self.array = array

    def is_cpu(self):
        return True

    def as_numpy(self):
        return self.array


class DeviceTensor:
    """A Triton Python-backend tensor in device memory that speaks the DLPack protocol (a NumPy array stands in for
    the memory); its bare capsule (to_dlpack) carries no stream to synchronise on."""

    def __init__(self, array):
        self.array, self.streams = array, []

    def is_cpu(self):
        return False

    def __dlpack__(self, stream=None, **kwargs):
        self.streams.append(stream)
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    def to_dlpack(self):
        raise AssertionError("took the capsule, which carries no stream, where the protocol was offered")


def test_device_tensors_are_taken_through_the_dlpack_protocol():
    from types import SimpleNamespace

    from postprocess.serving import from_triton

    tensor = DeviceTensor(np.arange(6, dtype=np.float16).reshape(2, 3))
    device_module = SimpleNamespace(from_dlpack=np.from_dlpack)  # a consumer that is not NumPy (CuPy's role)
    taken = from_triton(tensor, device_module)
    assert tensor.streams == [None] and np.shares_memory(taken, tensor.array)  # no copy, asked through __dlpack__


def test_triton_tensors_arrive_in_the_scoring_array_module():
    from postprocess.serving import from_triton

    tensor = HostTensor(np.ones((2, 3), np.float16))
    assert from_triton(tensor) is tensor.array  # a NumPy service reads it in place
    moved = from_triton(tensor, strict)
    assert isinstance(moved, strict_xp.StrictArray) and moved.dtype == np.float16


@pytest.mark.parametrize("settings", [{}, {"full_bank_images": 5, "normal_fraction": 0.5}])  # a sampled lot too
def test_growing_a_bank_on_the_device_matches_numpy(scorers, tiny_clip_112, lot, settings):
    """``pa-clip banks update`` on a GPU server grows the bank where it is held: in the device's array module."""
    from postprocess import growth

    host, device = scorers
    cfg = PAClipConfig(rescore_k=3, **settings)
    keep = np.arange(len(lot) - 3)  # the lot's last images come later, as new parts
    lot_host = LotScorer(tiny_clip_112, lot[keep], "washer", progress=False, xp=np, features=host.features.take(keep))
    bank, _ = build_bank(lot_host, cfg, "washer", tiny_clip_112.fingerprint)
    new = np.arange(len(lot) - 3, len(lot))
    want, want_report = growth.grow_bank(bank, host.features.take(new), lot[new])
    strict_xp.TRANSFERS.clear()
    got, report = growth.grow_bank(bank.to(strict), device.features.take(strict.asarray(new)), lot[new])
    assert report == want_report and want_report["folded_in"] > 0
    assert all(isinstance(v, strict_xp.StrictArray) for v in got.full.values())
    for r in want.full:
        np.testing.assert_array_equal(K.to_numpy(got.full[r]), want.full[r])
    np.testing.assert_allclose(K.to_numpy(got.lot_scores), want.lot_scores, atol=1e-6)
    assert got.manifest == want.manifest
