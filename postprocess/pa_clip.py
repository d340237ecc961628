"""PA-CLIP scoring of a lot (docs/design.md, section 4) over encoder features, on NumPy or CuPy arrays.

Two stages, because the normal bank needs images that are encoded only after the lot has been looked at:

1. ``lot_stage``: multi-scale aggregation, patch-text scores, mutual scores against the full bank (the lot itself,
   each image excluding its own patches), and the choice of the most normal images.
2. (the caller augments the chosen images with CADA and encodes them: ``postprocess.pipeline``)
3. ``finish_stage``: the normal bank from the chosen images and their augmentations, scores against it, adaptive
   subtraction, multi-scale fusion, maps and image scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import kernels as K
from .config import PAClipConfig
from .contract import Features
from .errors import RequestError
from .host import DEFAULT_HOST, HostSettings


@dataclass
class LotState:
    """What stage 1 learnt about the lot."""

    full_scores: dict  # r -> (N, L) mutual scores against the full bank ({} for the text-only baseline)
    text_scores: dict  # r -> (N, L) P(defective) of each patch ({} without a text encoder)
    normal_scores: object  # (N,) higher = more normal
    normal_indices: np.ndarray  # chosen most-normal images, most normal first
    selection: str  # "text" or "visual"
    prior: object  # (N, L) prior anomaly score of each patch, used to keep defects out of the normal bank
    prior_threshold: float
    # r -> (N_bank, m) per-image coreset of the images the full bank keeps (full_references), or None for every
    # patch ({} for the text-only baseline)
    full_selections: dict = field(default_factory=dict)
    space: "SearchSpace | None" = None  # where the banks are searched (fit_search_space)
    # the lot indices the full bank keeps (sorted, host), None for every lot image (full_bank_references)
    full_references: np.ndarray | None = None
    # r -> (entries (n_layers, N_bank, m, d) as the bank stores them, int8 or float16; their (n_layers, N_bank, m)
    # scales or None): what the lot was scored against, for the bank to store as it is ({} where the lot was its
    # own bank, every patch compared pairwise: the bank reads them itself)
    full_entries: dict = field(default_factory=dict)


@dataclass
class NormalSet:
    """The images the normal bank is built from: the chosen lot images and their augmentations."""

    layer_tokens: object  # (M, n_layers, L, C)
    source_ids: object  # (M,) lot index each one came from (a query never matches its own source)
    prior: object  # (M, L) prior anomaly score of each patch, warped along with the augmentation


@dataclass
class ScoreResult:
    maps: object  # (N, H, W) float32
    scores: object  # (N,) float32
    patch_scores: object  # (N, L) fused, before upsampling
    normal_bank_scores: dict = field(default_factory=dict)  # r -> (N, L)
    tau_b: dict = field(default_factory=dict)  # r -> subtraction threshold
    normal_bank_sizes: dict = field(default_factory=dict)  # r -> entries kept
    map_scores: object = None  # (N,) image scores from the maps alone, before lot-level re-scoring


def fuse(per_scale: dict, cfg: PAClipConfig):
    return sum(float(w) * per_scale[r] for r, w in zip(cfg.scales, cfg.weights))  # float32 under NEP 50 too


def text_patch_scores(features: Features, text_embeds, cfg: PAClipConfig) -> dict:
    """r -> (N, L) P(defective) of the r x r-aggregated projected patch embeddings."""
    return {
        r: K.text_defect_probability(K.aggregate(features.patch_embeds, features.grid, r), text_embeds, cfg.tau_text)
        for r in cfg.scales
    }


def layer_features(layer_tokens, layer: int, grid, r: int, cfg: PAClipConfig):
    return K.aggregate(layer_tokens[:, layer], grid, r, cfg.feature_norm)


PCA_SAMPLE = 16384  # pooled patches a projection is fitted on (a random sample of the lot's: enough for C <= 4096)


@dataclass
class SearchSpace:
    """Where the banks are searched: the tapped layers that score, and per scale r each one's projection (C, d) of
    the pooled unit features onto ``bank_dim`` directions, or none (every channel).

    A projected feature is not re-normalised: with B orthonormal (PCA), 1 - (xB).(yB) = 1 - x.y + (the residuals'
    product), so a patch whose difference lies off the lot's main directions keeps most of its distance instead of
    being pulled onto the lot's subspace; a random projection keeps x.y in expectation.
    """

    layers: tuple[int, ...]
    bases: dict = field(default_factory=dict)  # r -> (len(layers), C, d) float32, {} without a projection

    def features(self, layer_tokens, position: int, grid, r: int, cfg: PAClipConfig):
        """(N, L, d) search features of the ``position``-th scoring layer at scale r."""
        feats = layer_features(layer_tokens, self.layers[position], grid, r, cfg)
        basis = self.bases.get(r)
        return feats if basis is None else feats @ basis[position]

    def width(self, r: int, channels: int) -> int:
        """The search features' width at scale r for encoder features of ``channels``."""
        basis = self.bases.get(r)
        return channels if basis is None else int(basis.shape[-1])


