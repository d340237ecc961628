"""What the exit status of a client command means: one meaning per number, the same in every command.

Scripts on a line branch on these: ``pa-clip score ... --fail-on anomalous`` exits 1 when a part was called
anomalous, 3 when the server could not be reached (retry later), 4 when it refused the request (fix the request).
"""

from __future__ import annotations

from client.triton_client import ServerRefused, ServerUnreachable

OK = 0  # done
FLAGGED = 1  # some images failed, or (--fail-on) were decided as asked for
USAGE = 2  # the command line or its inputs: nothing was sent, or nothing could be
UNREACHABLE = 3  # no server answered at the address
REFUSED = 4  # the server answered with an error

HELP = ("exit status: 0 done; 1 some images failed (or, with --fail-on, were decided so or could not be decided; "
        "banks verify: a bank is damaged; serve: it gave up after --max-restarts); "
        "2 bad usage or inputs; "
        "3 the server could not be reached; 4 the server refused the request")


def usage_error(message: str) -> SystemExit:
    """The ``SystemExit`` of bad usage or inputs: ``message`` on stderr, status 2 (``raise SystemExit("...")`` would
    exit 1, which scripts read as images that failed)."""
    import sys

    print(message, file=sys.stderr)
    return SystemExit(USAGE)


def for_error(err: BaseException) -> int:
    """The status of a command that stopped on ``err``."""
    if isinstance(err, ServerUnreachable):
        return UNREACHABLE
    if isinstance(err, ServerRefused):
        return REFUSED
    return USAGE
