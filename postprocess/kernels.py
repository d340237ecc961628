"""Array kernels of PA-CLIP scoring, written once against an array module ``xp``.

``xp`` is ``numpy`` on a CPU and ``cupy`` on a GPU: every function takes its module from its input arrays, and
uses only functions both modules have (matmul, cumsum, take, partition, quantile, ...). Nothing here ever holds a
whole (N*L) x (N*L) distance matrix: the kNN kernels work in chunks sized by a memory budget in bytes.
"""

from __future__ import annotations

import math

import numpy as np

try:  # CuPy is optional: present on GPU hosts only.
    import cupy as _cupy
except Exception:  # pragma: no cover - depends on the host
    _cupy = None


def get_xp(*arrays):
    """The array module the arrays live in: cupy, numpy, or the namespace an array type names for itself
    (``__array_namespace__``; the tests' strict device module uses it)."""
    if _cupy is not None and any(isinstance(a, _cupy.ndarray) for a in arrays):
        return _cupy
    for a in arrays:
        if not isinstance(a, np.ndarray) and hasattr(a, "__array_namespace__"):
            return a.__array_namespace__()
    return np


def to_numpy(array) -> np.ndarray:
    """The explicit move to the host: only maps, scores and bank files take it."""
    if not isinstance(array, np.ndarray) and hasattr(array, "get"):  # cupy (and the tests' strict device arrays)
        return array.get()
    return np.asarray(array)


def _fused(xp):
    """The fused CUDA kernels (``postprocess.cuda_kernels``) when the arrays are CuPy's, else None: the code in this
    module is then the path, and the kernels' reference."""
    if _cupy is None or xp is not _cupy:
        return None
    from . import cuda_kernels

    return cuda_kernels if cuda_kernels.enabled() else None


def _float32(x):
    xp = get_xp(x)
    return x.astype(xp.float32, copy=False)


# How the kNN kernels multiply on a CPU (``HostSettings.cpu_matmul``, ``host.CPU_MATMULS``): NumPy's float32 BLAS, or
# bfloat16 products through torch (oneDNN; AVX-512 BF16 where the CPU has it). CuPy arrays always take float32 (the
# GPU has its own fused kernels).


def bfloat16_available() -> bool:
    """Whether this host can take ``cpu_matmul="bfloat16"``: torch importable and oneDNN's bfloat16 usable."""
    try:
        import torch

        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # no torch (a serving machine may have only the base install), or an older torch
        return False


def _bfloat16_product(a, b):
    """``a @ b.T`` of NumPy rows as a torch bfloat16 tensor (both sides rounded to bfloat16, products too)."""
    import torch

    left = torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16)
    right = torch.from_numpy(np.ascontiguousarray(b)).to(torch.bfloat16)
    return left @ right.T


def similarities(a, b, precision: str = "float32"):
    """(n, m) float32 dot products ``a @ b.T`` of rows a (n, C) and b (m, C). ``precision="bfloat16"`` on NumPy
    arrays: both sides rounded to bfloat16, multiplied by torch and the products rounded to bfloat16 (about 3
    significant digits: cosine similarities off by up to ~4e-3; ``benchmarks/online_speed.py`` measures the speed,
    ``benchmarks/bank_frontier.py`` what it does to accuracy)."""
    if precision == "bfloat16" and get_xp(a, b) is np:
        return _bfloat16_product(a, b).float().numpy()
    return a @ b.T


def nearest_distances(a, b, shape, axes, precision: str = "float32") -> tuple:
    """Cosine distances to the nearest: one minus the maxima of ``similarities(a, b)`` seen as ``shape`` along each
    of ``axes``, a tuple of float32 arrays. In bfloat16 the maxima are taken before widening to float32, so only
    they are copied, not every product."""
    if precision == "bfloat16" and get_xp(a, b) is np:
        sims = _bfloat16_product(a, b).reshape(shape)
        return tuple(1.0 - sims.amax(dim=axis).float().numpy() for axis in axes)
    sims = similarities(a, b).reshape(shape)
    return tuple(1.0 - sims.max(axis=axis) for axis in axes)  # NumPy subtracts from a temporary in place


