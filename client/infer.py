"""Score a lot of images with PA-CLIP on a Triton server: an anomaly score and a heat map per image.

  python client/infer.py --category bottle --images 'photos/*.png' --build --out results/

--build first sends the images to the server as a lot and builds the bank (zero-shot: no labels, no reference
images; the lot itself is the reference). Without --build the images are scored against an existing bank, e.g. the
next lot of the same product, or single images online.

Writes OUT/results.csv (path,score[,decision]), OUT/results.json (everything, plus the bank's summary) and
OUT/overlays/*.png (image | heat map; blue = like the lot, red = anomalous, on the bank's colour scale).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm.auto import tqdm

from client.heatmap import save_panel
from client.images import IMAGE_SUFFIXES, image_size_of, model_input, read_rgb
from client.triton_client import ClientError, PAClipClient
from postprocess import contract as C
from postprocess.atomic import write_atomic
from postprocess.errors import RequestError

def find_images(spec: str) -> list[Path]:
    """A folder (searched recursively) or a glob pattern -> sorted image files."""
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        found = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def load_image(path: Path, size) -> tuple[np.ndarray, np.ndarray]:
    """(original RGB, resized to size = (height, width)) uint8; ValueError naming the file when it cannot be read."""
    rgb = read_rgb(path)
    return np.asarray(rgb), model_input(rgb, size)


def lot_size(encoder: dict, paths: list[Path], aspect: str, image_size: list[int] | None) -> tuple[int, int]:
    """The (height, width) a new lot is sent at (``contract.choose_input_size``): --image-size HEIGHT WIDTH, else
    the encoder's one size when it was exported for one, else the long side (--image-size SIZE or the encoder's)
    with the lot's median aspect ratio, or a square."""
    pair, long = C.size_argument(image_size)
    sizes = [s for s in map(image_size_of, paths) if s] if pair is None else []
    return C.choose_input_size(encoder, sizes, aspect, pair, long)


def load_images(paths: list[Path], size, progress: bool) -> tuple[list, list]:
    loaded, skipped = [], []
    for path in tqdm(paths, desc="read images", unit="img", disable=not progress, leave=False):
        try:
            loaded.append((path, *load_image(path, size)))
        except ValueError as err:
            warnings.warn(f"skipping: {err}", stacklevel=2)
            skipped.append({"path": str(path), "error": str(err)})
    return loaded, skipped


