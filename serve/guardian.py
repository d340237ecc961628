"""Keeps a tritonserver and everything it spawns (the Python-backend stubs) tied to the process that started it.

    python -m serve.guardian OWNER_PID -- tritonserver ARGS...

Runs as the leader of its own process group, with tritonserver (and through it the stubs) in the same group. When the
owner dies, even by SIGKILL, the guardian kills the whole group: nothing outlives ``python -m serve``. When
tritonserver exits, the guardian kills what is left of the group (stubs re-parented to init would otherwise keep
running) and exits with the server's status. SIGTERM / SIGINT are passed on to tritonserver for a clean stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from postprocess.atomic import pid_alive


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m serve.guardian OWNER_PID -- COMMAND...", file=sys.stderr)
        return 2
    owner = int(argv[0])
    server = subprocess.Popen(argv[2:])
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: server.send_signal(signum))
    while server.poll() is None:
        if not pid_alive(owner) or os.getppid() != owner:  # the owner is gone: take everything down with it
            os.killpg(os.getpgrp(), signal.SIGKILL)
        time.sleep(0.2)
    code = server.returncode
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(os.getpgrp(), signal.SIGTERM)  # stubs left behind (we ignore it ourselves)
    time.sleep(0.5)
    for pid in _group_members():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return 128 - code if code < 0 else code


def _group_members() -> list[int]:
    """Processes of our group other than ourselves (from /proc)."""
    group, me = os.getpgrp(), os.getpid()
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                if os.getpgid(int(entry)) == group:
                    members.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return members


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
