"""Accuracy parity through the server: a bank built and every image scored through Triton (``pa_clip`` ensemble)
against the in-process pipeline on the same exported encoder, on a labelled data set.

  python -m benchmarks.serving_parity --repository model_repository --data ../shared/data/magnetic_tile

Prints, per category: images, max map and score differences, and the metrics both ways with their deltas.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.datasets import discover, load_category
from benchmarks.metrics import lot_metrics


def served(repository: Path, banks: Path, images: np.ndarray, category: str, batch: int = 4):
    from client.infer import build
    from client.triton_client import PAClipClient
    from serve.local import LocalServer, free_ports

    http, grpc, metrics = free_ports(3)
    bank = category.replace(" ", "_")
    with LocalServer(repository, banks, http_port=http, grpc_port=grpc, metrics_port=metrics) as server:
        client = PAClipClient(server.grpc_url, "grpc")
        start = time.perf_counter()
        build(client, bank, category, images, {}, chunk=8, progress=False)
        built = time.perf_counter() - start
        start = time.perf_counter()
        parts = [client.score(images[i:i + batch], bank) for i in range(0, len(images), batch)]
        scored = time.perf_counter() - start
        client.close()
    return np.concatenate([m for m, _ in parts]), np.concatenate([s for _, s in parts]), built, scored


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving_parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--data", required=True)
    p.add_argument("--dataset", choices=["mvtec", "visa", "folder"], default="mvtec")
    args = p.parse_args(argv)

    from export.backbones import OnnxBackbone
    from postprocess.config import PAClipConfig
    from postprocess.pipeline import LotScorer

    repository = Path(args.repository)
    backbone = OnnxBackbone.from_repository(repository)
    work = Path(tempfile.mkdtemp(prefix="pa-clip-serving-parity-"))
    print("| category | images | max map diff | max score diff | metric | in-process | served | delta |")
    print("|---|---|---|---|---|---|---|---|")
    for category in discover(args.data, args.dataset):
        loaded = load_category(category, backbone.image_size)
        name = category.name.replace("_", " ")
        maps, scores, built, scored = served(repository, work / "banks", loaded.images, name)
        expected = LotScorer(backbone, loaded.images, name, progress=False).score(PAClipConfig())
        ours = lot_metrics(loaded.labels, loaded.masks, scores, maps)
        theirs = lot_metrics(loaded.labels, loaded.masks, expected.scores, expected.maps)
        head = (f"| {category.name} | {len(loaded.images)} | {np.abs(maps - expected.maps).max():.2e} | "
                f"{np.abs(scores - expected.scores).max():.2e} |")
        for i, key in enumerate(ours):
            lead = head if i == 0 else "| | | | |"
            print(f"{lead} {key} | {theirs[key]:.4f} | {ours[key]:.4f} | {ours[key] - theirs[key]:+.4f} |")
        print(f"{category.name}: add+build {built:.1f} s, scoring {scored:.1f} s through the server", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
