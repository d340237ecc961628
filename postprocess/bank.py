"""Memory banks for serving: what a built lot leaves behind so that any image can be scored later, one at a time.

A bank holds, per scale r, the full bank (every lot image's aggregated features at every tapped layer, or each
image's coreset) and the normal bank (coreset of the most normal images and their CADA augmentations), the
subtraction thresholds tau_b measured on the lot, the interval k, and the SHA-256 of every lot image so that a lot
image sent again never matches its own patches. Scoring one image against a bank gives the same map as scoring the
whole lot in one process (``tests/test_bank.py``). Entries are stored as float16 (half the disk and memory; the
maps move by less than 1e-3).

On disk (``BankStore``), one folder per bank id:

    <root>/<bank>/CURRENT                      name of the live version folder (replaced atomically)
    <root>/<bank>/v-<build id>/manifest.json   encoder fingerprint, config, counts, thresholds, image hashes
    <root>/<bank>/v-<build id>/bank.safetensors
    <root>/<bank>/lot/part-<n>.safetensors     images added but not yet built (the pending lot)

A version folder is complete before ``CURRENT`` names it, so a crash mid-build leaves the previous bank live. No
pickle: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels as K
from .atomic import HOST, fsync_dir, is_dead_leftover, owner_gone, temp_name, write_atomic
from .config import PAClipConfig
from .contract import IMAGES, TEXT_EMBEDS, VISION_OUTPUTS, Features, encoder_identity
from .decision import calibrate
from .errors import RequestError
from .host import DEFAULT_HOST, HostSettings
from .pa_clip import (ScoreResult, bank_entries, decide, finish_stage, full_scores_against, layer_features,
                      normal_banks, normal_scores_against, original_normal_set, rescore_images, text_patch_scores)

FORMAT_VERSION = 1
# used with fullmatch only: "$" would let a trailing newline through (a folder "banks/x\n")
BANK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Fields that banks built before host settings moved out of PAClipConfig still carry in their manifest.
LEGACY_HOST_FIELDS = ("memory_budget_mb",)
LOT_EMBEDS, LOT_SCORES = "lot_image_embeds", "lot_map_scores"  # bank tensors for lot-level re-scoring


class BankError(RequestError):
    """A request about banks that cannot be served; the message says what to do."""


def check_bank_id(bank_id: str) -> str:
    if not isinstance(bank_id, str) or not BANK_ID_PATTERN.fullmatch(bank_id):
        raise BankError(f"invalid bank id {bank_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return bank_id


def image_key(image: np.ndarray) -> str:
    """Identity of an image as the encoder sees it (uint8 pixels after resizing)."""
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def check_encoder(manifest: dict, fingerprint: dict | None) -> None:
    if fingerprint is None:
        return
    built, serving = encoder_identity(manifest["encoder"]), encoder_identity(fingerprint)
    if built != serving:
        raise BankError(f"bank {manifest['bank']!r} was built with encoder {built}, but this server runs {serving}: "
                        "rebuild the bank (client/infer.py --build) or serve the encoder it was built with")


def config_from_dict(values: dict) -> PAClipConfig:
    names = {f for f in PAClipConfig.__dataclass_fields__}
    unknown = set(values) - names
    if unknown:
        raise BankError(f"unknown PA-CLIP settings {sorted(unknown)}; known: {sorted(names)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return PAClipConfig(**fixed)


@dataclass
class Bank:
    manifest: dict
    full: dict  # r -> (n_layers, N, m, C) float16; {} for the text-only baseline
    normal: dict  # r -> (n_layers, M, C) float16
    normal_ids: dict  # r -> (M,) int64 lot index of each entry's source image
    text_embeds: object | None  # (2, D) float32 or None
    # With lot-level re-scoring on: the lot's image embeddings (N, D) float32 and the scores of its maps (N,)
    lot_embeds: object | None = None
    lot_scores: object | None = None

    def _arrays(self) -> list:
        arrays = [*self.full.values(), *self.normal.values(), *self.normal_ids.values()]
        return arrays + [a for a in (self.text_embeds, self.lot_embeds, self.lot_scores) if a is not None]

    @property
    def config(self) -> PAClipConfig:
        stored = {k: v for k, v in self.manifest["config"].items() if k not in LEGACY_HOST_FIELDS}
        return config_from_dict(stored)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.manifest["grid"])

    def query_ids(self, keys: list[str]) -> np.ndarray:
        """Lot index of each image (-1 for an image that is not in the lot)."""
        index = {key: i for i, key in enumerate(self.manifest["image_keys"])}
        return np.asarray([index.get(key, -1) for key in keys], dtype=np.int64)

    @property
    def nbytes(self) -> int:
        """Bytes its arrays take in memory."""
        return int(sum(a.nbytes for a in self._arrays()))

    def to(self, xp) -> "Bank":
        """The same bank with its arrays in ``xp`` (numpy or cupy)."""
        def move(v):
            return None if v is None else xp.asarray(v)

        return Bank(self.manifest, {r: move(v) for r, v in self.full.items()},
                    {r: move(v) for r, v in self.normal.items()}, {r: move(v) for r, v in self.normal_ids.items()},
                    move(self.text_embeds), move(self.lot_embeds), move(self.lot_scores))

    def tensors(self) -> dict:
        out = {}
        for r, v in self.full.items():
            out[f"full.r{r}"] = K.to_numpy(v)
        for r, v in self.normal.items():
            out[f"normal.r{r}"] = K.to_numpy(v)
            out[f"normal_ids.r{r}"] = K.to_numpy(self.normal_ids[r])
        for name, value in ((TEXT_EMBEDS, self.text_embeds), (LOT_EMBEDS, self.lot_embeds),
                            (LOT_SCORES, self.lot_scores)):
            if value is not None:
                out[name] = K.to_numpy(value)
        return out

    @classmethod
    def from_tensors(cls, manifest: dict, tensors: dict) -> "Bank":
        def by_scale(prefix):
            return {int(k[len(prefix) + 2:]): v for k, v in tensors.items() if k.startswith(prefix + ".r")}

        return cls(manifest, by_scale("full"), by_scale("normal"), by_scale("normal_ids"), tensors.get(TEXT_EMBEDS),
                   tensors.get(LOT_EMBEDS), tensors.get(LOT_SCORES))


def build_bank(scorer, cfg: PAClipConfig, bank_id: str, encoder: dict, map_size=None):
    """Build a bank from a ``postprocess.pipeline.LotScorer`` (lot encoded, augmentations encoded on demand).

    Returns the bank and the lot's own report (maps and scores of the lot images, as ``LotScorer.score`` gives).
    """
    from .pipeline import LotReport

    features = scorer.features
    size = tuple(map_size or scorer.images.shape[1:3])
    state = scorer.state(cfg)
    normal, extra = scorer.normal_set(cfg, state)
    n = len(features)
    n_layers = features.layer_tokens.shape[1]
    xp = K.get_xp(features.layer_tokens)  # the bank stays where the lot was scored until it is saved
    full = {}  # the coresets stage 1 scored against ({} for the text-only baseline)
    for r, selection in state.full_selections.items():
        full[r] = xp.stack([bank_entries(layer_features(features.layer_tokens, layer, features.grid, r, cfg),
                                         selection).astype(xp.float16) for layer in range(n_layers)])
    banks = {}
    if cfg.use_normal_bank and not cfg.text_only:
        if normal is None:
            normal = original_normal_set(features, state)
        # Rounded to float16 before the lot is scored against them, so the lot's tau_b are those of the stored bank.
        banks = {r: (b.astype(xp.float16), ids)
                 for r, (b, ids) in normal_banks(normal, features.grid, state.prior_threshold, cfg).items()}
    result = finish_stage(features, state, normal, cfg, size, banks=banks or None, host=scorer.host)
    maps = K.to_numpy(result.maps).astype(np.float32)
    scores = K.to_numpy(result.scores).astype(np.float32)
    rescoring = cfg.rescore_k > 0  # the lot's embeddings and map scores stay, for scoring new images the same way
    k = K.interval_k(n, cfg.interval_fraction, cfg.k_min, cfg.k_max)
    manifest = {
        "format_version": FORMAT_VERSION,
        "bank": bank_id,
        "category": scorer.category,
        "encoder": dict(encoder),
        "config": cfg.to_dict(),
        "grid": list(features.grid),
        "image_size": list(size),
        "n_images": n,
        "image_keys": [image_key(img) for img in scorer.images],
        "interval_k": k,
        "tau_b": {str(r): v for r, v in result.tau_b.items()},
        "normal_bank_entries": {str(r): int(b.shape[1]) for r, (b, _) in banks.items()},
        "full_bank_entries_per_image": {str(r): int(v.shape[2]) for r, v in full.items()},
        "normal_selection": state.selection,
        "normal_indices": [int(i) for i in state.normal_indices],
        # colour scale for heat maps: the lot's median pixel score to its 99.9th percentile
        "map_range": [float(np.quantile(maps, 0.5)), float(np.quantile(maps, 0.999))],
        "lot_scores": {"min": float(scores.min()), "median": float(np.median(scores)), "max": float(scores.max())},
        # the automatic threshold and calibrated score of this lot (postprocess/decision.py), kept so that an image
        # scored alone later gets the decision it would have got in the lot
        "decision": calibrate(scores, state.normal_indices).to_dict(),
        **{k_: v for k_, v in extra.items() if k_ in ("cada", "n_augmented")},
    }
    bank = Bank(manifest, full, {r: b for r, (b, _) in banks.items()},
                {r: ids.astype(xp.int64) for r, (_, ids) in banks.items()},
                None if scorer.text_embeds is None else scorer.text_embeds.astype(xp.float32),
                features.image_embeds.astype(xp.float32) if rescoring else None,
                result.map_scores.astype(xp.float32) if rescoring else None)
    report = LotReport(maps, scores, np.asarray(state.normal_indices), {
        "normal_selection": state.selection, "normal_indices": manifest["normal_indices"],
        "tau_b": manifest["tau_b"], **extra})
    return bank, report


def score_with_bank(bank: Bank, features: Features, query_ids, map_size: tuple[int, int] | None = None,
                    host: HostSettings = DEFAULT_HOST) -> ScoreResult:
    """Maps and image scores of query images (any images: lot members carry their lot index, others -1)."""
    cfg = bank.config
    if tuple(features.grid) != bank.grid:
        raise BankError(f"features on a {features.grid} patch grid cannot be scored against bank "
                        f"{bank.manifest['bank']!r} built on a {bank.grid} grid")
    xp = K.get_xp(features.layer_tokens)
    query_ids = xp.asarray(query_ids)
    size = tuple(map_size or bank.manifest["image_size"])
    full_scores, text_scores, normal_scores = {}, {}, {}
    if cfg.text_only:
        text_scores = text_patch_scores(features, bank.text_embeds, cfg)
    else:
        bank_ids = xp.arange(bank.manifest["n_images"])
        k = int(bank.manifest["interval_k"])
        full_scores = {r: full_scores_against(features, bank.full[r], bank_ids, query_ids, k, r, cfg, host)
                       for r in cfg.scales}
        for r in bank.normal:
            normal_scores[r] = normal_scores_against(features, bank.normal[r], bank.normal_ids[r], cfg, r, query_ids,
                                                     host)
    tau_b = {int(r): v for r, v in bank.manifest["tau_b"].items()}
    result = decide(full_scores, text_scores, normal_scores, tau_b, cfg, features.grid, size)
    result.normal_bank_scores = normal_scores
    result.tau_b = tau_b
    if cfg.rescore_k > 0 and bank.lot_embeds is None:
        raise BankError(f"bank {bank.manifest['bank']!r} asks for lot-level re-scoring but holds no lot embeddings: "
                        "rebuild it")
    # the same neighbours a lot image had in its lot (its own entry left out), new images: the whole lot
    return rescore_images(result, features.image_embeds, bank.lot_embeds, bank.lot_scores, cfg, query_ids)


# ---------------------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------------------


class StoreFull(BankError):
    """The bank store's volume is full: the message says where and what to free."""


