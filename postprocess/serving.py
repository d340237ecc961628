"""What the Triton Python-backend models do, without Triton: ``model_repository/*/1/model.py`` are thin wrappers.

- ``ScoreService`` (model ``pa_clip_score``): encoder outputs of a batch of images + bank id -> anomaly maps and
  image scores. Banks are loaded once and reloaded when a build commits a new version.
- ``BankService`` (model ``pa_clip_bank``): add a lot, build, list, info, delete. Encoding goes through callables
  that the model wires to ``clip_vision`` / ``clip_text`` (BLS), so this module never needs a server to be tested.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from export.onnx_export import ENCODER_FILE, fingerprint_of

from . import kernels as K
from .bank import BankError, BankStore, build_bank, check_bank_id, config_from_dict, encoder_identity, image_key, \
    score_with_bank
from .config import MODES, PAClipConfig
from .pa_clip import Features
from .pipeline import LotScorer

def read_encoder_fingerprint(model_dir: str | Path) -> dict:
    """The fingerprint ``python -m export`` wrote beside an encoder model (``encoder.json``)."""
    model_dir = Path(model_dir)
    path = model_dir / ENCODER_FILE
    if path.is_file():
        return json.loads(path.read_text())
    onnx_file = model_dir / "1" / "model.onnx"
    if onnx_file.is_file():  # repositories exported before encoder.json existed
        return fingerprint_of(onnx_file)
    raise FileNotFoundError(f"no encoder fingerprint at {path}: export the encoder with `python -m export onnx`")


def bank_root(model_repository: str | Path, configured: str = "") -> Path:
    """Where banks live: PA_CLIP_BANKS, else the model config's ``bank_dir``, else ``banks`` beside the repository."""
    chosen = os.environ.get("PA_CLIP_BANKS") or configured
    repo = Path(model_repository)
    if not chosen:
        return repo.parent / "banks"
    path = Path(chosen)
    return path if path.is_absolute() else repo.parent / path


def array_module(choice: str = "auto"):
    """numpy, or cupy when asked (``cupy``) or when a CUDA GPU is there (``auto``)."""
    if choice == "numpy":
        return np
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception as err:  # no cupy, no driver, no device
        if choice == "cupy":
            raise RuntimeError(f"array_module=cupy but CuPy cannot use a GPU here: {err}") from err
    return np


def _check_array(name: str, array: np.ndarray, dtype, ndim: int) -> np.ndarray:
    if array.dtype != dtype or array.ndim != ndim:
        raise ValueError(f"input '{name}' must be {np.dtype(dtype).name} with {ndim} dimensions, "
                         f"got {array.dtype} {list(array.shape)}")
    return array


class ScoreService:
    """Scores images against banks; keeps up to ``cache_size`` banks in memory (least recently used goes first)."""

    def __init__(self, store: BankStore, encoder: dict, xp=np, cache_size: int = 4):
        self.store = store
        self.encoder = encoder
        self.xp = xp
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()  # bank id -> (version, Bank)

    def bank(self, bank_id: str):
        check_bank_id(bank_id)
        version = self.store.current_version(bank_id)
        cached = self._cache.get(bank_id)
        if cached is not None and cached[0] == version:
            self._cache.move_to_end(bank_id)
            return cached[1]
        self._cache.pop(bank_id, None)
        bank = self.store.load(bank_id, self.encoder).to(self.xp)  # raises BankError for a missing bank
        self._cache[bank_id] = (bank.manifest["version"], bank)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return bank

    def score(self, bank_id: str, layer_tokens, patch_embeds, image_embeds, images) -> tuple[np.ndarray, np.ndarray]:
        """(B, H, W) float16 maps and (B,) float32 scores for one bank (inputs as ``check_request`` accepts)."""
        bank = self.bank(bank_id)
        grid = bank.grid
        if layer_tokens.shape[2] != grid[0] * grid[1]:
            raise BankError(f"bank {bank_id!r} expects {grid[0]}x{grid[1]} patches per image, the encoder gave "
                            f"{layer_tokens.shape[2]}: was the bank built with another encoder?")
        xp = self.xp
        features = Features(xp.asarray(layer_tokens), xp.asarray(patch_embeds), xp.asarray(image_embeds), grid)
        ids = bank.query_ids([image_key(img) for img in images])
        result = score_with_bank(bank, features, ids, tuple(images.shape[1:3]))
        return K.to_numpy(result.maps).astype(np.float16), K.to_numpy(result.scores).astype(np.float32)

    @staticmethod
    def check_request(req: dict) -> None:
        """Types and shapes of one request, checked alone so that a bad request cannot spoil a batch."""
        images = _check_array("images", req["images"], np.uint8, 4)
        _check_array("layer_tokens", req["layer_tokens"], np.float16, 4)
        _check_array("patch_embeds", req["patch_embeds"], np.float16, 3)
        _check_array("image_embeds", req["image_embeds"], np.float32, 2)
        if images.shape[-1] != 3:
            raise ValueError(f"input 'images' must be RGB [B,H,W,3], got {list(images.shape)}")
        sizes = {len(req[k]) for k in ("images", "layer_tokens", "patch_embeds", "image_embeds")}
        if len(sizes) != 1:
            raise ValueError("inputs disagree on the number of images")

    def score_requests(self, requests: list[dict]) -> list:
        """Score several requests (dicts of the model's inputs), grouping items of the same bank into one call.

        Returns, per request, ``(maps, scores)`` or the exception that request ran into.
        """
        results: list = [None] * len(requests)
        groups: dict = {}
        for i, req in enumerate(requests):
            try:
                banks = [b.decode() if isinstance(b, bytes) else str(b) for b in np.asarray(req["bank"]).reshape(-1)]
                if len(banks) != len(req["images"]):
                    raise ValueError(f"input 'bank' must have one id per image ({len(req['images'])}), "
                                     f"got {len(banks)}")
                if len(set(banks)) != 1:
                    raise ValueError("all images of one request must use the same bank")
                self.check_request(req)
                groups.setdefault(banks[0], []).append(i)
            except Exception as err:
                results[i] = err
        for bank_id, members in groups.items():
            try:
                parts = {k: np.concatenate([requests[i][k] for i in members])
                         for k in ("layer_tokens", "patch_embeds", "image_embeds", "images")}
                maps, scores = self.score(bank_id, **parts)
                start = 0
                for i in members:
                    n = len(requests[i]["images"])
                    results[i] = (maps[start:start + n], scores[start:start + n])
                    start += n
            except Exception as err:
                for i in members:
                    results[i] = err
        return results


