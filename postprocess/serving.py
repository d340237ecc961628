"""What the Triton Python-backend models do, without Triton: ``model_repository/*/1/model.py`` are thin wrappers.

- ``ScoreService`` (model ``pa_clip_score``): encoder outputs of a batch of images + bank id -> anomaly maps and
  image scores. Banks are loaded once and reloaded when a build commits a new version.
- ``BankService`` (model ``pa_clip_bank``): add a lot, build, list, info, delete. Encoding goes through callables
  that the model wires to ``clip_vision`` / ``clip_text`` (BLS), so this module never needs a server to be tested.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np

from . import contract as C
from . import kernels as K, strict_json
from .bank import BankError, BankManifest, build_bank, config_from_dict, image_key, score_with_bank
from .bank_store import BankStore, build_slot, check_bank_id, check_lot_session
from .config import MODES, PAClipConfig
from .contract import Features
from .decision import DEFAULT_FALSE_ALARM_RATE, check_false_alarm_rate
from .errors import RequestError, ServerBusy
from .host import DEFAULT_HOST, HostSettings
from .pipeline import LotScorer
from .drift import DriftMonitor
from .logs import get_logger
from .ood import OodCalibration, image_statistics
from .telemetry import NO_TELEMETRY, Telemetry


def bank_root(model_repository: str | Path, configured: str = "") -> Path:
    """Where banks live: PA_CLIP_BANKS, else the model config's ``bank_dir``, else ``banks`` beside the repository."""
    chosen = os.environ.get("PA_CLIP_BANKS") or configured
    repo = Path(model_repository)
    if not chosen:
        return repo.parent / "banks"
    path = Path(chosen)
    return path if path.is_absolute() else repo.parent / path


STORE_LIMIT_ENV = "PA_CLIP_MAX_STORE_GB"  # python -m serve --max-store-gb: what the bank store may hold


def store_limit_bytes() -> int | None:
    """The bank store's size limit from the environment (None: no limit)."""
    text = os.environ.get(STORE_LIMIT_ENV, "").strip()
    if not text:
        return None
    try:
        gigabytes = float(text)
    except ValueError:
        raise ValueError(f"{STORE_LIMIT_ENV} must be a number of gigabytes, got {text!r}") from None
    if not gigabytes > 0:
        raise ValueError(f"{STORE_LIMIT_ENV} must be positive, got {text!r}")
    return int(gigabytes * 2**30)


# gRPC carries an error's message in a header of at most 16 KB, percent-encoded (up to 12 bytes a character): a
# longer one was replaced by RESOURCE_EXHAUSTED, and the client never saw the reason
MAX_MESSAGE_CHARS = 1000


def describe_failure(model: str, err: BaseException, log_error) -> tuple[str, bool]:
    """(message for the client, whether the fault is ours).

    A ``RequestError`` is the caller's: its message goes back as it is (a 400-style error). Anything else is a bug
    or a broken installation: its traceback goes to the server log (``log_error``) under a short id, and the client
    gets an internal error that names the id, so the two can be matched up.
    """
    if isinstance(err, RequestError):
        message = str(err)
        if len(message) > MAX_MESSAGE_CHARS:  # a client's 20,000-character bank id, echoed, never reached it
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS} more characters)"
        return f"{model}: {message}", False
    incident = uuid.uuid4().hex[:8]
    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    log_error(f"{model}: internal error {incident}:\n{trace}")
    return (f"{model}: internal error {incident} ({type(err).__name__}); the server log has the traceback under "
            "this id"), True


def error_response(pb_utils, model: str, err: BaseException):
    """The Triton response for a failed request (``describe_failure``): INVALID_ARG for the caller's mistakes,
    UNAVAILABLE (503) for "busy, retry", INTERNAL, with a logged traceback, for ours. ``pb_utils`` is the Python
    backend's module, passed in."""
    message, internal = describe_failure(model, err, pb_utils.Logger.log_error)
    code = pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.UNAVAILABLE \
        if isinstance(err, ServerBusy) else pb_utils.TritonError.INVALID_ARG
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


# A request carrying this parameter is a health canary (serve.canary): a model answers it at once, without work.
CANARY_PARAMETER = "pa_clip_canary"


def canary_message(model: str) -> str:
    return f"{model}: alive"


