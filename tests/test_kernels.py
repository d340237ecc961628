"""Unit tests of the array kernels (NumPy here; the same tests run on CuPy when a GPU host has it)."""

import numpy as np
import pytest
import torch

from postprocess import kernels as K
from postprocess.reference import greedy_coreset

try:
    import cupy
    cupy.zeros(1)
    XPS = [np, cupy]
except Exception:  # no CuPy or no GPU
    cupy = None
    XPS = [np, pytest.param(None, marks=pytest.mark.skip(reason="CuPy with a CUDA GPU is not available here"))]


@pytest.fixture(params=XPS, ids=lambda xp: "numpy" if xp is np else "cupy")
def xp(request):
    return request.param


def knn_atol(xp) -> float:
    """NumPy: float32 throughout. CuPy: the fused kNN multiplies in float16 tiles (float32 accumulation)."""
    return 1e-6 if xp is np else 2e-3


def test_box_mean_uses_valid_neighbours_at_borders(xp):
    grid = xp.arange(12, dtype=xp.float32).reshape(1, 3, 4, 1)
    out = K.to_numpy(K.box_mean(grid, 3))[0, :, :, 0]
    g = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert out[1, 1] == pytest.approx(g[0:3, 0:3].mean())
    assert out[0, 0] == pytest.approx(g[0:2, 0:2].mean())  # corner: 4 valid neighbours
    assert out[2, 3] == pytest.approx(g[1:3, 2:4].mean())


def test_aggregate_outputs_unit_vectors(xp):
    rng = np.random.default_rng(0)
    tokens = xp.asarray(rng.standard_normal((2, 12, 5)).astype(np.float16))
    out = K.aggregate(tokens, (3, 4), 5, "layernorm")
    assert out.dtype == xp.float32
    np.testing.assert_allclose(K.to_numpy((out * out).sum(-1)), 1.0, rtol=1e-5)


def test_greedy_coreset_spreads_out(xp):
    # three tight clusters: three picks must land in three different clusters
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32)
    pts = np.concatenate([c + 0.01 * rng.standard_normal((20, 2)) for c in centres]).astype(np.float32)
    picks = K.to_numpy(K.greedy_coreset(xp.asarray(pts)[None], 3))[0]
    assert sorted({int(p) // 20 for p in picks}) == [0, 1, 2]


def test_greedy_coreset_never_picks_a_point_twice(xp):
    # identical frames: 3 distinct patches, 5 copies each; 10 picks are 10 different patches, the 3 kinds first
    pts = np.tile(np.eye(3, 4, dtype=np.float32), (5, 1))
    picks = K.to_numpy(K.greedy_coreset(xp.asarray(pts)[None], 10))[0]
    assert len(set(picks.tolist())) == 10
    assert {int(p) % 3 for p in picks[:3]} == {0, 1, 2}
    reference = greedy_coreset(torch.from_numpy(pts)[None], 10)[0].numpy()
    np.testing.assert_array_equal(picks, reference)


def test_normal_images_rank_by_their_likeness_to_the_normal_prompt_alone(xp):
    """Eq. 3: S_cls = sim(cls, f_pos) / tau. A softmax against the defective prompt ranks otherwise (here image 1,
    far from both prompts but farther from the defective one) and saturates in float32 into ties."""
    text = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0]], dtype=np.float32)  # f_pos, f_neg
    cls = np.array([[0.95, 0.3, 0.0], [0.5, -0.6, 0.6], [0.2, 0.9, 0.4]], dtype=np.float32)
    got = K.to_numpy(K.normal_prompt_similarity(xp.asarray(cls), xp.asarray(text), 0.01))
    cosine = cls[:, 0] / np.linalg.norm(cls, axis=1)
    np.testing.assert_allclose(got, cosine / 0.01, rtol=1e-5)
    assert list(np.argsort(-got)) == [0, 1, 2]
    softmax = 1.0 - K.to_numpy(K.text_defect_probability(xp.asarray(cls), xp.asarray(text), 0.01))
    assert list(np.argsort(-softmax, kind="stable"))[0] != 0  # the old ranking put another image first


def test_interval_k_is_clamped():
    assert K.interval_k(101, 0.3, 1, 64) == 30
    assert K.interval_k(1001, 0.3, 1, 64) == 64
    assert K.interval_k(3, 0.3, 1, 64) == 1
    assert K.interval_k(2, 0.3, 5, 64) == 1  # never more than the other images


