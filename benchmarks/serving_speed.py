"""Request latency and images/s through a real Triton server (the pa_clip ensemble), next to the same work done
in one process without a server, on the same images in the same run.

  python -m benchmarks.serving_speed --repository model_repository [--images DIR] [--concurrency 1 4]

Starts a local server on free ports (or uses --url), builds a bank on the lot, then scores every lot image once per
row, one image per request, with N requests in flight. Prints a table: protocol, transport, in flight, latency
p50 / p90 per request, images/s, and images/s relative to the in-process row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from client.demo_lot import write_demo_lot
from client.infer import find_images, load_image
from client.triton_client import PAClipClient
from postprocess.contract import VISION_MODEL, read_fingerprint, square_size



def timed_run(url: str, protocol: str, shm: bool, concurrency: int, images: np.ndarray, bank: str) -> dict:
    local = threading.local()
    clients = []

    def score(i):
        if not hasattr(local, "client"):
            local.client = PAClipClient(url, protocol, shared_memory=shm)
            clients.append(local.client)
        t = time.perf_counter()
        local.client.score(images[i:i + 1], bank)
        return time.perf_counter() - t

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(score, range(min(len(images), 2 * concurrency))))  # warm-up: connections, shm, caches
        start = time.perf_counter()
        latencies = list(pool.map(score, range(len(images))))
        wall = time.perf_counter() - start
    for c in clients:
        c.close()
    return {"protocol": protocol, "transport": "shared memory" if shm else "network", "in_flight": concurrency,
            "p50_ms": 1000 * float(np.median(latencies)), "p90_ms": 1000 * float(np.quantile(latencies, 0.9)),
            "images_per_s": len(images) / wall}


def in_process(repository: Path, images: np.ndarray, bank_dir: Path, bank: str) -> dict:
    """The same per-image work without a server: ONNX Runtime encode + scoring against the stored bank."""
    from export.backbones import OnnxBackbone
    from postprocess.bank import image_key, score_with_bank
    from postprocess.bank_store import BankStore

    backbone = OnnxBackbone.from_repository(repository)
    stored = BankStore(bank_dir).load(bank, backbone.fingerprint)
    latencies = []
    for i in range(len(images) + 2):
        j = i % len(images)
        t = time.perf_counter()
        features = backbone.encode(images[j:j + 1])
        score_with_bank(stored, features, stored.query_ids([image_key(images[j])]))
        if i >= 2:
            latencies.append(time.perf_counter() - t)
    return {"protocol": "-", "transport": "in-process (no server)", "in_flight": 1,
            "p50_ms": 1000 * float(np.median(latencies)), "p90_ms": 1000 * float(np.quantile(latencies, 0.9)),
            "images_per_s": len(latencies) / sum(latencies)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--images", default=None, help="lot to build and score (default: the demo lot)")
    p.add_argument("--category", default="washer")
    p.add_argument("--limit", type=int, default=None, help="use the first N images")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    from serve.local import LocalServer, free_ports

    repository = Path(args.repository)
    fingerprint = read_fingerprint(repository / VISION_MODEL)
    size = square_size(fingerprint)
    work = Path(tempfile.mkdtemp(prefix="pa-clip-serving-speed-"))
    folder = Path(args.images) if args.images else write_demo_lot(work / "lot")
    paths = find_images(str(folder))[: args.limit]
    images = np.stack([load_image(path, size)[1] for path in paths])
    http, grpc, metrics = free_ports(3)
    banks = work / "banks"
    rows = []
    with LocalServer(repository, banks, http_port=http, grpc_port=grpc, metrics_port=metrics) as server:
        client = PAClipClient(server.http_url)
        t = time.perf_counter()
        client.add_images("speed", args.category, images, reset=True)
        added = time.perf_counter() - t
        built = client.build_bank("speed")
        build_s = time.perf_counter() - t - added
        client.close()
        print(f"{len(images)} images at {size[0]}x{size[1]}, encoder {built['encoder']['backbone']}: add (encode) "
              f"{added:.1f} s, build {build_s:.1f} s", file=sys.stderr)
        for concurrency in args.concurrency:
            rows.append(timed_run(server.http_url, "http", False, concurrency, images, "speed"))
            rows.append(timed_run(server.grpc_url, "grpc", False, concurrency, images, "speed"))
            rows.append(timed_run(server.http_url, "http", True, concurrency, images, "speed"))
    rows.append(in_process(repository, images, banks, "speed"))
    base = rows[-1]["images_per_s"]
    print("| protocol | transport | in flight | latency p50 (ms) | p90 (ms) | images/s | vs in-process |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['protocol']} | {r['transport']} | {r['in_flight']} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | "
              f"{r['images_per_s']:.2f} | x{r['images_per_s'] / base:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": len(images), "image_size": size, "add_s": added,
                                               "build_s": build_s, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
