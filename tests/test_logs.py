"""Structured logs through the writer thread (vibrato/server/logs.py): the logging thread only
enqueues; lines keep the request id of the thread that logged them; nothing is lost at exit; a
writer that falls behind drops records and says how many; secrets are redacted."""
import io
import json
import logging
import subprocess
import sys
import threading
import time

import pytest

from vibrato.server import logs


@pytest.fixture
def captured():
    """logs.configure() writing to a StringIO instead of stderr; restored afterwards."""
    out = io.StringIO()
    root = logging.getLogger()
    level = root.level
    logs.configure("info", out)
    yield out
    logs.flush()
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, "_vibrato", False):
            root.removeHandler(h)


def lines(out) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_lines_carry_the_request_id_of_the_logging_thread(captured):
    log = logging.getLogger("vibrato.test")

    def in_request(rid):
        token = logs.REQUEST_ID.set(rid)
        try:
            log.info("handled %s", rid, extra={"fields": {"k": 1}})
        finally:
            logs.REQUEST_ID.reset(token)

    threads = [threading.Thread(target=in_request, args=(f"req-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.info("outside any request")
    logs.flush()
    got = lines(captured)
    handled = [r for r in got if r["msg"].startswith("handled")]
    assert len(got) == 9 and len(handled) == 8
    assert all(r["request_id"] == r["msg"].split()[1] and r["k"] == 1 for r in handled)
    assert "request_id" not in next(r for r in got if r["msg"] == "outside any request")


def test_the_logging_thread_does_not_format(captured, monkeypatch):
    seen = []
    real = logs.JsonFormatter.format

    def spy(self, record):
        seen.append(threading.current_thread().name)
        return real(self, record)
    monkeypatch.setattr(logs.JsonFormatter, "format", spy)
    logging.getLogger("vibrato.test").info("one line")
    logs.flush()
    assert seen and threading.current_thread().name not in seen
    assert lines(captured)[0]["msg"] == "one line"


def test_a_full_buffer_drops_and_reports_the_count(captured, monkeypatch):
    gate = threading.Event()
    monkeypatch.setattr(logs, "QUEUE_MAX_RECORDS", 4)
    logs.configure("info", captured)  # a new writer with the small buffer
    writer = logs._writer
    real = writer.drain

    def slow():
        gate.wait(10)
        real()
    monkeypatch.setattr(writer, "drain", slow)  # this writer only: the one configure stopped drained as usual
    log = logging.getLogger("vibrato.test")
    for i in range(50):
        log.warning("flood %d", i)
    gate.set()
    deadline = time.monotonic() + 10
    while logs._writer.front.buffer and time.monotonic() < deadline:
        time.sleep(0.01)
    log.warning("after the flood")
    logs.flush()
    got = lines(captured)
    written = [r["msg"] for r in got if r["msg"].startswith("flood")]
    dropped = [r for r in got if "log_records_dropped" in r]
    assert written == [f"flood {i}" for i in range(4)]
    assert [r["log_records_dropped"] for r in dropped] == [46]
    assert got[-1]["msg"] == "after the flood" and got.index(dropped[0]) < got.index(got[-1])


def test_secrets_are_redacted_by_the_writer(captured):
    token = "vbk_0123456789abcdef." + "s" * 40
    logging.getLogger("vibrato.test").warning("client sent Authorization: Bearer %s", token)
    logs.flush()
    text = captured.getvalue()
    assert token not in text and "s" * 40 not in text and "[redacted]" in text


def test_queued_lines_are_written_at_exit():
    code = ("import logging; from vibrato.server import logs; logs.configure('info'); "
            "log = logging.getLogger('vibrato.test'); [log.info('line %d', i) for i in range(2000)]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    got = [json.loads(line)["msg"] for line in out.stderr.splitlines()]
    assert got == [f"line {i}" for i in range(2000)]


def test_access_lines_match_the_logging_path(captured):
    fields = {"method": "POST", "path": "/v2/query", "status": 200, "latency_ms": 0.5, "client": "127.0.0.1",
              "key_id": None}
    token = logs.REQUEST_ID.set("req-access")
    try:
        logs.access_line(fields)
        logging.getLogger("vibrato.access").info("request", extra={"fields": fields})
    finally:
        logs.REQUEST_ID.reset(token)
    logs.flush()
    fast, slow = lines(captured)
    assert abs(fast.pop("ts") - slow.pop("ts")) < 5 and fast.pop("time")[:10] == slow.pop("time")[:10]
    assert fast == slow == {"level": "info", "logger": "vibrato.access", "msg": "request",
                            "request_id": "req-access", **fields}


def test_the_time_field_is_the_utc_time_of_ts_across_seconds():
    """json_line reuses the last line's second for "time": lines in and out of order, across second
    and day boundaries, each carry their own UTC time, ms truncated as before."""
    import datetime
    for created in (1796575924.381, 1796575924.9995, 1796575925.0001, 1796575924.5, 86399.999, 86400.0, 0.0):
        line = json.loads(logs.json_line(created, "info", "x", "m", None, None))
        want = datetime.datetime.fromtimestamp(int(created), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        assert line["time"] == f"{want}.{int(created * 1000) % 1000:03d}Z"
        assert line["ts"] == round(created, 3)
