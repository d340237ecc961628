"""The NumPy kernels against the plain-torch reference on random features: same choices, maps within 1e-4."""

import inspect

import numpy as np
import pytest
import torch

from postprocess import kernels, pa_clip, reference
from postprocess.config import PAClipConfig
from postprocess.contract import Features
from postprocess.host import HostSettings
from postprocess.pa_clip import LotState, NormalSet, ScoreResult, finish_stage, lot_stage

GRID = (6, 5)
HOST = HostSettings(memory_budget_mb=1)  # small enough that the NumPy kNN kernels work in several chunks


def random_features(n, seed, layers=3, channels=24, dim=16):
    rng = np.random.default_rng(seed)
    length = GRID[0] * GRID[1]
    # a shared "normal" pattern plus noise, so that the scores are not all alike
    base = rng.standard_normal((1, layers, length, channels))
    tokens = base + 0.6 * rng.standard_normal((n, layers, length, channels))
    patch = rng.standard_normal((n, length, dim))
    cls = rng.standard_normal((n, dim))
    return Features(tokens.astype(np.float16), patch.astype(np.float16), cls.astype(np.float32), GRID)


def torch_features(f: Features) -> Features:
    return Features(torch.from_numpy(f.layer_tokens.astype(np.float32)),
                    torch.from_numpy(f.patch_embeds.astype(np.float32)),
                    torch.from_numpy(f.image_embeds), f.grid)


