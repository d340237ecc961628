"""benchmarks/gpu.py and benchmarks/gpu_check.sh are prepared for a session that is lent a GPU; here the dry run
(NumPy and torch on the CPU, tiny sizes) walks every row, and the check's stages run on the CPU under small limits, so
neither fails for a Python or shell reason on the device."""

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu
from postprocess import kernels

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_walks_every_row_fused_and_generic(tmp_path, capsys):
    assert gpu.main(["--dry-run", "--json", str(tmp_path / "gpu.json")]) == 0
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    names = [r["row"] for r in rows]
    assert not [r for r in rows if "error" in r]
    for label in ("fused", "generic"):
        assert f"kNN full bank ({label})" in names
        assert sum(n.endswith(f"({label})") for n in names) == 5, names  # kNN, coreset, pooling, fusion, upsampling
    assert any(n.startswith("whole lot") for n in names) and any(n.startswith("end to end") for n in names)
    banks = [r for r in rows if r["row"].startswith("bank ")]
    assert [r["row"].split(":")[0] for r in banks] == ["bank full bank", "bank default"]  # no CPU-host rows
    assert all(r["ms_per_new_image"] > 0 and r["bank_gb"] > 0 for r in banks)
    knn = next(r for r in rows if r["row"] == "kNN full bank (fused)")
    assert knn["max_diff"] < 1e-3  # our kNN and the cdist reference agree (float16 bank)
    whole = next(r for r in rows if r["row"].startswith("whole lot"))
    printed = capsys.readouterr().out
    assert f"whole-lot scoring, torch cdist / ours: x{whole['speedup']:.1f}" in printed
    assert "pooling r=5 of 2 images: generic / fused x" in printed
    assert os.environ.get("PA_CLIP_FUSED_KERNELS") is None  # the rows put the setting back


def test_a_failing_kernel_row_leaves_the_others(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS (planted)")

    monkeypatch.setattr(kernels, "box_mean", broken)
    assert gpu.main(["--dry-run", "--skip", "lot", "banks", "end-to-end", "--json", str(tmp_path / "gpu.json")]) == 1
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    failed = [r["row"] for r in rows if "error" in r]
    assert failed == ["pooling r=5 of 2 images (fused)", "pooling r=5 of 2 images (generic)"]
    assert sum("ms" in r for r in rows) == 9  # matmul + 4 kernels x 2 settings
    assert "pooling r=5 of 2 images (fused): FAILED: RuntimeError: CUDA_ERROR_ILLEGAL_ADDRESS" in capsys.readouterr().out


def test_device_check_scripts_parse():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_device_check_stages_survive_a_hang_and_a_failure(tmp_path):
    """On the CPU: the smoke stage passes (every GPU test skips), the GPU tests hit a 1-second limit, the benchmark
    fails (no CuPy); each stage leaves its file and its line, and the check's status says something failed."""
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_LIMITS="120 1 120",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stderr
    lines = (tmp_path / "stages.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["smoke", "gpu_tests", "benchmark"], lines
    assert lines[0].startswith("smoke: exit 0 ") and "skipped" in (tmp_path / "smoke.txt").read_text()
    assert lines[1].startswith("gpu_tests: exit 124 ") and lines[1].endswith("(time limit)")
    assert lines[2].startswith("benchmark: exit 1 ") and "cupy" in (tmp_path / "gpu_benchmark.txt").read_text()
    assert (tmp_path / "device.txt").exists()
