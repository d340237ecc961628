"""Content-adaptive augmentation: the position spread decides the strategy, and masks move with their images."""

import numpy as np

from postprocess.cada import (Augmentation, apply_augmentation, cada_decision, draw_augmentations, object_centroid,
                              warp_patch_map)


def _object_at(x, y, size=64):
    img = np.full((size, size, 3), 30, np.uint8)
    img[y - 6 : y + 6, x - 6 : x + 6] = 220
    return img


def test_centroid_finds_the_object():
    cx, cy = object_centroid(_object_at(16, 48))
    assert abs(cx - 16 / 64) < 0.03 and abs(cy - 48 / 64) < 0.03


def test_fixed_objects_get_geometric_augmentation_moving_ones_do_not():
    still = [_object_at(32, 32) for _ in range(6)]
    moving = [_object_at(x, y) for x, y in [(12, 12), (50, 20), (20, 50), (52, 52), (30, 14), (14, 36)]]
    assert cada_decision(still, 0.05).strategy == "photometric+geometric"
    decision = cada_decision(moving, 0.05)
    assert decision.strategy == "photometric" and decision.sigma > 0.05
    assert decision.sigma_spatial > 0 and decision.sigma_temporal > 0


def test_photometric_only_keeps_geometry():
    (aug,) = draw_augmentations(1, "photometric", 64, seed=0)
    assert aug.matrix is None
    out = apply_augmentation(_object_at(20, 20), aug)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert object_centroid(out) == object_centroid(_object_at(20, 20))


def test_corners_a_turn_brings_in_take_the_adjusted_background():
    """The photometric step comes first: the corners filled by the turn must match the brightened background, or
    every geometric copy carries a seam into the normal bank (the original's border was used: 180 against 205)."""
    background = np.full((112, 112, 3), 180, np.uint8)
    background[40:72, 40:72] = 60
    (drawn,) = draw_augmentations(1, "photometric+geometric", 112, seed=0)
    out = apply_augmentation(background, Augmentation(1.15, 1.0, drawn.matrix))
    adjusted = apply_augmentation(background, Augmentation(1.15, 1.0, None))
    corners = np.stack([out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]])
    assert np.abs(corners.astype(int) - adjusted[0, 0].astype(int)).max() <= 1, (corners, adjusted[0, 0])


def test_mask_follows_the_image():
    rng_augs = draw_augmentations(5, "photometric+geometric", 64, seed=3)
    image = _object_at(20, 40)
    patch_map = np.zeros((8, 8), np.float32)
    patch_map[40 // 8, 20 // 8] = 1.0  # the patch holding the object's centre
    for aug in rng_augs:
        moved_img = apply_augmentation(image, Augmentation(1.0, 1.0, aug.matrix))
        moved_map = warp_patch_map(patch_map, aug, 64)
        cx, cy = object_centroid(moved_img)
        peak_y, peak_x = np.unravel_index(np.argmax(moved_map), moved_map.shape)
        assert abs((peak_x + 0.5) / 8 - cx) <= 1.5 / 8 and abs((peak_y + 0.5) / 8 - cy) <= 1.5 / 8


def test_patch_map_warp_samples_as_pil_does():
    """The gather form of the warp (which runs on the device) against PIL's own affine transform of the map."""
    from PIL import Image

    rng = np.random.default_rng(4)
    for seed in range(5):
        for aug in draw_augmentations(3, "photometric+geometric", 112, seed):
            for side in (8, 37):
                patch_map = rng.random((side, side)).astype(np.float32)
                a, b, c, d, e, f = aug.matrix
                scale = side / 112
                pil = np.asarray(Image.fromarray(patch_map, mode="F").transform(
                    (side, side), Image.AFFINE, (a, b, c * scale, d, e, f * scale), resample=Image.BILINEAR,
                    fillcolor=float(np.median(patch_map))))
                np.testing.assert_allclose(warp_patch_map(patch_map, aug, 112), pil, atol=1e-6)
