"""systemd's readiness protocol (sd_notify) without libsystemd: datagrams to $NOTIFY_SOCKET.

Under `Type=notify` (deploy/systemd/vibrato.service) systemd counts the service as started only
when the main process sends `READY=1`. serve-v2 binds its port at once and recovers the engine in
the background (CONTRACT.md D21), so `READY=1` is sent when `engine.readiness()` first turns true, i.e.
exactly when `GET /v2/health/ready` would answer 200 — not when the port binds. `STOPPING=1` is sent
at the start of the SIGTERM drain; `STATUS=...` lines show the recovery report in `systemctl status`.

Everything here is a no-op when NOTIFY_SOCKET is unset, and a send that fails (socket gone, queue
full, unsupported address) is logged and dropped: notification never takes the server down.
"""
import asyncio
import logging
import os
import socket

log = logging.getLogger("vibrato.server")

POLL_MAX_SECS = 1.0    # readiness poll while recovering (starts at 50 ms, doubles)
STATUS_POLL_SECS = 5.0  # after READY=1: readiness can still degrade (a blocker found live)


def _address(value: str):
    """The socket address for a NOTIFY_SOCKET value: a path, or '@name' in the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. systemd's vsock: addresses, which a host service is not given


def send(message: str) -> bool:
    """Send one notification (newline-separated KEY=VALUE assignments). True if it was sent."""
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a unix socket address; systemd notification skipped", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # sent from the event loop: a full receive queue must not stall it
            sock.sendto(message.encode("utf-8", "replace"), address)
    except OSError as exc:
        log.warning("systemd notification failed: %s", exc, extra={"fields": {"notify_socket": value}})
        return False
    return True


def _status(ready: bool, report: str) -> str:
    # STATUS is one line; the report never holds a newline, but a blocker message might.
    return "STATUS=" + ("ready: " if ready else "not ready: ") + " ".join(report.split())


class Notifier:
    """Watches the engine's readiness once the port is bound; `stopping()` when the drain starts."""

    def __init__(self, engine):
        self.engine = engine
        self.task = None

    @classmethod
    def start(cls, engine) -> "Notifier":
        notifier = cls(engine)
        if os.environ.get("NOTIFY_SOCKET"):
            notifier.task = asyncio.create_task(notifier._watch(), name="vibrato-sd-notify")
        return notifier

    async def _watch(self):
        ready_sent, last_status, delay = False, None, 0.05
        while True:
            try:
                ready, report = await asyncio.to_thread(self.engine.readiness)
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive a failed check
                ready, report = False, f"readiness check failed: {exc}"
            status = _status(ready, report)
            if ready and not ready_sent:
                send("READY=1\n" + status)
                ready_sent = True
            elif status != last_status:
                send(status)
            last_status = status
            await asyncio.sleep(STATUS_POLL_SECS if ready_sent else delay)
            delay = min(POLL_MAX_SECS, delay * 2)

    def stopping(self):
        """The SIGTERM drain begins: stop watching and tell systemd (a no-op without NOTIFY_SOCKET)."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        send("STOPPING=1\nSTATUS=draining in-flight requests")
