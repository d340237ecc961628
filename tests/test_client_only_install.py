"""A client machine: a fresh virtual environment with only the ``client`` extra (``pip install '<repo>[client]'``,
not editable, pip's own resolution from the package index), in which torch and open_clip do not import, scores the
demo lot with client/infer.py against a real tritonserver on loopback, and agrees with the in-process pipeline.

The venv takes a few minutes to build the first time (downloads; later runs reuse pip's cache). It skips only when
no package index answers.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conftest import BANK_STORAGE_TOL, LOT_IMAGE_SIZE as SIZE, LOT_SIZE

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.server, pytest.mark.slow]

try:
    from serve.local import LocalServer, bundled_server, free_ports

    bundled_server()
except Exception as err:  # noqa: BLE001
    pytest.skip(f"tritonserver from the nvidia-pytriton wheel is not available here: {err}", allow_module_level=True)


def clean_env() -> dict:
    """The environment without this venv's traces, so that the client venv's python finds only its own packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def project_copy(target: Path) -> Path:
    """What a wheel of the project is built from (pyproject.toml, README.md, the packages), copied out of the
    checkout so that pip's build leaves nothing in it."""
    target.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in sorted({pattern.rstrip("*") for pattern in include}):
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


@pytest.fixture(scope="module")
def client_python(tmp_path_factory):
    """The python of a fresh venv with only pa-clip-triton[client] installed."""
    work = tmp_path_factory.mktemp("client_only")
    source = project_copy(work / "source")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-m", "pip", "download", "--no-deps", "--dest", str(work / "probe"),
                            "pypng"], capture_output=True, text=True, env=clean_env(), timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"no package index reachable (pip download pypng failed): {probe.stderr.strip()[-500:]}")
    start = time.monotonic()
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{source}[client]"],
                             capture_output=True, text=True, env=clean_env(), timeout=1800)
    assert install.returncode == 0, install.stderr[-3000:]
    print(f"client-only venv installed in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return python


def run_client(python: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *map(str, args)], cwd=cwd, capture_output=True, text=True, env=clean_env(),
                          timeout=600)


def test_the_client_extra_installs_no_torch(client_python, tmp_path):
    for module in ("torch", "open_clip", "torchvision", "onnx", "onnxruntime"):
        proc = run_client(client_python, "-c", f"import {module}", cwd=tmp_path)
        assert proc.returncode != 0 and f"No module named '{module}'" in proc.stderr, (module, proc.stderr)
    # the installed package (not the checkout), and what client/ imports, without torch
    proc = run_client(client_python, "-c", "import sys, client, client.infer, client.banks, client.heatmap, "
                      "client.report, postprocess; print(client.__file__); assert 'torch' not in sys.modules",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "site-packages" in proc.stdout and str(ROOT) not in proc.stdout


def scores_of(table_path: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(table_path)))
    assert len(rows) == LOT_SIZE and all(r["rank"] and r["decision"] in ("normal", "anomalous") for r in rows), rows
    return {Path(r["path"]).name: float(r["score"]) for r in rows}


def test_a_client_only_venv_scores_a_lot_against_a_real_server(client_python, repository, lot_dir, lot, tmp_path):
    from export.backbones import OnnxBackbone
    from postprocess.config import PAClipConfig
    from postprocess.pipeline import LotScorer

    http, grpc, metrics = free_ports(3)
    srv = LocalServer(repository, tmp_path / "banks", http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=tmp_path / "server.log").start(timeout=180)
    try:
        # the installed package, run from outside the checkout: build the bank from the lot and score it
        built = run_client(client_python, "-m", "client.infer", "--url", srv.http_url, "--images", lot_dir,
                           "--category", "washer", "--build", "--out", tmp_path / "built", "--quiet", cwd=tmp_path)
        assert built.returncode == 0, built.stderr[-3000:]
        # the README's command, over gRPC: score the lot again against the bank
        scored = run_client(client_python, ROOT / "client" / "infer.py", "--url", srv.grpc_url, "--protocol", "grpc",
                            "--images", lot_dir, "--bank", "washer", "--out", tmp_path / "scored", "--quiet",
                            "--no-overlays", cwd=tmp_path)
        assert scored.returncode == 0, scored.stderr[-3000:]
    finally:
        srv.stop()
    report = json.loads((tmp_path / "built" / "results.json").read_text())
    assert report["bank"]["normal_selection"] == "text"  # the prompts went through clip_text, tokenized in the server
    assert len(list((tmp_path / "built" / "overlays").glob("*.png"))) == LOT_SIZE  # matplotlib's colours too
    expected = LotScorer(OnnxBackbone.from_repository(repository), lot, "washer", progress=False).score(PAClipConfig())
    paths = sorted(lot_dir.glob("*.png"))
    for out in ("built", "scored"):
        served = scores_of(tmp_path / out / "results.csv")
        got = np.array([served[p.name] for p in paths])
        assert np.abs(got - expected.scores).max() < BANK_STORAGE_TOL, (out, got, expected.scores)
