"""CLIP's tokenizer without torch: the prompts "a photo of a normal {category}" / "... defective ..." as the INT64
[B, 77] tokens that ``clip_text`` takes, in the server's ``pa_clip_bank`` and in ``OnnxBackbone``.

The export writes the tokenizer beside the text model, ``clip_text/tokenizer.json``, in the format of Hugging Face's
``tokenizers`` library (a kept, compiled implementation of byte-level BPE): CLIP's vocabulary and merges taken from
open_clip's tokenizer, CLIP's pre-split pattern, the byte-to-character mapping, ``</w>`` at word ends, the start and
end tokens, truncation and zero padding to the context length. What ``tokenizers`` cannot express, open_clip's text
clean-up, is done here first (``clean``). tests/test_text_tokens.py checks the ids against open_clip's, id for id.

Imports numpy, ``tokenizers``, ``regex`` and ``ftfy``: no torch, no open_clip.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from . import strict_json
from .contract import TEXT_CONTEXT

TOKENIZER_FILE = "tokenizer.json"
START, END = "<start_of_text>", "<end_of_text>"
PAD_ID = 0  # open_clip pads with id 0
# CLIP's pre-split: the special tokens, English contractions, runs of letters, single digits, runs of anything else
# that is not a space. The text is lower-cased before, so the pattern needs no case-insensitive flag.
CLIP_SPLIT = START + "|" + END + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clean(text: str) -> str:
    """open_clip's clean-up of CLIP's prompts: broken Unicode fixed (ftfy), HTML entities decoded (twice, as
    open_clip does), runs of white space made one space, stripped, lower case."""
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def build(vocab: dict[str, int], merges: list[tuple[str, str]], context_length: int = TEXT_CONTEXT):
    """The ``tokenizers.Tokenizer`` of a CLIP BPE vocabulary (token -> id, with START and END) and its merges (lowest
    rank first), ready to be written as ``tokenizer.json``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    for special in (START, END):
        if special not in vocab:
            raise ValueError(f"a CLIP vocabulary holds {START} and {END}; {special} is missing")
    tokenizer = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), end_of_word_suffix="</w>",
                                     continuing_subword_prefix="", fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),  # keep the matches, drop the rest
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # UTF-8 bytes as printable characters
    ])
    tokenizer.add_special_tokens([START, END])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{START} $A {END}", special_tokens=[(START, vocab[START]), (END, vocab[END])])
    # a longer text keeps its first context_length - 2 tokens between START and END, as open_clip cuts it
    tokenizer.enable_truncation(max_length=int(context_length))
    tokenizer.enable_padding(length=int(context_length), pad_id=PAD_ID, pad_token=START)
    return tokenizer


class ClipTokenizer:
    """Texts -> INT64 [B, context length] token ids, as open_clip's ``SimpleTokenizer(texts)`` gives them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sot_token_id = tokenizer.token_to_id(START)
        self.eot_token_id = tokenizer.token_to_id(END)
        if self.sot_token_id is None or self.eot_token_id is None or tokenizer.padding is None:
            raise ValueError(f"not a CLIP tokenizer: it lacks {START}/{END} or padding to a context length")

    def __call__(self, texts) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        encoded = self.tokenizer.encode_batch([clean(t) for t in texts])
        return np.asarray([e.ids for e in encoded], dtype=np.int64).reshape(len(texts), -1)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @classmethod
    def from_json(cls, text: str) -> "ClipTokenizer":
        from tokenizers import Tokenizer

        document = strict_json.loads(text)  # a key written twice is refused before the library reads the file
        if not isinstance(document, dict) or (document.get("model") or {}).get("type") != "BPE":
            raise ValueError("not a BPE tokenizer in the tokenizers library's format")
        return cls(Tokenizer.from_str(text))


def load_tokenizer(model_dir: str | Path) -> ClipTokenizer:
    """The tokenizer written beside a text model (``clip_text/tokenizer.json``)."""
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"re-export: this repository's {Path(model_dir).name} has no {TOKENIZER_FILE} ({path}); the server "
            f"tokenizes prompts without torch from that file, which `python -m export onnx` writes beside the text "
            f"model")
    try:
        return ClipTokenizer.from_json(path.read_text(encoding="utf-8"))
    except Exception as err:  # the library's own errors are plain Exceptions
        raise ValueError(f"{path}: not a tokenizer this version reads ({err}); re-export the encoder") from err
