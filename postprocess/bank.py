"""Memory banks for serving: what a built lot leaves behind so that any image can be scored later, one at a time.

A bank holds, per scale r, the full bank (every lot image's aggregated features at every tapped layer, or each
image's coreset) and the normal bank (coreset of the most normal images and their CADA augmentations), the
subtraction thresholds tau_b measured on the lot, the interval k, and the SHA-256 of every lot image so that a lot
image sent again never matches its own patches. Scoring one image against a bank gives the same map as scoring the
whole lot in one process (``tests/test_bank.py``). Entries are stored as float16 (half the disk and memory; the
maps move by less than 1e-3).

What a bank is: its arrays (``Bank``) and its ``BankManifest`` (what it was built from and with, its thresholds).
Where banks live on disk: ``postprocess.bank_store`` (which imports this module, never the other way round).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass

import numpy as np

from . import kernels as K, strict_json
from .config import FULL_BANK, PAClipConfig
from .contract import (TEXT_EMBEDS, Features, encoder_identity, first_ids, image_key,  # noqa: F401 (image_key)
                       patch_side)
from .decision import DEFAULT_FALSE_ALARM_RATE, calibrate
from .errors import RequestError
from .ood import DEFAULT_STATISTICS, calibrate_ood, image_statistics
from .host import DEFAULT_HOST, HostSettings
from .pa_clip import (ScoreResult, SearchSpace, bank_entries, decide, full_bank_references, full_scores_against,
                      grown_sample, lot_interval_k, normal_scores_against, rescore_images, text_patch_scores)

# The manifest format this code writes. A change to what manifest.json holds bumps it and adds the step from the
# previous format to MIGRATIONS, so that banks already on a (shared) store keep loading.
FORMAT_VERSION = 7
# format 2 added the digests of the version's files and the shapes and dtypes of its tensors (``files``,
# ``tensors``): a format-1 bank has neither, and is checked against what its other fields imply; format 3 the
# out-of-distribution calibration (``ood``): a bank built before has none and makes no such decisions; format 4 the
# lot sizes a sampled bank grew through (``sample_growth``): a bank written before never grew past its sample;
# format 5 the keys of the parts an update left out (``left_out_keys``): a bank written before counted none (a
# server of format 4 read a grown bank's new field as damage; it now says the format is newer); format 6 the digest
# of the manifest itself, beside it (``manifest.sha256``, the store's): a bank written before has none, and a flipped
# bit in its thresholds or image keys went unseen; format 7 the score up to which an update folds a new part in
# (``accept_level``, fixed at a bank's first update): a bank written before read it again from a calibration that
# parts left out had lifted, and folds in by the level read from its calibration at its next update
MIGRATIONS: dict = {old: (lambda values, new=old + 1: {**values, "format_version": new})
                    for old in (1, 2, 3, 4, 5, 6)}
DIGESTED_FROM = 2  # the first format whose manifest records its files' digests and its tensors (``files``, ``tensors``)
IMAGE_KEY = re.compile(r"[0-9a-f]{64}")  # ``image_key``: a SHA-256 in hex
# Fields that banks built before host settings moved out of PAClipConfig still carry in their manifest's config.
LEGACY_HOST_FIELDS = ("memory_budget_mb",)
LOT_EMBEDS, LOT_SCORES = "lot_image_embeds", "lot_map_scores"  # bank tensors for lot-level re-scoring
FULL_IDS = "full_ids"  # the lot images a sampled full bank keeps


class BankError(RequestError):
    """A request about banks that cannot be served; the message says what to do."""


class BankFormatError(BankError):
    """A manifest of a format this code does not read (a newer server wrote it): rebuild, or serve with that one."""


def check_encoder(manifest: "BankManifest", fingerprint: dict | None) -> None:
    if fingerprint is None:
        return
    recorded = dict(manifest.encoder)
    if "positions_from" in fingerprint and recorded.get("dynamic_size") and "positions_from" not in recorded:
        # built in torch before the field was recorded: that encoder's positions came from its configured size
        recorded["positions_from"] = recorded.get("image_size")
    built, serving = encoder_identity(recorded), encoder_identity(fingerprint)
    if built != serving:
        raise BankError(f"bank {manifest.bank!r} was built with encoder {built}, but this server runs {serving}: "
                        "rebuild the bank (pa-clip score --build) or serve the encoder it was built with")


# A bank's manifest holds every setting there was when it was built. One added later, or whose default changed, is
# read back, when absent, as what the bank did then, not as today's default (issue 26 made the full bank int8, C/8
# and 8 neighbours by default; a bank written before then is the full bank).
ABSENT_SETTINGS = dict(FULL_BANK)


def config_from_dict(values: dict) -> PAClipConfig:
    names = {f for f in PAClipConfig.__dataclass_fields__}
    unknown = set(values) - names
    if unknown:
        raise BankError(f"unknown PA-CLIP settings {sorted(unknown)}; known: {sorted(names)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return PAClipConfig(**{**{k: v for k, v in ABSENT_SETTINGS.items() if k not in fixed}, **fixed})


def _jsonable(value):
    """Tuples as lists, recursively: what the value reads back as from JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _lot_sizes(value) -> tuple[int, ...] | None:
    """``sample_growth`` as read from JSON: absent, or a list of whole numbers (nothing else turned into one)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(type(n) is int for n in value):
        raise ValueError(f"sample_growth is a list of lot sizes, not {json.dumps(value)[:80]}")
    return tuple(value)


def _number(value, name: str) -> float:
    """A number as read from JSON (a bool, a string or a list is none: ``float`` would take some of them)."""
    if type(value) not in (int, float):
        raise ValueError(f"{name} is a number, not {json.dumps(value)[:80]}")
    return float(value)


def _image_keys(value) -> tuple[str, ...] | None:
    """``left_out_keys`` as read from JSON: absent, or a list of strings (``check_manifest`` checks each key)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"left_out_keys is a list of image keys, not {json.dumps(value)[:80]}")
    return tuple(value)


