"""Does one bank's build hold up the others? Scoring and ``info`` of a built bank, alone and while another bank
builds on the same server, side by side in one run.

  python -m benchmarks.bank_isolation --repository model_repository [--build-images 60] [--score-images 8]

Starts a local server on free ports, builds bank "line_a" on the demo lot, then times, three times each:
``client/infer.py --bank line_a`` on the first --score-images lot images (the command a line runs: encoder, info,
scoring, results), the same scoring as one request, and ``info``. Then, for each of the three, it adds
--build-images images to bank "line_b", starts that build, waits until its build lock is taken, and repeats the call
as long as the build runs, timing every call that started during it to its end. Prints a table: call, alone
(median s), during the build (median and max s, how many calls), max / alone, and the build's seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from client.demo_lot import write_demo_lot
from client.infer import find_images, load_image
from client.triton_client import PAClipClient
from postprocess.contract import VISION_MODEL, read_fingerprint, square_size

ROOT = Path(__file__).resolve().parents[1]
BUILD_B = "import sys; from client.triton_client import PAClipClient; PAClipClient(sys.argv[1]).build_bank('line_b')"


def calls(url: str, images: np.ndarray, folder: Path, out: Path) -> dict:
    """The three calls of a line against bank line_a: {name: callable returning nothing}."""
    def infer_command():
        subprocess.run([sys.executable, "-m", "client.infer", "--url", url, "--bank", "line_a", "--images",
                        str(folder), "--out", str(out), "--quiet"], cwd=ROOT, check=True, capture_output=True)

    def score():
        with PAClipClient(url) as client:
            client.score(images, "line_a")

    def info():
        with PAClipClient(url) as client:
            client.bank_info("line_a")

    return {"client/infer.py --bank (whole command)": infer_command, "score (one request)": score,
            "info": info}


def timed(call, runs: int = 3) -> float:
    """Median seconds of ``runs`` calls."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def while_building(call, url: str, lock: Path) -> dict:
    """Build line_b (its lot added already) and repeat ``call`` as long as the build runs: the calls started while
    it held its build lock, timed to their end (the first one included: where a build blocks, that is the wait)."""
    # the build from another process: tritonclient's HTTP client runs on gevent, whose hub is one per thread
    t = time.perf_counter()
    builder = subprocess.Popen([sys.executable, "-c", BUILD_B, url], cwd=ROOT)
    while not lock.exists() and builder.poll() is None:
        time.sleep(0.01)  # the build has the server, not just the queue
    times = []
    while builder.poll() is None and lock.exists():
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    if builder.wait() != 0:
        raise SystemExit("the build of line_b failed: see the output above")
    if not times:
        raise SystemExit("the build of line_b ended before a call could start: give it more images (--build-images)")
    return {"median_s": float(np.median(times)), "max_s": max(times), "calls": len(times),
            "build_s": time.perf_counter() - t}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bank_isolation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--build-images", type=int, default=60, help="images of the bank built meanwhile")
    p.add_argument("--score-images", type=int, default=8, help="images each scoring call sends")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    from serve.local import LocalServer, free_ports

    repository = Path(args.repository)
    fingerprint = read_fingerprint(repository / VISION_MODEL)
    size = square_size(fingerprint)
    work = Path(tempfile.mkdtemp(prefix="pa-clip-bank-isolation-"))
    lot = np.stack([load_image(path, size)[1] for path in find_images(str(write_demo_lot(work / "lot")))])
    to_score = work / "to_score"
    to_score.mkdir()
    for path in find_images(str(work / "lot"))[: args.score_images]:
        (to_score / path.name).write_bytes(path.read_bytes())
    other = write_demo_lot(work / "other", n_images=args.build_images, n_defective=max(1, args.build_images // 20),
                           seed=11)
    other_lot = np.stack([load_image(path, size)[1] for path in find_images(str(other))])
    http, grpc, metrics = free_ports(3)
    banks = work / "banks"
    rows = []
    with LocalServer(repository, banks, http_port=http, grpc_port=grpc, metrics_port=metrics) as server:
        with PAClipClient(server.http_url) as client:
            client.add_images("line_a", "washer", lot, reset=True)
            client.build_bank("line_a")
        work_calls = calls(server.http_url, lot[: args.score_images], to_score, work / "out")
        for call in work_calls.values():  # warm-up: the bank in the scoring model's cache, imports on disk
            call()
        alone = {name: timed(call) for name, call in work_calls.items()}

        during = {}
        for name, call in work_calls.items():  # a build of line_b of its own for each call: a blocked call
            with PAClipClient(server.http_url) as client:  # waits until the build it started under ends
                client.add_images("line_b", "washer", other_lot, reset=True)
            during[name] = while_building(call, server.http_url, banks / "line_b" / ".build-lock")
    print(f"{len(lot)}-image bank line_a, {len(other_lot)}-image builds of line_b at {size[0]}x{size[1]}, encoder "
          f"{fingerprint.get('backbone')}; alone: median of 3; during: every call started while the build ran",
          file=sys.stderr)
    print("| call | alone (s) | during another bank's build: median (s) | max (s) | calls | max / alone | build (s) |")
    print("|---|---|---|---|---|---|---|")
    for name in work_calls:
        a, d = alone[name], during[name]
        rows.append({"call": name, "alone_s": a, **d, "ratio_max": d["max_s"] / a})
        print(f"| {name} | {a:.2f} | {d['median_s']:.2f} | {d['max_s']:.2f} | {d['calls']} | "
              f"x{d['max_s'] / a:.2f} | {d['build_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
