"""python -m client.banks: look after the banks a server keeps.

  python -m client.banks list              every bank: category, lot size, image size, bytes on disk, build date,
                                           encoder; the pending lots; the store's size
  python -m client.banks info BANK         one bank in full (its versions on disk, its decision calibration, what
                                           scoring saw lately: score quantiles, out-of-distribution rate, drift)
  python -m client.banks delete BANK       delete one (asks first at a terminal; --yes does not, and is needed
                                           without one)
  python -m client.banks prune             remove old versions and what failed builds left behind
  python -m client.banks verify [BANK]     check every bank (or one) against its manifest: file digests, tensor
                                           shapes, dtypes and values; exit code 1 when one is damaged
  python -m client.banks update BANK --images DIR
                                           grow a bank with new parts without building it anew: those that look
                                           like its lot's good parts are folded in (a new version), the rest left
                                           out and listed; the decision's calibration is read again

A commit keeps the live version of a bank and the one before it (a replica may still be loading it); `prune` removes
every version but the live one once it is over 10 minutes old. `python -m serve --max-store-gb N` refuses adds and
builds that would take the store past N GB.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from client import exits
from client.triton_client import ClientError, PAClipClient
from postprocess import flags as F
from postprocess.bank import BankError
from postprocess.bank_store import check_bank_id as store_check_bank_id
from postprocess.drift import MIN_IMAGES


def megabytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MB"


def build_parser(prog: str = "python -m client.banks") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=exits.HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="server address (default 127.0.0.1:8000 for http, :8001 for grpc)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--key", default=None, help="the server's access key (default: $PA_CLIP_KEY)")
    p.add_argument("--json", action="store_true", help="print what the server answered, as JSON")
    p.add_argument("--timeout", type=F.SECONDS, default=None,
                   help="seconds to wait for the server's answer (default: 60; update, which builds: 3600)")
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every bank and the store's size")
    commands.add_parser("info", help="one bank in full").add_argument("bank")
    delete = commands.add_parser("delete", help="delete one bank")
    delete.add_argument("bank")
    delete.add_argument("--yes", action="store_true", help="do not ask (needed where there is no terminal to ask at)")
    commands.add_parser("prune", help="remove old versions and what failed builds left")
    commands.add_parser("verify", help="check banks against their manifests (all, or one)").add_argument(
        "bank", nargs="?", default="")
    update = commands.add_parser("update", help="fold new good parts into a bank (a new version)")
    update.add_argument("bank")
    update.add_argument("--images", required=True, help="a folder, a file or a glob of the new parts")
    update.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def update_paths(spec: str) -> list:
    """The new parts ``update`` sends: the images at ``spec`` but a scoring run's own heat maps (checked before the
    server is asked anything: a mistyped folder is a usage error, not a reason to retry)."""
    from client.infer import UsageError, no_images_message, part_images

    paths = part_images(spec)
    if not paths:
        raise UsageError(no_images_message(spec))
    return paths


def update(client: PAClipClient, args, paths: list) -> dict:
    """Send the new parts at the bank's size as its pending lot (started afresh), then grow the bank with them."""
    from client.infer import UsageError, load_images, path_text

    info = client.bank_info(args.bank)
    loaded, skipped = load_images(paths, tuple(info["image_size"]), not args.quiet)
    if not loaded:
        raise UsageError(f"none of the {len(paths)} images at {args.images!r} could be read")
    images = [item[2] for item in loaded]
    # this update's own lot: the report's indices are these images, no other client's; given back if it fails
    with client.lot_session(args.bank) as lot:
        for start in range(0, len(images), 8):
            client.add_images(args.bank, info["category"], np.stack(images[start:start + 8]), reset=start == 0,
                              lot=lot)
        answer = client.update_bank(args.bank, on_wait=lambda m: print(f"waiting: {m}", file=sys.stderr), lot=lot)
    answer["update"]["paths"] = [path_text(item[0]) for item in loaded]
    answer["update"]["skipped"] = skipped
    answer["update"]["threshold_before"] = (info.get("decision") or {}).get("threshold")
    return answer


