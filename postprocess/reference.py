"""A plain-torch reference of PA-CLIP scoring (DESIGN.md steps 2-9), written for clarity, not for memory or speed.

It builds whole distance matrices and uses torch's own pooling, interpolation and convolution, so it checks the
array kernels of ``postprocess.kernels`` / ``postprocess.pa_clip`` from an independent direction. Only the seeded
random projection of the coreset is shared, so that both pick the same patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import PAClipConfig
from .kernels import coreset_size, random_projection


def aggregate(tokens: torch.Tensor, grid, r: int, feature_norm: str) -> torch.Tensor:
    """(N, L, C) -> (N, L, C): optional LayerNorm, r x r mean over valid neighbours, L2 normalisation."""
    x = tokens.float()
    if feature_norm == "layernorm":
        x = F.layer_norm(x, x.shape[-1:], eps=1e-5)
    n, length, channels = x.shape
    h, w = grid
    if r > 1:
        img = x.reshape(n, h, w, channels).permute(0, 3, 1, 2)
        img = F.avg_pool2d(img, kernel_size=r, stride=1, padding=r // 2, count_include_pad=False)
        x = img.permute(0, 2, 3, 1).reshape(n, length, channels)
    return F.normalize(x, dim=-1)


def defect_probability(features: torch.Tensor, text: torch.Tensor, tau: float) -> torch.Tensor:
    logits = F.normalize(features.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / tau
    return logits.softmax(dim=-1)[..., 1]


def greedy_coreset(points: torch.Tensor, n_select: int) -> torch.Tensor:
    """(P, d) -> (n_select,) indices: start nearest the mean, then always the point farthest from the chosen."""
    start = int(torch.cdist(points, points.mean(0, keepdim=True)).squeeze(1).argmin())
    chosen = [start]
    min_dist = torch.cdist(points, points[start : start + 1]).squeeze(1)
    for _ in range(1, n_select):
        nxt = int(min_dist.argmax())
        chosen.append(nxt)
        min_dist = torch.minimum(min_dist, torch.cdist(points, points[nxt : nxt + 1]).squeeze(1))
    return torch.tensor(chosen)


def projected(layer_tokens: torch.Tensor, grid, r: int, cfg: PAClipConfig) -> torch.Tensor:
    n_layers, channels = layer_tokens.shape[1], layer_tokens.shape[3]
    feats = torch.cat([aggregate(layer_tokens[:, l], grid, r, cfg.feature_norm) for l in range(n_layers)], dim=-1)
    proj = torch.from_numpy(random_projection(n_layers * channels, cfg.coreset_dim, cfg.seed + r))
    return feats @ proj


def interval_k(n: int, cfg: PAClipConfig) -> int:
    k = min(cfg.k_max, max(cfg.k_min, int(round(cfg.interval_fraction * (n - 1)))))
    return max(1, min(k, n - 1))


def mutual_scores(layer_tokens: torch.Tensor, grid, r: int, cfg: PAClipConfig) -> torch.Tensor:
    """(N, L): per patch, nearest distance to each other image, mean of the k smallest, mean over layers."""
    n, n_layers, length, _ = layer_tokens.shape
    m = coreset_size(length, cfg.full_coreset_ratio)
    keep = None
    if m < length:
        proj = projected(layer_tokens, grid, r, cfg)
        keep = torch.stack([greedy_coreset(proj[i], m) for i in range(n)])  # (N, m)
    k = interval_k(n, cfg)
    total = torch.zeros(n, length)
    for layer in range(n_layers):
        feats = aggregate(layer_tokens[:, layer], grid, r, cfg.feature_norm)
        bank = feats if keep is None else torch.stack([feats[i, keep[i]] for i in range(n)])
        for i in range(n):  # one query image at a time keeps the distance block at L x N x m
            dist = 1.0 - torch.einsum("lc,bmc->lbm", feats[i], bank)
            per_image = dist.min(dim=-1).values  # (L, N): nearest patch of every image
            per_image[:, i] = float("inf")  # never match yourself
            total[i] += per_image.sort(dim=-1).values[:, :k].mean(dim=-1)
    return total / n_layers


def fuse(per_scale: dict, cfg: PAClipConfig) -> torch.Tensor:
    return sum(w * per_scale[r] for r, w in zip(cfg.scales, cfg.weights))


def lot_stage(features, text, cfg: PAClipConfig) -> dict:
    """Torch twin of ``pa_clip.lot_stage``; ``features`` holds torch tensors."""
    n = features.layer_tokens.shape[0]
    text_scores = {}
    if text is not None:
        text_scores = {r: defect_probability(aggregate(features.patch_embeds, features.grid, r, "none"), text,
                                             cfg.tau_text) for r in cfg.scales}
    full = {} if cfg.text_only else {r: mutual_scores(features.layer_tokens, features.grid, r, cfg)
                                     for r in cfg.scales}
    if text is not None:
        normal_scores = 1.0 - defect_probability(features.image_embeds, text, cfg.tau_text)
        prior = fuse(text_scores, cfg)
    else:
        prior = fuse(full, cfg)
        normal_scores = -image_score(prior, cfg)
    count = min(n, max(cfg.min_normal, math.ceil(cfg.normal_fraction * n)))
    normal_indices = torch.sort(normal_scores, descending=True, stable=True).indices[:count]
    return {"full": full, "text": text_scores, "normal_indices": normal_indices, "prior": prior,
            "prior_threshold": float(torch.quantile(prior.flatten().double(), cfg.normal_patch_quantile))}


def normal_bank(layer_tokens, source_ids, prior, grid, r: int, threshold: float, cfg: PAClipConfig):
    count, n_layers, length, _ = layer_tokens.shape
    keep = torch.nonzero(prior.reshape(-1) <= threshold).squeeze(1)
    if keep.numel() == 0:
        keep = torch.arange(count * length)
    m = coreset_size(keep.numel(), cfg.normal_coreset_ratio)
    if m < keep.numel():
        proj = projected(layer_tokens, grid, r, cfg).reshape(count * length, -1)[keep]
        keep = keep[greedy_coreset(proj, m)]
    ids = source_ids.repeat_interleave(length)[keep]
    feats = [aggregate(layer_tokens[:, l], grid, r, cfg.feature_norm).reshape(count * length, -1)[keep]
             for l in range(n_layers)]
    return feats, ids


def normal_scores(layer_tokens, bank_layers, bank_ids, grid, r: int, cfg: PAClipConfig) -> torch.Tensor:
    n, n_layers, length, _ = layer_tokens.shape
    k = min(cfg.normal_k, bank_ids.numel())
    total = torch.zeros(n, length)
    for layer in range(n_layers):
        feats = aggregate(layer_tokens[:, layer], grid, r, cfg.feature_norm)
        for i in range(n):
            dist = 1.0 - feats[i] @ bank_layers[layer].T  # (L, M)
            dist[:, bank_ids == i] = float("inf")  # nor its own augmentations
            nearest = dist.topk(k, dim=-1, largest=False).values
            finite = torch.isfinite(nearest)  # fewer than k entries from other images: mean of those there are
            total[i] += torch.where(finite, nearest, 0.0).sum(-1) / finite.sum(-1).clamp(min=1)
    return total / n_layers


def to_maps(patch_scores: torch.Tensor, grid, size, sigma: float) -> torch.Tensor:
    h, w = grid
    maps = F.interpolate(patch_scores.reshape(-1, 1, h, w), size=size, mode="bilinear", align_corners=False)
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        taps = torch.exp(-0.5 * (x / sigma) ** 2)
        taps = (taps / taps.sum()).float()
        maps = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
        maps = F.conv2d(maps, taps.view(1, 1, -1, 1))
        maps = F.conv2d(maps, taps.view(1, 1, 1, -1))
    return maps[:, 0]


def image_score(maps: torch.Tensor, cfg: PAClipConfig) -> torch.Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    if cfg.image_score == "max":
        return flat.max(dim=1).values
    k = max(1, int(round(cfg.image_topk_fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


def finish_stage(features, state: dict, normal_tokens, normal_ids, normal_prior, cfg: PAClipConfig, map_size):
    """Torch twin of ``pa_clip.finish_stage``: returns (maps (N,H,W), scores (N,), patch scores (N,L))."""
    if cfg.text_only:
        per_scale = state["text"]
    elif not cfg.use_normal_bank:
        per_scale = state["full"]
    else:
        s_b, tau = {}, {}
        for r in cfg.normal_bank_scales:
            bank, ids = normal_bank(normal_tokens, normal_ids, normal_prior, features.grid, r,
                                    state["prior_threshold"], cfg)
            s_b[r] = normal_scores(features.layer_tokens, bank, ids, features.grid, r, cfg)
            tau[r] = float(torch.quantile(s_b[r].flatten().double(), cfg.tau_quantile))
        per_scale = {}
        for r in cfg.scales:
            rb = r if r in s_b else cfg.normal_bank_scales[0]
            subtract = (s_b[rb] <= tau[rb]).float()
            per_scale[r] = state["full"][r] - cfg.alpha * s_b[rb] * subtract
    patch = fuse(per_scale, cfg)
    maps = to_maps(patch, features.grid, map_size, cfg.smooth_sigma)
    return maps, image_score(maps, cfg), patch
