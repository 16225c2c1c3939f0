"""systemd integration with the standard library only: socket activation (sd_listen_fds)
and readiness notification (sd_notify), after the protocols in sd_listen_fds(3) and
sd_notify(3)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

SD_LISTEN_FDS_START = 3


def listen_fds(
    env: MutableMapping[str, str] | None = None, unset: bool = True
) -> list[socket.socket]:
    """The sockets systemd passed (LISTEN_PID == our pid, LISTEN_FDS of them from fd 3),
    made close-on-exec; the variables are removed so children do not inherit them."""
    env = os.environ if env is None else env
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if unset:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(var, None)
    if pid != os.getpid() or count <= 0:
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def listen_fds_with_names(
    env: MutableMapping[str, str] | None = None, unset: bool = True
) -> list[tuple[str, socket.socket]]:
    """listen_fds() with each socket's name from $LISTEN_FDNAMES (colon-separated, one per
    fd, set by FileDescriptorName= in the socket unit; "unknown" when absent)."""
    env = os.environ if env is None else env
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    socks = listen_fds(env, unset)
    return [(names[i] if i < len(names) else "unknown", s) for i, s in enumerate(socks)]


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` ("READY=1", "STOPPING=1", "WATCHDOG=1", "STATUS=...") to $NOTIFY_SOCKET.
    Abstract socket names start with '@'. False when there is no socket or sending failed."""
    env = os.environ if env is None else env
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    elif addr[0] != "/":
        return False  # vsock and other forms are not used by this daemon
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_seconds(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog period from WATCHDOG_USEC (if WATCHDOG_PID is unset or ours), else None."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1e6
