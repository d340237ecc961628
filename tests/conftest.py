"""Shared fixtures and the test tiers.

Tiers (pytest markers): ``unit`` (no server, no real data: the loop for someone changing a kernel), ``server`` (a
real tritonserver on 127.0.0.1), ``data`` (real images in ../shared/data). A test module says ``server`` or
``data`` with ``pytestmark``; every other test is ``unit``. ``pytest -m unit`` runs one tier; ``./run.sh test``
runs them all.

``slow`` (a marker across the tiers): a test that takes a minute or more in CI on 2 cores (kill and restart
cycles, two servers or two main jobs at once, the load soak, a dead stub per model, another encoder exported, the
real-data lots). ``pytest -m "server and not slow"`` is the loop of a few minutes for someone changing the serving;
CI runs everything. Every run ends with the time spent per tier, and how much of it was ``slow``
(``pytest_terminal_summary`` below): the figures the README's tier timings are read from.

Server-tier fixtures: ``repository`` (the tiny model exported at 112, once per session; no test writes into it),
``workdir`` (a folder per test module), ``server`` and ``built`` (one server per module, with the bank "washer").
"""

import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageDraw

from postprocess.config import FULL_BANK

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"
TIERS = ("unit", "server", "data")
# The demo lot the bank and serving tests share: 10 images, so that the interval k of the lot (N-1 = 9 others:
# round(0.3 * 9) = 3) differs from the one of N-2 others (round(0.3 * 8) = 2) and an off-by-one shows.
LOT_SIZE = 10
LOT_IMAGE_SIZE = 112

# The parity contract (README, "Parity"): banks store their entries in float16, which moves maps and scores by less
# than BANK_STORAGE_TOL (2.3e-5 measured on the demo lot); the served anomaly_map is float16, so a served map also
# carries float16 rounding: half a unit in the last place, |x| * 2**-11.
BANK_STORAGE_TOL = 1e-4
FLOAT16_HALF_ULP = 2.0 ** -11

# the full bank (as before issue 26) as the text of a benchmark's --variant
FULL_BANK_VARIANT = ",".join(f"{k}:{v}" for k, v in FULL_BANK.items())


def storage_tolerance(channels: int | None = None, cfg=None) -> float:
    """BANK_STORAGE_TOL for entries of every channel; a bank projected onto d of C directions (``cfg``'s search
    width) keeps larger coordinates (the same length in fewer of them), whose float16 rounding moves a distance up to
    sqrt(C / d) more. (int8 entries: the lot is scored against them as stored, so they add nothing.)"""
    width = cfg.search_dim(channels) if cfg is not None and channels else 0
    return BANK_STORAGE_TOL * (float(np.sqrt(channels / width)) if width else 1.0)


def assert_maps_within_contract(got, expected, served: bool = True, storage_tol: float = BANK_STORAGE_TOL):
    """Maps scored against a stored bank (``served``: and returned as float16) against in-process maps."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape
    tolerance = storage_tol + (np.abs(expected) * FLOAT16_HALF_ULP if served else 0.0)
    excess = np.abs(got - expected) - tolerance
    assert excess.max() <= 0, f"maps differ by up to {np.abs(got - expected).max():.3g}, beyond the contract"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in ("server", "data")):
            item.add_marker(pytest.mark.unit)
        tier = next(t for t in TIERS if item.get_closest_marker(t))
        _TIER_OF[item.nodeid] = (tier, item.get_closest_marker("slow") is not None)


_TIER_OF: dict[str, tuple[str, bool]] = {}  # node id -> (tier, slow)
_SECONDS: dict[tuple[str, bool], float] = {}  # (tier, slow) -> setup + call + teardown, every test summed


def pytest_runtest_logreport(report):
    if report.nodeid in _TIER_OF:
        key = _TIER_OF[report.nodeid]
        _SECONDS[key] = _SECONDS.get(key, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """The wall time per tier (setup, call and teardown of its tests; a module fixture counts where it is made)."""
    if _SECONDS:
        terminalreporter.write_sep("-", "time per tier")
        terminalreporter.write_line(", ".join(
            f"{tier} {_SECONDS.get((tier, False), 0) + _SECONDS.get((tier, True), 0):.0f} s "
            f"(slow {_SECONDS.get((tier, True), 0):.0f} s)" for tier in TIERS))


def make_mvtec_tree(root: Path, n_good=6, n_bad=4, size=96, seed=0, width=None, types=("scratch",)) -> Path:
    """A small MVTec-layout category: textured images (size high, width wide), defects are dark blobs with masks,
    the defective images spread over ``types`` in turn."""
    rng = np.random.default_rng(seed)
    width = width or size
    cat = root / "widget"
    for sub in ("test/good", *(f"test/{t}" for t in types), *(f"ground_truth/{t}" for t in types)):
        (cat / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_good + n_bad):
        base = np.full((size, width, 3), 170, np.uint8) + rng.integers(0, 20, (size, width, 3), dtype=np.uint8)
        img = Image.fromarray(base)
        if i < n_good:
            img.save(cat / "test/good" / f"{i:03d}.png")
            continue
        kind = types[(i - n_good) % len(types)]
        mask = Image.new("L", (width, size), 0)
        x, y = rng.integers(10, width - 30), rng.integers(10, size - 30)
        ImageDraw.Draw(img).ellipse([x, y, x + 18, y + 18], fill=(20, 20, 20))
        ImageDraw.Draw(mask).ellipse([x, y, x + 18, y + 18], fill=255)
        img.save(cat / f"test/{kind}" / f"{i:03d}.png")
        mask.save(cat / f"ground_truth/{kind}" / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def mvtec_tree(tmp_path):
    return make_mvtec_tree(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_clip():
    """The tiny randomly initialised open_clip ViT (text tower included) at its own 56x56."""
    from export.backbones import ClipBackbone

    return ClipBackbone("tiny", pretrained="none")


@pytest.fixture(scope="session")
def tiny_clip_112():
    """The same tiny model at 112x112 (an 8x8 patch grid), for banks and serving."""
    from export.backbones import ClipBackbone

    return ClipBackbone("tiny", pretrained="none", image_size=LOT_IMAGE_SIZE)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory):
    """The tiny model exported at 56 by ``python -m export onnx`` into a model repository."""
    from export import __main__ as export_cli

    repo = tmp_path_factory.mktemp("tiny_repository")
    assert export_cli.main(["onnx", "--model", "tiny", "--pretrained", "none", "--out", str(repo)]) == 0
    return repo


@pytest.fixture(scope="session")
def lot_dir(tmp_path_factory):
    """Synthetic washers (2 defective) as PNG files, as the main job's demo lot makes them."""
    from client.demo_lot import write_demo_lot

    return write_demo_lot(tmp_path_factory.mktemp("demo_lot"), n_images=LOT_SIZE, n_defective=2, size=128)


