"""PA-CLIP scoring after the encoder, and what the serving models do with it. No torch, no Triton at import time.

- ``contract``: the encoder contract (Triton names, dtypes, shapes, fingerprint and its checks); ``errors``:
  ``RequestError``, the caller's mistake as opposed to ours; ``host``: settings of the machine that scores (memory
  budget, NumPy/CuPy, bank cache), never stored in a bank; ``atomic``: the one atomic file write; ``backbone``: the
  ``Backbone`` protocol, the encoder as the pipeline and the bank service use it.
- ``kernels`` (array kernels on NumPy or CuPy), ``config`` (``PAClipConfig``: everything that decides a result),
  ``pa_clip`` (the two scoring stages), ``cada``, ``pipeline`` (a lot end to end in one process), ``bank`` (a bank
  and its typed manifest), ``bank_store`` (banks on disk), ``serving`` (what the Triton Python models do, without
  Triton), ``text_tokens`` (CLIP's BPE tokenizer without torch, from the ``clip_text/tokenizer.json`` the export
  writes), ``reference`` (plain-torch twin of ``pa_clip``/``kernels``, the only module here that imports torch).

May import: numpy, scipy, Pillow, safetensors, tqdm, tokenizers, ftfy and regex (the tokenizer), CuPy when
present: the base install (pyproject.toml's ``dependencies``). Never ``export``, ``client``, ``serve`` or
``benchmarks``: every other package builds on this one.
"""

from .config import DEFAULT_CONFIG, MODES, PAClipConfig
from .contract import Features

__all__ = ["DEFAULT_CONFIG", "MODES", "PAClipConfig", "Features"]
