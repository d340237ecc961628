"""Triton's own load generator, perf_analyzer, against the pa_clip ensemble: HTTP and gRPC, 1-8 requests in flight,
with and without system shared memory. Writes one CSV row per run, a PNG plot (images/s against requests in flight)
and prints the README table.

    bash benchmarks/perf_setup.sh                        # once: perf_analyzer (tritonclient 2.51) and its libraries
    python -m benchmarks.perf_analyzer --repository model_repository --out out/perf

It starts its own server on free ports (through the HTTP guard, as users reach it), builds a bank on the demo lot,
and scores one demo image per request.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / ".perf"  # where benchmarks/perf_setup.sh installs perf_analyzer


def find_perf_analyzer() -> tuple[str, dict]:
    """(binary, environment) or FileNotFoundError saying how to install it."""
    env = dict(os.environ)
    binary = shutil.which("perf_analyzer") or (str(LOCAL / "bin" / "perf_analyzer")
                                               if (LOCAL / "bin" / "perf_analyzer").is_file() else None)
    if binary is None:
        raise FileNotFoundError("perf_analyzer is not installed: run `bash benchmarks/perf_setup.sh` (tritonclient "
                                "2.51's wheel ships it; it needs libb64 and libcudart)")
    cudart = LOCAL / "nvidia" / "cuda_runtime" / "lib"
    if cudart.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(cudart), env.get("LD_LIBRARY_PATH", "")]))
    return binary, env


def input_data(image: np.ndarray, bank: str) -> dict:
    return {"data": [{"images": {"b64": base64.b64encode(np.ascontiguousarray(image).tobytes()).decode(),
                                 "shape": list(image.shape)},
                      "bank": [bank]}]}


def run_one(binary, env, url, protocol, shm, concurrency, data_file, shape, out_csv, key, interval_ms,
            stability: float) -> dict:
    command = [binary, "-m", "pa_clip", "-u", url, "-i", protocol, "--input-data", str(data_file),
               "--shape", f"images:{','.join(map(str, shape))}", "--concurrency-range", f"{concurrency}",
               "--measurement-interval", str(interval_ms), "--max-trials", "6", "--stability-percentage", str(stability),
               "-f", str(out_csv)]
    if shm:
        command += ["--shared-memory", "system"]
    if key:
        header = "pa-clip-key" if protocol == "http" else "triton-grpc-protocol-pa-clip-key"
        command += ["-H", f"{header}:{key}"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({' '.join(command[:8])} ...):\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-2000:]}")
    with open(out_csv) as f:
        row = next(csv.DictReader(f))
    return {"protocol": protocol, "shared_memory": shm, "in_flight": concurrency,
            "images_per_s": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
            "p90_ms": float(row["p90 latency"]) / 1000}


def plot(rows: list[dict], path: Path) -> None:
    """images/s against requests in flight, one line per transport (Pillow: no plotting library needed)."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 400, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = sorted({r["in_flight"] for r in rows})
    top = max(r["images_per_s"] for r in rows) * 1.1 or 1.0
    draw.line([(margin, margin // 2), (margin, height - margin), (width - margin // 2, height - margin)], "black")

    def point(x, y):
        fx = (xs.index(x) / max(1, len(xs) - 1)) if len(xs) > 1 else 0.5
        return margin + fx * (width - 1.5 * margin), height - margin - y / top * (height - 1.5 * margin)

    for x in xs:
        px, _ = point(x, 0)
        draw.text((px - 3, height - margin + 6), str(x), "black")
    draw.text((width // 2 - 50, height - 25), "requests in flight", "black")
    draw.text((6, margin // 2 - 20), f"images/s (max {top / 1.1:.1f})", "black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    series = sorted({(r["protocol"], r["shared_memory"]) for r in rows})
    for colour, (protocol, shm) in zip(colours, series):
        points = [point(r["in_flight"], r["images_per_s"]) for r in sorted(rows, key=lambda r: r["in_flight"])
                  if (r["protocol"], r["shared_memory"]) == (protocol, shm)]
        draw.line(points, colour, width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], colour)
        label = f"{protocol}{' + shm' if shm else ''}"
        draw.text((margin + 12, margin // 2 + 16 * series.index((protocol, shm))), label, colour)
    image.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf_analyzer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--out", default="out/perf")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--protocols", nargs="+", default=["http", "grpc"], choices=["http", "grpc"])
    p.add_argument("--shared-memory", choices=["both", "no", "yes"], default="both")
    p.add_argument("--interval-ms", type=int, default=3000, help="perf_analyzer's measurement window")
    p.add_argument("--stability", type=float, default=30.0,
                   help="percent by which consecutive windows may differ (perf_analyzer's --stability-percentage)")
    args = p.parse_args(argv)

    from client.demo_lot import write_demo_lot
    from client.infer import find_images, load_image
    from client.triton_client import PAClipClient
    from postprocess.contract import ACCESS_KEY_ENV, VISION_MODEL, read_fingerprint, square_size
    from serve.local import LocalServer, free_ports

    try:
        binary, env = find_perf_analyzer()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    repository = Path(args.repository)
    fingerprint = read_fingerprint(repository / VISION_MODEL)
    size = square_size(fingerprint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pa-clip-perf-"))
    images = np.stack([load_image(path, size)[1] for path in find_images(str(write_demo_lot(work / "lot", 8, 1)))])
    data_file = work / "input.json"
    data_file.write_text(json.dumps(input_data(images[0], "perf")))
    key = os.environ.get(ACCESS_KEY_ENV, "")
    shm_choices = {"both": [False, True], "no": [False], "yes": [True]}[args.shared_memory]
    rows = []
    http, grpc, metrics = free_ports(3)
    with LocalServer(repository, work / "banks", http_port=http, grpc_port=grpc, metrics_port=metrics,
                     key=key or None) as server:
        client = PAClipClient(server.http_url)
        client.add_images("perf", "washer", images, reset=True)
        client.build_bank("perf", {"mode": "pad_mpam"})
        client.close()
        for protocol in args.protocols:
            url = server.http_url if protocol == "http" else server.grpc_url
            for shm in shm_choices:
                for concurrency in args.concurrency:
                    print(f"perf_analyzer {protocol}{' + shm' if shm else ''}, {concurrency} in flight ...",
                          file=sys.stderr, flush=True)
                    rows.append(run_one(binary, env, url, protocol, shm, concurrency, data_file, images.shape[1:],
                                        work / "run.csv", key, args.interval_ms, args.stability))
    with open(out / "perf_analyzer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "perf_analyzer.png")
    encoder = read_fingerprint(repository / VISION_MODEL)
    print(f"\nperf_analyzer, pa_clip ensemble, {encoder['backbone']} at {size[0]}x{size[1]}, one image per request")
    print("| protocol | transport | in flight | images/s | latency p50 (ms) | p90 (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['protocol']} | {'shared memory' if r['shared_memory'] else 'network'} | {r['in_flight']} | "
              f"{r['images_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} |")
    print(f"\nwrote {out / 'perf_analyzer.csv'} and {out / 'perf_analyzer.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
