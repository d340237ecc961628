"""A plain-torch reference of PA-CLIP scoring (docs/design.md, section 4), written for clarity, not for memory or speed.

Every function carries the name, argument order and return type of its NumPy twin in ``postprocess.kernels`` or
``postprocess.pa_clip``, so the two read side by side; the dataclasses (``Features``, ``LotState``, ``NormalSet``,
``ScoreResult``) are the same ones, holding torch tensors here. The twins' ``host`` (memory budget) is absent: this
module has none to respect.

The maths is done independently: whole distance blocks per query image, ``cdist``, ``topk``/``sort``, and torch's
own pooling, interpolation and convolution where the kernels use operator matrices and chunked partitions. So it
checks the kernels from another direction, the interval k and the normal set's size included (a wrong k in the
kernels once passed parity because the reference took it from them). Only the seeded random projection, the coreset
size, the seeded sample of a large lot (``full_bank_references``) and the PCA's sample are shared, so that both pick
the same patches and images.
"""

from __future__ import annotations

import math

import numpy as np

import torch
import torch.nn.functional as F

from .config import PAClipConfig
from .contract import Features
from .kernels import coreset_size, random_projection
from .pa_clip import PCA_SAMPLE, LotState, NormalSet, ScoreResult, SearchSpace, full_bank_references, scoring_layers

# -- kernels.py twins -------------------------------------------------------------------------------------------


def aggregate(tokens: torch.Tensor, grid, r: int, feature_norm: str = "none") -> torch.Tensor:
    """(N, L, C) -> (N, L, C): optional LayerNorm, r x r mean over valid neighbours, L2 normalisation."""
    x = tokens.float()
    if feature_norm == "layernorm":
        x = F.layer_norm(x, x.shape[-1:], eps=1e-5)
    n, length, channels = x.shape
    h, w = grid
    if r > 1:
        img = x.reshape(n, h, w, channels).permute(0, 3, 1, 2)
        # count_include_pad=False: border patches average only the neighbours that exist
        img = F.avg_pool2d(img, kernel_size=r, stride=1, padding=r // 2, count_include_pad=False)
        x = img.permute(0, 2, 3, 1).reshape(n, length, channels)
    return F.normalize(x, dim=-1)


def text_defect_probability(features: torch.Tensor, text_embeds: torch.Tensor, tau: float) -> torch.Tensor:
    """P(defective): softmax over cosines to (normal, defective) prompts / tau, second entry."""
    logits = F.normalize(features.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).T / tau
    return logits.softmax(dim=-1)[..., 1]


def greedy_coreset(points: torch.Tensor, n_select: int) -> torch.Tensor:
    """(G, P, d) -> (G, n_select) indices: start nearest the group mean, then always the point farthest from the
    chosen ones. One group at a time."""
    groups, n_points, _ = points.shape
    if n_select >= n_points:
        return torch.arange(n_points).repeat(groups, 1)
    out = torch.empty(groups, n_select, dtype=torch.int64)
    for g in range(groups):
        p = points[g].float()
        chosen = [int(torch.cdist(p, p.mean(0, keepdim=True)).squeeze(1).argmin())]
        min_dist = torch.cdist(p, p[chosen[0]][None]).squeeze(1)
        min_dist[chosen[0]] = -1.0  # chosen: never picked again, even when the rest lie at distance 0
        for _ in range(1, n_select):
            chosen.append(int(min_dist.argmax()))
            min_dist = torch.minimum(min_dist, torch.cdist(p, p[chosen[-1]][None]).squeeze(1))
            min_dist[chosen[-1]] = -1.0
        out[g] = torch.tensor(chosen)
    return out


def interval_k(n_bank_images: int, fraction: float, k_min: int, k_max: int) -> int:
    """round(fraction * (N - 1)) within [k_min, k_max], and never more than the N - 1 other images (at least 1)."""
    k = min(k_max, max(k_min, int(round(fraction * (n_bank_images - 1)))))
    return max(1, min(k, n_bank_images - 1))


def lot_interval_k(n_images: int, cfg: PAClipConfig, lot_ids=None) -> int:
    """``interval_k`` of the images a lot image is compared with, plus itself: the lot, or a sampled lot's sample +
    1; and never past the sample's other images, nor (copies of one image exclude each other) past the fewest
    images of another id that any lot image finds there."""
    references = full_bank_references(n_images, cfg)
    if references is None:
        k = interval_k(n_images, cfg.interval_fraction, cfg.k_min, cfg.k_max)
    else:
        k = max(1, min(interval_k(len(references) + 1, cfg.interval_fraction, cfg.k_min, cfg.k_max),
                       len(references) - 1))
    if lot_ids is None:
        return k
    ids = torch.as_tensor(lot_ids)
    kept = ids if references is None else ids[torch.as_tensor(references)]
    fewest = min(int((kept != i).sum()) for i in ids.unique())
    return min(k, fewest)


def normal_count(n_images: int, cfg: PAClipConfig) -> int:
    """The normal set's size: ``normal_fraction`` (rounded up) of the lot, or of a sampled lot's sample + 1; at
    least ``min_normal``, at most the lot."""
    references = full_bank_references(n_images, cfg)
    represented = n_images if references is None else len(references) + 1
    return min(n_images, max(cfg.min_normal, math.ceil(cfg.normal_fraction * represented)))


def adaptive_subtraction(full_scores: torch.Tensor, normal_scores: torch.Tensor, alpha: float, tau: float):
    """Eq. 7: S = S_c - alpha * S_b * 1[S_b <= tau]."""
    return full_scores - alpha * normal_scores * (normal_scores <= tau).float()


def patch_scores_to_maps(patch_scores: torch.Tensor, grid, size, sigma: float) -> torch.Tensor:
    """(N, L) -> (N, H, W): bilinear upsampling (half-pixel centres), then a Gaussian with mirror borders."""
    h, w = grid
    maps = F.interpolate(patch_scores.float().reshape(-1, 1, h, w), size=tuple(size), mode="bilinear",
                         align_corners=False)
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)  # truncated at 4 sigma, as scipy
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        taps = torch.exp(-0.5 * (x / sigma) ** 2)
        taps = (taps / taps.sum()).float()
        maps = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
        maps = F.conv2d(maps, taps.view(1, 1, -1, 1))
        maps = F.conv2d(maps, taps.view(1, 1, 1, -1))
    return maps[:, 0]


