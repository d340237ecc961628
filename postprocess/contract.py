"""The encoder contract, in one place: the Triton names, dtypes and shapes of ``clip_vision`` / ``clip_text`` and of
the PA-CLIP serving models, and the encoder fingerprint (``encoder.json`` / ONNX metadata) with its checks.

Export writes models to this contract, the serving models and the stand-in ONNX Runtime backend read it, the client
and the benchmarks talk to it. Nothing here imports torch, ONNX or Triton (``onnx`` only inside the two functions
that read or write ONNX metadata), so every package may import this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import strict_json
from .errors import RequestError

# -- model names (Triton) -----------------------------------------------------------------------------------------
VISION_MODEL = "clip_vision"  # the ONNX encoder; every encoder target: export/targets.py
TEXT_MODEL = "clip_text"
ENSEMBLE = "pa_clip"
SCORE_MODEL = "pa_clip_score"
BANK_MODEL = "pa_clip_bank"
SERVING_MODELS = (ENSEMBLE, SCORE_MODEL, BANK_MODEL)
ENSEMBLE_MAX_BATCH = 8  # images per request the ensemble takes (model_repository/pa_clip/config.pbtxt, as exported)

# -- tensors ------------------------------------------------------------------------------------------------------
IMAGES = "images"  # UINT8 [B,H,W,3], RGB, resized by the client; normalisation is inside the encoder graph
LAYER_TOKENS = "layer_tokens"  # FP16 [B,n_taps,L,C], residual stream after the tapped blocks, CLS dropped
PATCH_EMBEDS = "patch_embeds"  # FP16 [B,L,D], last block through the final norm (and projection)
IMAGE_EMBEDS = "image_embeds"  # FP32 [B,D], the CLS token through the final norm (and projection)
VISION_OUTPUTS = (LAYER_TOKENS, PATCH_EMBEDS, IMAGE_EMBEDS)
VISION_DTYPES = {IMAGES: np.uint8, LAYER_TOKENS: np.float16, PATCH_EMBEDS: np.float16, IMAGE_EMBEDS: np.float32}
VISION_RANKS = {IMAGES: 4, LAYER_TOKENS: 4, PATCH_EMBEDS: 3, IMAGE_EMBEDS: 2}
TOKENS = "tokens"  # INT64 [B,77]
TEXT_EMBEDS = "text_embeds"  # FP32 [B,D], unit length
TEXT_CONTEXT = 77
BANK = "bank"  # BYTES [B,1]: the bank id of each image
ANOMALY_MAP = "anomaly_map"  # FP16 [B,H,W]
SCORE = "score"  # FP32 [B,1]

# -- access ---------------------------------------------------------------------------------------------------------
ACCESS_KEY_HEADER = "pa-clip-key"  # HTTP header / gRPC metadata carrying the server's access key
ACCESS_KEY_ENV = "PA_CLIP_KEY"  # where python -m serve, client/infer.py and the benchmarks read it by default

# -- fingerprint --------------------------------------------------------------------------------------------------
ENCODER_FILE = "encoder.json"  # beside each encoder model in the repository
FINGERPRINT_KEY = "pa_clip.encoder"  # ONNX metadata_props key holding the same JSON
# The fields that make two encoders' features interchangeable; precision only moves the last digits.
# NORMALISATION ({"mean", "std"} of the pixels) is recorded only where it is not OpenAI CLIP's, and left out of the
# identity when absent: fingerprints written before it was recorded keep the identity they had.
NORMALISATION = "normalisation"
IDENTITY_FIELDS = ("backbone", "weights", "image_size", "patch_size", "taps", NORMALISATION)
OPTIONAL_IDENTITY_FIELDS = (NORMALISATION,)


@dataclass
class Features:
    """``clip_vision``'s outputs for a set of images (NumPy or CuPy arrays) and the patch grid they lie on."""

    layer_tokens: object  # (N, n_taps, L, C)
    patch_embeds: object  # (N, L, D)
    image_embeds: object  # (N, D)
    grid: tuple[int, int]

    def __len__(self) -> int:
        return int(self.layer_tokens.shape[0])

    def take(self, indices) -> "Features":
        return Features(self.layer_tokens[indices], self.patch_embeds[indices], self.image_embeds[indices], self.grid)

    def to(self, xp) -> "Features":
        """The same features in array module ``xp`` (host -> device is explicit and allowed; the reverse is not
        how features move: only maps, scores and bank files leave the device)."""
        return Features(xp.asarray(self.layer_tokens), xp.asarray(self.patch_embeds), xp.asarray(self.image_embeds),
                        self.grid)

    def outputs(self) -> dict:
        """The three tensors by their Triton names."""
        return {LAYER_TOKENS: self.layer_tokens, PATCH_EMBEDS: self.patch_embeds, IMAGE_EMBEDS: self.image_embeds}

    @classmethod
    def from_outputs(cls, outputs, grid) -> "Features":
        """From a mapping by Triton name, or a sequence in ``VISION_OUTPUTS`` order."""
        if isinstance(outputs, dict):
            outputs = [outputs[name] for name in VISION_OUTPUTS]
        return cls(*outputs, tuple(grid))