def _by_scale(values: dict, kind) -> dict:
    """A per-scale table keyed by the scale r (JSON keys are strings)."""
    return {int(r): kind(v) for r, v in values.items()}


@dataclass(frozen=True, kw_only=True)
class BankManifest:
    """What a bank was built from and with, and what the lot measured: ``manifest.json`` beside its tensors.

    The JSON (``to_json``, ``to_dict``: also what the ``info`` and ``list`` bank actions return) keeps the field
    order below, writes per-scale tables with string keys ("1", "3", ...) and leaves out the fields that are None.
    """

    format_version: int = FORMAT_VERSION
    bank: str
    category: str
    encoder: dict  # the encoder's fingerprint (contract.encoder_identity: what must match to score with the bank)
    config: PAClipConfig  # the PA-CLIP settings the bank was built with (no host settings)
    grid: tuple[int, int]  # patch grid (h, w)
    image_size: tuple[int, int]  # (height, width) of the images it scores; maps come out at this size
    n_images: int  # lot size
    image_keys: tuple[str, ...]  # image_key of each lot image, in lot order
    interval_k: int
    tau_b: dict  # r -> subtraction threshold measured on the lot (float)
    normal_bank_entries: dict  # r -> entries of the normal bank at scale r ({} without a normal bank)
    full_bank_entries_per_image: dict  # r -> full-bank entries per lot image ({} for the text-only baseline)
    normal_selection: str  # "text" or "visual": how the normal images were chosen
    normal_indices: tuple[int, ...]  # lot index of each image chosen as normal
    map_range: tuple[float, float]  # heat maps' colour scale (low, high): see colour_scale
    lot_scores: dict  # the lot's image scores: {"min", "median", "max"}
    # the automatic threshold and calibrated score of this lot (postprocess/decision.py, Calibration.to_dict), kept
    # as written so that an image scored alone later gets the decision it would have got in the lot
    decision: dict
    # the out-of-distribution statistics' lot values and thresholds (postprocess/ood.py, OodCalibration.to_dict);
    # None in banks built before format 3
    ood: dict | None = None
    cada: dict | None = None  # the CADA decision (cada.CadaDecision.to_dict) when the normal set was augmented
    n_augmented: int | None = None  # augmentations encoded into the normal bank
    # the lot sizes a sampled full bank grew through (postprocess/growth.py): its sample was drawn at the first and
    # carried to each next by pa_clip.reservoir_step; None: the sample its settings draw at n_images
    sample_growth: tuple[int, ...] | None = None
    # image keys of the parts an update scored and left out (postprocess/growth.py): their scores joined the
    # calibration once, so a part sent again is neither scored again nor counted twice; None: none yet
    left_out_keys: tuple[str, ...] | None = None
    # the highest score a new part may have to be folded in (postprocess/growth.py): the lot's upper-quartile score
    # as the bank was built, fixed at its first update (the calibration's reference then also holds the scores of
    # parts left out, which would lift it); None: never grown
    accept_level: float | None = None
    version: str | None = None  # the version folder, set by BankStore.save
    built_at: str | None = None  # when it was saved (local time, ISO 8601)
    # set by BankStore.save: file name -> {"sha256", "bytes"} of the version's data files, and tensor name ->
    # {"shape", "dtype"} of bank.safetensors (None in banks of format 1)
    files: dict | None = None
    tensors: dict | None = None

    def to_dict(self) -> dict:
        """The manifest as JSON values (lists, string keys), in the order it is written."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            if f.name == "config":
                value = value.to_dict()
            elif f.name in ("tau_b", "normal_bank_entries", "full_bank_entries_per_image"):
                value = {str(r): v for r, v in value.items()}
            out[f.name] = _jsonable(value)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> "BankManifest":
        """Read ``manifest.json``: damaged JSON (or a key written twice) raises ValueError, a format this code does
        not read a BankError that says to rebuild."""
        return cls.from_dict(cls.json_values(text))

    @staticmethod
    def json_values(text: str | bytes):
        """The JSON of ``manifest.json`` as written (before any migration): damaged JSON (or a key written twice)
        raises ValueError."""
        try:
            return strict_json.loads(text)
        except strict_json.JsonRefused as err:
            raise ValueError(f"{err} (a bank manifest): the file is damaged; rebuild the bank") from None

    @classmethod
    def from_dict(cls, values: dict) -> "BankManifest":
        if not isinstance(values, dict):
            raise ValueError(f"a bank manifest is a JSON object, not {type(values).__name__}")
        version = values.get("format_version")
        while type(version) is int and version in MIGRATIONS:  # an older format: brought up to this one step by step
            values = MIGRATIONS[version](values)
            version = values.get("format_version")
        if type(version) is int and version > FORMAT_VERSION:
            raise BankFormatError(f"bank {values.get('bank')!r} has format {version}, newer than this server reads "
                                  f"({FORMAT_VERSION}): serve it with the newer server that wrote it, or rebuild it")
        if type(version) is not int or version != FORMAT_VERSION:  # repr: a "7" read "format 7, this server reads 7"
            raise BankFormatError(f"bank {values.get('bank')!r} has format {version!r}, not one this server reads (up "
                                  f"to {FORMAT_VERSION}): the manifest is damaged; rebuild it")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if set(values) - names or required - set(values):
            raise ValueError(f"bank manifest of {values.get('bank')!r} (format {version}) has unknown fields "
                             f"{sorted(set(values) - names)} and lacks {sorted(required - set(values))}: the file is "
                             "damaged; rebuild the bank")
        v = dict(values)
        stored = {k: x for k, x in v["config"].items() if k not in LEGACY_HOST_FIELDS}
        optional_int = v.get("n_augmented")
        return cls(
            format_version=int(v["format_version"]), bank=str(v["bank"]), category=str(v["category"]),
            encoder=dict(v["encoder"]), config=config_from_dict(stored), grid=tuple(int(x) for x in v["grid"]),
            image_size=tuple(int(x) for x in v["image_size"]), n_images=int(v["n_images"]),
            image_keys=tuple(str(x) for x in v["image_keys"]), interval_k=int(v["interval_k"]),
            tau_b=_by_scale(v["tau_b"], float), normal_bank_entries=_by_scale(v["normal_bank_entries"], int),
            full_bank_entries_per_image=_by_scale(v["full_bank_entries_per_image"], int),
            normal_selection=str(v["normal_selection"]), normal_indices=tuple(int(i) for i in v["normal_indices"]),
            map_range=tuple(float(x) for x in v["map_range"]), lot_scores=dict(v["lot_scores"]),
            decision=dict(v["decision"]), ood=None if v.get("ood") is None else dict(v["ood"]),
            cada=None if v.get("cada") is None else dict(v["cada"]),
            n_augmented=None if optional_int is None else int(optional_int),
            sample_growth=_lot_sizes(v.get("sample_growth")),
            left_out_keys=_image_keys(v.get("left_out_keys")),
            accept_level=None if v.get("accept_level") is None else _number(v["accept_level"], "accept_level"),
            version=v.get("version"), built_at=v.get("built_at"),
            files=None if v.get("files") is None else dict(v["files"]),
            tensors=None if v.get("tensors") is None else dict(v["tensors"]))

    def replace(self, **changes) -> "BankManifest":
        return dataclasses.replace(self, **changes)

    @functools.cached_property
    def lot_ids(self) -> np.ndarray:
        """(N,) the id each lot image goes by (``contract.first_ids`` of its keys: ``check_manifest`` holds one per
        image)."""
        return first_ids(self.image_keys)

    @functools.cached_property  # drawn once per manifest: a load checks both the tensors' shapes and full_ids by it
    def full_bank_sample(self) -> np.ndarray | None:
        """The lot images its full bank keeps (sorted lot indices), None for every one."""
        if self.sample_growth:
            return grown_sample(self.sample_growth, self.config)
        return full_bank_references(self.n_images, self.config)


@dataclass
class Bank:
    manifest: BankManifest
    full: dict  # r -> (n_layers, N, m, C) float16; {} for the text-only baseline
    normal: dict  # r -> (n_layers, M, C) float16
    normal_ids: dict  # r -> (M,) int64 lot index of each entry's source image
    text_embeds: object | None  # (2, D) float32 or None
    # With lot-level re-scoring on: the lot's image embeddings (N, D) float32 and the scores of its maps (N,)
    lot_embeds: object | None = None
    lot_scores: object | None = None
    full_scale: dict = dataclasses.field(default_factory=dict)  # r -> (n_layers, N, m) float32 with int8 entries
    bases: dict = dataclasses.field(default_factory=dict)  # r -> (n_layers, C, d) float32 with a projection
    full_ids: object | None = None  # (N_bank,) int64 lot index of each full-bank image, when it keeps a sample
    # r -> (n_layers, N, d) float32, each full-bank image's mean entry, read once (``full_descriptors``)
    _descriptors: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def full_descriptors(self, r: int, host: HostSettings = DEFAULT_HOST):
        """(n_layers, N, d) the full bank's image descriptors at scale r (``kernels.image_descriptors``, within the
        host's memory budget), by which each new image's neighbours are chosen: computed on first use and kept,
        since a bank's entries never change (a grown bank is a new one), where every request read all entries again
        before."""
        if r not in self._descriptors:
            entries, scale = self.full[r], self.full_scale.get(r)
            xp = K.get_xp(entries)
            self._descriptors[r] = xp.stack([K.image_descriptors(entries[p], None if scale is None else scale[p],
                                                                 host.budget_bytes)
                                             for p in range(entries.shape[0])])
        return self._descriptors[r]

    @functools.cached_property  # a bank's ids never change (a grown bank is a new one): read once, on its device
    def full_bank_ids(self):
        """The id each image the full bank keeps (every lot image, or its sample) goes by: its lot index, a copy's
        the first copy's (``contract.first_ids``, as the lot stage read them)."""
        xp = K.get_xp(*self.full.values()) if self.full else np
        ids = xp.asarray(self.manifest.lot_ids)
        return ids if self.full_ids is None else ids[self.full_ids]

    def _arrays(self) -> list:
        arrays = [*self.full.values(), *self.normal.values(), *self.normal_ids.values(), *self.full_scale.values(),
                  *self.bases.values(), *([] if self.full_ids is None else [self.full_ids])]
        return arrays + [a for a in (self.text_embeds, self.lot_embeds, self.lot_scores) if a is not None]

    @property
    def space(self) -> SearchSpace:
        """Where this bank is searched: its scoring layers and projections (``pa_clip.SearchSpace``)."""
        stored = next(iter({**self.full, **self.normal}.values()), None)  # (n_layers, ...): every tap it scores with
        layers = self.config.layers or tuple(range(0 if stored is None else int(stored.shape[0])))
        return SearchSpace(tuple(layers), dict(self.bases))

    @property
    def config(self) -> PAClipConfig:
        return self.manifest.config

    @property
    def grid(self) -> tuple[int, int]:
        return self.manifest.grid

    def query_ids(self, keys: list[str]) -> np.ndarray:
        """The id each image goes by (-1 for an image that is not in the lot; a lot's copies of one image go by its
        first, as the lot stage read them: ``contract.first_ids``)."""
        index = dict(zip(self.manifest.image_keys, self.manifest.lot_ids.tolist()))  # copies share their id
        return np.asarray([index.get(key, -1) for key in keys], dtype=np.int64)

    @property
    def nbytes(self) -> int:
        """Bytes its stored arrays take (in memory as in its file)."""
        return int(sum(a.nbytes for a in self._arrays()))

    def prepare(self, host: HostSettings = DEFAULT_HOST) -> "Bank":
        """Compute now what scoring reads from the bank's arrays and keeps (the full bank's image descriptors), so
        that a server counts it when the bank is loaded (``held_nbytes``), not after its first request."""
        if self.config.full_bank_neighbours > 0:
            for r in self.full:
                self.full_descriptors(r, host)
        return self

    @property
    def held_nbytes(self) -> int:
        """Bytes the bank holds in memory: its arrays and what scoring computed from them and kept."""
        return self.nbytes + int(sum(a.nbytes for a in self._descriptors.values()))

    def to(self, xp) -> "Bank":
        """The same bank with its arrays in ``xp`` (numpy or cupy)."""
        def move(v):
            return None if v is None else xp.asarray(v)

        return Bank(self.manifest, {r: move(v) for r, v in self.full.items()},
                    {r: move(v) for r, v in self.normal.items()}, {r: move(v) for r, v in self.normal_ids.items()},
                    move(self.text_embeds), move(self.lot_embeds), move(self.lot_scores),
                    {r: move(v) for r, v in self.full_scale.items()}, {r: move(v) for r, v in self.bases.items()},
                    move(self.full_ids))

    def tensors(self) -> dict:
        out = {}
        for r, v in self.full.items():
            out[f"full.r{r}"] = K.to_numpy(v)
        for r, v in self.full_scale.items():
            out[f"full_scale.r{r}"] = K.to_numpy(v)
        for r, v in self.bases.items():
            out[f"basis.r{r}"] = K.to_numpy(v)
        for r, v in self.normal.items():
            out[f"normal.r{r}"] = K.to_numpy(v)
            out[f"normal_ids.r{r}"] = K.to_numpy(self.normal_ids[r])
        for name, value in ((TEXT_EMBEDS, self.text_embeds), (LOT_EMBEDS, self.lot_embeds),
                            (LOT_SCORES, self.lot_scores), (FULL_IDS, self.full_ids)):
            if value is not None:
                out[name] = K.to_numpy(value)
        return out

    @classmethod
    def from_tensors(cls, manifest: BankManifest, tensors: dict) -> "Bank":
        def by_scale(prefix):
            return {int(k[len(prefix) + 2:]): v for k, v in tensors.items() if k.startswith(prefix + ".r")}

        return cls(manifest, by_scale("full"), by_scale("normal"), by_scale("normal_ids"), tensors.get(TEXT_EMBEDS),
                   tensors.get(LOT_EMBEDS), tensors.get(LOT_SCORES), by_scale("full_scale"), by_scale("basis"),
                   tensors.get(FULL_IDS))