def scoring_layers(cfg: PAClipConfig, n_layers: int) -> tuple[int, ...]:
    if not cfg.layers:
        return tuple(range(n_layers))
    if max(cfg.layers) >= n_layers:
        raise RequestError(f"layers {list(cfg.layers)} name taps the encoder does not have: it has {n_layers} "
                           f"(0 to {n_layers - 1})")
    return tuple(int(i) for i in cfg.layers)


def fit_search_space(features: Features, cfg: PAClipConfig) -> SearchSpace:
    """The scoring layers and, with a search width below the feature width (``PAClipConfig.search_dim``), each
    one's projection: the top that many principal directions (uncentred: what best keeps dot products) of a seeded
    sample of the lot's pooled patches, or a seeded Gaussian projection."""
    xp = K.get_xp(features.layer_tokens)
    n, n_layers, length, channels = features.layer_tokens.shape
    layers = scoring_layers(cfg, n_layers)
    width = cfg.search_dim(channels)
    if width == 0 or cfg.text_only:  # text only: no bank is searched
        return SearchSpace(layers)
    if width >= channels:
        raise RequestError(f"bank_dim {width} is not below the encoder's feature width {channels}: use bank_dim 0 "
                           "with bank_dim_divisor 1 to keep every channel, or fewer directions")
    rows = None
    if n * length > PCA_SAMPLE:  # host indices, then one explicit move
        rows = xp.asarray(np.sort(np.random.default_rng(cfg.seed).choice(n * length, PCA_SAMPLE, replace=False)))
    bases = {}
    for r in cfg.scales:
        per_layer = []
        for position, layer in enumerate(layers):
            if cfg.bank_projection == "random":
                seed = cfg.seed + 7919 * r + position
                per_layer.append(xp.asarray(K.random_projection(channels, width, seed)))
                continue
            flat = layer_features(features.layer_tokens, layer, features.grid, r, cfg).reshape(n * length, channels)
            if rows is not None:
                flat = flat[rows]
            gram = K.to_numpy(flat.T @ flat).astype(np.float64)  # (C, C): small, decomposed on the host
            _, vectors = np.linalg.eigh(gram)  # ascending eigenvalues
            top = vectors[:, ::-1][:, :width]
            # an eigenvector's sign is arbitrary, and coreset choices project the coordinates: fix it (its largest
            # component positive) so that any correct eigensolver gives the same bank
            top = top * np.sign(top[np.abs(top).argmax(axis=0), np.arange(top.shape[1])])
            per_layer.append(xp.asarray(np.ascontiguousarray(top).astype(np.float32)))
        bases[r] = xp.stack(per_layer)
    return SearchSpace(layers, bases)


def _projected(layer_tokens, grid, r: int, cfg: PAClipConfig, space: SearchSpace, rows=None):
    """Random projection of the concatenated search features of each patch: (N, L, coreset_dim).

    ``rows`` optionally picks images first. Coreset choices use all scoring layers together, so a bank entry is one
    patch with its features at every layer.
    """
    xp = K.get_xp(layer_tokens)
    tokens = layer_tokens if rows is None else layer_tokens[rows]
    width = space.width(r, tokens.shape[-1])
    proj = xp.asarray(K.random_projection(len(space.layers) * width, cfg.coreset_dim, cfg.seed + r))
    total = 0
    for position in range(len(space.layers)):  # one layer at a time: the lot's features at every layer may not fit
        total = total + space.features(tokens, position, grid, r, cfg) @ proj[position * width:(position + 1) * width]
    return total


def full_bank_references(n_images: int, cfg: PAClipConfig) -> np.ndarray | None:
    """The lot images the full bank keeps: every one (None) up to ``full_bank_images`` + 1, else a seeded sample of
    ``full_bank_images`` (sorted lot indices), so that the lot stage and the bank grow linearly with the lot."""
    if cfg.full_bank_images == 0 or n_images <= cfg.full_bank_images + 1:
        return None
    return np.sort(np.random.default_rng([cfg.seed, n_images]).choice(n_images, cfg.full_bank_images, replace=False))