def check_tensor(name: str, array) -> np.ndarray:
    """A request's tensor against the contract's dtype and rank (RequestError naming both when it is off)."""
    if not hasattr(array, "dtype"):
        array = np.asarray(array)
    dtype, rank = np.dtype(VISION_DTYPES[name]), VISION_RANKS[name]  # (CuPy arrays from DLPack stay where they are)
    if array.dtype != dtype or array.ndim != rank:
        raise RequestError(f"input '{name}' must be {dtype.name} with {rank} dimensions, "
                           f"got {array.dtype} {list(array.shape)}")
    return array


def size_pair(size) -> tuple[int, int]:
    """(height, width) from a square size (int) or an [height, width] pair."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = (int(v) for v in size)
    return h, w


def fixed_size_fields(size) -> dict:
    """The fingerprint fields of an encoder that takes one (height, width): a square as one number."""
    h, w = size_pair(size)
    return {"image_size": h if h == w else [h, w], "dynamic_size": False}


def size_argument(values) -> tuple[tuple[int, int] | None, int | None]:
    """A command line's ``--image-size SIZE`` or ``--image-size HEIGHT WIDTH`` (argparse ``nargs="+"``, or None) as
    (fixed (height, width) or None, long side or None)."""
    if values is None:
        return None, None
    if len(values) == 1:
        return None, int(values[0])
    if len(values) == 2:
        return (int(values[0]), int(values[1])), None
    raise RequestError(f"--image-size takes SIZE or HEIGHT WIDTH, got {len(values)} numbers")


def fixed_input_size(fingerprint: dict) -> tuple[int, int] | None:
    """The one (height, width) an encoder takes, or None when it takes any multiple of its patch size (an encoder
    exported with dynamic height and width, like the DINOv2 proxy)."""
    if fingerprint.get("dynamic_size"):
        return None
    return size_pair(fingerprint["image_size"])


def long_side(fingerprint: dict) -> int:
    """The encoder's configured size: the long side a lot is resized to when its aspect ratio is kept."""
    return max(size_pair(fingerprint["image_size"]))


def square_size(fingerprint: dict) -> tuple[int, int]:
    """The (height, width) a square lot (the demo lots, a TensorRT plan's profile) is sent at: the encoder's one
    size, or the square at its long side for one that takes any."""
    return fixed_input_size(fingerprint) or (long_side(fingerprint),) * 2


# A dynamic-size encoder is asked to take images up to this many times its configured long side: encoding time
# grows with the square of the side (a 1204x1204 image cost 20 s of CPU encoder time), so the servers refuse larger
# ones before encoding (serve.request_checks, serve/onnxruntime_backend.py).
MAX_SIDE_FACTOR = 2


def patch_side(fingerprint) -> int:
    """The encoder's patch side (the shortest image side it reads), 0 where a fingerprint does not say."""
    patch = fingerprint.get("patch_size") if isinstance(fingerprint, dict) else None
    return patch if type(patch) is int and patch > 0 else 0


def max_image_side(fingerprint: dict) -> int:
    """The longest image side an encoder is asked to take: its own size when it takes one, else ``MAX_SIDE_FACTOR``
    times its configured long side (a fingerprint's ``max_image_side`` overrides)."""
    if fingerprint.get("max_image_side"):
        return int(fingerprint["max_image_side"])
    fixed = fixed_input_size(fingerprint)
    return max(fixed) if fixed is not None else MAX_SIDE_FACTOR * long_side(fingerprint)


def grid_for(size, patch_size: int) -> tuple[int, int]:
    """The patch grid (rows, columns) of an (height, width) input."""
    h, w = size_pair(size)
    return h // int(patch_size), w // int(patch_size)


ASPECTS = ("native", "square")
DEFAULT_ASPECT = "native"  # README "Results": the protocol's choice


def lot_input_size(image_sizes, long: int, patch_size: int, aspect: str = "native") -> tuple[int, int]:
    """The one (height, width) a lot is encoded at: the long side ``long``, the lot's median aspect ratio kept
    (``native``) or a square; both sides multiples of the patch size (at least 2 patches).

    ``image_sizes`` are the originals' (width, height), as PIL gives them.
    """
    if aspect not in ASPECTS:
        raise RequestError(f"aspect must be one of {', '.join(ASPECTS)}, got {aspect!r}")
    p = int(patch_size)
    if long % p:
        raise RequestError(f"image size {long} is not a multiple of the patch size {p}")
    if aspect == "square" or not len(image_sizes):
        return long, long
    ratio = float(np.median([w / h for w, h in image_sizes]))  # width / height
    short = max(2, round(long * min(ratio, 1 / ratio) / p)) * p
    return (short, long) if ratio >= 1 else (long, short)


