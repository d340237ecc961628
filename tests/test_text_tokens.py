"""postprocess/text_tokens.py: the server's torch-free CLIP tokenizer gives open_clip's token ids, id for id."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from postprocess import text_tokens
from postprocess.text_tokens import ClipTokenizer, load_tokenizer

open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed: pip install -e '.[export]'")

ROOT = Path(__file__).resolve().parents[1]

MVTEC = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal nut", "pill", "screw", "tile",
         "toothbrush", "transistor", "wood", "zipper"]
VISA = ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
        "pipe_fryum"]
ODD = [
    "metal_nut", "ball_screw", "magnetic_tile", "  spaced   out\tname\n", "PCB4", "Metal Nut", "SCREW-M6x20",
    "part #4711 (rev. B)", "o-ring, 3/8\"", "bolt's head", "it's", "we'll", "12345678901234567890", "½ inch washer",
    "Ⅻ gear", "x²", "crème brûlée", "Straße", "Ångström", "naïve café", "ｆｕｌｌｗｉｄｔｈ", "汽车零件", "нержавейка",
    "ねじ", "🔩 bolt", "a&amp;b", "&lt;gear&gt;", "Ã©cran", "tab\u00a0nbsp", "zero\u200bwidth", "combining e\u0301",
    "unit\x1fseparator", "next\x85line", "<start_of_text>", "foo<end_of_text>bar", "!!!???...", "__", "___init___", "",
]
LONG = "very " * 80 + "long category name that does not fit"


def prompts_for(names):
    return [p for c in names for p in (f"a photo of a normal {c}", f"a photo of a defective {c}")]


@pytest.fixture(scope="module")
def reference():
    """open_clip's tokenizer of the tiny test model and of ViT-L-14-336 (both CLIP's SimpleTokenizer)."""
    return open_clip.tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def ours(reference):
    from export.clip_encoder import server_tokenizer

    return ClipTokenizer.from_json(server_tokenizer(reference).to_json())  # through the file's text


@pytest.mark.parametrize("names", [MVTEC, VISA, ODD, [LONG], [""]], ids=["mvtec", "visa", "odd", "long", "empty"])
def test_token_ids_are_open_clips(reference, ours, names):
    prompts = prompts_for(names) + list(names)  # the prompts, and the bare names (cleaning at the edges)
    expected = reference(prompts).numpy()
    got = ours(prompts)
    assert got.dtype == np.int64 and got.shape == (len(prompts), 77)
    for prompt, e, g in zip(prompts, expected, got):
        assert np.array_equal(g, e), f"{prompt!r}: {g[:20]} != {e[:20]}"


def test_a_long_name_is_truncated_keeping_the_end_token(ours, reference):
    tokens = ours([f"a photo of a defective {LONG}"])[0]
    assert (tokens != 0).all() and tokens[0] == ours.sot_token_id and tokens[-1] == ours.eot_token_id
    assert np.array_equal(ours(["a photo of a normal "])[0], reference(["a photo of a normal "])[0].numpy())
    assert np.array_equal(ours([LONG])[0], reference([LONG])[0].numpy())


def test_the_clip_models_tokenizer_is_the_tiny_ones(reference):
    from export.clip_encoder import server_tokenizer

    assert server_tokenizer(open_clip.get_tokenizer("ViT-L-14-336")).to_json() == server_tokenizer(reference).to_json()


def test_other_tokenizers_are_refused_at_export():
    from export.clip_encoder import server_tokenizer

    with pytest.raises(ValueError, match="CLIP's BPE tokenizer"):
        server_tokenizer(object())
    with pytest.raises(ValueError, match="CLIP's BPE tokenizer"):
        server_tokenizer(open_clip.tokenizer.SimpleTokenizer(reduction_mask="simple"))
    with pytest.raises(ValueError, match="CLIP's BPE tokenizer"):
        server_tokenizer(open_clip.tokenizer.SimpleTokenizer(clean="canonicalize"))


def test_the_export_writes_it_beside_clip_text_and_the_onnx_backbone_uses_it(tiny_repository, reference):
    from export.backbones import OnnxBackbone

    tokenizer = load_tokenizer(tiny_repository / "clip_text")
    prompts = prompts_for(MVTEC[:3])
    assert np.array_equal(tokenizer(prompts), reference(prompts).numpy())
    backbone = OnnxBackbone.from_repository(tiny_repository)
    assert isinstance(backbone.tokenizer, ClipTokenizer) and backbone.encode_text(prompts).shape[0] == len(prompts)


def test_a_repository_exported_before_the_tokenizer_file_says_to_re_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="re-export: this repository's clip_text has no tokenizer.json"):
        load_tokenizer(tmp_path / "clip_text")
    (tmp_path / "clip_text").mkdir()
    (tmp_path / "clip_text" / text_tokens.TOKENIZER_FILE).write_text('{"model": {"type": "WordPiece"}}')
    with pytest.raises(ValueError, match="re-export"):
        load_tokenizer(tmp_path / "clip_text")


def test_tokenizing_imports_no_torch(tiny_repository):
    code = ("import sys; from postprocess.text_tokens import load_tokenizer; "
            f"t = load_tokenizer({str(tiny_repository / 'clip_text')!r}); t(['a photo of a normal bottle']); "
            "assert not {'torch', 'open_clip'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
