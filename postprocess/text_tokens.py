"""CLIP's BPE tokenizer without torch: the prompts "a photo of a normal {category}" / "... defective ..." as the
INT64 [B, 77] tokens that ``clip_text`` takes, in the server's ``pa_clip_bank`` and in ``OnnxBackbone``.

The export writes what the tokenizer needs beside the text model, ``clip_text/tokenizer.json`` (the BPE merges of
open_clip's ``bpe_simple_vocab_16e6.txt.gz``, the special tokens, the context length and the clean-up;
``export.clip_encoder.tokenizer_document``). ``ClipTokenizer`` is open_clip's ``SimpleTokenizer`` step for step, so
the ids are the same (tests/test_text_tokens.py checks them against open_clip):

1. clean: ``ftfy.fix_text``, ``html.unescape`` twice, strip; then (``clean: lower``, CLIP's) whitespace runs
   collapsed to one space and lower case (``whitespace``: no lower case; ``canonicalize``: punctuation removed);
2. pre-split with CLIP's pattern (special tokens, English contractions, letter runs, single digits, runs of other
   non-space characters), case-insensitive;
3. each piece's UTF-8 bytes mapped to printable characters (GPT-2's byte-to-unicode table), ``</w>`` appended to
   its last character, BPE merges applied lowest rank first;
4. ``<start_of_text>`` ids ``<end_of_text>``, zero padding to the context length; a longer text is cut to the
   context length with its last id replaced by ``<end_of_text>``.

Imports numpy, ``regex`` (for ``\\p{L}``) and ``ftfy``: no torch, no open_clip.
"""

from __future__ import annotations

import html
import json
import string
from pathlib import Path

import numpy as np

from . import strict_json

TOKENIZER_FILE = "tokenizer.json"
FORMAT = "clip-bpe"  # open_clip's SimpleTokenizer
CLEAN_MODES = ("lower", "whitespace", "canonicalize")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: every byte to a printable character (printable ASCII and Latin-1 map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _basic_clean(text: str) -> str:
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def _whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def _canonicalize(text: str) -> str:
    text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
    return " ".join(text.split()).strip()


def clean(text: str, mode: str = "lower") -> str:
    if mode == "lower":
        return _whitespace_clean(_basic_clean(text)).lower()
    if mode == "whitespace":
        return _whitespace_clean(_basic_clean(text))
    if mode == "canonicalize":
        return _canonicalize(_basic_clean(text))
    raise ValueError(f"unknown clean-up {mode!r} (expected one of {', '.join(CLEAN_MODES)})")


class ClipTokenizer:
    """Texts -> INT64 [B, context_length] token ids, as open_clip's ``SimpleTokenizer(...)(texts)``."""

    def __init__(self, merges: list[tuple[str, str]], special_tokens=("<start_of_text>", "<end_of_text>"),
                 context_length: int = 77, clean_mode: str = "lower"):
        import regex

        if clean_mode not in CLEAN_MODES:
            raise ValueError(f"unknown clean-up {clean_mode!r} (expected one of {', '.join(CLEAN_MODES)})")
        if len(special_tokens) < 2 or int(context_length) < 2:
            raise ValueError("a CLIP tokenizer needs <start_of_text>, <end_of_text> and a context of 2 or more")
        self.byte_encoder = bytes_to_unicode()
        merges = [tuple(m) for m in merges]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + list(special_tokens)
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {t: t for t in special_tokens}
        self.pattern = regex.compile("|".join(special_tokens) +
                                     r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
        self.sot_token_id = self.encoder[special_tokens[0]]
        self.eot_token_id = self.encoder[special_tokens[1]]
        self.context_length = int(context_length)
        self.clean_mode = clean_mode
        self.vocab_size = len(self.encoder)

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` without the start and end tokens."""
        ids = []
        for piece in self.pattern.findall(clean(text, self.clean_mode)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids

    def __call__(self, texts, context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        result = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            result[row, :len(ids)] = ids
        return result

    @classmethod
    def from_document(cls, document: dict) -> "ClipTokenizer":
        if document.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} tokenizer (format {document.get('format')!r})")
        tokenizer = cls([tuple(m.split(" ")) for m in document["merges"]], tuple(document["special_tokens"]),
                        document["context_length"], document.get("clean", "lower"))
        if "vocab_size" in document and tokenizer.vocab_size != int(document["vocab_size"]):
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, its file says "
                             f"{document['vocab_size']}")
        return tokenizer


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:]))


def document_json(document: dict) -> str:
    """The text of ``tokenizer.json`` (UTF-8: the merges hold the byte table's non-ASCII characters)."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def load_tokenizer(model_dir: str | Path) -> ClipTokenizer:
    """The tokenizer written beside a text model (``clip_text/tokenizer.json``)."""
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"re-export: this repository's {Path(model_dir).name} has no {TOKENIZER_FILE} ({path}); the server "
            f"tokenizes prompts without torch from that file, which `python -m export onnx` writes beside the text "
            f"model")
    try:
        return ClipTokenizer.from_document(strict_json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a tokenizer this version reads ({err}); re-export the encoder") from err