def choose_input_size(fingerprint: dict, image_sizes, aspect: str = DEFAULT_ASPECT, size=None,
                      long: int | None = None) -> tuple[int, int]:
    """The (height, width) a new lot is encoded at: ``size`` when given (an encoder exported for one size accepts
    only that one), else that one size, else ``lot_input_size`` at the long side ``long`` (default: the encoder's).
    ``image_sizes``: the originals' (width, height)."""
    fixed = fixed_input_size(fingerprint)
    patch = int(fingerprint["patch_size"])
    if size is not None:
        size = size_pair(size)
        if fixed is not None and size != fixed:
            raise RequestError(f"this encoder takes {fixed[0]}x{fixed[1]} images only, not {size[0]}x{size[1]}: "
                               f"export it again with --image-size {size[0]} {size[1]}")
        check_images(np.zeros((1, *size, 3), np.uint8), patch)
    elif fixed is not None:
        size = fixed
    else:
        size = lot_input_size(image_sizes, long or long_side(fingerprint), patch, aspect)
    if max(size) > max_image_side(fingerprint):
        raise RequestError(f"{size[0]}x{size[1]} is over this encoder's {max_image_side(fingerprint)} pixels a side "
                           "(servers refuse larger images before encoding them): choose a smaller size")
    return size


def check_images(images, patch_size: int, size=None, max_side: int = 0) -> np.ndarray:
    """UINT8 [B,H,W,3] with H and W multiples of the patch size (and equal to ``size`` when the encoder or the bank
    takes one size, and no side over ``max_side`` when given: ``max_image_side``), or a RequestError that says what
    to send."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise RequestError(f"images must be uint8 [B,H,W,3] (RGB), got {images.dtype} {list(images.shape)}")
    h, w = images.shape[1:3]
    if size is not None and (h, w) != size_pair(size):
        sh, sw = size_pair(size)
        raise RequestError(f"images must be RGB resized to {sh}x{sw} (height x width) first (uint8 [B,{sh},{sw},3]), "
                           f"got {list(images.shape)}")
    if h % patch_size or w % patch_size or not h or not w:
        raise RequestError(f"image height and width must be multiples of the patch size {patch_size}, got {h}x{w}")
    if max_side and max(h, w) > max_side:
        raise RequestError(f"images are at most {max_side} pixels a side for this encoder, got {h}x{w}: resize them "
                           "first")
    return images


def encoder_identity(fingerprint: dict) -> dict:
    """What makes features interchangeable. An encoder that takes any size gives the same features whatever its
    configured size, so that is not part of it (a bank records the size it was built at on its own), unless its
    positions are resized from that size's grid (``positions_from``: open_clip in torch, where the DINOv2 proxy
    resizes its weights' own); a fixed-size export's image size says that already."""
    dynamic = fingerprint.get("dynamic_size")
    fields = [k for k in IDENTITY_FIELDS if not (k == "image_size" and dynamic)
              and not (k in OPTIONAL_IDENTITY_FIELDS and k not in fingerprint)]
    identity = {k: fingerprint.get(k) for k in fields}
    if dynamic and "positions_from" in fingerprint:
        identity["positions_from"] = fingerprint["positions_from"]
    return identity


def same_encoder(a: dict, b: dict) -> bool:
    return encoder_identity(a) == encoder_identity(b)


def encoder_json(fingerprint: dict) -> str:
    return json.dumps(fingerprint, indent=1, sort_keys=True)


def onnx_fingerprint(path: str | Path) -> dict:
    """The fingerprint recorded in an exported ONNX file's metadata."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == FINGERPRINT_KEY:
            return strict_json.loads(prop.value)
    raise ValueError(f"{path} does not say which encoder produced it (no {FINGERPRINT_KEY} metadata)")


def set_onnx_fingerprint(model, fingerprint: dict) -> None:
    """Record ``fingerprint`` in an onnx.ModelProto's metadata (replacing an earlier one)."""
    for prop in list(model.metadata_props):
        if prop.key == FINGERPRINT_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key = FINGERPRINT_KEY
    entry.value = json.dumps(fingerprint, sort_keys=True)


def read_fingerprint(model_dir: str | Path) -> dict:
    """The fingerprint the export wrote beside an encoder model (``encoder.json``; older repositories: the ONNX
    file's metadata)."""
    model_dir = Path(model_dir)
    path = model_dir / ENCODER_FILE
    if path.is_file():
        return strict_json.loads(path.read_text())
    onnx_file = model_dir / "1" / "model.onnx"
    if onnx_file.is_file():
        return onnx_fingerprint(onnx_file)
    raise FileNotFoundError(f"no encoder fingerprint at {path}: export the encoder with `python -m export onnx`")


def image_key(image: np.ndarray) -> str:
    """Identity of an image as the encoder sees it (uint8 pixels after resizing)."""
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def first_ids(keys) -> np.ndarray:
    """(N,) int64 the id each of a lot's images goes by (``keys``: their ``image_key``): its own index, but the
    first index of its pixels for a copy of an image before it. Copies are one image: none is scored against
    another's entries, full bank or normal bank (a copy matched its twin exactly in the lot, and a bank, taking a
    query for one of the copies, did not: served maps 0.02-0.07 off the lot's)."""
    first = {}
    return np.asarray([first.setdefault(key, i) for i, key in enumerate(keys)], dtype=np.int64)