def reservoir_step(sample: np.ndarray, n_before: int, n_after: int, cfg: PAClipConfig) -> np.ndarray:
    """A uniform sample of a lot of ``n_before`` images carried to the lot grown to ``n_after`` (sorted lot indices):
    each new image i (0-based) takes a slot drawn uniformly from i + 1 when it falls among the sample's (reservoir
    sampling), so every image of the grown lot is kept with the same chance, sample size / n_after, and the images
    outside the sample, whose entries a sampled bank no longer has, are never needed. Seeded by the two sizes."""
    slots = np.array(sample, dtype=np.int64)
    rng = np.random.default_rng([cfg.seed, n_before, n_after])
    for i in range(n_before, n_after):
        j = int(rng.integers(0, i + 1))
        if j < len(slots):
            slots[j] = i
    return np.sort(slots)


def grown_sample(lot_sizes, cfg: PAClipConfig) -> np.ndarray:
    """The sample a sampled full bank keeps after growing through ``lot_sizes`` (the manifest's ``sample_growth``):
    the seeded draw at the first size, carried by ``reservoir_step`` to each next one."""
    sample = full_bank_references(int(lot_sizes[0]), cfg)
    for before, after in zip(lot_sizes, lot_sizes[1:]):
        sample = reservoir_step(sample, int(before), int(after), cfg)
    return sample


def represented_lot_size(n_images: int, cfg: PAClipConfig) -> int:
    """The lot size the banks are sized by: the lot itself, or (a sampled lot) its sample + 1, as a lot image of the
    sample sees the others: so the interval's share of the lot and the normal set's stop growing with it."""
    references = full_bank_references(n_images, cfg)
    return n_images if references is None else len(references) + 1


def lot_interval_k(n_images: int, cfg: PAClipConfig, lot_ids=None, references=None) -> int:
    """The interval k of a lot's scoring, lot images and new ones alike: from the images the full bank keeps (a new
    image is compared with all of them, a lot image with the others). A sampled lot's k is at most its sample - 1:
    an image of the sample sees only the other images of it, and a k past them averaged its own excluded (infinite)
    distance into its score (NaN maps). ``lot_ids`` (``contract.first_ids``): with copies of one image, which
    exclude each other, at most the full bank's images less the most copies of one. ``references``: the sample the
    full bank keeps where it is not the settings' draw (a grown bank's reservoir)."""
    k = K.interval_k(represented_lot_size(n_images, cfg), cfg.interval_fraction, cfg.k_min, cfg.k_max)
    if references is None:
        references = full_bank_references(n_images, cfg)
    if references is not None:
        k = max(1, min(k, len(references) - 1))
    if lot_ids is not None:
        kept = np.asarray(lot_ids) if references is None else np.asarray(lot_ids)[np.asarray(references)]
        others = len(kept) - int(np.unique(kept, return_counts=True)[1].max())
        if others < 1:
            raise RequestError("the lot's full bank holds copies of one image only: a lot image has no other to be "
                               "compared with; add different parts (or more images)")
        k = min(k, others)
    return k


def normal_count(n_images: int, cfg: PAClipConfig) -> int:
    """How many of a lot's images make its normal set: ``normal_fraction`` of the represented lot, at least
    ``min_normal``, at most the lot."""
    share = int(np.ceil(cfg.normal_fraction * represented_lot_size(n_images, cfg)))
    return min(n_images, max(cfg.min_normal, share))


def full_bank_selection(layer_tokens, grid, r: int, cfg: PAClipConfig, space: SearchSpace):
    """Per-image coreset of the full bank: (N, m) patch indices, or None to keep every patch."""
    length = layer_tokens.shape[2]
    m = K.coreset_size(length, cfg.full_coreset_ratio)
    if m >= length:
        return None
    return K.greedy_coreset(_projected(layer_tokens, grid, r, cfg, space), m)


def bank_entries(feats, selection):
    """(N, m, C) full-bank entries of one layer's (N, L, C) features: every patch, or each image's coreset."""
    if selection is None:
        return feats
    return K.get_xp(feats).take_along_axis(feats, selection[:, :, None], axis=1)


