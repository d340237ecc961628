"""pa-clip: zero-shot defect detection (PA-CLIP) on Triton, one command with subcommands.

  pa-clip main      the whole job on this machine: export, start a local server, build a bank on a lot, score it
  pa-clip export    export the encoder (ONNX, TensorRT) into a model repository
  pa-clip serve     run the local Triton server behind its guards (127.0.0.1 unless told otherwise)
  pa-clip score     score images against a bank on a server (--build builds it from them first)
  pa-clip banks     list, inspect, verify, update, delete and prune the banks a server keeps
  pa-clip evaluate  accuracy on a labelled data set (MVTec or VisA layout)

`pa-clip COMMAND --help` explains each one. The module forms are the same commands: client/infer.py is `score`,
python -m client.banks `banks`, python -m serve `serve`, python -m export `export`, python -m benchmarks.evaluate
`evaluate`, ./run.sh main `main`.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = ("main", "export", "serve", "score", "banks", "evaluate")


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("pa-clip-triton")
    except PackageNotFoundError:
        return "unknown (not installed)"


def run(command: str, argv: list[str]) -> int:
    """The subcommand's own command line, its program name ``pa-clip COMMAND``; imported only when asked for, so
    that a client-only install runs ``score`` and ``banks`` without the server's or the encoders' packages."""
    prog = f"pa-clip {command}"
    if command == "score":
        from client import infer

        return infer.main(argv, prog)
    if command == "banks":
        from client import banks

        return banks.main(argv, prog)
    if command == "serve":
        from serve import __main__ as serve

        return serve.main(argv, prog)
    if command == "export":
        from export import __main__ as export

        return export.main(argv, prog)
    if command == "evaluate":
        from benchmarks import evaluate

        return evaluate.main(argv, prog)
    from serve import main_job

    return main_job.main(argv, prog)


def main(argv=None) -> int:
    from client import exits

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="pa-clip", description=__doc__, epilog=exits.HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pa-clip {version()}")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help=", ".join(COMMANDS))
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's own (pa-clip COMMAND --help)")
    if not argv:
        parser.print_help(sys.stderr)
        return exits.USAGE
    if argv[0] not in COMMANDS and argv[0].startswith("-"):  # --help, --version, or a misplaced option
        parser.parse_args(argv[:1])
    args = parser.parse_args(argv[:1])
    try:
        return int(run(args.command, argv[1:]) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