def _unit_vectors(rng, shape):
    """Random float32 vectors of length 1 along the last axis (features as the kNN kernels take them)."""
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_full(q, b, qid, bid, k):
    d = 1 - np.einsum("qlc,bmc->qlbm", q, b).max(-1)  # (Nq, L, Nb)
    d = np.where((qid[:, None] == bid[None, :])[:, None, :], np.inf, d)
    return np.sort(d, axis=-1)[..., :k].mean(-1)


def test_full_bank_scores_chunking_and_self_exclusion(xp):
    rng = np.random.default_rng(1)
    feats = _unit_vectors(rng, (7, 9, 6))
    ids = np.arange(7)
    expected = _brute_full(feats, feats, ids, ids, 2)
    for budget in (64, 1 << 30):  # tiny budget forces many chunks
        got = K.full_bank_scores(xp.asarray(feats), xp.asarray(feats), xp.asarray(ids), xp.asarray(ids), 2, budget)
        np.testing.assert_allclose(K.to_numpy(got), expected, atol=knn_atol(xp))
    # without self-exclusion each patch would find itself at distance 0
    assert expected.min() > 1e-3
    no_exclusion = K.full_bank_scores(xp.asarray(feats), xp.asarray(feats), xp.asarray(ids),
                                      xp.asarray(ids + 100), 1, 1 << 20)
    np.testing.assert_allclose(K.to_numpy(no_exclusion), 0.0, atol=knn_atol(xp))