def image_scores(maps: torch.Tensor, method: str, topk_fraction: float) -> torch.Tensor:
    """(N, H, W) -> (N,): the max, the mean of the top fraction of pixels, or the mean of all."""
    flat = maps.reshape(maps.shape[0], -1)
    if method == "max":
        return flat.max(dim=1).values
    if method == "mean":
        return flat.sum(dim=1) / flat.shape[1]
    k = max(1, int(round(topk_fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


# -- pa_clip.py twins -------------------------------------------------------------------------------------------


def fuse(per_scale: dict, cfg: PAClipConfig):
    """Eq. 8: weighted sum over scales."""
    return sum(w * per_scale[r] for r, w in zip(cfg.scales, cfg.weights))


def text_patch_scores(features: Features, text_embeds: torch.Tensor, cfg: PAClipConfig) -> dict:
    """r -> (N, L) P(defective) of the r x r-aggregated projected patch embeddings."""
    return {r: text_defect_probability(aggregate(features.patch_embeds, features.grid, r), text_embeds, cfg.tau_text)
            for r in cfg.scales}


def fit_search_space(features: Features, cfg: PAClipConfig) -> SearchSpace:
    """The scoring layers and, with a search width (``search_dim``), each one's projection: the eigenvectors of the
    sample's Gram matrix with the largest eigenvalues (torch's eigh), or the seeded Gaussian projection. The sample's
    rows are drawn as the twin draws them."""
    n, n_layers, length, channels = features.layer_tokens.shape
    layers = scoring_layers(cfg, n_layers)
    width = cfg.search_dim(channels)
    if width == 0 or cfg.text_only:  # text only: no bank is searched
        return SearchSpace(layers)
    rows = None
    if n * length > PCA_SAMPLE:
        rows = torch.from_numpy(np.sort(np.random.default_rng(cfg.seed).choice(n * length, PCA_SAMPLE, replace=False)))
    bases = {}
    for r in cfg.scales:
        per_layer = []
        for position, layer in enumerate(layers):
            if cfg.bank_projection == "random":
                per_layer.append(torch.from_numpy(random_projection(channels, width, cfg.seed + 7919 * r + position)))
                continue
            flat = aggregate(features.layer_tokens[:, layer], features.grid, r, cfg.feature_norm).reshape(-1, channels)
            if rows is not None:
                flat = flat[rows]
            _, vectors = torch.linalg.eigh((flat.T @ flat).double())
            top = vectors.flip(-1)[:, :width]
            top = top * top.gather(0, top.abs().argmax(0, keepdim=True)).sign()  # the largest component positive
            per_layer.append(top.float())
        bases[r] = torch.stack(per_layer)
    return SearchSpace(layers, bases)


def _search_features(tokens: torch.Tensor, space: SearchSpace, position: int, grid, r: int, cfg: PAClipConfig):
    """(N, L, d): the position-th scoring layer's pooled features, projected when the space has a basis."""
    feats = aggregate(tokens[:, space.layers[position]], grid, r, cfg.feature_norm)
    return feats if r not in space.bases else feats @ torch.as_tensor(space.bases[r][position])


def _projected(layer_tokens: torch.Tensor, grid, r: int, cfg: PAClipConfig, space: SearchSpace,
               rows=None) -> torch.Tensor:
    """(N, L, coreset_dim): all scoring layers' search features of a patch concatenated, then projected, so that a
    coreset entry is one patch with its features at every layer."""
    tokens = layer_tokens if rows is None else layer_tokens[rows]
    feats = torch.cat([_search_features(tokens, space, p, grid, r, cfg) for p in range(len(space.layers))], dim=-1)
    return feats @ torch.from_numpy(random_projection(feats.shape[-1], cfg.coreset_dim, cfg.seed + r))


def full_bank_selection(layer_tokens: torch.Tensor, grid, r: int, cfg: PAClipConfig, space: SearchSpace):
    """Per-image coreset of the full bank: (N, m) patch indices, or None to keep every patch."""
    length = layer_tokens.shape[2]
    m = coreset_size(length, cfg.full_coreset_ratio)
    if m >= length:
        return None
    return greedy_coreset(_projected(layer_tokens, grid, r, cfg, space), m)


def mutual_scores(features: Features, r: int, cfg: PAClipConfig, space: SearchSpace, selection=None,
                  references=None, lot_ids=None) -> torch.Tensor:
    """(N, L): per patch, nearest distance to each other lot image (or each of ``references`` but itself; its
    coreset ``selection``, or every patch), mean of the k smallest of those, mean over the scoring layers.
    ``lot_ids``: the id each image goes by (copies of one image share one, none matching another), default its
    index."""
    n, _, length, _ = features.layer_tokens.shape
    ids = torch.arange(n) if lot_ids is None else torch.as_tensor(lot_ids)
    k = lot_interval_k(n, cfg, lot_ids)
    kept_images = torch.arange(n) if references is None else torch.as_tensor(references)
    bank_ids = ids[kept_images]
    total = torch.zeros(n, length)
    for position in range(len(space.layers)):
        feats = _search_features(features.layer_tokens, space, position, features.grid, r, cfg)
        kept = feats[kept_images]
        bank = kept if selection is None else torch.stack([kept[j, selection[j]] for j in range(len(bank_ids))])
        if cfg.full_bank_storage == "int8":  # the entries as an int8 bank holds them: a scale per entry
            scale = bank.abs().amax(dim=-1, keepdim=True) / 127.0
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            bank = torch.round(bank / scale) * scale
        # full_bank_neighbours: only each image's most similar kept images (cosine of the mean entries) are read
        count = max(cfg.full_bank_neighbours, k)
        narrow = cfg.full_bank_neighbours > 0 and count < len(bank_ids) - 1
        bank_mean = torch.nn.functional.normalize(bank.mean(dim=1), dim=-1)
        for i in range(n):  # one query image at a time keeps the distance block at L x N x m
            dist = 1.0 - torch.einsum("lc,bmc->lbm", feats[i], bank)
            per_image = dist.min(dim=-1).values  # (L, N_bank): nearest patch of every kept image
            per_image[:, bank_ids == ids[i]] = float("inf")  # never match yourself
            if narrow:
                likeness = bank_mean @ torch.nn.functional.normalize(feats[i].mean(dim=0), dim=-1)
                likeness[bank_ids == ids[i]] = -float("inf")
                unread = torch.ones(len(bank_ids), dtype=torch.bool)
                unread[likeness.argsort(descending=True)[:count]] = False
                per_image[:, unread] = float("inf")
            total[i] += per_image.sort(dim=-1).values[:, :k].mean(dim=-1)
    return total / len(space.layers)


def select_normal(normal_scores: torch.Tensor, cfg: PAClipConfig) -> torch.Tensor:
    """Indices of the most normal images, highest score first (stable on ties): ``normal_count`` of them."""
    count = normal_count(normal_scores.shape[0], cfg)
    return torch.sort(normal_scores, descending=True, stable=True).indices[:count]


def lot_stage(features: Features, text_embeds, cfg: PAClipConfig, lot_ids=None) -> LotState:
    """Stage 1 on a lot that ``pa_clip.lot_stage`` accepts (the checks of the request live there only); ``lot_ids``
    as ``mutual_scores`` takes them."""
    n = len(features)
    has_text = text_embeds is not None
    text_scores = text_patch_scores(features, text_embeds, cfg) if has_text else {}
    space = fit_search_space(features, cfg)
    references = full_bank_references(n, cfg)  # the seeded sample is shared, as the random projections are
    kept = features.layer_tokens if references is None else features.layer_tokens[torch.as_tensor(references)]
    selections = {} if cfg.text_only else {
        r: full_bank_selection(kept, features.grid, r, cfg, space) for r in cfg.scales}
    full_scores = {r: mutual_scores(features, r, cfg, space, selection, references, lot_ids)
                   for r, selection in selections.items()}
    if has_text:
        # Eq. 3: S_cls = sim(cls, f_pos) / tau
        normal_scores = F.cosine_similarity(features.image_embeds.float(), text_embeds[0].float()[None], dim=-1) \
            / cfg.tau_text
        prior = fuse(text_scores, cfg)
        selection = "text"
    else:
        # no text encoder: the images least anomalous to their peers are the most normal
        prior = fuse(full_scores, cfg)
        h, w = features.grid
        normal_scores = -image_scores(prior.reshape(n, h, w), cfg.image_score, cfg.image_topk_fraction)
        selection = "visual"
    return LotState(
        full_scores=full_scores,
        text_scores=text_scores,
        normal_scores=normal_scores,
        normal_indices=select_normal(normal_scores, cfg),
        selection=selection,
        prior=prior,
        # in float64: torch.quantile and numpy's float32 quantile then agree to float32 precision
        prior_threshold=float(torch.quantile(prior.flatten().double(), cfg.normal_patch_quantile)),
        full_selections=selections,
        space=space,
        full_references=references,
    )


def original_normal_set(features: Features, state: LotState, lot_ids=None) -> NormalSet:
    """The chosen lot images themselves, without augmentation (each entry's source the id its image goes by)."""
    idx = torch.as_tensor(state.normal_indices)
    ids = idx if lot_ids is None else torch.as_tensor(lot_ids)[idx]
    return NormalSet(features.layer_tokens[idx], ids, state.prior[idx])


def build_normal_bank(normal: NormalSet, grid, r: int, prior_threshold: float, cfg: PAClipConfig,
                      space: SearchSpace):
    """(n_layers, M, d) search features and (M,) source ids: patches at or below the prior threshold,
    coreset-sampled."""
    count, _, length, _ = normal.layer_tokens.shape
    keep = torch.nonzero(normal.prior.reshape(-1) <= prior_threshold).squeeze(1)
    if keep.numel() == 0:  # every patch looks defective: better a noisy bank than none
        keep = torch.arange(count * length)
    m = coreset_size(keep.numel(), cfg.normal_coreset_ratio)
    if m < keep.numel():
        proj = _projected(normal.layer_tokens, grid, r, cfg, space).reshape(count * length, -1)[keep]
        keep = keep[greedy_coreset(proj[None], m)[0]]
    ids = torch.as_tensor(normal.source_ids).repeat_interleave(length)[keep]
    layers = [_search_features(normal.layer_tokens, space, p, grid, r, cfg).reshape(count * length, -1)[keep]
              for p in range(len(space.layers))]
    return torch.stack(layers), ids


def normal_scores_against(features: Features, bank: torch.Tensor, bank_ids, cfg: PAClipConfig, r: int,
                          space: SearchSpace, query_ids=None) -> torch.Tensor:
    """(N, L) mean distance of each query patch to its k nearest normal-bank entries, mean over the scoring
    layers."""
    n, _, length, _ = features.layer_tokens.shape
    query_ids = torch.arange(n) if query_ids is None else torch.as_tensor(query_ids)
    bank_ids = torch.as_tensor(bank_ids)
    k = min(cfg.normal_k, bank_ids.numel())
    total = torch.zeros(n, length)
    for position in range(len(space.layers)):
        feats = _search_features(features.layer_tokens, space, position, features.grid, r, cfg)
        for i in range(n):
            dist = 1.0 - feats[i] @ bank[position].T  # (L, M)
            dist[:, bank_ids == query_ids[i]] = float("inf")  # nor its own augmentations
            nearest = dist.topk(k, dim=-1, largest=False).values
            finite = torch.isfinite(nearest)  # fewer than k entries from other images: mean of those there are
            total[i] += torch.where(finite, nearest, 0.0).sum(-1) / finite.sum(-1).clamp(min=1)
    return total / len(space.layers)


def decide(full_scores: dict, text_scores: dict, normal_bank_scores: dict, tau_b: dict, cfg: PAClipConfig,
           grid, map_size, result: ScoreResult | None = None) -> ScoreResult:
    """Eq. 7 per scale (a scale without a normal bank borrows the first one), then Eq. 8 as one weighted sum over
    the stacked scales, maps and image scores."""
    result = result or ScoreResult(maps=None, scores=None, patch_scores=None)
    if cfg.text_only or not cfg.use_normal_bank:
        per_scale = dict(text_scores if cfg.text_only else full_scores)
    else:
        first = cfg.normal_bank_scales[0]
        per_scale = {r: adaptive_subtraction(full_scores[r], normal_bank_scores.get(r, normal_bank_scores[first]),
                                             cfg.alpha, tau_b.get(r, tau_b[first])) for r in cfg.scales}
    weights = torch.tensor(cfg.weights, dtype=torch.float32).view(-1, 1, 1)
    result.patch_scores = (weights * torch.stack([per_scale[r] for r in cfg.scales])).sum(0)
    result.maps = patch_scores_to_maps(result.patch_scores, grid, map_size, cfg.smooth_sigma)
    result.scores = image_scores(result.maps, cfg.image_score, cfg.image_topk_fraction)
    return result


def rescore_images(result: ScoreResult, image_embeds, ref_embeds, ref_scores, cfg: PAClipConfig,
                   query_ids=None) -> ScoreResult:
    """Each image score moved toward the mean score of its most similar other reference images (torch topk)."""
    result.map_scores = result.scores
    if cfg.rescore_k <= 0:
        return result
    q = torch.nn.functional.normalize(torch.as_tensor(image_embeds).float(), dim=1)
    r = torch.nn.functional.normalize(torch.as_tensor(ref_embeds).float(), dim=1)
    sim = q @ r.T
    if query_ids is not None:
        for i, own in enumerate(torch.as_tensor(query_ids).tolist()):
            if own >= 0:
                sim[i, own] = float("-inf")
    k = min(cfg.rescore_k, r.shape[0] - (query_ids is not None))
    if k >= 1:
        nearest = sim.topk(k, dim=1).indices
        mean = torch.as_tensor(ref_scores).float()[nearest].mean(1)
        result.scores = result.scores + cfg.rescore_weight * (mean - result.scores)
    return result


def finish_stage(features: Features, state: LotState, normal: NormalSet | None, cfg: PAClipConfig,
                 map_size, query_ids=None) -> ScoreResult:
    """Stage 2: normal banks from ``normal`` (None: the chosen lot images alone), scores against them, decision;
    ``query_ids``: the ids the lot images go by, as ``mutual_scores`` takes them."""
    result = ScoreResult(maps=None, scores=None, patch_scores=None)
    if cfg.use_normal_bank and not cfg.text_only:
        if normal is None:
            normal = original_normal_set(features, state, query_ids)
        for r in cfg.normal_bank_scales:
            bank, bank_ids = build_normal_bank(normal, features.grid, r, state.prior_threshold, cfg, state.space)
            s_b = normal_scores_against(features, bank, bank_ids, cfg, r, state.space, query_ids)
            result.normal_bank_scores[r] = s_b
            result.tau_b[r] = float(torch.quantile(s_b.flatten().double(), cfg.tau_quantile))
            result.normal_bank_sizes[r] = int(bank.shape[1])
    result = decide(state.full_scores, state.text_scores, result.normal_bank_scores, result.tau_b, cfg,
                    features.grid, map_size, result)
    return rescore_images(result, features.image_embeds, features.image_embeds, result.scores, cfg,
                          torch.arange(len(features)))