def full_scores_against(features: Features, bank_layers, bank_ids, query_ids, k: int, r: int, cfg: PAClipConfig,
                        space: SearchSpace, host: HostSettings = DEFAULT_HOST, bank_scales=None,
                        bank_descriptors=None):
    """(N, L) interval-averaged scores of query images against a stored full bank ((n_scoring_layers, Nb, m, d);
    int8 entries with ``bank_scales`` (n_scoring_layers, Nb, m)), averaged over layers; a query never matches the
    bank image that carries its own id. ``bank_descriptors``: the bank images' ``kernels.image_descriptors`` per
    scoring layer ((n_scoring_layers, Nb, d), kept by the bank), for choosing each query's neighbours."""
    total = 0
    for position in range(len(space.layers)):
        feats = space.features(features.layer_tokens, position, features.grid, r, cfg)
        scale = None if bank_scales is None else bank_scales[position]
        descriptors = None if bank_descriptors is None else bank_descriptors[position]
        total = total + K.full_bank_scores(feats, bank_layers[position], query_ids, bank_ids, k, host.budget_bytes,
                                           bank_scale=scale, matmul=host.cpu_matmul,
                                           neighbours=cfg.full_bank_neighbours, bank_descriptors=descriptors)
    return total / len(space.layers)


def mutual_scores(features: Features, r: int, cfg: PAClipConfig, space: SearchSpace, selection=None, references=None,
                  lot_ids=None, host: HostSettings = DEFAULT_HOST, stored: list | None = None):
    """(N, L) interval-averaged scores of every lot image against the rest of the lot, or (``references``: sorted
    lot indices) against those of them that are not itself; ``selection``: the full bank's per-image coreset of
    those images from ``full_bank_selection``, None for every patch. Averaged over layers. ``stored``: a list that
    receives, per layer, the entries the lot was scored against as a bank stores them ((int8 entries, scales) or
    (float16 entries, None)), where they were made (not when each pair of images is compared once). ``lot_ids``:
    the (N,) host ids the images go by (``contract.first_ids``: copies of one image share one), default the index.
    """
    xp = K.get_xp(features.layer_tokens)
    n = features.layer_tokens.shape[0]
    own = lot_ids is None or bool((np.asarray(lot_ids) == np.arange(n)).all())  # no copies: id i is image i
    host_ids = np.arange(n) if own else np.asarray(lot_ids, dtype=np.int64)
    ids = xp.asarray(host_ids)
    k = lot_interval_k(n, cfg, None if own else host_ids)
    bank_ids = ids if references is None else xp.asarray(host_ids[np.asarray(references)])
    # the lot is its own bank (every image read, its entries as they are): each pair of images compared once
    pairwise = (own and selection is None and references is None and cfg.full_bank_storage != "int8"
                and (cfg.full_bank_neighbours == 0 or max(cfg.full_bank_neighbours, k) >= n - 1))
    total = 0
    for position in range(len(space.layers)):  # one layer at a time: the lot's features at every layer may not fit
        feats = space.features(features.layer_tokens, position, features.grid, r, cfg)
        if pairwise:
            total = total + K.lot_mutual_scores(feats, k, host.budget_bytes, matmul=host.cpu_matmul)
        else:
            entries = bank_entries(feats if references is None else feats[xp.asarray(references)], selection)
            if cfg.full_bank_storage == "int8":  # the lot is scored against its entries as the bank stores them
                quantized = K.quantize_rows(entries)
                entries = K.dequantize_rows(*quantized)
                if stored is not None:
                    stored.append(quantized)
            elif stored is not None:
                stored.append((entries.astype(xp.float16), None))
            total = total + K.full_bank_scores(feats, entries, ids, bank_ids, k, host.budget_bytes,
                                               matmul=host.cpu_matmul, neighbours=cfg.full_bank_neighbours)
    return total / len(space.layers)


def select_normal(normal_scores, cfg: PAClipConfig) -> np.ndarray:
    """Indices of the most normal images (highest score first): ``normal_count`` of them."""
    scores = K.to_numpy(normal_scores)
    return np.argsort(-scores, kind="stable")[:normal_count(len(scores), cfg)]