@pytest.fixture(scope="session")
def lot(lot_dir):
    """The demo lot read the way the client reads it: uint8 [N,112,112,3]."""
    from client.infer import load_image

    return np.stack([load_image(p, LOT_IMAGE_SIZE)[1] for p in sorted(lot_dir.glob("*.png"))])


def process_pids(matches: Callable[[list[bytes]], bool]) -> list[int]:
    """The processes whose command line (the arguments, as bytes) ``matches``: one walk of /proc for the helpers."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and matches(args):
                pids.append(int(entry.name))
    return pids


def stub_pids(prefix: str, model: str) -> list[int]:
    """The Python-backend stub of ``model`` in the server whose shared-memory prefix starts with ``prefix``
    (``LocalServer.shm_prefix``: one server; ``pa_clip_<pid>_``: the servers process pid started)."""
    return process_pids(lambda args: args[0].endswith(b"triton_python_backend_stub") and
                        f"{model}_0_0".encode() in args and any(a.startswith(prefix.encode()) for a in args))


def tritonserver_pids(owner: int) -> list[int]:
    """The tritonserver processes that process ``owner`` (python -m serve, or a test) started: their shared-memory
    prefix names it (``LocalServer.shm_prefix``), also once they are re-parented."""
    mark = f"shm-region-prefix-name=pa_clip_{owner}_".encode()
    return process_pids(lambda args: args[0].endswith(b"tritonserver") and any(mark in arg for arg in args))


def stub_rss_mb(prefix: str, model: str) -> float:
    """Resident memory of ``model``'s stub (``stub_pids``)."""
    (pid,) = stub_pids(prefix, model)
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# --- the server tier's fixtures (tests/test_serving_*.py; serving_helpers.py skips those modules without a server)


@pytest.fixture(scope="session")
def repository(tmp_path_factory):
    """The tiny model (text tower included) exported at 112 by ``python -m export onnx``: one export for every
    server-tier module. Read-only: a test that needs another repository makes its own under ``workdir``."""
    repo = tmp_path_factory.mktemp("serving_repository") / "model_repository"
    subprocess.run([sys.executable, "-m", "export", "onnx", "--model", "tiny", "--pretrained", "none",
                    "--image-size", str(LOT_IMAGE_SIZE), "--out", str(repo)], cwd=ROOT, check=True,
                   capture_output=True)
    return repo


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request):
    """A folder of the test module's own (bank stores, logs, outputs)."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="module")
def server(repository, workdir):
    """A server of the module's own, its banks in ``workdir / "banks"``."""
    from serving_helpers import start_server

    srv = start_server(repository, workdir / "banks", workdir / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def built(server, lot):
    """The bank "washer" of the demo lot (pad_mpam), added in two parts, on the module's ``server``."""
    from client.triton_client import PAClipClient

    client = PAClipClient(server.http_url)
    client.add_images("washer", "washer", lot[:7], reset=True)
    client.add_images("washer", "washer", lot[7:])
    info = client.build_bank("washer", {"mode": "pad_mpam"})
    client.close()
    return info


def write_manifest(path: Path, text: str) -> None:
    """Write a version's ``manifest.json`` with its digest beside it (``manifest.sha256``), as a writer would: what a
    test changes in a manifest this way reaches the checks of its fields, which stand behind the digest."""
    import hashlib

    path.write_text(text)
    (path.parent / "manifest.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
