"""TensorRT engine for ``clip_vision``, built from the exported ONNX file with the TensorRT Python API.

FP16, one optimisation profile over batch sizes, a timing cache kept beside the repository so rebuilds are quick.
The profile and the Triton config are plain functions (tested on any machine); building needs TensorRT and a GPU,
and says so clearly when either is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from postprocess import contract as C
from postprocess.atomic import write_atomic

from .onnx_export import write_model_dir
from .targets import TENSORRT
from .triton_config import ModelConfig, config_text

ENGINE_NAME = TENSORRT.model


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message says what to install or where to run."""


class TensorRTBuildFailed(RuntimeError):
    """TensorRT parsed the model but could not build a plan from it (its log above says why)."""


@dataclass(frozen=True)
class BatchProfile:
    """Shapes of the ``images`` input for the optimisation profile: (min, opt, max) batch at one (height, width)."""

    image_size: tuple[int, int]
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 8

    def __post_init__(self):
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min <= opt <= max batch, got {self.min_batch}/{self.opt_batch}/"
                             f"{self.max_batch}")
        if self.min_batch != 1:
            # Triton's dynamic batcher sends whatever is queued, often one image: a plan whose profile starts
            # above 1 refuses those batches at run time ("expected the shape of dimension 0 to be between ...")
            raise ValueError(f"min batch must be 1 (Triton sends batches of 1 up to max_batch_size), got "
                             f"{self.min_batch}")

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        h, w = C.size_pair(self.image_size)
        return ((self.min_batch, h, w, 3), (self.opt_batch, h, w, 3), (self.max_batch, h, w, 3))


def engine_config(fingerprint: dict, profile: BatchProfile, n_taps: int, tokens: int, channels: int, dim: int,
                  instances: int = 1) -> ModelConfig:
    """The config serving the plan under the clip_vision contract, as the ``TENSORRT`` target's row says (GPU)."""
    # the encoder that produced the plan travels in the config, so a mismatched bank can be refused
    return TENSORRT.config(profile.image_size, n_taps, tokens, channels, dim, profile.max_batch, instances=instances,
                           parameters={"encoder": fingerprint_text(fingerprint)})


def fingerprint_text(fingerprint: dict) -> str:
    return ";".join(f"{k}={v}" for k, v in sorted(fingerprint.items())).replace('"', "'")


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTUnavailable(
            "TensorRT is not installed: pip install '.[gpu]' on a machine with an NVIDIA GPU (or build the plan in "
            "the NGC TensorRT container); the ONNX model in the repository serves without it") from err
    if not hasattr(trt.BuilderFlag, "FP16"):
        # TensorRT 11 builds strongly typed networks only: BuilderFlag.FP16 is gone, an FP32 ONNX model stays FP32
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} has no FP16 builder flag (TensorRT 11 builds strongly typed networks "
            "only); install the TensorRT 10 of the tritonserver image that serves the plan (pip install "
            "'.[gpu]' pins it)")
    return trt


def build_engine(onnx_path: Path, repository: Path, profile: BatchProfile, timing_cache: Path,
                 workspace_gib: float = 8.0) -> Path:
    """Parse the ONNX file, build an FP16 plan with ``profile``, write ``repository/clip_vision_trt`` atomically."""
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as err:  # no driver / no device
        raise TensorRTUnavailable(f"TensorRT found no usable CUDA GPU here ({err}); build the plan on the GPU host "
                                  "that will serve it") from err
    if builder is None:
        raise TensorRTUnavailable("TensorRT found no usable CUDA GPU here; build the plan on the GPU host")
    flags = 0
    if hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # TensorRT < 10 needs it said
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(C.IMAGES, *profile.shapes())
    config.add_optimization_profile(opt_profile)
    _attach_timing_cache(trt, config, timing_cache, logger)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBuildFailed("TensorRT failed to build the engine; run with a larger --workspace-gib or read "
                                  "the TensorRT log above")

    # the plan takes this one size, whatever the ONNX model took
    fingerprint = {**C.onnx_fingerprint(onnx_path), **C.fixed_size_fields(profile.image_size)}
    n_taps, tokens, channels, dim = output_dims(network)
    # a plan loads only in the TensorRT that built it: say which, so a tritonserver refusing it can be understood
    written = write_model_dir(repository, ENGINE_NAME, {
        f"1/{TENSORRT.model_file}": bytes(plan),
        "config.pbtxt": config_text(engine_config(fingerprint, profile, n_taps, tokens, channels, dim)),
        C.ENCODER_FILE: C.encoder_json({**fingerprint, "precision": "fp16-tensorrt",
                                        "tensorrt": str(trt.__version__)}),
    })
    _save_timing_cache(config, timing_cache, logger, trt)  # after the plan: a cache problem never costs the build
    return written


def _attach_timing_cache(trt, config, timing_cache: Path, logger) -> None:
    """The saved timing cache, or a fresh one where the saved one is unreadable or from another GPU / TensorRT
    (``set_timing_cache`` returns False then and attaches nothing; it does not raise)."""
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    try:
        cache = config.create_timing_cache(cache_bytes) if cache_bytes else None
    except Exception:  # a blob this TensorRT cannot read
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if cache_bytes:
            logger.log(trt.Logger.WARNING, f"ignoring the timing cache {timing_cache}: it is from another GPU or "
                       "TensorRT version; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(config, timing_cache: Path, logger, trt) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    try:
        write_atomic(timing_cache, bytes(memoryview(cache.serialize())))
    except OSError as err:
        logger.log(trt.Logger.WARNING, f"could not save the timing cache {timing_cache}: {err}")


def output_dims(network) -> tuple[int, int, int, int]:
    """(taps, tokens, channels, projected dim) read off the parsed network's outputs."""
    outputs = {network.get_output(i).name: tuple(network.get_output(i).shape) for i in range(network.num_outputs)}
    _, n_taps, tokens, channels = outputs[C.LAYER_TOKENS]
    dim = outputs[C.IMAGE_EMBEDS][-1]
    return int(n_taps), int(tokens), int(channels), int(dim)
