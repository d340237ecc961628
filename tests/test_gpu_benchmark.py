"""benchmarks/gpu.py is prepared for a session that is lent a GPU; here its dry run (NumPy and torch on the CPU, tiny
sizes) walks every row, so the script does not fail for a Python reason on the device."""

import json
import subprocess
from pathlib import Path

from benchmarks import gpu

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_walks_every_row(tmp_path, capsys):
    assert gpu.main(["--dry-run", "--json", str(tmp_path / "gpu.json")]) == 0
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    names = [r["row"] for r in rows]
    assert names[0] == "kNN full bank (fused)" and any(n.startswith("whole lot") for n in names)
    assert any(n.startswith("end to end") for n in names)
    knn = rows[0]
    assert knn["max_diff"] < 1e-3  # our kNN and the cdist reference agree (float16 bank)
    whole = next(r for r in rows if r["row"].startswith("whole lot"))
    printed = capsys.readouterr().out
    assert f"whole-lot scoring, torch cdist / ours: x{whole['speedup']:.1f}" in printed


def test_device_check_script_parses():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