def relative_name(path: Path, root: Path | None) -> str:
    try:
        return str(path.resolve().relative_to(root)) if root else path.name
    except ValueError:
        return path.name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="client/infer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder (searched recursively) or glob pattern of images")
    p.add_argument("--category", default=None,
                   help="product name used in the text prompts, e.g. 'bottle' (needed with --build)")
    p.add_argument("--bank", default=None, help="bank id (default: the category, spaces as underscores)")
    p.add_argument("--build", action="store_true", help="build the bank from these images first (replaces it)")
    p.add_argument("--mode", default="pad_mpam", help="PA-CLIP variant for --build: pad_mpam (full, default), "
                   "pad_pam, pad, mutual, baseline")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a PA-CLIP setting for --build, e.g. --set alpha=0.3 (JSON values)")
    p.add_argument("--image-size", type=int, nargs="+", default=None, metavar="SIZE",
                   help="with --build: the long side the lot is resized to (default: the encoder's), or HEIGHT "
                   "WIDTH. Without --build images are resized to the size the bank was built at")
    p.add_argument("--aspect", choices=C.ASPECTS, default=C.DEFAULT_ASPECT,
                   help="with --build: keep the lot's median aspect ratio (native) or stretch to a square")
    p.add_argument("--out", default="out/infer", help="output folder")
    p.add_argument("--threshold", type=float, default=None,
                   help="images scoring above this are marked 'anomalous' in results.csv")
    p.add_argument("--url", default=None, help="server address (default 127.0.0.1:8000 for http, :8001 for grpc)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--key", default=None, help="the server's access key (default: $PA_CLIP_KEY; needed when the "
                   "server was started off loopback)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--batch-size", type=int, default=1, help="images per scoring request")
    p.add_argument("--shared-memory", action="store_true",
                   help="send pixels and receive maps through system shared memory (client on the server's host)")
    p.add_argument("--no-overlays", action="store_true", help="write scores only")
    p.add_argument("--save-maps", action="store_true", help="also write each map as float16 .npy")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for one request (builds are long)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_overrides(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def build(client: PAClipClient, bank: str, category: str, images: np.ndarray, options: dict, chunk: int,
          progress: bool) -> dict:
    bar = tqdm(total=len(images), desc=f"add lot to bank {bank}", unit="img", disable=not progress, leave=False)
    for start in range(0, len(images), chunk):
        client.add_images(bank, category, images[start:start + chunk], reset=start == 0)
        bar.update(min(chunk, len(images) - start))
    bar.close()
    print(f"building bank {bank!r} from {len(images)} images (the server encodes augmentations and builds "
          "the memory banks; this is the slow part) ...", file=sys.stderr, flush=True)
    return client.build_bank(bank, options)


def score_all(args, loaded: list, bank: str, value_range: tuple[float, float], out: Path, root: Path | None,
              progress: bool) -> tuple[list, list]:
    """Score in batches with ``args.concurrency`` requests in flight; overlays are written as results arrive."""
    local = threading.local()
    clients = []
    lock = threading.Lock()

    def client() -> PAClipClient:
        if not hasattr(local, "client"):
            local.client = PAClipClient(args.url, args.protocol, args.timeout, args.shared_memory, args.key)
            with lock:
                clients.append(local.client)
        return local.client

    def work(batch):
        images = np.stack([item[2] for item in batch])
        maps, scores = client().score(images, bank)
        rows = []
        for (path, original, _), amap, score in zip(batch, maps, scores):
            name = relative_name(path, root)
            row = {"path": str(path), "score": float(score)}
            if not args.no_overlays:
                target = out / "overlays" / Path(name).with_suffix(".png")
                save_panel(target, original, amap, *value_range)
                row["overlay"] = str(target)
            if args.save_maps:
                target = out / "maps" / Path(name).with_suffix(".npy")
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target, amap.astype(np.float16))
            rows.append(row)
        return rows

    batches = [loaded[i:i + args.batch_size] for i in range(0, len(loaded), args.batch_size)]
    results, failed = [], []
    bar = tqdm(total=len(loaded), desc=f"score against {bank}", unit="img", disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
            futures = {pool.submit(work, batch): batch for batch in batches}
            for future in as_completed(futures):
                try:
                    results.extend(future.result())
                except ClientError as err:
                    for path, _, _ in futures[future]:
                        failed.append({"path": str(path), "error": str(err)})
                    warnings.warn(f"request failed: {err}", stacklevel=2)
                bar.update(len(futures[future]))
    finally:
        bar.close()
        for c in clients:
            c.close()
    order = {str(item[0]): i for i, item in enumerate(loaded)}
    results.sort(key=lambda row: order[row["path"]])
    return results, failed


def decision(score: float, threshold: float) -> str:
    """Above the threshold is anomalous; a score that is not a number is never called normal."""
    if not np.isfinite(score):
        return "invalid"
    return "anomalous" if score > threshold else "normal"


def write_results(out: Path, rows: list, threshold: float | None) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "score"] + (["decision"] if threshold is not None else []) + ["overlay"])
            for row in rows:
                verdict = [] if threshold is None else [decision(row["score"], threshold)]
                writer.writerow([row["path"], f"{row['score']:.6f}"] + verdict + [row.get("overlay", "")])

    return write_atomic(out / "results.csv", write)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.quiet
    out = Path(args.out)
    bank = args.bank or (args.category or "").strip().replace(" ", "_")
    if not bank:
        print("error: give --bank (or --category, which names the bank by default)", file=sys.stderr)
        return 2
    if args.build and not args.category:
        print("error: --build needs --category (the product name the text prompts use)", file=sys.stderr)
        return 2
    try:
        options = {"mode": args.mode, **parse_overrides(args.set)} if args.build else {}
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = find_images(args.images)
    if not paths:
        print(f"error: no images found at {args.images!r} (a folder or a glob like 'photos/*.png')", file=sys.stderr)
        return 2
    root = Path(args.images).resolve() if Path(args.images).is_dir() else None
    try:
        client = PAClipClient(args.url, args.protocol, args.timeout, key=args.key)
        client.check_ready()
        encoder = client.encoder()
        if args.build:
            size = lot_size(encoder["encoder"], paths, args.aspect, args.image_size)
        else:  # the bank was built at one size: its images' size, which is also its maps' size
            size = tuple(client.bank_info(bank)["image_size"])
            if args.image_size is not None:
                print(f"note: --image-size applies to --build; bank {bank!r} scores {size[0]}x{size[1]} images",
                      file=sys.stderr)
        print(f"server {client.url} ({args.protocol}): encoder {encoder['encoder']['backbone']}, images sent at "
              f"{size[0]}x{size[1]} (height x width)"
              + ("" if encoder["has_text"] else " (no text encoder: normal images are chosen visually)"),
              file=sys.stderr)
        loaded, skipped = load_images(paths, size, progress)
        if skipped:
            print(f"skipped {len(skipped)} unreadable image(s): " + ", ".join(s["path"] for s in skipped),
                  file=sys.stderr)
        if not loaded:
            print("error: none of the images could be read", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        if args.build:
            built = build(client, bank, args.category, np.stack([item[2] for item in loaded]), options, 8, progress)
            print(f"bank {bank!r} built in {time.perf_counter() - t0:.1f} s: {built['n_images']} images, normal "
                  f"images chosen by {built['normal_selection']} ({len(built['normal_indices'])}), "
                  f"mode {options['mode']}", file=sys.stderr)
        info = client.bank_info(bank)
        client.close()
        print(f"bank {bank!r}: {info['n_images']} lot images, {info['bytes_on_disk'] / 2**20:.1f} MB on disk, "
              f"{info['bytes_in_memory'] / 2**20:.1f} MB once loaded for scoring", file=sys.stderr)
    except (ClientError, RequestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    rows, failed = score_all(args, loaded, bank, tuple(info["map_range"]), out, root, progress)
    elapsed = time.perf_counter() - t1
    csv_path = write_results(out, rows, args.threshold)
    report = {
        "bank": summary_of(info), "threshold": args.threshold, "protocol": args.protocol,
        "scored": len(rows), "skipped": skipped, "failed": failed,
        "seconds": round(elapsed, 3), "images_per_second": round(len(rows) / elapsed, 3) if elapsed > 0 else None,
        "images": rows,
    }
    write_atomic(out / "results.json", json.dumps(report, indent=1))
    line = f"scored {len(rows)} images in {elapsed:.1f} s ({report['images_per_second']} img/s)"
    if args.threshold is not None:
        line += f"; {sum(decision(r['score'], args.threshold) == 'anomalous' for r in rows)} above {args.threshold}"
    print(f"{line}. Wrote {csv_path}" + ("" if args.no_overlays else f" and {out / 'overlays'}/"), file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} image(s) failed: {failed[0]['error']}", file=sys.stderr)
        return 1
    return 0


def summary_of(info: dict) -> dict:
    keep = ("bank", "category", "version", "built_at", "n_images", "normal_selection", "normal_indices", "encoder",
            "map_range", "lot_scores", "cada", "bytes_on_disk", "bytes_in_memory", "image_size")
    return {k: info[k] for k in keep if k in info}


if __name__ == "__main__":
    sys.exit(main())