class BankDamaged(BankError):
    """A version on disk that cannot be what was written: it is refused, never scored with."""


def damaged(bank_id: str, version: str | None, why: str) -> BankDamaged:
    return BankDamaged(f"bank {bank_id!r} version {version or '?'} is damaged ({why}): rebuild it (pa-clip score "
                       "--build) or restore the version from a backup")


DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "I8": np.int8}  # what bank.safetensors holds, by safetensors name
DTYPE_NAMES = {np.dtype(v).str: k for k, v in DTYPES.items()}
SCORE_LIMIT = 1e6  # no threshold or score range of a real bank comes near it; 1e30 is damage


def check_manifest(manifest: "BankManifest", bank_id: str) -> None:
    """What the manifest's own fields must satisfy (the config is checked against ``RANGES`` when it is read):
    ``BankDamaged`` naming the first that does not."""
    def fail(why):
        raise damaged(bank_id, manifest.version, why)

    if manifest.bank != bank_id:
        fail(f"its manifest is for bank {manifest.bank!r}")
    cfg = manifest.config
    if manifest.n_images < 2 or len(manifest.image_keys) != manifest.n_images:
        fail(f"n_images {manifest.n_images} with {len(manifest.image_keys)} image keys")
    if not all(isinstance(k, str) and IMAGE_KEY.fullmatch(k) for k in manifest.image_keys):
        fail("an image key is not a SHA-256")
    left_out = manifest.left_out_keys or ()
    if not all(isinstance(k, str) and IMAGE_KEY.fullmatch(k) for k in left_out):
        fail("a left-out part's key is not a SHA-256")
    if len(set(left_out)) != len(left_out) or set(left_out) & set(manifest.image_keys):
        fail("a left-out part is listed twice, or is also in the lot")
    if len(manifest.grid) != 2 or min(manifest.grid) < 1 or len(manifest.image_size) != 2 or \
            min(manifest.image_size) < 1:
        fail(f"grid {manifest.grid}, image size {manifest.image_size}")
    patch = patch_side(manifest.encoder)
    if patch and tuple(manifest.grid) != tuple(s // patch for s in manifest.image_size):
        # a request's features are laid out on this grid: another one pools the wrong neighbours together
        fail(f"grid {manifest.grid} for {manifest.image_size[0]}x{manifest.image_size[1]} images of {patch}-pixel "
             "patches")
    if not 1 <= manifest.interval_k <= max(1, manifest.n_images - 1):
        fail(f"interval k {manifest.interval_k} for {manifest.n_images} images")
    full_scales = set() if cfg.text_only else set(cfg.scales)
    normal_scales = set(cfg.normal_bank_scales) if cfg.use_normal_bank and not cfg.text_only else set()
    if set(manifest.full_bank_entries_per_image) != full_scales:
        fail(f"full-bank scales {sorted(manifest.full_bank_entries_per_image)}, the configuration's {sorted(full_scales)}")
    if set(manifest.normal_bank_entries) != normal_scales or set(manifest.tau_b) != normal_scales:
        fail(f"normal-bank scales {sorted(manifest.normal_bank_entries)} / thresholds {sorted(manifest.tau_b)}, the "
             f"configuration's {sorted(normal_scales)}")
    for name, values in (("tau_b", manifest.tau_b.values()), ("map_range", manifest.map_range),
                         ("lot_scores", manifest.lot_scores.values())):
        if not all(isinstance(v, (int, float)) and np.isfinite(v) and abs(v) < SCORE_LIMIT for v in values):
            fail(f"{name} holds {list(values)}")
    if manifest.map_range[0] > manifest.map_range[1]:
        fail(f"map_range {manifest.map_range}")
    level = manifest.accept_level
    if level is not None and not (np.isfinite(level) and abs(level) < SCORE_LIMIT):
        fail(f"its acceptance level is {level}")
    growth = manifest.sample_growth
    if growth is not None and not (cfg.full_bank_images > 0 and len(growth) >= 2 and growth[-1] == manifest.n_images
                                   and growth[0] > cfg.full_bank_images + 1
                                   and all(a < b for a, b in zip(growth, growth[1:]))):
        fail(f"sample_growth {list(growth)} for a lot of {manifest.n_images} sampled to {cfg.full_bank_images}")
    from .decision import Calibration, DecisionError

    try:
        threshold = Calibration.from_dict(manifest.decision).threshold
    except (DecisionError, KeyError, TypeError, ValueError) as err:
        fail(f"its decision: {err}")
    if not (np.isfinite(threshold) and abs(threshold) < SCORE_LIMIT):
        fail(f"its decision's threshold is {threshold}")
    if manifest.ood is not None:
        from .ood import OodCalibration

        try:
            ood = OodCalibration.from_dict(manifest.ood)
        except (KeyError, TypeError, ValueError) as err:
            fail(f"its out-of-distribution calibration: {err}")
        if not all(np.isfinite(v).all() and np.abs(v).max(initial=0) < SCORE_LIMIT
                   for v in map(np.asarray, ood.references.values())):
            fail("its out-of-distribution calibration holds values no lot gives")


def expected_tensors(manifest: "BankManifest") -> dict:
    """Tensor name -> the dimensions the manifest fixes (None where it does not say: layers, feature width)."""
    cfg, n = manifest.config, manifest.n_images
    n_layers = len(cfg.layers) or None  # every tap: as many as the encoder has
    width = cfg.bank_dim or None
    references = manifest.full_bank_sample
    n_full = n if references is None else len(references)
    out = {}
    if references is not None and not cfg.text_only:
        out[FULL_IDS] = ((n_full,), ("I64",))
    for r, per_image in manifest.full_bank_entries_per_image.items():
        if cfg.full_bank_storage == "int8":
            out[f"full.r{r}"] = ((n_layers, n_full, per_image, width), ("I8",))
            out[f"full_scale.r{r}"] = ((n_layers, n_full, per_image), ("F32",))
        else:
            out[f"full.r{r}"] = ((n_layers, n_full, per_image, width), ("F16",))
    if cfg.projects and not cfg.text_only:
        for r in cfg.scales:
            out[f"basis.r{r}"] = ((n_layers, None, width), ("F32",))
    for r, entries in manifest.normal_bank_entries.items():
        out[f"normal.r{r}"] = ((n_layers, entries, width), ("F16",))
        out[f"normal_ids.r{r}"] = ((entries,), ("I64",))
    if cfg.rescore_k > 0:
        out[LOT_EMBEDS] = ((n, None), ("F32",))
        out[LOT_SCORES] = ((n,), ("F32",))
    return out


def check_tensors(manifest: "BankManifest", tensors: dict, bank_id: str) -> None:
    """Every tensor against the manifest: the names its settings imply, the shapes and dtypes it recorded (format
    2) and those its counts fix, finite values, source ids inside the lot."""
    def fail(why):
        raise damaged(bank_id, manifest.version, why)

    expected = expected_tensors(manifest)
    names = set(tensors) - {TEXT_EMBEDS}
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        fail(f"bank.safetensors lacks {missing} and holds {extra}" if extra else f"bank.safetensors lacks {missing}")
    if manifest.tensors is not None and set(manifest.tensors) != set(tensors):
        fail(f"bank.safetensors holds {sorted(tensors)}, its manifest records {sorted(manifest.tensors)}")
    for name, array in tensors.items():
        dtype = DTYPE_NAMES.get(array.dtype.str, array.dtype.str)
        if manifest.tensors is not None:
            want = manifest.tensors[name]
            if list(array.shape) != list(want["shape"]) or dtype != want["dtype"]:
                fail(f"tensor {name} is {dtype} {list(array.shape)}, its manifest records {want['dtype']} "
                     f"{want['shape']}")
        shape, dtypes = expected.get(name, ((None, None), ("F32",)))
        if len(array.shape) != len(shape) or any(w is not None and w != g for w, g in zip(shape, array.shape)) or \
                dtype not in dtypes:
            fail(f"tensor {name} is {dtype} {list(array.shape)}, the manifest implies {'/'.join(dtypes)} "
                 f"{['*' if w is None else w for w in shape]}")
        if array.dtype.kind == "f" and not bool(np.isfinite(array).all()):
            fail(f"tensor {name} holds NaN or infinite values")
        if name.startswith("normal_ids.") and array.size and (array.min() < 0 or array.max() >= manifest.n_images):
            fail(f"tensor {name} names lot images outside 0..{manifest.n_images - 1}")
        if name == FULL_IDS and not np.array_equal(array, manifest.full_bank_sample):
            fail(f"tensor {name} is not the sample of lot images its settings draw")


def tensor_record(tensors: dict) -> dict:
    """The shapes and dtypes a manifest records for the tensors it is saved with."""
    return {name: {"shape": list(a.shape), "dtype": DTYPE_NAMES.get(a.dtype.str, a.dtype.str)}
            for name, a in sorted(tensors.items())}


def colour_scale(maps) -> tuple[float, float]:
    """Heat maps' colour scale: the lot's median pixel score to its 99.9th percentile, read from the images whose
    maximum lies within Tukey's far fence of the lot's maxima (q75 + 3 IQR). One black frame or broken part in a lot
    of 36 is 2.7% of its pixels, all far above the rest: it set the top, and every other map came out blue."""
    maps = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    peaks = maps.max(axis=1)
    q25, q75 = np.quantile(peaks, [0.25, 0.75])
    typical = maps[peaks <= q75 + 3 * (q75 - q25)]
    return float(np.quantile(typical, 0.5)), float(np.quantile(typical, 0.999))


def build_bank(scorer, cfg: PAClipConfig, bank_id: str, encoder: dict, map_size=None,
               false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE):
    """Package what ``LotScorer.run`` computed on the lot as a bank (still where the lot was scored until it is saved).

    Returns the bank and the lot's own report (maps and scores of the lot images, as ``LotScorer.score`` gives, but
    with the lot scored against the float16 normal banks the bank stores, so its tau_b are the stored bank's).
    """
    run = scorer.run(cfg, map_size, bank_dtype=np.float16)
    features, state, result = scorer.features, run.state, run.result
    report = run.report()
    n = len(features)
    xp = K.get_xp(features.layer_tokens)
    full, full_scale = {}, {}  # the coresets stage 1 scored against ({} for the text-only baseline)
    space = state.space
    references = state.full_references
    kept = features.layer_tokens if references is None else features.layer_tokens[xp.asarray(references)]
    for r, selection in state.full_selections.items():
        if r in state.full_entries:  # the entries the lot was scored against, made once
            full[r], scale = state.full_entries[r]
            if scale is not None:
                full_scale[r] = scale
            continue
        entries = xp.stack([bank_entries(space.features(kept, position, features.grid, r, cfg), selection)
                            for position in range(len(space.layers))])
        if cfg.full_bank_storage == "int8":
            full[r], full_scale[r] = K.quantize_rows(entries)
        else:
            full[r] = entries.astype(xp.float16)
    rescoring = cfg.rescore_k > 0  # the lot's embeddings and map scores stay, for scoring new images the same way
    maps, scores = report.maps, report.scores
    unscored = np.flatnonzero(~np.isfinite(np.asarray(scores)))
    if unscored.size:  # no input of the caller's makes them (the encoder's outputs are checked): a fault of ours
        raise RuntimeError(f"the lot scores of images {unscored[:10].tolist()} are not numbers")
    manifest = BankManifest(
        bank=bank_id, category=scorer.category, encoder=dict(encoder), config=cfg, grid=tuple(features.grid),
        image_size=run.map_size, n_images=n, image_keys=scorer.image_keys,
        interval_k=lot_interval_k(n, cfg, scorer.lot_ids),
        tau_b=dict(result.tau_b),
        normal_bank_entries={r: int(b.shape[1]) for r, (b, _) in run.banks.items()},
        full_bank_entries_per_image={r: int(v.shape[2]) for r, v in full.items()},
        normal_selection=state.selection, normal_indices=tuple(int(i) for i in state.normal_indices),
        map_range=colour_scale(maps),
        lot_scores={"min": float(scores.min()), "median": float(np.median(scores)), "max": float(scores.max())},
        decision=calibrate(scores, state.normal_indices, false_alarm_rate).to_dict(),
        ood=calibrate_ood(image_statistics(maps, scorer.images, DEFAULT_STATISTICS)).to_dict(),
        cada=run.extra.get("cada"), n_augmented=run.extra.get("n_augmented"))
    bank = Bank(manifest, full, {r: b for r, (b, _) in run.banks.items()},
                {r: ids.astype(xp.int64) for r, (_, ids) in run.banks.items()},
                None if scorer.text_embeds is None else scorer.text_embeds.astype(xp.float32),
                features.image_embeds.astype(xp.float32) if rescoring else None,
                result.map_scores.astype(xp.float32) if rescoring else None,
                full_scale, {r: b.astype(xp.float32) for r, b in space.bases.items()},
                None if references is None or cfg.text_only else xp.asarray(references.astype(np.int64)))
    return bank, report


def score_with_bank(bank: Bank, features: Features, query_ids, map_size: tuple[int, int] | None = None,
                    host: HostSettings = DEFAULT_HOST) -> ScoreResult:
    """Maps and image scores of query images (any images: lot members carry their lot index, others -1)."""
    cfg = bank.config
    if tuple(features.grid) != bank.grid:
        raise BankError(f"features on a {features.grid} patch grid cannot be scored against bank "
                        f"{bank.manifest.bank!r} built on a {bank.grid} grid")
    xp = K.get_xp(features.layer_tokens)
    for r, basis in bank.bases.items():  # the encoder's identity matched: another width is a damaged basis
        if int(basis.shape[1]) != int(features.layer_tokens.shape[-1]):
            raise damaged(bank.manifest.bank, bank.manifest.version, f"tensor basis.r{r} projects "
                          f"{basis.shape[1]} channels, the encoder gives {features.layer_tokens.shape[-1]}")
    query_ids = xp.asarray(query_ids)
    size = tuple(map_size or bank.manifest.image_size)
    full_scores, text_scores, normal_scores = {}, {}, {}
    if cfg.text_only:
        text_scores = text_patch_scores(features, bank.text_embeds, cfg)
    else:
        bank_ids = xp.asarray(bank.full_bank_ids)
        k = bank.manifest.interval_k
        space = bank.space
        full_scores = {r: full_scores_against(features, bank.full[r], bank_ids, query_ids, k, r, cfg, space, host,
                                              bank.full_scale.get(r),
                                              bank.full_descriptors(r, host) if cfg.full_bank_neighbours > 0
                                              else None)
                       for r in cfg.scales}
        for r in bank.normal:
            normal_scores[r] = normal_scores_against(features, bank.normal[r], bank.normal_ids[r], cfg, r, space,
                                                     query_ids, host)
    tau_b = dict(bank.manifest.tau_b)
    result = decide(full_scores, text_scores, normal_scores, tau_b, cfg, features.grid, size)
    result.normal_bank_scores = normal_scores
    result.tau_b = tau_b
    if cfg.rescore_k > 0 and bank.lot_embeds is None:
        raise BankError(f"bank {bank.manifest.bank!r} asks for lot-level re-scoring but holds no lot embeddings: "
                        "rebuild it")
    # the same neighbours a lot image had in its lot (its own entry left out), new images: the whole lot
    return rescore_images(result, features.image_embeds, bank.lot_embeds, bank.lot_scores, cfg, query_ids)


__all__ = ["Bank", "BankManifest", "BankError", "BankDamaged", "BankFormatError", "check_manifest", "check_tensors", "damaged",
           "tensor_record", "build_bank", "score_with_bank", "image_key", "check_encoder",
           "config_from_dict", "FORMAT_VERSION"]
