"""WAL growth guard (CONTRACT.md §6, runbook §10): the SQLite `-wal` file of catalog.sqlite3 stays under its
configured bound while timeout-prone readers scan the whole catalog and writers keep committing.

Setup, after v2.1's `sqlite_wal_growth_stays_bounded_under_timeout_prone_reads` (CONTRACT.md R6):
* an engine (the real ingest path: validation, group commit, fsync) with a 32-page
  `sqlite_wal_autocheckpoint_pages`, a small `sqlite_wal_max_bytes` and a fast PASSIVE timer;
* a second `Catalog` handle with a 1 ms read timeout running full metadata scans in a loop
  (`wal.scan_metadata`), so its reads are interrupted mid-transaction again and again;
* a sampler reading the size of `catalog.sqlite3-wal` every few milliseconds for the whole run.

Asserts: the largest sampled `-wal` size is <= the bound (`sqlite_wal_max_bytes` unless
VIBRATO_WAL_GUARD_BOUND_BYTES says otherwise), the slow reader really timed out (counter > 0) and
every write landed. VIBRATO_WAL_GUARD_PIN_READER_SECS=N adds a reader that holds its read
transaction for N seconds (shows that the guard fails when the WAL is pinned). Sizes: VIBRATO_WAL_GUARD_PRELOAD (5000) and VIBRATO_WAL_GUARD_INGESTS (15000)
single ingests from VIBRATO_WAL_GUARD_WRITERS (4) threads.
"""
import os
import threading
import time

import pytest

from vibrato.catalog import Catalog, wal
from vibrato.engine import Engine
from vibrato.errors import CatalogReadTimeout

PRELOAD = int(os.environ.get("VIBRATO_WAL_GUARD_PRELOAD", "5000"))
INGESTS = int(os.environ.get("VIBRATO_WAL_GUARD_INGESTS", "15000"))
WRITERS = int(os.environ.get("VIBRATO_WAL_GUARD_WRITERS", "4"))
WAL_MAX_BYTES = 4 * 1024 * 1024
BOUND = int(os.environ.get("VIBRATO_WAL_GUARD_BOUND_BYTES", str(WAL_MAX_BYTES)))
# Fault injection for the guard itself: a reader that holds one read transaction open this long
# (the failure mode the guard exists for: SQLite cannot reset a WAL a reader still needs).
PIN_READER_SECS = float(os.environ.get("VIBRATO_WAL_GUARD_PIN_READER_SECS", "0"))
AUTOCHECKPOINT_PAGES = 32


def _item(i: int) -> dict:
    a = (i % 1000) / 1000.0
    return {"vector": [a, 1.0 - a], "metadata": {"source_file": f"wal_guard_{i}.wav", "start_time_ms": i,
                                                 "duration_ms": 20, "bpm": 120.0, "tags": ["drums", "wal_guard"]},
            "idempotency_key": f"wal-guard-{i}"}


@pytest.mark.timeout(900)
def test_sqlite_wal_stays_bounded_under_timeout_prone_reads(tmp_path):
    data = tmp_path / "data"
    eng = Engine.open(data, dim=2, background=False, catalog_read_timeout_ms=500,
                      sqlite_wal_autocheckpoint_pages=AUTOCHECKPOINT_PAGES, sqlite_wal_max_bytes=WAL_MAX_BYTES,
                      sqlite_passive_checkpoint_secs=0.05)
    wal_path = str(eng.config.catalog_path) + "-wal"
    try:
        for start in range(0, PRELOAD, 1000):
            eng.ingest_batch([_item(i) for i in range(start, min(PRELOAD, start + 1000))])

        slow = Catalog(eng.config.catalog_path, read_timeout_ms=1, wal_autocheckpoint_pages=AUTOCHECKPOINT_PAGES,
                       wal_max_bytes=WAL_MAX_BYTES, readers=2)
        stop = threading.Event()
        samples = []
        scans = {"ok": 0, "timeout": 0}
        write_max = [0.0] * WRITERS
        errors = []

        def sampler():
            while not stop.is_set():
                try:
                    samples.append(os.path.getsize(wal_path))
                except OSError:
                    samples.append(0)
                time.sleep(0.002)

        def reader():
            while not stop.is_set():
                try:
                    slow.read(wal.scan_metadata, eng.cid)
                    scans["ok"] += 1
                except CatalogReadTimeout:
                    scans["timeout"] += 1
                except Exception as exc:  # noqa: BLE001 - any other failure fails the test
                    errors.append(exc)
                    return
                time.sleep(0.001)

        def writer(w):
            try:
                for i in range(PRELOAD + w, PRELOAD + INGESTS, WRITERS):
                    it = _item(i)
                    t = time.perf_counter()
                    vid, created = eng.ingest(it["vector"], it["metadata"], it["idempotency_key"])
                    write_max[w] = max(write_max[w], time.perf_counter() - t)
                    assert created
                    if (i - PRELOAD) % 1000 < WRITERS:
                        time.sleep(0.002)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        def pinning_reader():
            eng.catalog.read(lambda conn: (wal.count(conn, eng.cid), time.sleep(PIN_READER_SECS)))

        threads = [threading.Thread(target=sampler), threading.Thread(target=reader)]
        if PIN_READER_SECS > 0:
            threads.append(threading.Thread(target=pinning_reader))
        writers = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
        t0 = time.monotonic()
        for t in threads + writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        slow_timeouts = slow.read_timeout_total
        slow.close()

        assert not errors, errors
        peak = max(samples)
        print(f"\nwal_guard: writes={INGESTS} in {elapsed:.1f}s, samples={len(samples)}, "
              f"max_wal_bytes={peak}, bound={BOUND}, scans_ok={scans['ok']}, "
              f"read_timeouts={slow_timeouts}, max_write_ms={max(write_max) * 1000:.0f}, checkpoints={eng.catalog.wal_stats()['sqlite_wal_checkpoints']}")
        assert len(samples) > 100, "the sampler barely ran"
        assert peak <= BOUND, f"SQLite -wal reached {peak} bytes, above the bound of {BOUND} bytes"
        assert slow_timeouts > 0 and scans["timeout"] == slow_timeouts, \
            f"the 1 ms reader never timed out (scans ok={scans['ok']}): the guard did not exercise timeouts"
        assert eng.stats()["total_vectors"] == PRELOAD + INGESTS
    finally:
        eng.close()
