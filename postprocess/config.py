"""PA-CLIP scoring configuration: the defaults, and the paper's ablation rows as presets.

Every number the paper leaves open is a field here; README.md ("Defaults") says why each was chosen. These fields
decide the result and travel in a bank's manifest; how a machine runs the work (memory budget, NumPy or CuPy) is
``postprocess.host.HostSettings`` and never does.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field

# The ablation rows of the paper (Tables 3-4) plus the MuSc-style mutual-scoring baseline we must beat.
MODES = ("baseline", "mutual", "pad", "pad_pam", "pad_mpam")
MODE_HELP = {
    "baseline": "text only: patch-text similarity (needs a text encoder)",
    "mutual": "MuSc-style mutual scoring against the full bank; no normal bank, no subtraction",
    "pad": "+PAD: full bank and a normal bank of the selected images (no augmentation, no coreset), "
    "adaptive subtraction, normal bank at r=1 only",
    "pad_pam": "+PAD+PAM: the normal bank adds CADA augmentations and coreset sampling, at r=1 only",
    "pad_mpam": "+PAD+MPAM: the full method, normal banks at every scale",
}


IMAGE_SCORES = ("max", "topk_mean", "mean")
BANK_PROJECTIONS = ("pca", "random")
BANK_STORAGE = ("float16", "int8")
# The full bank: every channel, float16 entries, every image of any lot kept and read (the defaults before issue 26);
# on top of today's defaults these settings give it back
FULL_BANK = {"bank_dim_divisor": 1, "full_bank_storage": "float16", "full_bank_neighbours": 0, "full_bank_images": 0}
MAX_TAPS = 64  # the largest tapped-layer index ``layers`` may name (an encoder has far fewer taps)
MAX_SCALE_WEIGHT = 1e6  # scale_weights are relative: their ratio matters, and a bound keeps their sum a float

# Settings used only after the normal images are chosen (normal bank, subtraction, maps).
FINISH_STAGE_FIELDS = frozenset({
    "use_normal_bank", "multiscale_normal_bank", "augment", "n_augment", "cada_threshold", "normal_coreset_ratio",
    "normal_k", "alpha", "tau_quantile", "smooth_sigma", "rescore_k", "rescore_weight",
})  # not full_bank_storage: the lot is scored against its full-bank entries as the bank stores them (int8 or not)


# What each numeric setting may take: (lowest, highest, whether the lowest itself is allowed). Checked when a
# configuration is made, so a build request gets a 400 that states the range instead of a failure halfway through.
# The upper bounds keep one request's work and memory sane; 64 is the top-k the GPU kernels keep (MAX_K).
RANGES = {
    "tau_text": (0.0, 10.0, False),
    "normal_fraction": (0.0, 1.0, False),
    "min_normal": (1, 10_000, True),
    "normal_patch_quantile": (0.0, 1.0, True),
    "n_augment": (0, 64, True),
    "cada_threshold": (0.0, 1.0, True),
    "full_coreset_ratio": (0.0, 1.0, False),
    "normal_coreset_ratio": (0.0, 1.0, False),
    "coreset_dim": (1, 4096, True),
    "bank_dim": (0, 4096, True),
    "bank_dim_divisor": (1, 4096, True),
    "full_bank_images": (0, 1_000_000, True),
    "full_bank_neighbours": (0, 1_000_000, True),
    "interval_fraction": (0.0, 1.0, False),
    "k_min": (1, 64, True),
    "k_max": (1, 64, True),
    "normal_k": (1, 64, True),
    "alpha": (0.0, 1.0, True),
    "tau_quantile": (0.0, 1.0, True),
    "smooth_sigma": (0.0, 64.0, True),
    "image_topk_fraction": (0.0, 1.0, False),
    "rescore_k": (0, 1000, True),
    "rescore_weight": (-1.0, 1.0, True),
    "seed": (0, 2**32 - 1, True),
}
MAX_SCALE = 15  # the largest pooling window r (an r x r neighbourhood of patches)


def describe_range(name: str) -> str:
    low, high, closed = RANGES[name]
    kind = "an integer" if isinstance(low, int) else "a number"
    return f"{kind} in {'[' if closed else '('}{low}, {high}]"


@dataclass(frozen=True)
class PAClipConfig:
    # Multi-scale aggregation (Eq. 1) and fusion weights (Eq. 8); None = equal weights.
    scales: tuple[int, ...] = (1, 3, 5)
    scale_weights: tuple[float, ...] | None = None
    # Feature normalisation before aggregation: "none", or "layernorm" (per token over channels).
    feature_norm: str = "none"

    # Text (Eq. 2-3).
    tau_text: float = 0.01
    # Normal-image selection: this fraction of the lot, at least min_normal images.
    normal_fraction: float = 0.1
    min_normal: int = 2
    # Patches of selected images whose prior anomaly score (text, or mutual without text) is above this
    # quantile of the lot's prior scores are kept out of the normal bank.
    normal_patch_quantile: float = 0.9

    # Banks.
    use_normal_bank: bool = True
    multiscale_normal_bank: bool = True
    augment: bool = True
    n_augment: int = 4
    cada_threshold: float = 0.05
    full_coreset_ratio: float = 1.0
    normal_coreset_ratio: float = 0.1
    coreset_dim: int = 128
    # Where the banks are searched: the tapped layers that score (indices into the encoder's taps; empty: all), and
    # each one's pooled features projected onto bank_dim directions, or (bank_dim 0) onto the encoder's channels /
    # bank_dim_divisor (divisor 1: every channel, no projection): "pca" (the lot's principal directions) or a seeded
    # "random" projection; the full bank's entries stored as float16 or as int8 with a scale per entry.
    # The defaults (C/8, int8, 8 neighbours) were chosen on magnetic tile with benchmarks.bank_frontier and reported
    # on ball screw: 12x smaller and 26x less work per new image there, within 0.3 points (README "Bank size")
    layers: tuple[int, ...] = ()
    # Lots larger than this + 1 images keep a seeded sample of this many in the full bank, every image, of the lot or
    # new, is scored against that sample instead of the whole lot, and the interval's k and the normal set are sized
    # by the sample (0: always the whole lot). 160: up to there the interval's k (5% of the lot) stays within the 8
    # neighbours, so the work per image is flat; above, the sample keeps it flat and the lot stage grows linearly
    # (README "Lots that scale")
    full_bank_images: int = 160
    # Each image, of the lot or new, is compared with its full_bank_neighbours most similar full-bank images (the
    # cosine of their mean entries; at least the interval's k of them) instead of every one (0: every one): the
    # interval average reads the nearest few images anyway, and the work per image stops growing with the lot
    full_bank_neighbours: int = 8
    bank_dim: int = 0
    bank_dim_divisor: int = 8
    bank_projection: str = "pca"
    full_bank_storage: str = "int8"

    # Psi (Eq. 5-6). The interval average reads the k = interval_fraction * (N - 1) nearest lot images: what recurs in
    # more than that share of a lot counts as normal. A line's lots are a few percent defective, so 5% (chosen on
    # magnetic tile with benchmarks.line; MuSc's 30% is for half-defective test sets: README "Decisions on a line")
    interval_fraction: float = 0.05
    k_min: int = 1
    k_max: int = 64
    normal_k: int = 3

    # Adaptive subtraction (Eq. 7).
    alpha: float = 0.2
    tau_quantile: float = 0.98

    # Maps and image score.
    smooth_sigma: float = 0.0
    # "max" of the map, "topk_mean" (mean of its top image_topk_fraction: the paper's "averaging the patch-level
    # scores", read as the top ones), or "mean" of the whole map (that sentence read literally)
    image_score: str = "max"
    image_topk_fraction: float = 0.01
    # Lot-level image re-scoring: each image score moves by rescore_weight toward the mean score of its rescore_k
    # most similar lot images (cosine of the image embeddings; a negative weight moves it away). 0 = off.
    rescore_k: int = 0  # off: on new parts at line rates it did not help (README "Decisions on a line")
    rescore_weight: float = 0.5

    # Text-only map instead of memory banks (the "baseline" ablation row).
    text_only: bool = False

    seed: int = 0

    def __post_init__(self):
        self._check_types_and_ranges()
        if any(r < 1 or r % 2 == 0 for r in self.scales):
            raise ValueError(f"scales must be odd positive integers, got {self.scales}")
        if self.scale_weights is not None and len(self.scale_weights) != len(self.scales):
            raise ValueError("scale_weights must have one weight per scale")
        if self.feature_norm not in ("none", "layernorm"):
            raise ValueError(f"feature_norm must be 'none' or 'layernorm', got {self.feature_norm!r}")
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {self.image_score!r}")
        if self.bank_projection not in BANK_PROJECTIONS:
            raise ValueError(f"bank_projection must be one of {', '.join(BANK_PROJECTIONS)}, got "
                             f"{self.bank_projection!r}")
        if self.full_bank_storage not in BANK_STORAGE:
            raise ValueError(f"full_bank_storage must be one of {', '.join(BANK_STORAGE)}, got "
                             f"{self.full_bank_storage!r}")
        if self.k_max < self.k_min:
            raise ValueError(f"need k_min <= k_max, got {self.k_min} and {self.k_max}")
        if self.full_bank_images == 1:  # an image of a sample of one has no other to be compared with
            raise ValueError("full_bank_images must be 0 (keep every lot image) or at least 2, got 1")

    @property
    def projects(self) -> bool:
        """Whether the banks are searched in a projection of the encoder's channels (``search_dim`` > 0)."""
        return bool(self.bank_dim) or self.bank_dim_divisor > 1

    def search_dim(self, channels: int) -> int:
        """The width the banks are searched at for encoder features of ``channels``: bank_dim, else channels /
        bank_dim_divisor; 0 for every channel (no projection)."""
        if not self.projects:
            return 0
        return self.bank_dim or max(1, channels // self.bank_dim_divisor)

    def _check_types_and_ranges(self) -> None:
        """Strict types (a boolean is not a number, "no" is not a boolean) and the ``RANGES``."""
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            if isinstance(default, bool):
                if type(value) is not bool:
                    raise ValueError(f"{f.name} must be true or false, got {value!r}")
            elif isinstance(default, (int, float)):
                kind = numbers.Integral if type(default) is int else numbers.Real
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise ValueError(f"{f.name} must be {describe_range(f.name)}, got {value!r}")
                low, high, closed = RANGES[f.name]
                if not (low <= value <= high) or (value == low and not closed) or value != value:
                    raise ValueError(f"{f.name} must be {describe_range(f.name)}, got {value!r}")
            elif isinstance(default, str) and not isinstance(value, str):
                raise ValueError(f"{f.name} must be text, got {value!r}")
        if not isinstance(self.scales, (tuple, list)) or not self.scales or len(self.scales) > 8 or \
                not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) and 1 <= r <= MAX_SCALE and r % 2 for r in self.scales):
            raise ValueError(f"scales must be 1 to 8 odd integers in [1, {MAX_SCALE}], got {self.scales!r}")
        if not isinstance(self.layers, (tuple, list)) or len(self.layers) > MAX_TAPS or len(set(self.layers)) != \
                len(self.layers) or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and
                                            0 <= i < MAX_TAPS for i in self.layers):
            raise ValueError(f"layers must be distinct tapped-layer indices in [0, {MAX_TAPS}) (empty: all), got "
                             f"{self.layers!r}")
        if self.scale_weights is not None:
            weights = self.scale_weights
            if not isinstance(weights, (tuple, list)) or not all(
                    isinstance(w, numbers.Real) and not isinstance(w, bool) and 0 <= w <= MAX_SCALE_WEIGHT
                    for w in weights) or not sum(weights) > 0:
                # bounded: JSON carries integers past any float, whose sum overflowed (a 500), and floats whose sum
                # is infinite made every weight 0 (every score 0)
                raise ValueError(f"scale_weights are relative weights, non-negative numbers up to "
                                 f"{MAX_SCALE_WEIGHT:g} with a positive sum, e.g. [1, 2, 1] (or null), got "
                                 f"{str(weights)[:200]}")

    @property
    def weights(self) -> tuple[float, ...]:  # scale_weights as floats (their ranges keep the sum finite)
        if self.scale_weights is None:
            return tuple(1.0 / len(self.scales) for _ in self.scales)
        total = float(sum(self.scale_weights))
        return tuple(w / total for w in self.scale_weights)

    @property
    def normal_bank_scales(self) -> tuple[int, ...]:
        return self.scales if self.multiscale_normal_bank else (self.scales[0],)

    def lot_stage_key(self) -> tuple:
        """The settings stage 1 (mutual scores, normal-image choice) depends on: equal keys, equal stage-1 results."""
        return tuple((k, v) for k, v in sorted(self.to_dict().items()) if k not in FINISH_STAGE_FIELDS)

    def replace(self, **changes) -> "PAClipConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def for_mode(cls, mode: str, **overrides) -> "PAClipConfig":
        """The configuration of one ablation row; overrides apply on top."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        preset = {
            "baseline": dict(text_only=True, use_normal_bank=False, augment=False),
            "mutual": dict(use_normal_bank=False, augment=False),
            "pad": dict(augment=False, normal_coreset_ratio=1.0, multiscale_normal_bank=False),
            "pad_pam": dict(multiscale_normal_bank=False),
            "pad_mpam": dict(),
        }[mode]
        preset.update(overrides)
        return cls(**preset)


DEFAULT_CONFIG = PAClipConfig()