# ---------------------------------------------------------------------------------------------------------------
# Feature aggregation (Eq. 1)
# ---------------------------------------------------------------------------------------------------------------


def layer_norm(x, eps: float = 1e-5):
    """Per-token normalisation over channels (no affine): tames the few huge channels of ViT residual streams."""
    x = _float32(x)
    xp = get_xp(x)
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / xp.sqrt(var + eps)


def l2_normalize(x, eps: float = 1e-12):
    xp = get_xp(x)
    norm = xp.sqrt((x * x).sum(axis=-1, keepdims=True))
    return x / xp.maximum(norm, eps)


def _box_mean_matrix(n: int, radius: int) -> np.ndarray:
    """(n, n) operator averaging each position with its neighbours within +-radius that exist (borders clipped)."""
    idx = np.arange(n)
    band = (np.abs(idx[:, None] - idx[None, :]) <= radius).astype(np.float32)
    return band / band.sum(axis=1, keepdims=True)


def box_mean(grid_features, r: int):
    """Mean over the r x r neighbourhood of each patch of (N, h, w, C); at borders, the mean of valid neighbours.

    The window is separable and so is its count of valid neighbours, so the 2-D mean is a row operator then a
    column operator: two small matrix products, which BLAS (or cuBLAS) does far faster than shifted sums.
    """
    if r == 1:
        return grid_features
    xp = get_xp(grid_features)
    fused = _fused(xp)
    if fused is not None:
        return fused.box_mean(grid_features, r)
    n, h, w, c = grid_features.shape
    rows = xp.asarray(_box_mean_matrix(h, r // 2))
    cols = xp.asarray(_box_mean_matrix(w, r // 2))
    x = rows @ grid_features.reshape(n, h, w * c)  # along the grid's rows
    return (cols @ x.reshape(n * h, w, c)).reshape(n, h, w, c)  # along its columns


def aggregate(tokens, grid: tuple[int, int], r: int, feature_norm: str = "none"):
    """(N, L, C) patch tokens of one layer -> (N, L, C) r x r-aggregated, L2-normalised features (float32)."""
    x = _float32(tokens)
    if feature_norm == "layernorm":
        x = layer_norm(x)
    n, length, channels = x.shape
    h, w = grid
    if h * w != length:
        raise ValueError(f"grid {grid} does not match {length} tokens")
    x = box_mean(x.reshape(n, h, w, channels), r).reshape(n, length, channels)
    return l2_normalize(x)


# ---------------------------------------------------------------------------------------------------------------
# Text scores (Eq. 2-3)
# ---------------------------------------------------------------------------------------------------------------


def normal_prompt_similarity(features, text_embeds, tau: float):
    """Eq. 3: S_cls = sim(feature, f_pos) / tau, the cosine to the normal prompt (row 0 of ``text_embeds``) alone.
    The most normal images rank highest. (A softmax against the defective prompt, as P(normal) was read before,
    is another ranking, and saturates in float32: 7 of 20 random images tied at exactly 1.0, lot order deciding.)"""
    f = l2_normalize(_float32(features))
    t = l2_normalize(_float32(text_embeds[:1]))
    return (f @ t.T)[..., 0] / tau


def text_defect_probability(features, text_embeds, tau: float):
    """P(defective) of each feature vector: softmax over (cos to f_pos, cos to f_neg) / tau, second entry.

    ``text_embeds`` is (2, D): row 0 the normal prompt, row 1 the defective prompt.
    """
    xp = get_xp(features)
    f = l2_normalize(_float32(features))
    t = l2_normalize(_float32(text_embeds))
    logits = (f @ t.T) / tau
    # softmax of two logits: P(neg) = sigmoid(l_neg - l_pos)
    return 1.0 / (1.0 + xp.exp(logits[..., 0] - logits[..., 1]))


# ---------------------------------------------------------------------------------------------------------------
# Coreset (approximate greedy k-center after a random projection, as in PatchCore)
# ---------------------------------------------------------------------------------------------------------------


def random_projection(d_in: int, d_out: int, seed: int) -> np.ndarray:
    """A seeded Gaussian projection (numpy, float32); the same matrix serves NumPy, CuPy and the reference."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((d_in, d_out)) / math.sqrt(d_out)).astype(np.float32)


CHOSEN = -1.0  # greedy_coreset: a chosen point's distance to the chosen set, below any real (squared) distance


def coreset_size(n: int, ratio: float) -> int:
    return max(1, min(n, int(math.ceil(ratio * n))))


def greedy_coreset(points, n_select: int):
    """Greedy k-center selection in each group of (G, P, d) points -> (G, n_select) indices.

    Starts from the point nearest the group mean, then repeatedly takes the point farthest from the chosen set. A
    chosen point's distance is set below every other (CHOSEN), so that a group with fewer distinct points than
    ``n_select`` (identical frames) still gets ``n_select`` different indices, never one point twice.
    """
    xp = get_xp(points)
    points = _float32(points)
    groups, n_points, _ = points.shape
    if n_select >= n_points:
        return xp.tile(xp.arange(n_points)[None, :], (groups, 1))
    sq_norm = (points * points).sum(axis=-1)  # (G, P)
    rows = xp.arange(groups)

    def sq_dist_to(idx):
        centre = points[rows, idx]  # (G, d)
        dots = (points @ centre[:, :, None])[..., 0]  # batched matrix-vector product (BLAS)
        return xp.maximum(sq_norm - 2.0 * dots + (centre * centre).sum(axis=-1)[:, None], 0.0)

    mean = points.mean(axis=1)
    start = xp.argmin(((points - mean[:, None, :]) ** 2).sum(axis=-1), axis=1)
    min_dist = sq_dist_to(start)
    min_dist[rows, start] = CHOSEN
    selected = xp.empty((groups, n_select), dtype=xp.int64)
    selected[:, 0] = start
    fused = _fused(xp)
    if fused is not None:  # the distance update and its argmax in one kernel launch per step
        nxt = xp.argmax(min_dist, axis=1)
        for t in range(1, n_select):
            selected[:, t] = nxt
            nxt = fused.coreset_step(points, sq_norm, min_dist, nxt)
        return selected
    for t in range(1, n_select):
        nxt = xp.argmax(min_dist, axis=1)
        selected[:, t] = nxt
        min_dist = xp.minimum(min_dist, sq_dist_to(nxt))
        min_dist[rows, nxt] = CHOSEN
    return selected


# ---------------------------------------------------------------------------------------------------------------
# Psi: cosine kNN against the banks (Eq. 5-6)
# ---------------------------------------------------------------------------------------------------------------


def interval_k(n_bank_images: int, fraction: float, k_min: int, k_max: int) -> int:
    """k of the interval average: round(fraction * (N - 1)) clamped to [k_min, k_max] and to N - 1."""
    k = int(round(fraction * (n_bank_images - 1)))
    k = max(k_min, min(k_max, k))
    return max(1, min(k, max(1, n_bank_images - 1)))


# The chunk sizes of the kNN kernels, one formula each (bytes as NumPy/CuPy hold them: float32 4, bool 1).


def _chunk(total: int, per_item_bytes: int, budget_bytes: int) -> int:
    """How many of ``total`` items of ``per_item_bytes`` fit ``budget_bytes``: at least 1, at most ``total``."""
    return int(max(1, min(total, budget_bytes // max(1, per_item_bytes))))


def half_budget(budget_bytes: int) -> int:
    """The share of each of the two intermediates a kNN pass holds at once: the per-row results (minima, best k)
    and one block of similarities or distances (with its bank chunk)."""
    return budget_bytes // 2


def full_bank_row_bytes(n_bank: int, per_image: int) -> int:
    """Bounds a row block of ``full_bank_scores``: per query row, its per-image minima and the copies ``where`` and
    ``partition`` make (3 x float32 per bank image), the own-image mask (bool) and one image's similarities."""
    return 4 * (3 * n_bank + per_image) + n_bank


def full_bank_image_bytes(rows: int, per_image: int, channels: int) -> int:
    """Bounds a bank chunk of ``full_bank_scores``: per bank image, its similarities to the block's ``rows``
    (float32) and its patches in float32."""
    return per_image * (4 * rows + 4 * channels)


# Bank entries a row block of normal_bank_scores is sized for: an entry chunk holds at least these many (more when
# the block has fewer rows than the budget allows).
NORMAL_ROW_ENTRIES = 4096


def normal_bank_row_bytes(n_entries: int, k: int) -> int:
    """Bounds a row block of ``normal_bank_scores``: per query row, 17 bytes per entry of a chunk of up to
    NORMAL_ROW_ENTRIES (the distances, the mask, ``where``'s copy, and room for a ``partition``'s copy where
    ``smallest_per_row`` takes one) and 12 per kept neighbour (the best k, in the merge and in its partition)."""
    return 17 * min(n_entries, NORMAL_ROW_ENTRIES) + 12 * k


def normal_bank_entry_bytes(rows: int, channels: int) -> int:
    """Bounds an entry chunk of ``normal_bank_scores``: per entry, 17 bytes per row of the block (as above) and the
    entry in float32."""
    return 17 * rows + 4 * channels


def quantize_rows(values):
    """int8 entries with one float32 scale per row (the last axis): values ~= q * scale, |q| <= 127."""
    xp = get_xp(values)
    values = _float32(values)
    scale = xp.abs(values).max(axis=-1) / 127.0
    scale = xp.where(scale > 0, scale, xp.float32(1.0)).astype(xp.float32)
    return xp.rint(values / scale[..., None]).astype(xp.int8), scale


def dequantize_rows(q, scale, dtype=None):
    xp = get_xp(q)
    return (q.astype(xp.float32) * scale[..., None]).astype(dtype or xp.float32, copy=False)


def image_descriptors(entries, scale=None, budget_bytes: int = 1 << 26):
    """(N, C) float32 unit vectors: the mean of each image's (N, m, C) entries (int8 ones with their (N, m) scales),
    images taken in chunks whose float32 copy fits ``budget_bytes``."""
    xp = get_xp(entries)
    n, per_image, channels = entries.shape
    out = xp.empty((n, channels), dtype=xp.float32)
    step = _chunk(n, 4 * per_image * channels, budget_bytes)
    for b0 in range(0, n, step):
        chunk = entries[b0:b0 + step]
        chunk = _float32(chunk) if scale is None else dequantize_rows(chunk, scale[b0:b0 + step])
        out[b0:b0 + step] = chunk.mean(axis=1)
    return l2_normalize(out)


def nearest_images(queries, bank, query_ids, bank_ids, count: int, bank_scale=None, budget_bytes: int = 1 << 26,
                   bank_descriptors=None):
    """(Nq, count) indices of each query image's ``count`` most similar bank images (cosine of the mean entries,
    ``image_descriptors``), most similar first, images with the query's own id never among them.
    ``bank_descriptors``: the bank's ``image_descriptors`` where the caller keeps them (a stored bank's do not
    change, and reading them from every entry again per request grows with the bank)."""
    xp = get_xp(queries)
    if bank_descriptors is None:
        bank_descriptors = image_descriptors(bank, bank_scale, budget_bytes)
    similarity = image_descriptors(queries, None, budget_bytes) @ bank_descriptors.T
    similarity = xp.where(query_ids[:, None] == bank_ids[None, :], -xp.inf, similarity)
    return xp.argsort(-similarity, axis=1)[:, :count]


def full_bank_scores(queries, bank, query_ids, bank_ids, k: int, budget_bytes: int, bank_scale=None,
                     matmul: str = "float32", neighbours: int = 0, bank_descriptors=None):
    """Interval-averaged mutual score of each query patch against a full bank.

    queries (Nq, L, C) and bank (Nb, m, C) are unit vectors (or their projections); bank image b carries id
    ``bank_ids[b]``; an int8 bank comes with ``bank_scale`` (Nb, m), one scale per entry (``quantize_rows``). For
    each query patch: cosine distance to the nearest patch of every bank image, images with the query's own id
    left out, then the mean of the k smallest of those per-image minima. Returns (Nq, L) float32. ``matmul``: the
    products' precision on a CPU (``similarities``).

    ``neighbours`` > 0: each query image is compared with its ``max(neighbours, k)`` most similar bank images only
    (``nearest_images``, by the bank's ``bank_descriptors`` where given), not with all: the interval reads the
    nearest few images anyway, and the work per query no longer grows with the bank. A bank with no more images
    than that (its own left out) is searched whole.

    Memory: query patches are taken in row blocks (a block may be part of one image) and bank images in chunks, so
    that the per-image minima of a block (with the copies ``where`` and ``partition`` make) fit half the budget and
    one similarity block (with the bank chunk in float32) the other half.
    """
    xp = get_xp(queries)
    count = max(neighbours, k)
    if neighbours > 0 and count < bank.shape[0] - 1:
        chosen = nearest_images(queries, bank, query_ids, bank_ids, count, bank_scale, half_budget(budget_bytes),
                                bank_descriptors)
        out = xp.empty(queries.shape[:2], dtype=xp.float32)
        for i in range(queries.shape[0]):  # one query image against its own neighbours (the same kernels)
            pick = chosen[i]
            out[i] = full_bank_scores(queries[i:i + 1], bank[pick], query_ids[i:i + 1], bank_ids[pick], k,
                                      budget_bytes, None if bank_scale is None else bank_scale[pick], matmul)[0]
        return out
    fused = _fused(xp)
    if fused is not None and k <= fused.MAX_K:
        if bank_scale is not None:  # the fused kNN reads float16 entries
            bank = dequantize_rows(bank, bank_scale, xp.float16)
        return fused.full_bank_scores(queries, bank, query_ids, bank_ids, k, budget_bytes)
    n_query, length, channels = queries.shape
    n_bank, per_image, _ = bank.shape
    flat_queries = queries.reshape(n_query * length, channels)
    flat_bank = bank.reshape(n_bank * per_image, channels)
    flat_scale = None if bank_scale is None else bank_scale.reshape(n_bank * per_image)
    row_ids = xp.repeat(query_ids, length)
    out = xp.empty(n_query * length, dtype=xp.float32)
    half = half_budget(budget_bytes)
    rows = _chunk(n_query * length, full_bank_row_bytes(n_bank, per_image), half)
    for r0 in range(0, n_query * length, rows):
        r1 = min(n_query * length, r0 + rows)
        q = flat_queries[r0:r1]
        minima = xp.empty((r1 - r0, n_bank), dtype=xp.float32)
        b_chunk = _chunk(n_bank, full_bank_image_bytes(r1 - r0, per_image, channels), half)
        for b0 in range(0, n_bank, b_chunk):
            b1 = min(n_bank, b0 + b_chunk)
            entries = flat_bank[b0 * per_image : b1 * per_image]
            if flat_scale is not None:  # int8: this chunk in float32 (what the chunk's bytes are sized for)
                entries = dequantize_rows(entries, flat_scale[b0 * per_image : b1 * per_image])
            minima[:, b0:b1] = nearest_distances(q, entries, (r1 - r0, b1 - b0, per_image), (-1,), matmul)[0]
        own = row_ids[r0:r1, None] == bank_ids[None, :]  # a query never matches its own image
        minima = xp.where(own, xp.float32(xp.inf), minima)
        out[r0:r1] = xp.partition(minima, k - 1, axis=-1)[:, :k].mean(axis=-1)
    return out.reshape(n_query, length)


def lot_minima_bytes(n_images: int, length: int) -> int:
    """Bounds ``lot_mutual_scores``: every patch's per-image minima of the whole lot at once (float32)."""
    return 4 * n_images * n_images * length


def lot_pair_bytes(length: int) -> int:
    """Bytes one pair of images takes in a group block of ``lot_mutual_scores``: their (L, L) float32 similarities
    and the four (1, L, 1) float32 results of its row and column maxima (each maximum, then one minus it)."""
    return 4 * length * (length + 4)


def lot_pair_block_images(n_images: int, length: int, budget_bytes: int) -> int:
    """Images per group in ``lot_mutual_scores``: one group pair's block (g^2 ``lot_pair_bytes``) fits the budget."""
    return max(1, min(n_images, int((budget_bytes // lot_pair_bytes(length)) ** 0.5)))


def lot_mutual_scores(feats, k: int, budget_bytes: int, matmul: str = "float32"):
    """``full_bank_scores`` of a lot against itself with every patch in the bank (image i carries id i).

    Image i's minima against image j and j's against i are the row and column maxima of one similarity block, so
    each pair of images is multiplied once: half the products of the general path. The lot's minima are held whole
    (``lot_minima_bytes``); when they do not fit half the budget, nor one pair of images' block does, or the fused
    CUDA kernels serve the arrays, this is ``full_bank_scores``. The products' rounding may differ from the general
    path's in the last bit.
    """
    xp = get_xp(feats)
    n, length, channels = feats.shape
    half = half_budget(budget_bytes)
    if _fused(xp) is not None or lot_minima_bytes(n, length) > half or lot_pair_bytes(length) > half:
        ids = xp.arange(n)
        return full_bank_scores(feats, feats, ids, ids, k, budget_bytes, matmul=matmul)
    flat = feats.reshape(n * length, channels)
    minima = xp.empty((n, length, n), dtype=xp.float32)  # [query image, patch, bank image]
    group = lot_pair_block_images(n, length, half)
    for a0 in range(0, n, group):
        a1 = min(n, a0 + group)
        for b0 in range(a0, n, group):
            b1 = min(n, b0 + group)
            rows, cols = nearest_distances(flat[a0 * length : a1 * length], flat[b0 * length : b1 * length],
                                           (a1 - a0, length, b1 - b0, length), (3, 1), matmul)
            minima[a0:a1, :, b0:b1] = rows
            minima[b0:b1, :, a0:a1] = cols.transpose(1, 2, 0)
            del rows, cols
    own = xp.arange(n)
    minima[own, :, own] = xp.float32(xp.inf)  # a query never matches its own image
    out = xp.empty((n, length), dtype=xp.float32)
    rows = _chunk(n, lot_minima_bytes(n, length) // n, half)  # partition copies a block of images' minima
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        out[r0:r1] = xp.partition(minima[r0:r1], k - 1, axis=-1)[..., :k].mean(axis=-1)
    return out


def smallest_per_row(values, k: int):
    """(R, min(k, M)) the k smallest of each row of (R, M) float32 ``values`` (in no order; ``values`` is
    overwritten). For a few of many, k passes of ``argmin`` (one vectorised read of the row each) beat a ``partition``
    of the whole row several times over on a CPU, where the normal bank's kNN spent most of its time."""
    xp = get_xp(values)
    k = min(k, values.shape[1])
    if k * 4 > values.shape[1]:  # a large share of the row: one partition is cheaper
        return xp.partition(values, k - 1, axis=1)[:, :k]
    rows = xp.arange(values.shape[0])
    out = xp.empty((values.shape[0], k), dtype=values.dtype)
    for j in range(k):
        at = values.argmin(axis=1)
        out[:, j] = values[rows, at]
        values[rows, at] = xp.inf
    return out


def normal_bank_scores(queries, bank, query_ids, bank_ids, k: int, budget_bytes: int, matmul: str = "float32"):
    """Mean cosine distance of each query patch to its k nearest normal-bank entries (own image's entries excluded).

    queries (Nq, L, C), bank (M, C), bank_ids (M,). Returns (Nq, L) float32. Query patches in row blocks, bank
    entries in chunks: a block's distances to a chunk (with the mask, the merge with the best k so far and the
    partition's copy) and the chunk in float32 stay within the budget.
    """
    xp = get_xp(queries)
    n_query, length, channels = queries.shape
    n_entries = bank.shape[0]
    k = max(1, min(k, n_entries))
    flat_queries = queries.reshape(n_query * length, channels)
    row_ids = xp.repeat(query_ids, length)
    out = xp.empty(n_query * length, dtype=xp.float32)
    half = half_budget(budget_bytes)
    rows = _chunk(n_query * length, normal_bank_row_bytes(n_entries, k), half)
    for r0 in range(0, n_query * length, rows):
        r1 = min(n_query * length, r0 + rows)
        q = flat_queries[r0:r1]
        best = xp.full((r1 - r0, k), xp.inf, dtype=xp.float32)
        m_chunk = _chunk(n_entries, normal_bank_entry_bytes(r1 - r0, channels), half)
        for m0 in range(0, n_entries, m_chunk):
            m1 = min(n_entries, m0 + m_chunk)
            dist = 1.0 - similarities(q, bank[m0:m1], matmul)
            dist = xp.where(row_ids[r0:r1, None] == bank_ids[None, m0:m1], xp.float32(xp.inf), dist)
            both = xp.concatenate([best, smallest_per_row(dist.astype(xp.float32, copy=False), k)], axis=1)
            del dist
            best = xp.partition(both, k - 1, axis=1)[:, :k]
        out[r0:r1] = finite_mean(best, axis=1)
    return out.reshape(n_query, length)


def finite_mean(values, axis: int):
    """Mean of the finite entries along ``axis``; 0 where there are none.

    A small normal bank may hold fewer than k entries from images other than the query's own (a coreset of two
    images can keep mostly one): the score is then the mean of the neighbours there are, and with none at all the
    normal bank says nothing (0: nothing is subtracted), instead of an infinity that turns the map into NaN.
    """
    xp = get_xp(values)
    finite = xp.isfinite(values)
    count = finite.sum(axis=axis)
    total = xp.where(finite, values, 0).sum(axis=axis)
    return (total / xp.maximum(count, 1)).astype(xp.float32)


# ---------------------------------------------------------------------------------------------------------------
# Decision (Eq. 7), fusion (Eq. 8), maps and image scores
# ---------------------------------------------------------------------------------------------------------------


def adaptive_subtraction(full_scores, normal_scores, alpha: float, tau: float):
    """S = S_c - alpha * S_b * 1[S_b <= tau]."""
    xp = get_xp(full_scores)
    # Python floats: a NumPy float64 weight or alpha keeps float32 maps under NumPy 2's promotion (NEP 50) too
    return full_scores - float(alpha) * normal_scores * (normal_scores <= tau).astype(xp.float32)


def subtract_and_fuse(full: list, normal: list, taus: list, weights, alpha: float):
    """Eq. 7 at every scale, then Eq. 8: sum_s w_s (S_c,s - alpha S_b,s 1[S_b,s <= tau_s]) (lists over scales)."""
    fused = _fused(get_xp(full[0]))
    if fused is not None:
        return fused.subtract_and_fuse(full, normal, taus, weights, alpha)
    return sum(float(w) * adaptive_subtraction(c, b, alpha, t) for c, b, t, w in zip(full, normal, taus, weights))


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation operator, half-pixel centres (torch align_corners=False)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    op = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(op, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(op, (np.arange(n_out), i1), frac)
    return op


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    """Normalised Gaussian taps, truncated at 4 sigma (scipy's default)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def smoothing_limit(size) -> float:
    """A map of (height, width) ``size`` takes a smoothing sigma below this: the kernel's radius, 4 sigma rounded,
    below its short side, as a mirror border needs."""
    return (min(size) - 0.5) / 4.0


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur operator with mirror borders (edge sample not repeated, torch's 'reflect')."""
    if sigma >= smoothing_limit((n, n)):
        raise ValueError(f"smoothing sigma {sigma} too large for a map of size {n}")
    taps = gaussian_kernel_1d(sigma)
    radius = len(taps) // 2
    op = np.zeros((n, n), dtype=np.float64)
    for offset, weight in zip(range(-radius, radius + 1), taps):
        j = np.arange(n) + offset
        j = np.where(j < 0, -j, j)
        j = np.where(j > n - 1, 2 * (n - 1) - j, j)
        np.add.at(op, (np.arange(n), j), weight)
    return op


def map_operator(n_in: int, n_out: int, sigma: float) -> np.ndarray:
    """Upsample-then-smooth along one axis as one matrix (n_out, n_in), float32."""
    op = _bilinear_matrix(n_in, n_out)
    if sigma > 0:
        op = _gaussian_matrix(n_out, sigma) @ op
    return op.astype(np.float32)


def patch_scores_to_maps(patch_scores, grid: tuple[int, int], size: tuple[int, int], sigma: float):
    """(N, L) patch scores -> (N, H, W) maps: bilinear upsampling, then Gaussian smoothing (sigma 0 = none)."""
    xp = get_xp(patch_scores)
    h, w = grid
    fused = _fused(xp)
    if fused is not None and sigma <= 0:
        return fused.upsample_bilinear(patch_scores.reshape(-1, h, w), tuple(size))
    rows = xp.asarray(map_operator(h, size[0], sigma))
    cols = xp.asarray(map_operator(w, size[1], sigma))
    grid_scores = _float32(patch_scores).reshape(-1, h, w)
    return rows @ grid_scores @ cols.T


def image_scores(maps, method: str, topk_fraction: float):
    """Reduce (N, H, W) maps to (N,) image scores: the max, the mean of the top fraction of pixels, or the mean of
    the whole map (the paper's sentence read literally)."""
    xp = get_xp(maps)
    flat = maps.reshape(maps.shape[0], -1)
    if method == "max":
        return flat.max(axis=1)
    if method == "mean":
        return flat.mean(axis=1)
    k = max(1, int(round(topk_fraction * flat.shape[1])))
    return xp.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(axis=1)


def neighbour_rescore(scores, embeds, ref_embeds, ref_scores, k: int, weight: float, query_ids=None):
    """Image scores refined by the lot (in the spirit of MuSc's re-scoring with image-level neighbours): each score
    moves by ``weight`` toward the mean score of its ``k`` most similar reference images, by cosine similarity of
    their embeddings. A query never counts itself: reference ``j`` is left out for a query whose id is ``j``."""
    xp = get_xp(scores)
    q = embeds.astype(xp.float32)
    r = ref_embeds.astype(xp.float32)
    q = q / xp.maximum(xp.sqrt((q * q).sum(axis=1, keepdims=True)), 1e-12)
    r = r / xp.maximum(xp.sqrt((r * r).sum(axis=1, keepdims=True)), 1e-12)
    sim = q @ r.T  # (N, M): a lot is hundreds of images, never a memory concern
    m = int(sim.shape[1])
    if query_ids is not None:
        sim = xp.where(xp.asarray(query_ids)[:, None] == xp.arange(m)[None, :], -xp.inf, sim)
    k = min(int(k), m)
    if k < 1:
        return scores
    nearest = xp.argpartition(-sim, k - 1, axis=1)[:, :k]
    # a lot member's own reference (-inf) is taken only when k reaches the whole lot: it is left out of the mean
    # there, where a new image averages every reference (one k for both dropped a new image's farthest one)
    counted = xp.isfinite(sim[xp.arange(sim.shape[0])[:, None], nearest]).astype(xp.float32)
    taken = counted.sum(axis=1)
    neighbour_mean = (ref_scores.astype(xp.float32)[nearest] * counted).sum(axis=1) / xp.maximum(taken, 1.0)
    moved = scores + weight * (neighbour_mean - scores)
    return xp.where(taken > 0, moved, scores).astype(scores.dtype)
