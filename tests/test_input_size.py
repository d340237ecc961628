"""How a lot's input size is chosen from its images and the encoder (postprocess.contract)."""

from types import SimpleNamespace

import numpy as np
import pytest

from postprocess.contract import choose_input_size, encoder_identity, lot_input_size
from postprocess.errors import RequestError

PROXY = {"backbone": "dinov2", "weights": "w", "image_size": 336, "patch_size": 14, "taps": [3], "dynamic_size": True}
CLIP_WIDE = {"backbone": "ViT", "weights": "w", "image_size": [182, 448], "patch_size": 14, "taps": [6]}


def test_native_keeps_the_median_aspect_at_the_long_side():
    assert lot_input_size([(1130, 460)] * 3, 224, 14) == (98, 224)  # 2.46:1 -> 7 x 16 patches
    assert lot_input_size([(460, 1130)], 224, 14) == (224, 98)  # portrait
    assert lot_input_size([(100, 300), (300, 100), (200, 100)], 336, 14) == (168, 336)  # median 2:1
    assert lot_input_size([(4000, 10)], 112, 14) == (28, 112)  # at least 2 patches
    assert lot_input_size([(1130, 460)], 224, 14, "square") == (224, 224)
    with pytest.raises(RequestError, match="aspect must be one of"):
        lot_input_size([(10, 10)], 224, 14, "stretched")


def test_an_encoder_with_one_size_decides_and_refuses_others():
    assert choose_input_size(CLIP_WIDE, [(100, 100)]) == (182, 448)
    with pytest.raises(RequestError, match="takes 182x448 images only"):
        choose_input_size(CLIP_WIDE, [], size=(224, 224))
    assert choose_input_size(PROXY, [(1130, 460)]) == (140, 336)
    assert choose_input_size(PROXY, [(1130, 460)], long=224) == (98, 224)
    assert choose_input_size(PROXY, [], size=(42, 70)) == (42, 70)
    with pytest.raises(RequestError, match="multiples of the patch size 14"):
        choose_input_size(PROXY, [], size=(42, 71))


def test_the_configured_size_of_an_any_size_encoder_is_not_part_of_its_identity():
    assert encoder_identity(PROXY) == encoder_identity({**PROXY, "image_size": 224})
    assert encoder_identity(CLIP_WIDE) != encoder_identity({**CLIP_WIDE, "image_size": [224, 224]})


def test_open_clip_in_torch_at_two_sizes_is_two_encoders(tiny_clip_112):
    """ClipBackbone resizes every input's positions from its configured size's grid: at one input size, a model
    configured at 56 and one at 112 give different features, so a bank built with one is refused by the other."""
    from export.backbones import ClipBackbone
    from postprocess.bank import BankError, check_encoder

    small = ClipBackbone("tiny", pretrained="none", image_size=56)
    images = np.random.default_rng(0).integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    assert np.abs(small.encode(images).layer_tokens.astype(np.float32)
                  - tiny_clip_112.encode(images).layer_tokens.astype(np.float32)).max() > 1e-2
    assert encoder_identity(small.fingerprint) != encoder_identity(tiny_clip_112.fingerprint)
    built = SimpleNamespace(bank="washer", encoder=dict(tiny_clip_112.fingerprint))
    check_encoder(built, tiny_clip_112.fingerprint)
    with pytest.raises(BankError, match="rebuild the bank"):
        check_encoder(built, small.fingerprint)
    # a bank built in torch before the field was recorded: its configured size is where its positions came from
    older = SimpleNamespace(bank="washer", encoder={k: v for k, v in tiny_clip_112.fingerprint.items()
                                                    if k != "positions_from"})
    check_encoder(older, tiny_clip_112.fingerprint)
    with pytest.raises(BankError, match="rebuild the bank"):
        check_encoder(older, small.fingerprint)


def test_patch_side_is_a_positive_int_from_the_fingerprint_and_0_for_anything_else():
    """The shortest side an encoder reads comes from its fingerprint; a fingerprint that does not say (missing,
    damaged, a bool or float from a hand-edited JSON, a non-positive value) gives 0: no minimum, never a bogus one."""
    from postprocess.contract import patch_side

    assert patch_side({"patch_size": 14}) == 14
    for fingerprint in ({}, None, "14", {"patch_size": None}, {"patch_size": "14"}, {"patch_size": 14.0},
                        {"patch_size": True}, {"patch_size": 0}, {"patch_size": -14}):
        assert patch_side(fingerprint) == 0, fingerprint


def test_image_key_tells_apart_images_with_the_same_bytes_in_another_shape():
    """An image's identity is its pixels as the encoder sees them: a 2x8 and a 4x4 image of the same bytes are
    different images (one key for both would make one a 'copy' of the other and score it against nothing)."""
    from postprocess.contract import image_key

    pixels = np.arange(48, dtype=np.uint8)
    wide, square = pixels.reshape(2, 8, 3), pixels.reshape(4, 4, 3)
    assert image_key(wide) != image_key(square)
    assert image_key(wide) == image_key(wide.copy()) and len(image_key(wide)) == 64
    assert image_key(np.asfortranarray(square)) == image_key(square)  # the same pixels whatever the memory layout
    assert image_key(square) != image_key(square[::-1])
