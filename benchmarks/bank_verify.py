"""What verifying a bank costs when the scoring model loads it (once per load, not per request): the load with every
check (``BankStore.load``) beside its parts, each bank of a store, measured in one run.

    python -m benchmarks.bank_verify --banks banks [--repeats 3]

Columns: the bank's bytes on disk; reading its tensors alone (safetensors, no checks); the SHA-256 of its data file;
the tensor checks (shapes, dtypes, finite values, source ids); the whole verified load; and the load's cost over the
plain read. Best of --repeats runs each (these machines are shared).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from postprocess.bank import check_tensors
from postprocess.bank_store import BankStore, _load_tensors, file_digest


def best(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bank_verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--banks", default="banks", help="the bank store (python -m serve --banks)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not Path(args.banks).is_dir():
        print(f"error: no bank store at {args.banks} (./run.sh main builds one)", file=sys.stderr)
        return 2
    store = BankStore(args.banks)
    print("| bank | MB on disk | read tensors (s) | SHA-256 (s) | tensor checks (s) | verified load (s) | load / read |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for bank_id in store.bank_ids():
        version = store.current_version(bank_id)
        data = Path(args.banks) / bank_id / version / "bank.safetensors"
        manifest = store.manifest(bank_id)
        tensors, _ = _load_tensors(data)
        read = best(args.repeats, lambda: _load_tensors(data))
        digest = best(args.repeats, lambda: file_digest(data))
        checks = best(args.repeats, lambda: check_tensors(manifest, tensors, bank_id))
        load = best(args.repeats, lambda: store.load(bank_id))
        print(f"| {bank_id} | {data.stat().st_size / 2**20:.1f} | {read:.3f} | {digest:.3f} | {checks:.3f} | "
              f"{load:.3f} | x{load / read:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