CASES = {
    "full-method-text": dict(mode="pad_mpam", text=True, cfg=dict(smooth_sigma=2.0, feature_norm="layernorm",
                                                                  full_coreset_ratio=0.5, normal_coreset_ratio=0.3)),
    "visual-selection": dict(mode="pad_mpam", text=False, cfg=dict(smooth_sigma=0.0, image_score="topk_mean",
                                                                   image_topk_fraction=0.05)),
    "pad-single-scale": dict(mode="pad", text=True, cfg=dict(alpha=0.8, tau_quantile=0.7, image_score="mean")),
    "mutual": dict(mode="mutual", text=False, cfg=dict(smooth_sigma=1.5)),
    "text-baseline": dict(mode="baseline", text=True, cfg=dict()),
    "lot-rescoring": dict(mode="pad_mpam", text=True, cfg=dict(rescore_k=3, rescore_weight=0.5)),
    "lot-rescoring-away": dict(mode="mutual", text=False, cfg=dict(rescore_k=40, rescore_weight=-0.4)),
    # the search space: two of the three taps, each projected onto the lot's 8 principal directions (or a seeded
    # random projection), with coresets chosen in it
    "pca-two-layers": dict(mode="pad_mpam", text=False, cfg=dict(layers=(2, 0), bank_dim=8, full_coreset_ratio=0.5)),
    "random-projection": dict(mode="pad_mpam", text=True, cfg=dict(bank_dim=6, bank_projection="random")),
    # a lot larger than the full bank: every image scored against a sample of 7 (every patch; a coreset of each)
    "sampled-full-bank": dict(mode="pad_mpam", text=True, cfg=dict(full_bank_images=7)),
    "sampled-coreset": dict(mode="mutual", text=False, cfg=dict(full_bank_images=5, full_coreset_ratio=0.5)),
    # each image compared with its 4 most similar lot images only (k = 2 at interval 0.2 of 12 images)
    "image-neighbours": dict(mode="pad_mpam", text=True, cfg=dict(full_bank_neighbours=4, interval_fraction=0.2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_matches_torch_reference(case):
    spec = CASES[case]
    cfg = PAClipConfig.for_mode(spec["mode"], **spec["cfg"])
    feats = random_features(12, seed=1)
    text = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32) if spec["text"] else None
    tfeats = torch_features(feats)
    ttext = None if text is None else torch.from_numpy(text)

    state = lot_stage(feats, text, cfg, host=HOST)
    ref_state = reference.lot_stage(tfeats, ttext, cfg)
    assert isinstance(ref_state, LotState)
    np.testing.assert_array_equal(state.normal_indices, ref_state.normal_indices.numpy())
    assert state.full_scores.keys() == ref_state.full_scores.keys()
    for r in state.full_scores:
        np.testing.assert_allclose(state.full_scores[r], ref_state.full_scores[r].numpy(), atol=1e-5)
    assert ref_state.prior_threshold == pytest.approx(state.prior_threshold, abs=1e-5)

    # augmentations of the chosen images, as the encoder would return them
    idx = state.normal_indices
    aug = random_features(2 * len(idx), seed=3)
    normal_tokens = np.concatenate([feats.layer_tokens[idx], aug.layer_tokens])
    normal_ids = np.concatenate([idx, np.repeat(idx, 2)])
    normal_prior = np.concatenate([np.asarray(state.prior)[idx], np.repeat(np.asarray(state.prior)[idx], 2, axis=0)])
    size = (23, 19)
    result = finish_stage(feats, state, NormalSet(normal_tokens, normal_ids, normal_prior), cfg, size, host=HOST)
    ref = reference.finish_stage(
        tfeats, ref_state, NormalSet(torch.from_numpy(normal_tokens.astype(np.float32)), torch.from_numpy(normal_ids),
                                     torch.from_numpy(normal_prior)), cfg, size)
    assert isinstance(ref, ScoreResult)
    assert result.maps.shape == (12, *size)
    np.testing.assert_allclose(result.patch_scores, ref.patch_scores.numpy(), atol=1e-4)
    np.testing.assert_allclose(result.maps, ref.maps.numpy(), atol=1e-4)
    np.testing.assert_allclose(result.scores, ref.scores.numpy(), atol=1e-4)
    np.testing.assert_allclose(result.map_scores, ref.map_scores.numpy(), atol=1e-4)
    assert (cfg.rescore_k > 0) == (not np.allclose(result.scores, result.map_scores))
    assert result.tau_b.keys() == ref.tau_b.keys()
    for r in result.tau_b:
        assert ref.tau_b[r] == pytest.approx(result.tau_b[r], abs=1e-5)
    assert result.normal_bank_sizes == ref.normal_bank_sizes
    # the maps carry signal: not constant
    assert float(np.ptp(result.maps)) > 1e-3


def test_reference_names_match_numpy_twins():
    """Every public function of the reference is named after its NumPy twin and takes the twin's leading
    arguments in the same order (the twins may add more, such as ``host``)."""
    own = {name: fn for name, fn in inspect.getmembers(reference, inspect.isfunction)
           if fn.__module__ == reference.__name__ and not name.startswith("_")}
    assert own
    for name, fn in own.items():
        twin = getattr(pa_clip, name, None) or getattr(kernels, name, None)
        assert inspect.isfunction(twin), f"reference.{name} has no twin in pa_clip.py or kernels.py"
        ref_params = list(inspect.signature(fn).parameters)
        twin_params = list(inspect.signature(twin).parameters)
        assert twin_params[: len(ref_params)] == ref_params, f"{name}: {ref_params} vs {twin_params}"


@pytest.mark.parametrize("case", ["full-method-text", "sampled-full-bank", "image-neighbours", "mutual"])
def test_numpy_matches_torch_reference_on_a_lot_with_copies(case):
    """Copies of one image (images 9 and 11 of image 0, 10 of 4) go by the first copy's id against every bank,
    full and normal (contract.first_ids): both implementations, from the same ids."""
    spec = CASES[case]
    cfg = PAClipConfig.for_mode(spec["mode"], **spec["cfg"])
    feats = random_features(12, seed=4)
    for copy, first in ((9, 0), (10, 4), (11, 0)):
        for array in (feats.layer_tokens, feats.patch_embeds, feats.image_embeds):
            array[copy] = array[first]
    lot_ids = np.asarray([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 4, 0])
    text = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32) if spec["text"] else None
    tfeats = torch_features(feats)
    state = lot_stage(feats, text, cfg, host=HOST, lot_ids=lot_ids)
    ref_state = reference.lot_stage(tfeats, None if text is None else torch.from_numpy(text), cfg, lot_ids)
    for r in state.full_scores:
        np.testing.assert_allclose(state.full_scores[r], ref_state.full_scores[r].numpy(), atol=1e-5)
        # a copy is never matched with another: the copies of image 0 score alike, none of them near 0
        np.testing.assert_allclose(state.full_scores[r][[0, 9, 11]], state.full_scores[r][[9, 11, 0]], atol=1e-5)
    size = (23, 19)
    result = finish_stage(feats, state, None, cfg, size, host=HOST, query_ids=lot_ids)
    ref = reference.finish_stage(tfeats, ref_state, None, cfg, size, lot_ids)
    np.testing.assert_allclose(result.maps, ref.maps.numpy(), atol=1e-4)
    np.testing.assert_allclose(result.scores, ref.scores.numpy(), atol=1e-4)


def _per_scale_scores(scales, n=3, seed=0):
    rng = np.random.default_rng(seed)
    length = GRID[0] * GRID[1]
    full = {r: rng.random((n, length)).astype(np.float32) for r in scales}
    normal = {r: rng.random((n, length)).astype(np.float32) for r in scales}
    return full, normal, {r: 0.6 for r in scales}


@pytest.mark.parametrize("text_only", [False, True])
def test_the_fusion_weighs_each_scale_by_its_own_normalised_weight(text_only):
    """Eq. 8: scale_weights (1, 4) on scales (1, 3) weigh the 1x1 scale 1/5 and the 3x3 scale 4/5, whichever scores
    are fused (after the adaptive subtraction of Eq. 7, or the text-only row's). Weights are relative: (2, 2) fuses
    exactly as (1, 1) and as the default equal weights."""
    full, normal, taus = _per_scale_scores((1, 3))

    def decided(weights):
        cfg = PAClipConfig(scales=(1, 3), scale_weights=weights, text_only=text_only, alpha=0.5)
        return pa_clip.decide(full, full, normal, taus, cfg, GRID, (12, 10))

    if text_only:
        per_scale = full
    else:  # S_c - alpha S_b 1[S_b <= tau], by hand
        per_scale = {r: full[r] - 0.5 * normal[r] * (normal[r] <= taus[r]) for r in (1, 3)}
    weighted = decided((1, 4))
    np.testing.assert_allclose(weighted.patch_scores, 0.2 * per_scale[1] + 0.8 * per_scale[3], rtol=1e-6)
    equal = decided(None)
    np.testing.assert_allclose(equal.patch_scores, 0.5 * (per_scale[1] + per_scale[3]), rtol=1e-6)
    for weights in ((1, 1), (2, 2)):
        np.testing.assert_allclose(decided(weights).maps, equal.maps, rtol=1e-6)
