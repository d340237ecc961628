"""``config.pbtxt`` through Triton's own protobuf schema (``tritonclient.grpc.model_config_pb2``): read, build, write.

Every config the project reads or writes goes through here (export writes the encoders' configs and repoints the
serving models; ``serve.canary`` reads them), never through regular expressions on the text. Writing a parsed config
back drops its comments: the checked-in ``model_repository/*/config.pbtxt`` keep theirs until something rewrites
them (``export.repository.point_ensemble_at`` on that repository).

Only ``export`` and ``serve`` import this module; ``postprocess.contract`` stays free of Triton.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from postprocess import contract as C
from postprocess.atomic import write_atomic

ModelConfig = mc.ModelConfig
CONFIG_FILE = "config.pbtxt"


def config_path(path: str | Path) -> Path:
    """A model folder's config file (a path that is already a ``config.pbtxt`` stays as it is)."""
    path = Path(path)
    return path if path.name == CONFIG_FILE else path / CONFIG_FILE


def parse_config(text: str) -> ModelConfig:
    return text_format.Parse(text, ModelConfig())


def read_config(path: str | Path) -> ModelConfig:
    """The config of a model folder (or a ``config.pbtxt`` path), parsed with the schema."""
    return parse_config(config_path(path).read_text())


def config_text(config: ModelConfig) -> str:
    return text_format.MessageToString(config)


def write_config(path: str | Path, config: ModelConfig) -> Path:
    """Write ``config`` as the model folder's (or the given) ``config.pbtxt``, atomically."""
    return write_atomic(config_path(path), config_text(config))


def instance_kind(name: str) -> int:
    """``"KIND_CPU"`` -> the schema's enum value (a clear error for a name it does not have)."""
    return mc.ModelInstanceGroup.Kind.Value(name)


def _tensor(spec, name: str, data_type: str, dims) -> None:
    spec.name = name
    spec.data_type = mc.DataType.Value(data_type)
    spec.dims.extend(int(d) for d in dims)


def check_runner(name: str, platform: str, backend: str) -> None:
    """A Triton model names exactly one of a platform and a backend."""
    if bool(platform) == bool(backend):
        raise ValueError(f"{name}: a Triton model has a platform or a backend (got {platform!r} and {backend!r})")


def _model(name: str, platform: str, backend: str, max_batch_size: int, kind: str, instances: int,
           parameters: dict | None) -> ModelConfig:
    check_runner(name, platform, backend)
    config = ModelConfig(name=name, platform=platform, backend=backend, max_batch_size=int(max_batch_size))
    config.instance_group.add(kind=instance_kind(kind), count=int(instances))
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = str(value)
    return config


# -- the encoders' configs (dims exclude the batch dimension; names and dtypes from postprocess.contract) ----------
def vision_config(name: str, image_size, n_taps: int, tokens: int, channels: int, dim: int, max_batch_size: int,
                  *, kind: str, platform: str = "", backend: str = "", instances: int = 1,
                  parameters: dict | None = None) -> ModelConfig:
    """The clip_vision contract. ``image_size``: an int or (height, width) for a fixed-size encoder, None for any
    size (then ``tokens`` is -1). Platform, backend and kind come from a row of ``export.targets``."""
    h, w = (-1, -1) if image_size is None else C.size_pair(image_size)
    config = _model(name, platform, backend, max_batch_size, kind, instances, parameters)
    _tensor(config.input.add(), C.IMAGES, "TYPE_UINT8", (h, w, 3))
    _tensor(config.output.add(), C.LAYER_TOKENS, "TYPE_FP16", (n_taps, tokens, channels))
    _tensor(config.output.add(), C.PATCH_EMBEDS, "TYPE_FP16", (tokens, dim))
    _tensor(config.output.add(), C.IMAGE_EMBEDS, "TYPE_FP32", (dim,))
    config.dynamic_batching.max_queue_delay_microseconds = 2000
    return config


def text_config(name: str, dim: int, max_batch_size: int, *, kind: str, platform: str = "",
                backend: str = "") -> ModelConfig:
    """The clip_text contract."""
    config = _model(name, platform, backend, max_batch_size, kind, 1, None)
    _tensor(config.input.add(), C.TOKENS, "TYPE_INT64", (C.TEXT_CONTEXT,))
    _tensor(config.output.add(), C.TEXT_EMBEDS, "TYPE_FP32", (dim,))
    return config