def print_update(answer: dict) -> None:
    report = answer["update"]
    paths = report.pop("paths", [])
    written = report.get("written", report["folded_in"])
    print(f"{report['scored']} image(s) scored against bank {answer['bank']!r}: {report['folded_in']} folded in, "
          f"{len(report['left_out'])} left out, {report['already_in_lot']} already in its lot"
          + (f", {report['already_counted']} counted before (left out earlier, or sent twice)"
             if report.get("already_counted") else "")
          + f"; lot now {answer['n_images']} images" + (f", version {answer['version']}" if written else
                                                        " (nothing written)"))
    for item in report["left_out"]:
        name = paths[item["index"]] if item["index"] < len(paths) else f"#{item['index']}"
        score = "-" if item.get("score") is None else f"{item['score']:.4g}"  # no score: written null
        print(f"  left out: {name}: {item['why']} (score {score})")
    for item in report.get("skipped", []):
        print(f"  skipped: {item['path']}: {item['error']}")
    if answer.get("decision"):
        d = answer["decision"]
        before = report.get("threshold_before")
        print(f"threshold now {d['threshold']:.4g}" + ("" if before is None else f" (was {before:.4g})")
              + f" ({d['method']}, {d['false_alarm_rate']:.1%} budget)")
        above = [item for item in report["left_out"] if before is not None and item.get("score") is not None
                 and item["score"] > before and not item["why"].startswith("out of distribution")]
        if above and d["threshold"] > before:  # every part's score joins the calibration, a reject's too
            print(f"note: {len(above)} of these parts scored above the threshold before the update; their scores "
                  "joined the calibration, as every part's does, and lifted the threshold. Send an update a line's "
                  "parts as they came (defects at the line's rate), not its rejects.")


def print_verified(answer: dict) -> None:
    if not answer["banks"]:
        print("no banks in the store: nothing to verify")
    for bank in answer["banks"]:
        if bank["ok"]:
            print(f"{bank['bank']:<24} ok: {bank['verified']} ({bank['version']}, {bank['seconds']:.2f} s)")
        else:
            print(f"{bank['bank']:<24} DAMAGED: {bank['error']}")


def print_list(store: dict) -> None:
    banks = store["banks"]
    limit = store.get("store_limit_bytes")
    print(f"{len(banks)} bank(s), {megabytes(store['store_bytes'])} in the store"
          + (f" (limit {megabytes(limit)})" if limit else ""))
    if banks:
        print(f"{'bank':<24} {'category':<16} {'lot':>5} {'image size':>10} {'on disk':>10}  {'built':<25} encoder")
    for bank in banks:
        if "error" in bank:
            print(f"{bank['bank']:<24} cannot be read: {bank['error']}")
            continue
        size = "x".join(str(v) for v in bank.get("image_size", []))
        print(f"{bank['bank']:<24} {str(bank.get('category', '')):<16} {bank.get('n_images', ''):>5} {size:>10} "
              f"{megabytes(bank.get('bytes_on_disk')):>10}  {bank.get('built_at', ''):<25} "
              f"{bank.get('encoder', {}).get('backbone', '?')}")
    for lot in store.get("pending", []):
        whose = f" (a client run's, session {lot['lot']})" if lot.get("lot") else ""
        if "error" in lot:
            print(f"pending lot of {lot['bank']!r}{whose} cannot be read: {lot['error']}")
            continue
        print(f"pending lot of {lot['bank']!r}{whose}: {lot['images']} image(s) added, not built; expires in "
              f"{lot['expires_in_s'] // 3600} h")