def _is_disk_full(err: BaseException) -> bool:
    # OSError from Python's own writes; safetensors' Rust writer reports "StorageFull" / "No space left" in text
    return (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        any(words in str(err) for words in ("No space left", "StorageFull", "Disk quota exceeded"))


@contextmanager
def disk_full_is_clear(folder: Path):
    """Turn a full volume into a ``StoreFull`` that says what to free, instead of an internal error."""
    try:
        yield
    except Exception as err:
        if not _is_disk_full(err):
            raise
        raise StoreFull(f"no space left on the volume of the bank store ({folder}): free space there (delete banks "
                        "you no longer need with the 'delete' action, or pending lots you will not build), or move "
                        "the store to a larger volume (PA_CLIP_BANKS / python -m serve --banks); nothing was "
                        "changed") from err


def _save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.numpy import save_file

    with disk_full_is_clear(path.parent):
        write_atomic(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                                                 metadata=metadata))


def _load_tensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


class BankStore:
    """Banks on disk under ``root`` (see the module docstring for the layout).

    Several servers may share ``root`` (a shared volume): version names carry the host, temporary names their owner
    (host and pid), ``clean`` removes only leftovers whose owner is provably gone, and a build holds
    ``<bank>/.build-lock`` so that one bank id is built by one replica at a time.
    """

    STALE_AFTER_S = 6 * 3600  # a leftover or a lock of another host counts as abandoned after this long

    PRUNE_AFTER_S = 600  # an older version younger than this may still be being loaded by a replica: prune keeps it

    def __init__(self, root: str | Path, pending_ttl_s: float = 24 * 3600, max_bytes: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pending_ttl_s = pending_ttl_s  # a lot added but never built is removed after this long
        self.max_bytes = max_bytes  # what the whole store may hold (python -m serve --max-store-gb); None: no limit

    # -- committed banks --------------------------------------------------------------------------------------
    def _dir(self, bank_id: str) -> Path:
        return self.root / check_bank_id(bank_id)

    def current_version(self, bank_id: str) -> str | None:
        try:
            name = (self._dir(bank_id) / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def exists(self, bank_id: str) -> bool:
        return self.current_version(bank_id) is not None

    def bank_ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and BANK_ID_PATTERN.fullmatch(p.name) and (p / "CURRENT").is_file())

    def _missing(self, bank_id: str) -> BankError:
        known = self.bank_ids()
        return BankError(f"unknown bank {bank_id!r}; " + (f"banks on this server: {', '.join(known)}" if known else
                         "this server has no banks yet") + ". Build one with client/infer.py --build")

    def manifest(self, bank_id: str) -> dict:
        version = self.current_version(bank_id)
        if version is None:
            raise self._missing(bank_id)
        return json.loads((self._dir(bank_id) / version / "manifest.json").read_text())

    def sizes(self, bank_id: str) -> dict:
        """Bytes of the live version on disk, and of its arrays once loaded (on the GPU or in host memory), read
        from the safetensors header without loading the tensors."""
        version = self.current_version(bank_id)
        if version is None:
            raise self._missing(bank_id)
        folder = self._dir(bank_id) / version
        tensors, _ = _load_tensors_meta(folder / "bank.safetensors")
        itemsize = {"F16": 2, "F32": 4, "I64": 8, "BF16": 2, "F64": 8, "I32": 4}
        resident = sum(int(np.prod(t["shape"])) * itemsize[t["dtype"]] for t in tensors.values())
        return {"bytes_on_disk": sum(p.stat().st_size for p in folder.iterdir()), "bytes_in_memory": resident}

    def versions(self, bank_id: str) -> list[dict]:
        """The versions on disk, newest first, each with its bytes and whether it is the live one."""
        current = self.current_version(bank_id)
        folders = sorted(self._dir(bank_id).glob("v-*"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [{"version": p.name, "live": p.name == current, "bytes": _bytes_under(p)} for p in folders]

    def total_bytes(self) -> int:
        return _bytes_under(self.root)

    def check_room(self, adding: int = 0) -> None:
        """Refuse, with what to do, a write that would take the store over ``max_bytes``."""
        if self.max_bytes is None:
            return
        held = self.total_bytes()
        if held + adding > self.max_bytes:
            raise StoreFull(f"the bank store ({self.root}) holds {_human(held)} and this would add "
                            f"{_human(adding)}; this server keeps at most {_human(self.max_bytes)} "
                            "(python -m serve --max-store-gb): delete banks you no longer need (python -m "
                            "client.banks delete ID) or prune old versions (python -m client.banks prune)")

    def prune(self) -> dict:
        """Remove what no one needs: versions other than the live one (older than ``PRUNE_AFTER_S``), bank folders
        a failed build left empty, and ``clean``'s leftovers. Returns what went and the bytes freed."""
        before = self.total_bytes()
        removed = self.clean()
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and BANK_ID_PATTERN.fullmatch(p.name)):
            current = self.current_version(folder.name)
            for version in folder.glob("v-*"):
                if version.name != current and time.time() - version.stat().st_mtime > self.PRUNE_AFTER_S:
                    shutil.rmtree(version, ignore_errors=True)
                    removed.append(str(version))
            if _holds_nothing(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(str(folder))
        return {"removed": removed, "freed_bytes": max(0, before - self.total_bytes())}

    def load(self, bank_id: str, encoder: dict | None = None) -> Bank:
        version = self.current_version(bank_id)
        if version is None:
            raise self._missing(bank_id)
        folder = self._dir(bank_id) / version
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BankError(f"bank {bank_id!r} has format {manifest.get('format_version')}, this server reads "
                            f"{FORMAT_VERSION}: rebuild it")
        check_encoder(manifest, encoder)
        tensors, _ = _load_tensors(folder / "bank.safetensors")
        return Bank.from_tensors(manifest, tensors)

    def save(self, bank: Bank) -> str:
        """Commit a bank: write a new version folder completely, then point CURRENT at it."""
        bank_id = check_bank_id(bank.manifest["bank"])
        self.check_room(bank.nbytes)  # the arrays are stored as they are held: their bytes are the file's
        folder = self._dir(bank_id)
        folder.mkdir(exist_ok=True)
        # unique across replicas on a shared volume: the host's name, then 48 random bits
        version = f"v-{time.strftime('%Y%m%dT%H%M%S')}-{HOST}-{uuid.uuid4().hex[:12]}"
        staging = folder / temp_name(version)
        staging.mkdir()
        try:
            manifest = {**bank.manifest, "version": version, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            _save_tensors(staging / "bank.safetensors", bank.tensors())
            with disk_full_is_clear(folder):
                write_atomic(staging / "manifest.json", json.dumps(manifest, indent=1))
            os.replace(staging, folder / version)
            fsync_dir(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        previous = self.current_version(bank_id)
        write_atomic(folder / "CURRENT", version)  # the commit: readers see the old version or the new one
        # keep the version a reader may still be loading; older ones go
        for old in folder.glob("v-*"):
            if old.name not in (version, previous):
                shutil.rmtree(old, ignore_errors=True)
        bank.manifest = manifest
        return version

    def delete(self, bank_id: str) -> None:
        folder = self._dir(bank_id)
        if not folder.exists():
            raise self._missing(bank_id)
        trash = self.root / f".trash-{bank_id}-{uuid.uuid4().hex[:8]}"
        os.replace(folder, trash)  # gone for readers at once
        shutil.rmtree(trash, ignore_errors=True)

    def clean(self) -> list[str]:
        """Remove what interrupted writes left behind and lots that were never built: only what provably has no
        live writer (another replica's build in progress stays). Returns what it removed."""
        # renamed away already (deleted banks, taken-over build locks): nobody reads or writes them
        leftovers = [*self.root.glob(".trash-*"), *self.root.glob("*/.trash-lock-*")]
        leftovers += [p for p in [*self.root.glob("*/.tmp-*"), *self.root.glob("*/lot/.tmp-*")]
                      if is_dead_leftover(p, self.STALE_AFTER_S)]
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return [str(p) for p in leftovers] + self.expire_pending()

    # -- one build per bank id, across replicas ---------------------------------------------------------------
    @contextmanager
    def building(self, bank_id: str):
        """Hold the build lock of ``bank_id``; a second build gets a clear "in progress" error."""
        folder = self._dir(bank_id)
        folder.mkdir(exist_ok=True)
        lock = folder / ".build-lock"
        for attempt in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder = self._lock_holder(lock)
                if attempt == 0 and owner_gone(holder.get("host", ""), int(holder.get("pid", 0)),
                                               float(holder.get("started", 0)), self.STALE_AFTER_S):
                    trash = folder / f".trash-lock-{uuid.uuid4().hex[:8]}"
                    try:  # a dead build's lock: move it away (atomically: only one replica wins) and try again
                        os.replace(lock, trash)
                        trash.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                raise BankError(f"a build of bank {bank_id!r} is in progress (host {holder.get('host', '?')}, pid "
                                f"{holder.get('pid', '?')}, started {holder.get('started_at', '?')}): wait for it to "
                                "finish, or build under another bank id") from None
        with os.fdopen(fd, "w") as f:
            json.dump({"host": HOST, "pid": os.getpid(), "started": time.time(),
                       "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            if _holds_nothing(folder):  # a build that failed before anything was written leaves no folder behind
                shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _lock_holder(lock: Path) -> dict:
        try:
            return json.loads(lock.read_text())
        except (OSError, ValueError):  # being written right now, or gone: treat as a live holder
            return {"host": HOST, "pid": os.getpid(), "started": time.time()}

    # -- the pending lot --------------------------------------------------------------------------------------
    def _lot(self, bank_id: str) -> Path:
        return self._dir(bank_id) / "lot"

    def add_to_lot(self, bank_id: str, category: str, images: np.ndarray, features: Features,
                   reset: bool = False) -> int:
        """Append encoded images to the bank's pending lot; returns the lot's size."""
        lot = self._lot(bank_id)
        self.check_room(images.nbytes + sum(int(a.nbytes) for a in features.outputs().values()))
        if reset and lot.exists():
            shutil.rmtree(lot)
        lot.mkdir(parents=True, exist_ok=True)
        parts = sorted(lot.glob("part-*.safetensors"))
        if parts:
            _, meta = _load_tensors_meta(parts[0])
            if meta.get("category") != category:
                raise BankError(f"the pending lot of bank {bank_id!r} is for category {meta.get('category')!r}, "
                                f"not {category!r}: start a new lot (reset) or use another bank id")
            if json.loads(meta["grid"]) != list(features.grid):
                raise BankError(f"the pending lot of bank {bank_id!r} holds images of another size (patch grid "
                                f"{tuple(json.loads(meta['grid']))}, these give {tuple(features.grid)}): a lot is "
                                "encoded at one size; resize them like the first part, or start over with reset")
        index = 1 + max([int(p.stem.split("-")[1]) for p in parts], default=-1)
        _save_tensors(lot / f"part-{index:06d}.safetensors", {
            IMAGES: images, **{name: K.to_numpy(array) for name, array in features.outputs().items()},
        }, metadata={"category": category, "grid": json.dumps(list(features.grid))})
        return self.lot_size(bank_id)

    def lot_size(self, bank_id: str) -> int:
        return sum(_load_tensors_meta(p)[0][IMAGES]["shape"][0]
                   for p in sorted(self._lot(bank_id).glob("part-*.safetensors")))

    def load_lot(self, bank_id: str) -> tuple[str, np.ndarray, Features]:
        parts = sorted(self._lot(bank_id).glob("part-*.safetensors"))
        if not parts:
            raise BankError(f"bank {bank_id!r} has no images to build from: add a lot first "
                            "(client/infer.py --build --images DIR)")
        loaded = [_load_tensors(p) for p in parts]
        meta = loaded[0][1]
        cat = lambda key: np.concatenate([t[key] for t, _ in loaded])  # noqa: E731
        grid = tuple(json.loads(meta["grid"]))
        return meta["category"], cat(IMAGES), Features.from_outputs({k: cat(k) for k in VISION_OUTPUTS}, grid)

    def clear_lot(self, bank_id: str) -> None:
        shutil.rmtree(self._lot(bank_id), ignore_errors=True)

    def pending_lots(self) -> list[dict]:
        """Lots added but not (successfully) built: visible, with when they expire."""
        out = []
        for lot in sorted(self.root.glob("*/lot")):
            parts = sorted(lot.glob("part-*.safetensors"))
            if not parts or not BANK_ID_PATTERN.fullmatch(lot.parent.name):
                continue
            updated = max(p.stat().st_mtime for p in parts)
            _, meta = _load_tensors_meta(parts[0])
            out.append({"bank": lot.parent.name, "category": meta.get("category"),
                        "images": self.lot_size(lot.parent.name),
                        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(updated)),
                        "expires_in_s": max(0, int(updated + self.pending_ttl_s - time.time()))})
        return out

    def expire_pending(self) -> list[str]:
        """Remove pending lots untouched for ``pending_ttl_s``; returns their bank ids."""
        expired = [p["bank"] for p in self.pending_lots() if p["expires_in_s"] == 0]
        for bank_id in expired:
            self.clear_lot(bank_id)
        return expired


def _human(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**29 else f"{n / 2**20:.1f} MB"


def _bytes_under(path: Path) -> int:
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_size
        except OSError:  # removed meanwhile
            continue
    return total


def _holds_nothing(folder: Path) -> bool:
    """A bank folder without a live version, a pending lot, a version or a build in progress."""
    try:
        return folder.is_dir() and not any(p.name in ("CURRENT", "lot", ".build-lock") or p.name.startswith("v-")
                                           for p in folder.iterdir())
    except OSError:
        return False


def _load_tensors_meta(path: Path) -> tuple[dict, dict]:
    """The tensors' ``{"shape", "dtype"}`` and the metadata of a safetensors file, without reading the tensors."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    meta = header.pop("__metadata__", {}) or {}
    return header, meta


__all__ = ["Bank", "BankError", "BankStore", "StoreFull", "build_bank", "score_with_bank", "image_key", "check_bank_id",
           "config_from_dict"]
