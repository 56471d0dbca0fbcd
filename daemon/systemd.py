"""sd_notify without a dependency: READY, STATUS and WATCHDOG datagrams to $NOTIFY_SOCKET.
Without systemd (no socket) every call is a no-op, so the service runs the same by hand."""
from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        # Never block: a listener that stops reading must not stall the service (a full queue
        # drops this one message; the next ping or status follows soon).
        sock.setblocking(False)
        try:
            sock.connect(address)
            sock.send(message.encode())
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
