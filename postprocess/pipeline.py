"""PA-CLIP end to end in one process: encode a lot, choose normal images, augment them, score, make maps.

The encoder is a ``postprocess.backbone.Backbone``: ``encode(images) -> Features``, ``encode_text(prompts) -> array |
None`` and ``has_text`` (``export.backbones``, ``serving.RemoteEncoder``); the scoring is ``postprocess.pa_clip`` on
NumPy arrays (or CuPy when the features are).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from . import kernels as K
from .backbone import Backbone
from .cada import apply_augmentation, cada_decision, draw_augmentations, warp_patch_map
from .config import PAClipConfig
from .contract import Features, first_ids, image_key
from .errors import RequestError
from .host import DEFAULT_HOST, HostSettings
from .pa_clip import LotState, NormalSet, ScoreResult, finish_stage, lot_stage, normal_banks, rescore_within_lot

NORMAL_PROMPT = "a photo of a normal {}"
DEFECT_PROMPT = "a photo of a defective {}"


def prompts_for(category: str) -> list[str]:
    name = category.replace("_", " ")
    return [NORMAL_PROMPT.format(name), DEFECT_PROMPT.format(name)]


def encode_images(backbone: Backbone, images: np.ndarray, batch_size: int = 8, desc: str | None = None,
                  xp=None) -> Features:
    """Encode (N, H, W, 3) uint8 images in batches, with a progress bar when ``desc`` is given; the features end up
    in ``xp`` (default: where the backbone returns them)."""
    parts = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None):
        parts.append(backbone.encode(images[start : start + batch_size]))
    xp = xp or K.get_xp(parts[0].layer_tokens)
    parts = [p.to(xp) for p in parts]
    return Features(
        xp.concatenate([p.layer_tokens for p in parts]),
        xp.concatenate([p.patch_embeds for p in parts]),
        xp.concatenate([p.image_embeds for p in parts]),
        parts[0].grid,
    )


@dataclass
class LotReport:
    maps: np.ndarray  # (N, H, W) float32
    scores: np.ndarray  # (N,) float32
    normal_indices: np.ndarray
    info: dict = field(default_factory=dict)


@dataclass
class LotRun:
    """One lot scored under one configuration: what ``LotScorer.score`` reports and ``postprocess.bank.build_bank``
    packages as a bank."""
    cfg: PAClipConfig
    map_size: tuple[int, int]
    state: LotState  # stage 1: mutual scores, the normal images, the full banks' coresets
    normal: NormalSet | None  # the normal images (and their augmentations); None without a normal bank
    banks: dict  # r -> (normal bank (n_layers, M, C), source ids (M,)) the lot was scored against; {} without
    result: ScoreResult  # maps, image scores (after lot-level re-scoring), map scores, tau_b
    extra: dict  # what the normal set adds: "cada" and "n_augmented" when it was augmented

    def info(self) -> dict:
        cfg, state, result = self.cfg, self.state, self.result
        return {
            "normal_selection": state.selection,
            "normal_selection_note": (
                "normal images chosen by CLS-text similarity" if state.selection == "text" else
                "backbone has no text encoder: normal images chosen visually (lowest mutual score)"),
            "normal_indices": [int(i) for i in state.normal_indices],
            "image_score": f"{cfg.image_score}" + (
                f" (top {cfg.image_topk_fraction:.2%} of pixels)" if cfg.image_score == "topk_mean" else ""),
            "image_rescoring": (f"toward the mean of the {cfg.rescore_k} most similar lot images, weight "
                                f"{cfg.rescore_weight}" if cfg.rescore_k > 0 else "off"),
            "tau_b": {str(r): v for r, v in result.tau_b.items()},
            "normal_bank_entries": {str(r): v for r, v in result.normal_bank_sizes.items()},
            **self.extra,
        }

    def report(self) -> LotReport:
        return LotReport(K.to_numpy(self.result.maps).astype(np.float32),
                         K.to_numpy(self.result.scores).astype(np.float32), np.asarray(self.state.normal_indices),
                         self.info())


class LotScorer:
    """Scores one lot under one or more configurations, encoding each image (and augmentation) only once.

    Everything after the encoder runs in one array module, chosen once (``xp``, default ``host.xp()``: CuPy on a
    GPU host, NumPy otherwise): features, text embeddings, augmentation features and priors are moved there as they
    arrive, and only maps and scores come back.
    """

    def __init__(self, backbone: Backbone, images: np.ndarray, category: str, batch_size: int = 8,
                 features: Features | None = None, progress: bool = True, host: HostSettings = DEFAULT_HOST,
                 xp=None):
        if len(images) < 2:
            raise RequestError(f"a lot needs at least 2 images, got {len(images)}")
        self.backbone = backbone
        self.host = host
        self.xp = xp if xp is not None else host.xp()
        self.images = images
        self.image_keys = tuple(image_key(image) for image in images)  # hashed once: the bank records them too
        self.lot_ids = first_ids(self.image_keys)  # host: a copy of an earlier image goes by that one's index
        if len(set(self.lot_ids.tolist())) < 2:  # copies of one image are one image: none to score it against
            raise RequestError(f"a lot needs at least 2 different images, got {len(images)} copies of one")
        self.category = category
        self.batch_size = batch_size
        self.progress = progress
        self.features = features.to(self.xp) if features is not None else encode_images(
            backbone, images, batch_size, desc=f"encode {category}" if progress else None, xp=self.xp)
        text = backbone.encode_text(prompts_for(category)) if backbone.has_text else None
        self.text_embeds = None if text is None else self.xp.asarray(text, dtype=self.xp.float32)
        self._states: dict = {}
        self._normal_sets: dict = {}
        self._finished: dict = {}

    def state(self, cfg: PAClipConfig) -> LotState:
        key = cfg.lot_stage_key()
        if key not in self._states:
            self._states[key] = lot_stage(self.features, self.text_embeds, cfg, self.lot_ids, self.host)
        return self._states[key]

    def normal_set(self, cfg: PAClipConfig, state: LotState) -> tuple[NormalSet | None, dict]:
        """The chosen images plus, with CADA on, their augmentations (encoded here) and warped priors."""
        if not cfg.use_normal_bank or cfg.text_only:
            return None, {}
        xp = self.xp
        idx = state.normal_indices  # host: which lot images to augment
        on_device = xp.asarray(idx)
        ids = self.lot_ids[idx]  # each entry's source: a copy of an earlier image goes by that one's index
        originals = NormalSet(self.features.layer_tokens[on_device], xp.asarray(ids), state.prior[on_device])
        if not cfg.augment or cfg.n_augment <= 0:
            return originals, {}
        key = (cfg.lot_stage_key(), cfg.n_augment, cfg.cada_threshold)
        if key not in self._normal_sets:
            decision = cada_decision(self.images, cfg.cada_threshold)
            size = tuple(self.images.shape[1:3])
            h, w = self.features.grid
            aug_images, aug_ids, aug_prior = [], [], []
            for j, i in enumerate(idx):
                for aug in draw_augmentations(cfg.n_augment, decision.strategy, size, cfg.seed + 1000 + j):
                    aug_images.append(apply_augmentation(self.images[i], aug))  # pixels: host, for the encoder
                    aug_ids.append(ids[j])
                    aug_prior.append(warp_patch_map(originals.prior[j].reshape(h, w), aug, size).reshape(-1))
            encoded = encode_images(self.backbone, np.stack(aug_images), self.batch_size,
                                    desc="encode augmentations" if self.progress else None, xp=xp)
            normal = NormalSet(
                xp.concatenate([originals.layer_tokens, encoded.layer_tokens]),
                xp.concatenate([originals.source_ids, xp.asarray(np.asarray(aug_ids, dtype=np.int64))]),
                xp.concatenate([originals.prior, xp.stack(aug_prior).astype(originals.prior.dtype)]),
            )
            self._normal_sets[key] = (normal, {"cada": decision.to_dict(), "n_augmented": len(aug_images)})
        return self._normal_sets[key]

    def run(self, cfg: PAClipConfig, map_size: tuple[int, int] | None = None, bank_dtype=None) -> LotRun:
        """Score the lot under ``cfg``: stage 1, the normal set, the normal banks and the finish stage, each computed
        once per lot and settings (the last finish stage is kept; settings that differ only in lot-level re-scoring
        share it).

        ``bank_dtype``: the normal banks rounded to it before the lot is scored against them (``build_bank``:
        float16, so that the lot's tau_b are those of the stored bank); None keeps them as computed (``score``).
        """
        size = tuple(map_size or self.images.shape[1:3])
        if cfg.smooth_sigma >= K.smoothing_limit(size):  # refused before the lot stage, not after it (a 500)
            raise RequestError(f"smooth_sigma {cfg.smooth_sigma:g} is too large for maps of {size[0]}x{size[1]}: it "
                               f"must be below {K.smoothing_limit(size):g} (its kernel must fit the short side)")
        state = self.state(cfg)
        normal, extra = self.normal_set(cfg, state)
        # Lot-level re-scoring only reads the map scores: settings that differ in it alone share one finish stage
        plain = cfg.replace(rescore_k=0, rescore_weight=0.0)
        key = (tuple(sorted(plain.to_dict().items())), size, None if bank_dtype is None else np.dtype(bank_dtype).str)
        if key not in self._finished:
            self._finished.clear()  # one kept: maps of a whole lot are large
            banks = {}
            if normal is not None:  # a normal bank is used (normal_set gives None otherwise)
                banks = normal_banks(normal, self.features.grid, state.prior_threshold, plain, state.space)
                if bank_dtype is not None:
                    banks = {r: (b.astype(bank_dtype), ids) for r, (b, ids) in banks.items()}
            self._finished[key] = banks, finish_stage(self.features, state, normal, plain, size, banks=banks or None,
                                                      host=self.host, query_ids=self.xp.asarray(self.lot_ids))
        banks, finished = self._finished[key]
        result = rescore_within_lot(copy.copy(finished), self.features, cfg)
        return LotRun(cfg, size, state, normal, banks, result, extra)

    def score(self, cfg: PAClipConfig, map_size: tuple[int, int] | None = None) -> LotReport:
        return self.run(cfg, map_size).report()


def score_lot(backbone: Backbone, images: np.ndarray, category: str, cfg: PAClipConfig | None = None,
              **kwargs) -> LotReport:
    """One-shot: encode and score a lot of (N, H, W, 3) uint8 images."""
    return LotScorer(backbone, images, category, **kwargs).score(cfg or PAClipConfig())


__all__ = ["LotScorer", "LotReport", "LotRun", "score_lot", "encode_images", "prompts_for"]