def lot_stage(features: Features, text_embeds, cfg: PAClipConfig, lot_ids=None,
              host: HostSettings = DEFAULT_HOST) -> LotState:
    """Stage 1 (``lot_ids``: the ids the images go by, ``mutual_scores``)."""
    n = len(features)
    if n < 2:
        raise RequestError(f"a lot needs at least 2 images to score them against each other, got {n}")
    has_text = text_embeds is not None
    if cfg.text_only and not has_text:  # the caller's setting: a 400
        raise RequestError("the text-only baseline needs a text encoder; this server's has none: use mode 'mutual' "
                           "or 'pad_mpam'")
    text_scores = text_patch_scores(features, text_embeds, cfg) if has_text else {}
    space = fit_search_space(features, cfg)
    references = full_bank_references(n, cfg)
    kept = features.layer_tokens if references is None else features.layer_tokens[K.get_xp(
        features.layer_tokens).asarray(references)]
    selections = {} if cfg.text_only else {
        r: full_bank_selection(kept, features.grid, r, cfg, space) for r in cfg.scales}
    full_scores, full_entries = {}, {}
    xp = K.get_xp(features.layer_tokens)
    for r, selection in selections.items():
        stored: list = []
        full_scores[r] = mutual_scores(features, r, cfg, space, selection, references, lot_ids, host, stored)
        if stored:
            full_entries[r] = (xp.stack([q for q, _ in stored]),
                               None if stored[0][1] is None else xp.stack([scale for _, scale in stored]))

    if has_text:
        # Eq. 3: the CLS embedding's similarity to the normal prompt
        normal_scores = K.normal_prompt_similarity(features.image_embeds, text_embeds, cfg.tau_text)
        prior = fuse(text_scores, cfg)
        selection = "text"
    else:
        # No text encoder: the images that look least anomalous to their peers are the most normal.
        prior = fuse(full_scores, cfg)
        h, w = features.grid
        normal_scores = -K.image_scores(prior.reshape(n, h, w), cfg.image_score, cfg.image_topk_fraction)
        selection = "visual"
    xp = K.get_xp(prior)
    threshold = float(xp.quantile(prior, cfg.normal_patch_quantile))
    return LotState(
        full_scores=full_scores,
        text_scores=text_scores,
        normal_scores=normal_scores,
        normal_indices=select_normal(normal_scores, cfg),
        selection=selection,
        prior=prior,
        prior_threshold=threshold,
        full_selections=selections,
        space=space,
        full_references=references,
        full_entries=full_entries,
    )


def original_normal_set(features: Features, state: LotState, lot_ids=None) -> NormalSet:
    """The chosen lot images themselves, without augmentation (each entry's source the id its image goes by)."""
    xp = K.get_xp(features.layer_tokens)
    idx = xp.asarray(state.normal_indices)
    return NormalSet(features.layer_tokens[idx], idx if lot_ids is None else xp.asarray(lot_ids)[idx],
                     state.prior[idx])


def build_normal_bank(normal: NormalSet, grid, r: int, prior_threshold: float, cfg: PAClipConfig,
                      space: SearchSpace):
    """Normal bank at scale r: (n_scoring_layers, M, d) search features and (M,) source ids.

    Patches whose prior anomaly score is above the threshold are left out; the rest are coreset-sampled.
    """
    xp = K.get_xp(normal.layer_tokens)
    count, _, length, _ = normal.layer_tokens.shape
    keep = (normal.prior <= prior_threshold).reshape(-1)
    if not bool(keep.any()):  # every patch looks defective: better a noisy bank than none
        keep = xp.ones(count * length, dtype=bool)
    flat_index = xp.nonzero(keep)[0]
    n_keep = int(flat_index.shape[0])
    m = K.coreset_size(n_keep, cfg.normal_coreset_ratio)
    if m < n_keep:
        proj = _projected(normal.layer_tokens, grid, r, cfg, space).reshape(count * length, -1)[flat_index]
        flat_index = flat_index[K.greedy_coreset(proj[None], m)[0]]
    ids = xp.repeat(xp.asarray(normal.source_ids), length)[flat_index]
    layers = []
    for position in range(len(space.layers)):
        feats = space.features(normal.layer_tokens, position, grid, r, cfg)
        layers.append(feats.reshape(count * length, -1)[flat_index])
    return xp.stack(layers), ids


def normal_scores_against(features: Features, bank, bank_ids, cfg: PAClipConfig, r: int, space: SearchSpace,
                          query_ids=None, host: HostSettings = DEFAULT_HOST):
    """(N, L) mean kNN distance of each query patch to the normal bank, averaged over layers."""
    xp = K.get_xp(features.layer_tokens)
    n = features.layer_tokens.shape[0]
    ids = xp.arange(n) if query_ids is None else query_ids
    total = 0
    for position in range(len(space.layers)):
        feats = space.features(features.layer_tokens, position, features.grid, r, cfg)
        total = total + K.normal_bank_scores(feats, bank[position], ids, bank_ids, cfg.normal_k, host.budget_bytes,
                                             matmul=host.cpu_matmul)
    return total / len(space.layers)