def is_canary(request) -> bool:
    """Whether a Python-backend request is a canary (its parameters are a JSON object)."""
    import json

    try:
        return CANARY_PARAMETER in json.loads(request.parameters() or "{}")
    except (AttributeError, ValueError):
        return False


def canary_response(pb_utils, model: str):
    """The answer to a canary: an error, so that no output has to be made up, with words only a live model sends."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(canary_message(model)))


def from_triton(tensor, xp=np):
    """A Triton Python-backend tensor as an array of ``xp``: a tensor on the GPU is taken through DLPack without a
    copy (``FORCE_CPU_ONLY_INPUT_TENSORS: no``), one in host memory as NumPy, moved to ``xp`` when that is CuPy."""
    if tensor.is_cpu():
        array = tensor.as_numpy()
        return array if xp is np else xp.asarray(array)
    # the tensor itself where it speaks the DLPack protocol (__dlpack__ with the consumer's stream: the consumer waits
    # for the producer's writes); a bare capsule carries no stream, and its reader must trust the writes are done
    shared = tensor if hasattr(tensor, "__dlpack__") else tensor.to_dlpack()
    if xp is np:  # a host-side consumer (image hashes): the one explicit copy back
        import cupy

        return cupy.asnumpy(cupy.from_dlpack(shared))
    return xp.from_dlpack(shared)


def text_value(raw, name: str) -> str:
    """One BYTES element as text; a clear error for bytes that are not UTF-8."""
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(f"input '{name}' must be UTF-8 text: {err}") from err
    return str(raw)


def check_finite_outputs(outputs: dict) -> None:
    """The encoder's outputs (name -> NumPy or CuPy array) hold numbers only: NaN or infinity is a broken encoder,
    refused before it is scored or kept in a lot."""
    for name in C.VISION_OUTPUTS:
        if not bool(K.get_xp(outputs[name]).isfinite(outputs[name]).all()):
            raise RequestError(f"input '{name}' holds NaN or infinite values: the encoder output is broken")


class ScoreService:
    """Scores images against banks. Loaded banks stay in memory up to the host's byte budget
    (``HostSettings.bank_cache_mb``; the least recently used goes first, the one in use always stays); a bank is
    reloaded when a build commits a new version, and a deleted one is refused."""

    def __init__(self, store: BankStore, encoder: dict, host: HostSettings = DEFAULT_HOST, xp=None,
                 telemetry: Telemetry = NO_TELEMETRY):
        self.store = store
        self.encoder = encoder
        self.host = host
        self.xp = xp if xp is not None else host.xp()
        self.telemetry = telemetry
        self._cache: OrderedDict = OrderedDict()  # bank id -> (version, Bank)
        self.drift = DriftMonitor()
        # bank id -> (when its window was last written to the store, its alarm and version then)
        self._persisted: dict = {}
        self._deferred: dict = {}  # bank id -> the timer that writes its latest window once the interval is over
        self._persist_lock = threading.Lock()
        # one store write of a window at a time, each of the newest window: a timer's older window written after a
        # request's alarmed one left info reading "steady" under an alarm
        self._write_lock = threading.Lock()
        self._swept = time.monotonic()  # when the windows were last checked for deleted banks

    def bank(self, bank_id: str):
        check_bank_id(bank_id)
        self.forget_deleted()
        version = self.store.current_version(bank_id)
        if version is None:
            self.forget(bank_id)  # deleted (the load below says so to the request)
        cached = self._cache.get(bank_id)
        if cached is not None and cached[0] == version:
            self._cache.move_to_end(bank_id)
            self.telemetry.count("pa_clip_bank_cache_hits_total")
            return cached[1]
        self._cache.pop(bank_id, None)
        bank = self.store.load(bank_id, self.encoder).to(self.xp).prepare(self.host)  # BankError: missing
        if self.drift.version(bank_id) not in (None, bank.manifest.version) and not self._carried(bank):
            # the window and gauges of the version replaced: on /metrics until the next new image, they described a
            # bank no longer scored with (an alarm of the old version stood over the new one)
            self.forget(bank_id)
        self.telemetry.count("pa_clip_bank_cache_misses_total")
        self._cache[bank_id] = (bank.manifest.version, bank)
        while len(self._cache) > 1 and self.cached_bytes() > self.host.bank_cache_bytes:
            self._cache.popitem(last=False)
        self.telemetry.gauge("pa_clip_bank_cache_bytes", self.cached_bytes())
        return bank

    def _carried(self, bank) -> bool:
        """Whether the bank's drift window went on to this version: one grown by an update (``accept_level`` is
        set by updates alone) from the version whose window is held; a rebuild starts a new window."""
        manifest = bank.manifest
        if manifest.ood is None:
            return False
        return self.drift.carry(manifest.bank, manifest, OodCalibration.from_dict(manifest.ood).references)

    DELETED_SWEEP_S = 5.0  # how often a request checks that the banks loaded or watched are still in the store

    def forget(self, bank_id: str) -> None:
        """Drop what this process holds of a bank that is gone: the loaded bank, its drift window (no timer writes
        it back) and its drift gauges, which would otherwise stay on /metrics at their last values."""
        if self._cache.pop(bank_id, None) is not None:
            self.telemetry.gauge("pa_clip_bank_cache_bytes", self.cached_bytes())
        self.drift.forget(bank_id)
        with self._persist_lock:
            self._persisted.pop(bank_id, None)
            timer = self._deferred.pop(bank_id, None)
        if timer is not None:
            timer.cancel()
        self.telemetry.drop_gauges(bank=bank_id)

    def forget_deleted(self) -> None:
        """Forget the banks loaded or with drift windows that were deleted (by another instance or process: the
        store is the only witness), checked at most every ``DELETED_SWEEP_S``."""
        if time.monotonic() - self._swept < self.DELETED_SWEEP_S:
            return
        self._swept = time.monotonic()
        for bank_id in {*self.drift.bank_ids(), *self._cache}:
            try:
                gone = self.store.current_version(bank_id) is None
            except BankError:  # damaged, not deleted: its requests say so
                continue
            if gone:
                self.forget(bank_id)

    def cached_bytes(self) -> int:
        return sum(bank.held_nbytes for _, bank in self._cache.values())

    def score(self, bank_id: str, layer_tokens, patch_embeds, image_embeds, images) -> tuple[np.ndarray, np.ndarray]:
        """(B, H, W) float16 maps and (B,) float32 scores for one bank (inputs as ``check_request`` accepts)."""
        bank = self.bank(bank_id)
        self.check_against_bank(bank, layer_tokens, patch_embeds, image_embeds, images)
        return self._score_checked(bank, layer_tokens, patch_embeds, image_embeds, images)

    def _score_checked(self, bank, layer_tokens, patch_embeds, image_embeds, images) -> tuple[np.ndarray, np.ndarray]:
        """``score`` for inputs already checked against ``bank``."""
        grid = bank.grid
        xp = self.xp
        features = Features(xp.asarray(layer_tokens), xp.asarray(patch_embeds), xp.asarray(image_embeds), grid)
        keys = [image_key(img) for img in images]
        ids = bank.query_ids(keys)
        result = score_with_bank(bank, features, ids, tuple(images.shape[1:3]), self.host)
        maps, scores = K.to_numpy(result.maps).astype(np.float16), K.to_numpy(result.scores).astype(np.float32)
        self.observe(bank, ids, maps, scores, images, keys)
        return maps, scores

    MONITOR_WRITE_S = 5.0  # a bank's window is written to the store this often per process, and when its alarm turns

    def observe(self, bank, ids, maps, scores, images, keys=None) -> None:
        """The new images (not the lot's own, sent again, nor one already in the window) join the bank's drift
        window (``postprocess.drift``; ``keys``: each image's ``image_key``):
        its figures go to the metrics port and, every few seconds, to the store for ``info``. Never fails a
        request: a fault here is counted and logged once."""
        if bank.manifest.ood is None:  # built before banks kept an out-of-distribution calibration
            return
        try:
            new = np.asarray(ids) < 0
            if not new.any():
                return
            calibration = OodCalibration.from_dict(bank.manifest.ood)
            values = image_statistics(maps[new].astype(np.float32), K.to_numpy(images)[new], calibration.statistics)
            outside, _ = calibration.outside(values)
            bank_id = bank.manifest.bank
            window = self.drift.observe(bank_id, bank.manifest.version, calibration.references, scores[new], values,
                                        outside, None if keys is None else [k for k, n in zip(keys, new) if n],
                                        bank.manifest.image_keys)
            for q, value in window["score_quantiles"].items():
                self.telemetry.gauge("pa_clip_bank_score_quantile", value, bank=bank_id, q=q)
            self.telemetry.gauge("pa_clip_bank_ood_rate", window["ood_rate"], bank=bank_id)
            self.telemetry.gauge("pa_clip_bank_drift", window["drift"], bank=bank_id)
            self.telemetry.gauge("pa_clip_bank_drift_alarm", float(window["alarm"]), bank=bank_id)
            self.telemetry.count("pa_clip_images_out_of_distribution_total", float(outside.sum()), bank=bank_id)
            self._persist_window(bank_id, window)
        except Exception as err:  # a report, not the answer: the scores stand
            self.telemetry.count("pa_clip_monitor_errors_total")
            if not getattr(self, "_monitor_error_logged", False):
                self._monitor_error_logged = True
                get_logger("score").warning(f"the drift window failed ({type(err).__name__}: {err}); scoring goes "
                                            "on", exc_info=True)

    def _persist_window(self, bank_id: str, window: dict) -> None:
        """Write the bank's window for ``info`` at most every ``MONITOR_WRITE_S`` (at once when its alarm turns or
        its bank has a new version); a window held back is written by a timer when the interval is over, so that
        the last images of a burst reach ``info`` without waiting for the next request."""
        with self._persist_lock:
            last, alarmed, version = self._persisted.get(bank_id, (-1e9, None, None))
            wait = last + self.MONITOR_WRITE_S - time.monotonic()
            if wait > 0 and alarmed == window["alarm"] and version == window["version"]:
                if bank_id not in self._deferred:
                    timer = threading.Timer(wait, self._write_deferred, (bank_id,))
                    timer.daemon = True  # a report: never keeps the process alive
                    self._deferred[bank_id] = timer
                    timer.start()
                return
            self._persisted[bank_id] = (time.monotonic(), window["alarm"], window["version"])
        self._write_window(bank_id)

    def _write_deferred(self, bank_id: str) -> None:
        with self._persist_lock:
            self._deferred.pop(bank_id, None)
            window = self.drift.summary(bank_id)
            if window is None:
                return
            self._persisted[bank_id] = (time.monotonic(), window["alarm"], window["version"])
        try:
            self._write_window(bank_id)
        except Exception:  # a report: a store that cannot take it now gets the next one
            self.telemetry.count("pa_clip_monitor_errors_total")

    def _write_window(self, bank_id: str) -> None:
        """Write the bank's window as it is now (read under the write lock: whichever write comes last is newest)."""
        with self._write_lock:
            window = self.drift.summary(bank_id)
            if window is not None:
                self.store.write_monitor(bank_id, window)

    def check_request(self, req: dict) -> None:
        """Types, shapes and values of one request against the encoder contract, checked alone so that a bad request
        cannot spoil a batch (the bank's own checks follow in ``check_against_bank``)."""
        for name in (C.IMAGES, *C.VISION_OUTPUTS):
            C.check_tensor(name, req[name])
        images, layer_tokens = req[C.IMAGES], req[C.LAYER_TOKENS]
        patch_embeds, image_embeds = req[C.PATCH_EMBEDS], req[C.IMAGE_EMBEDS]
        if images.shape[-1] != 3:
            raise RequestError(f"input '{C.IMAGES}' must be RGB [B,H,W,3], got {list(images.shape)}")
        if len({len(req[k]) for k in (C.IMAGES, *C.VISION_OUTPUTS)}) != 1:
            raise RequestError("inputs disagree on the number of images")
        taps = len(self.encoder.get("taps", ())) or layer_tokens.shape[1]
        if layer_tokens.shape[1] != taps:
            raise RequestError(f"input '{C.LAYER_TOKENS}' must hold {taps} layers (the encoder's taps "
                               f"{self.encoder.get('taps')}), got {layer_tokens.shape[1]}")
        if patch_embeds.shape[1] != layer_tokens.shape[2] or patch_embeds.shape[2] != image_embeds.shape[1]:
            raise RequestError(f"inputs disagree: '{C.LAYER_TOKENS}' {list(layer_tokens.shape)}, '{C.PATCH_EMBEDS}' "
                               f"{list(patch_embeds.shape)}, '{C.IMAGE_EMBEDS}' {list(image_embeds.shape)}: patches "
                               "(L) and the embedding width (D) must match")
        check_finite_outputs(req)

    @staticmethod
    def check_against_bank(bank, layer_tokens, patch_embeds, image_embeds, images) -> None:
        """What a bank expects: its patch grid, its feature widths and its image size (which sets the map size)."""
        name = bank.manifest.bank
        (h, w), size = bank.grid, bank.manifest.image_size
        # first: with an encoder that takes any size, another size is the likely cause of every mismatch below
        if tuple(images.shape[1:3]) != size:
            raise BankError(f"bank {name!r} scores {size[0]}x{size[1]} images (height x width: the size it was built "
                            f"at, which sets the map size), got {images.shape[1]}x{images.shape[2]}: resize them "
                            "first (pa-clip score does)")
        if layer_tokens.shape[2] != h * w:
            raise BankError(f"bank {name!r} expects {h}x{w} patches per image, the encoder gave "
                            f"{layer_tokens.shape[2]}: was the bank built with another encoder?")
        # the encoder's width: what the bank's projections take, or (without) what its entries hold
        widths = {int(v.shape[1]) for v in bank.bases.values()} or \
            {int(v.shape[-1]) for v in (*bank.full.values(), *bank.normal.values())}
        if widths and widths != {int(layer_tokens.shape[3])}:
            raise BankError(f"bank {name!r} holds features {widths.pop()} wide, '{C.LAYER_TOKENS}' are "
                            f"{layer_tokens.shape[3]}: was the bank built with another encoder?")
        if bank.config.layers and max(bank.config.layers) >= layer_tokens.shape[1]:
            raise BankError(f"bank {name!r} scores with taps {list(bank.config.layers)}, '{C.LAYER_TOKENS}' has "
                            f"{layer_tokens.shape[1]}: was the bank built with another encoder?")
        if bank.text_embeds is not None and int(bank.text_embeds.shape[-1]) != int(image_embeds.shape[1]):
            raise BankError(f"bank {name!r} has {bank.text_embeds.shape[-1]}-wide text embeddings, the image "
                            f"embeddings are {image_embeds.shape[1]} wide: was the bank built with another encoder?")

    def score_requests(self, requests: list[dict]) -> list:
        """Score several requests (dicts of the model's inputs), grouping items of the same bank into one call.

        Returns, per request, ``(maps, scores)`` or the exception that request ran into.
        """
        started = time.perf_counter()
        try:
            return self._score_requests(requests)
        finally:
            self.telemetry.count("pa_clip_score_requests_total", len(requests))
            self.telemetry.count("pa_clip_score_seconds_total", time.perf_counter() - started)

    def _score_requests(self, requests: list[dict]) -> list:
        results: list = [None] * len(requests)
        groups: dict = {}
        for i, req in enumerate(requests):
            try:
                banks = [text_value(b, C.BANK) for b in np.asarray(req[C.BANK]).reshape(-1)]
                if len(banks) != len(req[C.IMAGES]):
                    raise RequestError(f"input '{C.BANK}' must have one id per image ({len(req[C.IMAGES])}), "
                                       f"got {len(banks)}")
                if len(set(banks)) != 1:
                    raise RequestError("all images of one request must use the same bank")
                self.check_request(req)
                groups.setdefault(banks[0], []).append(i)
            except Exception as err:
                results[i] = err
        for bank_id, members in groups.items():
            try:
                bank = self.bank(bank_id)
            except Exception as err:
                for i in members:
                    results[i] = err
                continue
            valid = []
            for i in members:  # each request against the bank alone, before they are scored together
                try:
                    self.check_against_bank(bank, *(requests[i][k] for k in (*C.VISION_OUTPUTS, C.IMAGES)))
                    valid.append(i)
                except Exception as err:
                    results[i] = err
            members = valid
            if not members:
                continue
            try:
                parts = {k: K.get_xp(requests[members[0]][k]).concatenate([requests[i][k] for i in members])
                         for k in (*C.VISION_OUTPUTS, C.IMAGES)}
                maps, scores = self._score_checked(bank, *(parts[k] for k in C.VISION_OUTPUTS), parts[C.IMAGES])
                self.telemetry.count("pa_clip_images_scored_total", len(scores), bank=bank_id)
                start = 0
                for i in members:
                    n = len(requests[i][C.IMAGES])
                    results[i] = (maps[start:start + n], scores[start:start + n])
                    start += n
            except Exception as err:
                for i in members:
                    results[i] = err
        return results


class RemoteEncoder:
    """A ``postprocess.backbone.Backbone`` over callables (the Triton models, through BLS)."""

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


BUDGET_OPTION = "false_alarm_rate"  # a build option beside the PA-CLIP settings: the budget the bank's threshold keeps


def build_budget(options) -> float:
    """The false-alarm budget of a build request (``BUDGET_OPTION``, default 1%): the bank keeps it, so that a part
    scored later against it is decided at the budget chosen when it was built (a line's --false-alarm-rate 0.05 at
    its build was read for that run alone, and every later run decided at 1%)."""
    if not isinstance(options, dict) or BUDGET_OPTION not in options:
        return DEFAULT_FALSE_ALARM_RATE
    try:
        return check_false_alarm_rate(options[BUDGET_OPTION])
    except (TypeError, ValueError) as err:
        raise BankError(f"bad build option {BUDGET_OPTION}: {err}") from None


def build_config(options: dict) -> PAClipConfig:
    """The PA-CLIP configuration of a build request: ``mode`` (an ablation row, default the full method) plus
    overrides of any ``PAClipConfig`` field."""
    if not isinstance(options, dict):
        raise BankError(f"build options must be a JSON object of PA-CLIP settings, got {options!r}")
    options = dict(options)
    host_fields = sorted(set(options) & set(HostSettings.__dataclass_fields__))
    if host_fields:
        raise BankError(f"{', '.join(host_fields)} is a setting of the host that scores, not of a bank: set it as a "
                        "parameter in the config.pbtxt of pa_clip_score / pa_clip_bank")
    mode = options.pop("mode", "pad_mpam")
    if mode not in MODES:
        raise BankError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    try:
        base = PAClipConfig.for_mode(mode).to_dict()
        base.update(options)
        return config_from_dict(base)
    except (TypeError, ValueError) as err:
        raise BankError(f"bad build options {options}: {err}") from err


def summary(manifest: BankManifest) -> dict:
    """A manifest as JSON values without the per-image hashes (what clients are shown)."""
    return {k: v for k, v in manifest.to_dict().items() if k != "image_keys"}


def parse_options(text: str) -> dict:
    """The ``options`` input of pa_clip_bank: a JSON object (empty text = no options)."""
    if not text.strip():
        return {}
    try:
        options = strict_json.loads(text)
    except ValueError as err:  # bad JSON, a key given twice, NaN
        raise RequestError(f"input 'options' must be a JSON object, e.g. {{\"mode\": \"pad_mpam\"}}: {err}") from err
    except RecursionError:  # nested past Python's reading (the HTTP guard bounds the request's JSON, not this text)
        raise RequestError("input 'options' is nested too deeply: it is a JSON object of PA-CLIP settings, e.g. "
                           "{\"mode\": \"pad_mpam\"}") from None
    if not isinstance(options, dict):
        raise RequestError(f"input 'options' must be a JSON object, e.g. {{\"mode\": \"pad_mpam\"}}, got {text!r}")
    return options


MAX_CATEGORY_CHARS = 200  # a product name, in a prompt of CLIP's 77 tokens: far more would be cut anyway
UNKNOWN_BANK_LABEL = "(unknown)"  # the bank label of a build metric for an id the store holds neither bank nor lot of


class BankService:
    ACTIONS = ("add", "build", "update", "discard", "list", "info", "delete", "encoder", "prune", "verify")

    def __init__(self, store: BankStore, encoder: dict, encode_images, encode_text=None, log=None,
                 host: HostSettings = DEFAULT_HOST, telemetry: Telemetry = NO_TELEMETRY):
        self.store = store
        self.encoder = encoder
        self.host = host
        self.telemetry = telemetry
        self.backbone = RemoteEncoder(encode_images, encode_text)
        self.patch_size = int(encoder["patch_size"])
        self.fixed_size = C.fixed_input_size(encoder)  # None: the encoder takes any multiple of the patch size
        self.log = log or get_logger("bank").info

    def _described(self, bank_id: str) -> dict:
        """A bank's manifest summary with its sizes (``info`` adds its versions)."""
        return {**summary(self.store.manifest(bank_id)), **self.store.sizes(bank_id)}

    def _listed(self, bank_id: str) -> dict:
        """One bank of ``list``; one this server cannot read (a newer format, a damaged manifest) is listed with why,
        so that the others are still shown."""
        try:
            return self._described(bank_id)
        except (BankError, OSError, ValueError) as err:
            return {"bank": bank_id, "error": str(err)}
        except Exception as err:  # whatever one bank's files make of the reading, the others are still listed
            return {"bank": bank_id, "error": f"{type(err).__name__}: {err}"}

    def handle(self, action: str, bank_id: str = "", category: str = "", images=None, options=None) -> dict:
        options = options or {}
        if action not in self.ACTIONS:
            raise BankError(f"unknown action {action!r}; one of {', '.join(self.ACTIONS)}")
        if action == "encoder":
            return {"encoder": self.encoder, "has_text": self.backbone.has_text}
        if action == "list":  # with the lots added but not built (a failed build leaves its lot): they expire
            self.store.expire_pending()
            return {"banks": [self._listed(b) for b in self.store.bank_ids()],
                    "pending": self.store.pending_lots(), "store_bytes": self.store.total_bytes(),
                    "store_limit_bytes": self.store.max_bytes}
        if action == "prune":
            return self.store.prune()
        if action == "verify":  # every bank, or the one named: digests, tensors, manifest fields
            if bank_id and check_bank_id(bank_id) not in self.store.bank_ids():
                raise self.store.missing(bank_id)  # not there is a refusal, not damage
            return {"banks": [self.store.verify(b) for b in ([bank_id] if bank_id else self.store.bank_ids())]}
        check_bank_id(bank_id)
        if action == "info":  # with its size on disk and once loaded, and what scoring saw of it lately
            return {**self._described(bank_id), "versions": self.store.versions(bank_id),
                    "monitors": self.store.monitors(bank_id)}
        if action == "delete":
            self.store.delete(bank_id)
            return {"deleted": bank_id}
        # "lot": a client's own lot session (what it adds, resets and builds, no other client's); absent: the
        # shared pending lot of the bank, as before sessions
        options = dict(options) if isinstance(options, dict) else options
        lot = check_lot_session(options.pop("lot", None)) if isinstance(options, dict) else None
        if action == "add":
            if unknown := sorted(set(options) - {"reset"}):  # a misspelt reset was dropped and the lot grew on
                raise BankError(f"add takes the options 'reset' and 'lot', got {unknown}")
            reset = options.get("reset", False)
            if not isinstance(reset, bool):  # "no" is a non-empty string: read as true it would wipe the lot
                raise BankError(f"option 'reset' must be true or false, got {reset!r}")
            return self.add(bank_id, category, images, reset, lot)
        if action == "discard":  # a client run whose build or update failed gives its lot back (it stayed 24 h)
            if lot is None or options:
                raise BankError("discard takes one option, 'lot': the lot session whose images to remove")
            self.store.discard_lot(bank_id, lot)
            return {"bank": bank_id, "discarded": lot}
        if action == "update":
            if options:
                raise BankError(f"update takes no options but 'lot' (it keeps the bank's settings), got "
                                f"{sorted(options)}")
            return self.build(bank_id, None, lot)
        return self.build(bank_id, options, lot)

    def add(self, bank_id: str, category: str, images, reset: bool, lot: str | None = None) -> dict:
        if not category:
            raise BankError("add needs a category name (the product, e.g. 'bottle')")
        if len(category) > MAX_CATEGORY_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in category):
            raise BankError(f"a category name is at most {MAX_CATEGORY_CHARS} characters with no control characters "
                            f"(it goes into the text prompts), got {len(category)} characters: {category[:40]!r}")
        if images is None or len(images) == 0:
            raise BankError("add needs at least one image")
        # the encoder's own limit checked here: past it clip_vision refuses, which a BLS call reported as a 500
        images = C.check_images(images, self.patch_size, self.fixed_size, C.max_image_side(self.encoder))
        features = self.backbone.encode(images)
        check_finite_outputs(features.outputs())  # a lot kept with them would build a bank that cannot be loaded
        size = self.store.add_to_lot(bank_id, category, images, features, reset=reset, session=lot)
        return {"bank": bank_id, "category": category, "lot_size": size, **({"lot": lot} if lot else {})}

    def build(self, bank_id: str, options: dict | None, lot: str | None = None) -> dict:
        """Build the bank from its pending lot with ``options`` (a PA-CLIP configuration), or (None) grow the live
        bank with it (``postprocess.growth``). ``lot``: the client's lot session to read (None: the shared lot);
        only the parts read are cleared, so another client's lot, or a part added since, stays pending."""
        budget = None if options is None else build_budget(options)
        cfg = None if options is None else build_config({k: v for k, v in options.items() if k != BUDGET_OPTION})
        started = time.perf_counter()
        outcome = "busy"  # refused before it held the host's slot and the bank's lock: a client sends it again
        try:
            # one build at a time on this host (the other instance stays free for info and adds, scoring keeps
            # the cores it needs), and one build per bank id, also across replicas on one store
            with build_slot(bank_id), self.store.building(bank_id, lot=lot):
                outcome = "failed"
                result = self._build(bank_id, cfg, lot, budget) if cfg is not None else self._update(bank_id, lot)
            outcome = "built" if cfg is not None else "updated"
            return result
        finally:
            label = bank_id if outcome in ("built", "updated") or self._known(bank_id, lot) else UNKNOWN_BANK_LABEL
            self.telemetry.count("pa_clip_bank_builds_total", bank=label, outcome=outcome)
            self.telemetry.count("pa_clip_bank_build_seconds_total", time.perf_counter() - started, bank=label)

    def _known(self, bank_id: str, lot: str | None = None) -> bool:
        """Whether the store holds the bank or a pending lot of it: a metric is labelled with such ids only (builds of
        ids made up by a client, each refused, added a series to /metrics that stayed)."""
        try:
            return self.store.exists(bank_id) or self.store.lot_size(bank_id, lot) > 0
        except Exception:  # a damaged bank is there
            return True

    def _build(self, bank_id: str, cfg: PAClipConfig, lot: str | None = None,
               false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> dict:
        category, images, features, parts = self.store.load_lot(bank_id, lot)
        self.log(f"building bank {bank_id!r}: {len(images)} images of {category!r}")
        # LotScorer refuses a lot of fewer than 2 images
        scorer = LotScorer(self.backbone, images, category, features=features, progress=False, host=self.host)
        bank, report = build_bank(scorer, cfg, bank_id, self.encoder, false_alarm_rate=false_alarm_rate)
        self.store.save(bank)
        self.store.clear_lot(bank_id, parts, lot)  # only what it was built from: a later add stays for the next one
        self.log(f"bank {bank_id!r} built: version {bank.manifest.version}")
        return {**summary(bank.manifest), "lot_image_scores": [float(s) for s in report.scores]}

    def _update(self, bank_id: str, lot: str | None = None) -> dict:
        from .growth import grow_bank

        bank = self.store.load(bank_id, self.encoder)
        category, images, features, parts = self.store.load_lot(bank_id, lot)
        if category != bank.manifest.category:
            raise BankError(f"the pending lot of bank {bank_id!r} is for category {category!r}, the bank for "
                            f"{bank.manifest.category!r}: add images of its product (or reset the lot)")
        if tuple(features.grid) != bank.grid:
            raise BankError(f"the pending lot of bank {bank_id!r} was encoded on a {tuple(features.grid)} patch grid, "
                            f"the bank scores {bank.grid}: resize the images to the bank's size "
                            f"{bank.manifest.image_size[0]}x{bank.manifest.image_size[1]}")
        self.log(f"updating bank {bank_id!r} (version {bank.manifest.version}) with {len(images)} images")
        moved = bank.to(self.host.xp())
        grown, report = grow_bank(moved, features.to(self.host.xp()), images, self.host)
        # a new version whenever a part was counted: folded in, or left out with its score joining the calibration
        report["written"] = grown is not moved
        if report["written"]:
            self.store.save(grown)
        self.store.clear_lot(bank_id, parts, lot)
        self.log(f"bank {bank_id!r}: {report['folded_in']} of {report['scored']} images folded in"
                 + (f": version {grown.manifest.version}" if report["written"] else ": nothing written"))
        return {**summary(grown.manifest if report["written"] else bank.manifest), "update": report}


__all__ = ["ScoreService", "BankService", "RemoteEncoder", "bank_root", "build_config", "describe_failure",
           "error_response", "from_triton", "parse_options", "text_value", "CANARY_PARAMETER", "canary_message",
           "is_canary", "canary_response", "STORE_LIMIT_ENV", "store_limit_bytes"]
