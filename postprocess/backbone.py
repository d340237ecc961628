"""The image encoder as the pipeline and the bank service use it: ``Backbone``.

``postprocess.pipeline`` (``encode_images``, ``LotScorer``) and ``postprocess.serving.BankService`` call exactly these
members, nothing else. Implemented by ``export.backbones.ClipBackbone`` (torch), ``export.backbones.OnnxBackbone``
(ONNX Runtime; ``ImgFocusBackbone`` is one) and ``postprocess.serving.RemoteEncoder`` (the Triton models through
BLS); ``tests/test_extension_points.py`` checks each against this protocol, signatures included.

The implementations do not inherit from it: a class that did would inherit these empty bodies, and a member it
forgot would go unnoticed. Nothing here imports torch or Triton.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .contract import Features


@runtime_checkable
class Backbone(Protocol):
    @property
    def has_text(self) -> bool:
        """Whether ``encode_text`` gives embeddings (without one, normal images are chosen visually)."""
        ...

    def encode(self, images: np.ndarray) -> Features:
        """UINT8 [B,H,W,3] RGB images (H and W multiples of the patch size) -> their clip_vision ``Features``."""
        ...

    def encode_text(self, prompts: list[str]) -> np.ndarray | None:
        """Unit-length FP32 [len(prompts), D] text embeddings, or None for an encoder with no text tower."""
        ...


MEMBERS = ("has_text", "encode", "encode_text")  # the protocol's members, in one place for the checks