def normal_banks(normal: NormalSet, grid, prior_threshold: float, cfg: PAClipConfig, space: SearchSpace) -> dict:
    """r -> (bank (n_scoring_layers, M, d), source ids (M,)) at every scale that has a normal bank."""
    return {r: build_normal_bank(normal, grid, r, prior_threshold, cfg, space) for r in cfg.normal_bank_scales}


def decide(full_scores: dict, text_scores: dict, normal_bank_scores: dict, tau_b: dict, cfg: PAClipConfig,
           grid, map_size: tuple[int, int], result: ScoreResult | None = None) -> ScoreResult:
    """Adaptive subtraction (Eq. 7), fusion (Eq. 8), maps and image scores from per-scale patch scores."""
    result = result or ScoreResult(maps=None, scores=None, patch_scores=None)
    if cfg.text_only or not cfg.use_normal_bank:
        result.patch_scores = fuse(text_scores if cfg.text_only else full_scores, cfg)
    else:
        # a scale without a normal bank of its own (single-scale rows) uses the first one
        banks = [r if r in normal_bank_scores else cfg.normal_bank_scales[0] for r in cfg.scales]
        result.patch_scores = K.subtract_and_fuse([full_scores[r] for r in cfg.scales],
                                                  [normal_bank_scores[b] for b in banks], [tau_b[b] for b in banks],
                                                  cfg.weights, cfg.alpha)
    result.maps = K.patch_scores_to_maps(result.patch_scores, grid, map_size, cfg.smooth_sigma)
    result.scores = K.image_scores(result.maps, cfg.image_score, cfg.image_topk_fraction)
    return result


def rescore_images(result: ScoreResult, image_embeds, ref_embeds, ref_scores, cfg: PAClipConfig,
                   query_ids=None) -> ScoreResult:
    """Lot-level image re-scoring (``cfg.rescore_k`` > 0): ``result.scores`` refined with the scores of the most
    similar reference images (the lot itself, or the lot a bank was built from); ``result.map_scores`` keeps the
    scores of the maps alone."""
    result.map_scores = result.scores
    if cfg.rescore_k > 0:
        result.scores = K.neighbour_rescore(result.scores, image_embeds, ref_embeds, ref_scores, cfg.rescore_k,
                                            cfg.rescore_weight, query_ids)
    return result


def rescore_within_lot(result: ScoreResult, features: Features, cfg: PAClipConfig) -> ScoreResult:
    """``rescore_images`` with the lot as its own reference: each image's neighbours are the other lot images."""
    xp = K.get_xp(result.scores)
    return rescore_images(result, features.image_embeds, features.image_embeds, result.scores, cfg,
                          xp.arange(len(features)))


def finish_stage(features: Features, state: LotState, normal: NormalSet | None, cfg: PAClipConfig,
                 map_size: tuple[int, int], query_ids=None, banks: dict | None = None,
                 host: HostSettings = DEFAULT_HOST) -> ScoreResult:
    """Stage 2 on the lot itself. ``banks`` (from ``normal_banks``) may be passed in when the caller keeps them;
    ``query_ids``: the id each lot image goes by against the normal banks (``contract.first_ids``; default its
    index)."""
    result = ScoreResult(maps=None, scores=None, patch_scores=None)
    if cfg.use_normal_bank and not cfg.text_only:
        if banks is None:
            if normal is None:
                normal = original_normal_set(features, state, query_ids)
            banks = normal_banks(normal, features.grid, state.prior_threshold, cfg, state.space)
        for r, (bank, bank_ids) in banks.items():
            s_b = normal_scores_against(features, bank, bank_ids, cfg, r, state.space, query_ids, host)
            xp = K.get_xp(s_b)
            result.normal_bank_scores[r] = s_b
            result.tau_b[r] = float(xp.quantile(s_b, cfg.tau_quantile))
            result.normal_bank_sizes[r] = int(bank.shape[1])
    result = decide(state.full_scores, state.text_scores, result.normal_bank_scores, result.tau_b, cfg,
                    features.grid, map_size, result)
    return rescore_within_lot(result, features, cfg)