class RemoteEncoder:
    """The backbone interface of ``postprocess.pipeline`` over callables (the Triton models, through BLS)."""

    def __init__(self, encode_images, encode_text=None):
        self._encode_images = encode_images
        self._encode_text = encode_text

    @property
    def has_text(self) -> bool:
        return self._encode_text is not None

    def encode(self, images: np.ndarray) -> Features:
        return self._encode_images(images)

    def encode_text(self, prompts: list[str]):
        return None if self._encode_text is None else self._encode_text(prompts)


def build_config(options: dict) -> PAClipConfig:
    """The PA-CLIP configuration of a build request: ``mode`` (an ablation row, default the full method) plus
    overrides of any ``PAClipConfig`` field."""
    options = dict(options)
    mode = options.pop("mode", "pad_mpam")
    if mode not in MODES:
        raise BankError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    try:
        base = PAClipConfig.for_mode(mode).to_dict()
        base.update(options)
        return config_from_dict(base)
    except (TypeError, ValueError) as err:
        raise BankError(f"bad build options {options}: {err}") from err


def summary(manifest: dict) -> dict:
    """A manifest without the per-image hashes (what clients are shown)."""
    return {k: v for k, v in manifest.items() if k != "image_keys"}


class BankService:
    ACTIONS = ("add", "build", "list", "info", "delete", "encoder")

    def __init__(self, store: BankStore, encoder: dict, encode_images, encode_text=None, log=print):
        self.store = store
        self.encoder = encoder
        self.backbone = RemoteEncoder(encode_images, encode_text)
        self.image_size = int(encoder["image_size"])
        self.log = log

    def handle(self, action: str, bank_id: str = "", category: str = "", images=None, options=None) -> dict:
        options = options or {}
        if action not in self.ACTIONS:
            raise BankError(f"unknown action {action!r}; one of {', '.join(self.ACTIONS)}")
        if action == "encoder":
            return {"encoder": self.encoder, "has_text": self.backbone.has_text}
        if action == "list":
            return {"banks": [summary(self.store.manifest(b)) for b in self.store.bank_ids()]}
        check_bank_id(bank_id)
        if action == "info":
            return summary(self.store.manifest(bank_id))
        if action == "delete":
            self.store.delete(bank_id)
            return {"deleted": bank_id}
        if action == "add":
            return self.add(bank_id, category, images, bool(options.get("reset", False)))
        return self.build(bank_id, options)

    def add(self, bank_id: str, category: str, images, reset: bool) -> dict:
        if not category:
            raise BankError("add needs a category name (the product, e.g. 'bottle')")
        if images is None or len(images) == 0:
            raise BankError("add needs at least one image")
        images = _check_array("images", np.asarray(images), np.uint8, 4)
        if images.shape[1:] != (self.image_size, self.image_size, 3):
            raise BankError(f"images must be RGB resized to {self.image_size}x{self.image_size} "
                            f"(uint8 [B,{self.image_size},{self.image_size},3]), got {list(images.shape)}")
        features = self.backbone.encode(images)
        size = self.store.add_to_lot(bank_id, category, images, features, reset=reset)
        return {"bank": bank_id, "category": category, "lot_size": size}

    def build(self, bank_id: str, options: dict) -> dict:
        cfg = build_config(options)
        category, images, features = self.store.load_lot(bank_id)
        self.log(f"building bank {bank_id!r}: {len(images)} images of {category!r}")
        # LotScorer refuses a lot of fewer than 2 images
        scorer = LotScorer(self.backbone, images, category, features=features, progress=False)
        bank, report = build_bank(scorer, cfg, bank_id, self.encoder)
        self.store.save(bank)
        self.store.clear_lot(bank_id)
        self.log(f"bank {bank_id!r} built: version {bank.manifest['version']}")
        return {**summary(bank.manifest), "lot_image_scores": [float(s) for s in report.scores]}


__all__ = ["ScoreService", "BankService", "RemoteEncoder", "read_encoder_fingerprint", "bank_root", "array_module",
           "build_config", "encoder_identity"]