def print_info(info: dict) -> None:
    for key in ("bank", "category", "version", "built_at", "n_images", "image_size", "normal_selection"):
        if key in info:
            print(f"{key:<17} {info[key]}")
    print(f"{'encoder':<17} {info.get('encoder', {}).get('backbone', '?')} "
          f"({info.get('encoder', {}).get('weights', '?')})")
    print(f"{'on disk':<17} {megabytes(info.get('bytes_on_disk'))} (live version); "
          f"{megabytes(info.get('bytes_in_memory'))} once loaded for scoring")
    if info.get("decision"):
        d = info["decision"]
        print(f"{'threshold':<17} {d['threshold']:.4g} ({d['method']}, false-alarm budget {d['false_alarm_rate']:.1%})")
        if d.get("confidence"):
            print(f"{'':<17} {d['confidence']['text']}")
    for version in info.get("versions", []):
        print(f"  {version['version']}  {megabytes(version['bytes'])}" + ("  (live)" if version["live"] else ""))
    if info.get("ood"):
        print(f"{'out of dist.':<17} an image outside the lot's range of {', '.join(info['ood']['statistics'])} "
              "is decided out_of_distribution")
    for monitor in info.get("monitors", []):
        quantiles = ", ".join(f"q{float(q):g} {v:.4g}" for q, v in monitor.get("score_quantiles", {}).items())
        if monitor.get("alarm"):
            state = "ALARM: the latest parts are unlike the lot"
        elif monitor["window"] < MIN_IMAGES:  # no alarm can be raised yet: "steady" said more than is known
            state = f"too few for an alarm yet ({monitor['window']} of {MIN_IMAGES})"
        else:
            state = "steady"
        print(f"{'scored lately':<17} {monitor['window']} new images (of {monitor['seen']}) by {monitor['process']}: "
              f"scores {quantiles or '-'}; out of distribution {monitor['ood_rate']:.1%}; drift "
              f"{monitor['drift']:.2f} (p {monitor['drift_p']:.2g}) against the lot's {monitor.get('statistic', '')}: "
              f"{state}")


def check_bank_id(bank_id: str) -> None:
    """Refuse a bank id the server would refuse, before asking it (bad usage, not a refusal), with the id that
    ``score --category`` makes of the same name: a category "ball screw" is scored against bank ``ball_screw``."""
    from client.infer import UsageError, safe_bank_id

    try:
        store_check_bank_id(bank_id)  # the store's own rule and words
    except BankError as err:
        made = safe_bank_id(bank_id, fallback=None)
        raise UsageError(f"{err}" + (f"; did you mean {made}?" if made else "")) from None


def print_pruned(answer: dict) -> None:
    print(f"removed {len(answer['removed'])} item(s), freed {megabytes(answer['freed_bytes'])}"
          + "".join(f"\n  {item}" for item in answer["removed"]))
    if kept := answer.get("kept_recent"):  # a replica may still be loading them (an older server does not say)
        print(f"kept {len(kept)} version(s) written less than {answer['kept_after_s'] / 60:g} minutes ago: "
              "prune again once they are older" + "".join(f"\n  {item}" for item in kept))


def main(argv=None, prog: str = "python -m client.banks") -> int:
    from client.infer import UsageError

    args = build_parser(prog).parse_args(argv)
    try:
        if getattr(args, "bank", ""):
            check_bank_id(args.bank)
        if args.command == "delete" and not args.yes and (sys.stdin is None or not sys.stdin.isatty()):
            raise UsageError("delete asks before it deletes, and there is no terminal to ask at: pass --yes")
        paths = update_paths(args.images) if args.command == "update" else None
        timeout = args.timeout if args.timeout is not None else (3600.0 if args.command == "update" else 60.0)
        with PAClipClient(args.url, args.protocol, timeout, key=args.key) as client:  # closed on every path
            client.check_ready()
            if args.command == "list":
                answer = client.store()
                show = print_list
            elif args.command == "info":
                answer = client.bank_info(args.bank)
                show = print_info
            elif args.command == "delete":
                if not args.yes:
                    print(f"delete bank {args.bank!r} from {client.url}? [y/N] ", end="", file=sys.stderr, flush=True)
                    reply = sys.stdin.readline().strip().lower()  # "" at the end of input: no
                    if reply not in ("y", "yes"):
                        print("nothing deleted", file=sys.stderr)
                        return exits.USAGE  # nothing was sent
                answer = client.delete_bank(args.bank)
                show = lambda a: print(f"deleted bank {a['deleted']!r}")  # noqa: E731
            elif args.command == "verify":
                answer = client.bank_action("verify", args.bank)
                show = print_verified
            elif args.command == "update":
                answer = update(client, args, paths)
                show = print_update
            else:
                answer = client.prune_banks()
                show = print_pruned
    except (ClientError, ValueError) as err:  # ValueError: the command's inputs (UsageError)
        print(f"error: {err}", file=sys.stderr)
        return exits.for_error(err)
    print(json.dumps(answer, indent=1)) if args.json else show(answer)
    if args.command == "verify" and not all(bank["ok"] for bank in answer["banks"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