def test_full_bank_neighbours_read_only_each_querys_most_similar_images(xp):
    """neighbours: each query image against its most similar bank images (cosine of the mean entries), never its
    own; as many as the bank holds (but its own) is the whole search."""
    rng = np.random.default_rng(3)
    # three families of images: a family shares a direction, so an image's look-alikes are its family
    centres = _unit_vectors(rng, (3, 1, 8))
    bank = _unit_vectors(rng, (12, 10, 8)) * 0.6 + np.repeat(centres, 4, axis=0)
    bank = (bank / np.linalg.norm(bank, axis=-1, keepdims=True)).astype(np.float32)
    ids = np.arange(12)
    exact = _brute_full(bank, bank, ids, ids, 2)
    args = (xp.asarray(bank), xp.asarray(bank), xp.asarray(ids), xp.asarray(ids), 2, 1 << 20)
    whole = K.full_bank_scores(*args, neighbours=11)
    np.testing.assert_allclose(K.to_numpy(whole), exact, atol=knn_atol(xp))
    chosen = K.to_numpy(K.nearest_images(xp.asarray(bank), xp.asarray(bank), xp.asarray(ids), xp.asarray(ids), 3))
    assert all(i not in row for i, row in enumerate(chosen))  # never its own image
    assert all({j // 4 for j in row} == {i // 4} for i, row in enumerate(chosen))  # its family's other three
    # where an image's nearest patches lie in its look-alikes, reading those alone loses nothing
    np.testing.assert_allclose(K.to_numpy(K.full_bank_scores(*args, neighbours=3)), exact, atol=knn_atol(xp))
    # images with no families: the kernel reads exactly the chosen images, and never comes nearer than the whole
    bank = _unit_vectors(rng, (12, 10, 8))
    exact = _brute_full(bank, bank, ids, ids, 2)
    args = (xp.asarray(bank), xp.asarray(bank), xp.asarray(ids), xp.asarray(ids), 2, 1 << 20)
    chosen = K.to_numpy(K.nearest_images(xp.asarray(bank), xp.asarray(bank), xp.asarray(ids), xp.asarray(ids), 3))
    narrow = K.to_numpy(K.full_bank_scores(*args, neighbours=3))
    expected = np.stack([_brute_full(bank[i:i + 1], bank[chosen[i]], ids[i:i + 1], chosen[i], 2)[0]
                         for i in range(12)])
    np.testing.assert_allclose(narrow, expected, atol=knn_atol(xp))
    assert (narrow >= exact - 1e-6).all() and (narrow > exact + 1e-3).any()
    # int8 entries: the same images chosen, the scores within the int8 rounding
    q, scale = K.quantize_rows(xp.asarray(bank))
    int8 = K.full_bank_scores(xp.asarray(bank), q, xp.asarray(ids), xp.asarray(ids), 2, 1 << 20, bank_scale=scale,
                              neighbours=3)
    np.testing.assert_allclose(K.to_numpy(int8), narrow, atol=2e-2)


def test_smallest_per_row_finds_the_k_smallest_with_ties_and_infinities(xp):
    rng = np.random.default_rng(11)
    values = rng.integers(0, 6, (40, 30)).astype(np.float32)  # many ties
    values[::3, ::2] = np.inf
    for k in (1, 3, 7, 12):  # argmin passes (k * 4 <= 30) and the partition (k * 4 > 30)
        got = np.sort(K.to_numpy(K.smallest_per_row(xp.asarray(values.copy()), k)), axis=1)
        np.testing.assert_array_equal(got, np.sort(values, axis=1)[:, :k])
    assert K.smallest_per_row(xp.asarray(values[:, :2].copy()), 5).shape == (40, 2)


def test_lot_mutual_scores_compares_each_pair_once_and_matches_the_general_path(xp):
    rng = np.random.default_rng(5)
    feats = _unit_vectors(rng, (7, 9, 6))
    ids = np.arange(7)
    expected = _brute_full(feats, feats, ids, ids, 3)
    # budgets giving groups of 2 and 3 images (pairs of groups that overlap the lot's end), the whole lot in one
    # block, and one too small to hold the lot's minima (the general path)
    pair = 4 * 9 * (9 + 4)  # bytes a pair of images takes in a group block: similarities and the maxima's results
    for budget, group in ((2 * 4 * pair, 2), (2 * 9 * pair, 3), (1 << 30, 7), (64, None)):
        if group:
            assert K.lot_pair_block_images(7, 9, budget // 2) == group
        got = K.lot_mutual_scores(xp.asarray(feats), 3, budget)
        np.testing.assert_allclose(K.to_numpy(got), expected, atol=knn_atol(xp))
    one = K.lot_mutual_scores(xp.asarray(feats[:3]), 1, 2 * K.lot_minima_bytes(3, 9))  # groups of one image
    assert K.lot_pair_block_images(3, 9, K.lot_minima_bytes(3, 9)) == 1
    np.testing.assert_allclose(K.to_numpy(one), _brute_full(feats[:3], feats[:3], ids[:3], ids[:3], 1),
                               atol=knn_atol(xp))


BFLOAT16 = pytest.mark.skipif(not K.bfloat16_available(), reason="torch with oneDNN bfloat16 is not installed here")


@BFLOAT16
def test_bfloat16_products_stay_within_their_rounding_and_every_knn_kernel_takes_them():
    rng = np.random.default_rng(11)
    a, b = _unit_vectors(rng, (40, 64)), _unit_vectors(rng, (50, 64))
    exact = a @ b.T
    got = K.similarities(a, b, "bfloat16")
    assert got.dtype == np.float32 and got.shape == exact.shape
    # inputs rounded to 8 bits of mantissa and the products too: a few 1e-3 at most, never exact
    assert 0 < np.abs(got - exact).max() < 8e-3
    np.testing.assert_array_equal(K.similarities(a, b), exact)  # float32 stays NumPy's product
    # float16 banks (how full banks are stored) go through the same way
    assert np.abs(K.similarities(a, b.astype(np.float16), "bfloat16") - exact).max() < 8e-3

    feats = _unit_vectors(rng, (6, 9, 16))
    ids = np.arange(6)
    for kernel in (lambda m: K.full_bank_scores(feats, feats, ids, ids, 2, 1 << 20, matmul=m),
                   lambda m: K.lot_mutual_scores(feats, 2, 1 << 20, matmul=m),
                   lambda m: K.normal_bank_scores(feats, feats.reshape(-1, 16), ids, np.repeat(ids, 9), 2, 1 << 20,
                                                  matmul=m)):
        exact, rounded = kernel("float32"), kernel("bfloat16")
        assert 0 < np.abs(rounded - exact).max() < 8e-3  # the precision reached the product


def test_normal_bank_scores_excludes_own_entries(xp):
    rng = np.random.default_rng(2)
    q = _unit_vectors(rng, (3, 4, 5))
    bank = q.reshape(12, 5)
    bank_ids = np.repeat(np.arange(3), 4)
    got = K.to_numpy(K.normal_bank_scores(xp.asarray(q), xp.asarray(bank), xp.asarray(np.arange(3)),
                                          xp.asarray(bank_ids), 2, 40))
    d = 1 - q.reshape(12, 5) @ bank.T
    d[np.repeat(np.arange(3), 4)[:, None] == bank_ids[None, :]] = np.inf
    np.testing.assert_allclose(got.reshape(-1), np.sort(d, axis=1)[:, :2].mean(1), atol=1e-6)
    # a new image (id -1) is allowed to match everything, so an exact copy scores 0
    new = K.to_numpy(K.normal_bank_scores(xp.asarray(q[:1]), xp.asarray(bank), xp.asarray(np.array([-1])),
                                          xp.asarray(bank_ids), 1, 1 << 20))
    np.testing.assert_allclose(new, 0.0, atol=1e-6)

    # fewer than k entries from other images: the mean of those there are; none at all: 0, never inf or NaN
    few_ids = np.array([0] * 11 + [1])
    few = K.to_numpy(K.normal_bank_scores(xp.asarray(q[:1]), xp.asarray(bank), xp.asarray(np.array([0])),
                                          xp.asarray(few_ids), 3, 1 << 20))
    np.testing.assert_allclose(few[0], 1 - q[0] @ bank[11], atol=1e-6)
    alone = K.to_numpy(K.normal_bank_scores(xp.asarray(q[:1]), xp.asarray(bank), xp.asarray(np.array([0])),
                                            xp.asarray(np.zeros(12, np.int64)), 3, 1 << 20))
    np.testing.assert_array_equal(alone, 0.0)

def test_adaptive_subtraction(xp):
    s_c = xp.asarray(np.array([1.0, 1.0, 1.0], np.float32))
    s_b = xp.asarray(np.array([0.2, 0.5, 0.9], np.float32))
    out = K.to_numpy(K.adaptive_subtraction(s_c, s_b, 0.5, 0.5))
    np.testing.assert_allclose(out, [0.9, 0.75, 1.0])


def test_maps_match_size_and_keep_constants(xp):
    scores = xp.full((2, 12), 0.3, dtype=xp.float32)
    maps = K.to_numpy(K.patch_scores_to_maps(scores, (3, 4), (30, 40), 2.0))
    assert maps.shape == (2, 30, 40)
    np.testing.assert_allclose(maps, 0.3, atol=1e-6)  # interpolation and smoothing preserve a constant


def test_image_scores(xp):
    maps = xp.asarray(np.arange(200, dtype=np.float32).reshape(2, 10, 10))
    np.testing.assert_allclose(K.to_numpy(K.image_scores(maps, "max", 0.0)), [99, 199])
    np.testing.assert_allclose(K.to_numpy(K.image_scores(maps, "topk_mean", 0.03)), [98, 198])


@pytest.mark.skipif(cupy is None, reason="CuPy with a CUDA GPU is not available here")
def test_stages_on_cupy_match_numpy():
    """The whole scoring (both stages) on CuPy arrays gives the NumPy maps: one code path for both."""
    xp = cupy
    from postprocess.config import PAClipConfig
    from postprocess.contract import Features
    from postprocess.pa_clip import finish_stage, lot_stage

    rng = np.random.default_rng(5)
    tokens = rng.standard_normal((8, 2, 20, 12)).astype(np.float16)
    patch = rng.standard_normal((8, 20, 6)).astype(np.float16)
    cls = rng.standard_normal((8, 6)).astype(np.float32)
    text = rng.standard_normal((2, 6)).astype(np.float32)
    cfg = PAClipConfig(normal_coreset_ratio=0.5, full_coreset_ratio=0.5, smooth_sigma=1.0)
    host = Features(tokens, patch, cls, (4, 5))
    device = Features(xp.asarray(tokens), xp.asarray(patch), xp.asarray(cls), (4, 5))
    expected = finish_stage(host, lot_stage(host, text, cfg), None, cfg, (16, 20))
    got = finish_stage(device, lot_stage(device, xp.asarray(text), cfg), None, cfg, (16, 20))
    np.testing.assert_allclose(K.to_numpy(got.maps), expected.maps, atol=1e-3)  # fused float16 kNN tiles


@pytest.mark.parametrize("kernel, budget", [("full", 256 << 10), ("normal", 1 << 20), ("lot", 34 << 20)])
def test_knn_intermediates_stay_within_the_memory_budget_for_a_500_image_lot(kernel, budget):
    """tracemalloc sees NumPy's allocations: the peak above the inputs, less the output, stays under the budget,
    and the chunked result equals the one computed in a single block."""
    import tracemalloc

    rng = np.random.default_rng(7)
    n, length, channels = 500, 16, 8
    feats = _unit_vectors(rng, (n, length, channels))
    bank = feats.astype(np.float16)  # stored banks are float16: their float32 copies count too
    ids = np.arange(n)
    if kernel == "full":
        run = lambda b: K.full_bank_scores(feats, bank, ids, ids, 30, b)  # noqa: E731
    elif kernel == "lot":  # the lot against itself: its 16 MB of minima and a block of pairs (32 MB at least)
        run = lambda b: K.lot_mutual_scores(feats, 30, b)  # noqa: E731
    else:
        run = lambda b: K.normal_bank_scores(feats, bank.reshape(-1, channels), ids, np.repeat(ids, length), 3, b)  # noqa: E731
    run(budget)  # once before tracing: what the interpreter allocates on a first call is not the kernel's
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = run(budget)
        peak = tracemalloc.get_traced_memory()[1] - before - out.nbytes
    finally:
        tracemalloc.stop()
    assert 0 < peak <= budget, f"peak {peak} bytes of intermediates against a budget of {budget}"
    np.testing.assert_allclose(out, run(1 << 30), atol=1e-6)


def test_neighbour_rescore_moves_each_score_toward_its_look_alikes():
    """Two groups of look-alike images (embeddings near x or near y); k = 2 neighbours are the other two of a group."""
    embeds = np.array([[1, 0.1], [1, 0], [1, -0.1], [0.1, 1], [0, 1], [-0.1, 1]], np.float32)
    scores = np.array([1.0, 2.0, 3.0, 10.0, 11.0, 30.0], np.float32)
    ids = np.arange(6)
    got = K.neighbour_rescore(scores, embeds, embeds, scores, 2, 0.5, ids)
    means = np.array([2.5, 2.0, 1.5, 20.5, 20.0, 10.5])  # each image's two group-mates, never itself
    np.testing.assert_allclose(got, scores + 0.5 * (means - scores), rtol=1e-6)
    away = K.neighbour_rescore(scores, embeds, embeds, scores, 2, -0.5, ids)
    np.testing.assert_allclose(away, scores - 0.5 * (means - scores), rtol=1e-6)
    # a new image (id -1) counts every reference: its two nearest are images 0 and 1
    new = K.neighbour_rescore(np.array([5.0], np.float32), np.array([[1, 0.05]], np.float32), embeds, scores, 2, 1.0,
                              np.array([-1]))
    np.testing.assert_allclose(new, [1.5])
    # k larger than the lot: the mean of all the others
    np.testing.assert_allclose(K.neighbour_rescore(scores, embeds, embeds, scores, 50, 1.0, ids)[0],
                               (scores.sum() - 1.0) / 5, rtol=1e-6)
    # ... and for a new image beside them, the mean of every reference (one k for both left its farthest out)
    mixed = K.neighbour_rescore(np.array([0.0, 0.0], np.float32), embeds[:2], embeds, scores, 50, 1.0,
                                np.array([-1, 0]))
    np.testing.assert_allclose(mixed, [scores.mean(), (scores.sum() - 1.0) / 5], rtol=1e-6)


def test_the_lots_pairs_fall_back_to_the_general_path_when_one_pair_passes_the_budget():
    """The lot's minima fit half the budget, one pair of images' block does not: the pairs' path held it anyway
    (its group floored at one image), 7 MB against a 1 MB budget at 37 x 37 patches."""
    import tracemalloc

    rng = np.random.default_rng(3)
    n, length = 3, 400
    feats = _unit_vectors(rng, (n, length, 8))
    budget = 200_000
    assert K.lot_minima_bytes(n, length) <= K.half_budget(budget) < 4 * length * (length + 4)
    K.lot_mutual_scores(feats, 2, budget)  # once before tracing
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = K.lot_mutual_scores(feats, 2, budget)
        peak = tracemalloc.get_traced_memory()[1] - before - out.nbytes
    finally:
        tracemalloc.stop()
    assert peak <= budget, f"peak {peak} bytes against a budget of {budget}"
    np.testing.assert_allclose(out, _brute_full(feats, feats, np.arange(n), np.arange(n), 2), atol=1e-5)


def test_fusion_keeps_float32_maps_under_numpy_2s_promotion():
    """Under NEP 50 (NumPy 2, the GPU image's) a NumPy float64 weight or alpha made the fused maps float64 (a
    scale weight may be any real number, np.float64 included); NumPy 1.26 emulates NEP 50 on request."""
    from postprocess.config import PAClipConfig
    from postprocess.pa_clip import fuse

    rng = np.random.default_rng(0)
    full = [rng.random((2, 5), dtype=np.float32) for _ in range(2)]
    normal = [rng.random((2, 5), dtype=np.float32) for _ in range(2)]
    weights, alpha = [np.float64(0.25), np.float64(0.75)], np.float64(0.5)
    state = getattr(np, "_get_promotion_state", lambda: None)()
    if state is not None:
        np._set_promotion_state("weak")
    try:
        fused = K.subtract_and_fuse(full, normal, [0.5, 0.5], weights, alpha)
        cfg = PAClipConfig(scales=(1, 3), scale_weights=(np.float64(0.5), np.float64(0.5)))
        fused_scales = fuse({1: full[0], 3: full[1]}, cfg)
    finally:
        if state is not None:
            np._set_promotion_state(state)
    assert fused.dtype == np.float32 and fused_scales.dtype == np.float32
