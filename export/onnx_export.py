"""ONNX building blocks: torch -> ONNX with the encoder fingerprint recorded, the ONNX Runtime session factory,
and writing a model folder into a Triton repository atomically.

Each model is written in a staging folder beside the repository (never in it: tritonserver reads every folder of a
repository as a model) and renamed into place, so an interrupted export never leaves a half-written model, or a
hidden folder the server refuses, in the repository. The ONNX file records what produced it (``metadata_props``:
backbone, weights hash, image size, taps), so that a bank built with one encoder is never scored with another.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from postprocess.atomic import new_temp, write_file
from postprocess.contract import set_onnx_fingerprint


# what an export wrote inside the repository before it staged beside it: tritonserver takes every folder there for a
# model and refused to start on one of these an interrupted export had left
OLD_LEFTOVERS = re.compile(r"\.[A-Za-z0-9_.-]+\.(partial|old|removed)-[A-Za-z0-9_]+")


def staging_path(repository: Path) -> Path:
    """Where a model folder is built and an old one put away: beside the repository, never in it (tritonserver reads
    every folder of the repository as a model, and refuses to start on a half-written or hidden one), on the same
    file system (renamed in whole)."""
    return repository.parent / f".{repository.name}.staging"


def staging_area(repository: Path) -> Path:
    """``staging_path``, made."""
    area = staging_path(repository)
    area.mkdir(parents=True, exist_ok=True)
    return area


def remove_leftovers(repository: Path) -> list[Path]:
    """Remove what an interrupted export left: the staging area's folders and, from before it, an export's hidden
    folders in the repository (``OLD_LEFTOVERS``). Only under the repository's export lock (``atomic.exporting``)."""
    gone = [p for p in repository.iterdir() if p.is_dir() and not p.is_symlink() and OLD_LEFTOVERS.fullmatch(p.name)] \
        if repository.is_dir() else []
    area = staging_path(repository)
    staged = area.is_dir() and not area.is_symlink()
    if staged:
        gone += [p for p in area.iterdir() if not p.is_symlink()]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if staged:
        _remove_if_empty(area)
    return gone


def write_model_dir(repository: Path, name: str, files: dict[str, object]) -> Path:
    """Write ``repository/name`` atomically: build it in the staging area beside the repository, then rename it into
    place (the old one renamed into the staging area first, then removed).

    ``files`` maps relative paths to bytes, text, or a callable that writes to the given path.
    """
    repository.mkdir(parents=True, exist_ok=True)
    area = staging_area(repository)
    staging = new_temp(area, f"{name}.partial-", directory=True)  # renamed into place: the umask's permissions
    try:
        for rel, content in files.items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file(target, content)
        final = repository / name
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{name}.old-", dir=area))
            final.replace(old / name)
        staging.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _remove_if_empty(area)


def _remove_if_empty(area: Path) -> None:
    try:
        area.rmdir()  # another export's folders in it keep it
    except OSError:
        pass


def remove_model_dir(repository: Path, name: str, why: str = "it belonged to another encoder") -> None:
    """Take a model out of the repository (renamed away first, so the server never sees half of it)."""
    target = repository / name
    if not target.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f"{name}.removed-", dir=staging_area(repository)))
    target.rename(trash / name)
    shutil.rmtree(trash, ignore_errors=True)
    _remove_if_empty(trash.parent)
    print(f"removed {target}: {why}", file=sys.stderr)


def export_torch_module(module, example, path: Path, input_name: str, output_names: list[str],
                        fingerprint: dict, precision: str, opset: int = 17) -> None:
    """torch -> ONNX with a dynamic batch dimension, fingerprint recorded, checked with onnx.checker.

    ``precision`` is recorded only: an fp16 export passes a module already in half precision.
    """
    import onnx
    import torch

    dynamic = {input_name: {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
    try:
        with torch.no_grad():
            torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=output_names,
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(path))
    set_onnx_fingerprint(model, {**fingerprint, "precision": precision})
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))


def ort_session(model: str | Path | bytes, precision: str = "fp32", threads: int = 0, basic_optimizations=False):
    """The one ONNX Runtime CPU session factory (export checks, OnnxBackbone, benchmarks, the stand-in Triton
    backend), for a file or a serialized model. float16 graphs get basic graph optimisations only: with the
    extended ones, onnxruntime 1.32 crashed (segmentation fault) building the session of our float16 ViT on the
    CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if precision == "fp16" or basic_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_run_options_shrinking_the_arena():
    """Run options under which ONNX Runtime hands its CPU arena's unused chunks back at the end of the run."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def release_freed_heap() -> None:
    """Return freed heap pages to the system (glibc keeps them for reuse otherwise); a no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_runs(path: Path, feeds: dict, precision: str = "fp32") -> list[np.ndarray]:
    """Load the file in ONNX Runtime and run it once: an export that does not load is not written."""
    return ort_session(path, precision).run(None, feeds)
