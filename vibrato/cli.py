"""The `vibrato` command line: parse, call one engine or catalog function, print key=value lines.

Exit codes: 0 success; 1 error (`Error: <message>` on stderr); 2 usage (click).
Long operations show a rich progress bar on a terminal and plain `progress ...` lines on stderr
otherwise, so stdout keeps only the key=value results.
"""
import shlex
import sys
from pathlib import Path

import rich_click as click

from vibrato import __version__
from vibrato.config import MADVISE_MODES, PIN_MODES, Config, Limits

_DEFAULTS = Config()
_LIMITS = Limits()


class BoolParam(click.ParamType):
    """`--flag`, `--flag true` and `--flag false` (case-insensitive); anything else is a usage error."""
    name = "true|false"

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text == "true":
            return True
        if text == "false":
            return False
        self.fail(f"expected true or false, got {value!r}", param, ctx)


BOOL = BoolParam()


def bool_option(name, default, help_text):
    return click.option(name, type=BOOL, default="true" if default else "false", is_flag=False, flag_value="true",
                        show_default=True, help=help_text + " Bare flag means true.")


def _checked_data_dir(ctx, param, value):
    """Every command that opens a data dir refuses one another local user could tamper with."""
    from vibrato import datadir
    try:
        datadir.check_private(value)
    except Exception as exc:  # noqa: BLE001 - UnsafeDataDirError, or an unreadable path
        _fail(exc)
    return value


def data_dir_option(f):
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("vibrato_data"),
                        show_default=True, callback=_checked_data_dir,
                        help="Data directory (owned by the user running Vibrato, mode 0700).")(f)


def _error(message: str):
    """Exit 1 with one plain `Error: <message>` line on stderr.

    (rich-click would draw a ClickException in a wrapped box; operators grep for the plain line,
    so the message is printed here and the command exits through click's Exit(1).)
    """
    click.echo(f"Error: {message}", err=True)
    raise click.exceptions.Exit(1)


def _fail(exc: BaseException):
    _error(getattr(exc, "message", None) or str(exc) or type(exc).__name__)


class _Progress:
    """progress(stage, done, total): a rich bar on a terminal, plain lines on stderr otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self._bar = None
        self._tasks = {}
        self._last = {}

    def __enter__(self):
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.console import Console
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self._bar.__enter__()
        return self

    def __call__(self, stage: str, done: int, total: int):
        if self._bar is not None:
            task = self._tasks.get(stage)
            if task is None:
                task = self._tasks[stage] = self._bar.add_task(stage, total=total or None)
            self._bar.update(task, completed=done, total=total or None)
            return
        # Plain output: the first, the last and about every 10% of a stage.
        step = max(1, (total or 1) // 10)
        last = self._last.get(stage)
        if last is None or done >= total or done - last >= step:
            self._last[stage] = done
            click.echo(f"progress stage={stage} done={done} total={total}", err=True)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="vibrato")
def cli():
    """Vibrato: a vector database for audio embeddings."""


# ---------------------------------------------------------------------------- serve-v2
@cli.command("serve-v2")
@click.option_panel("Storage", options=["--data-dir", "--collection", "--dim", "--catalog-read-timeout-ms",
                                        "--sqlite-wal-autocheckpoint-pages", "--quarantine-max-files",
                                        "--quarantine-max-bytes", "--orphan-ttl-hours", "--vector-madvise-mode"])
@click.option_panel("Network", options=["--port", "--host", "--public-health-metrics", "--bootstrap-admin-key",
                                        "--shutdown-timeout-secs", "--server-threads", "--inline-search",
                                        "--fast-query-path",
                                        "--query-workers", "--writer-nice", "--pin-query-workers", "--idle-spin-us",
                                        "--log-level",
                                        "--keepalive-timeout-secs", "--header-timeout-secs", "--body-timeout-secs",
                                        "--max-connections"])
@click.option_panel("Background work", options=["--checkpoint-interval-secs", "--compaction-interval-secs",
                                                "--audio-colocated", "--background-io-mb-per-sec",
                                                "--hot-index-shards", "--audit-retention-days",
                                                "--hot-max-rows", "--ingest-backpressure-wait-secs"])
@click.option_panel("Request limits", options=["--max-body-bytes", "--max-k", "--max-ef", "--max-batch",
                                               "--max-identify-frames", "--max-tags", "--max-tag-bytes",
                                               "--max-source-file-bytes", "--max-idempotency-key-bytes",
                                               "--max-delete-ids", "--max-delete-source-files"])
@data_dir_option
@click.option("--collection", default=_DEFAULTS.collection, show_default=True, help="Collection served.")
@click.option("--dim", type=click.IntRange(1, 4096), default=_DEFAULTS.dim, show_default=True,
              help="Vector dimension; must match an existing collection.")
@click.option("-p", "--port", type=click.IntRange(0, 65535), default=_DEFAULTS.port, show_default=True)
@click.option("--host", default=_DEFAULTS.host, show_default=True, help="IPv4/IPv6 address or hostname to bind.")
@click.option("--checkpoint-interval-secs", type=click.IntRange(0), default=_DEFAULTS.checkpoint_interval_secs,
              show_default=True)
@click.option("--compaction-interval-secs", type=click.IntRange(0), default=_DEFAULTS.compaction_interval_secs,
              show_default=True)
@click.option("--orphan-ttl-hours", type=click.IntRange(0), default=_DEFAULTS.orphan_ttl_hours, show_default=True,
              help="Quarantined orphan files are deleted after this many hours.")
@bool_option("--audio-colocated", _DEFAULTS.audio_colocated,
             "Run background work at low priority and throttle its I/O.")
@bool_option("--public-health-metrics", _DEFAULTS.public_health_metrics,
             "Serve /v2/health/* and /v2/metrics without a key (false: health needs query, metrics admin).")
@click.option("--catalog-read-timeout-ms", type=click.IntRange(0), default=_DEFAULTS.catalog_read_timeout_ms,
              show_default=True)
@click.option("--sqlite-wal-autocheckpoint-pages", type=click.IntRange(0),
              default=_DEFAULTS.sqlite_wal_autocheckpoint_pages, show_default=True)
@click.option("--quarantine-max-files", type=click.IntRange(0), default=_DEFAULTS.quarantine_max_files,
              show_default=True)
@click.option("--quarantine-max-bytes", type=click.IntRange(0), default=_DEFAULTS.quarantine_max_bytes,
              show_default=True)
@click.option("--background-io-mb-per-sec", type=click.IntRange(0), default=_DEFAULTS.background_io_mb_per_sec,
              show_default=True, help="MiB/s for background I/O; 0 disables the throttle.")
@click.option("--hot-index-shards", type=click.IntRange(0), default=_DEFAULTS.hot_index_shards, show_default=True,
              help="Accepted for the v2.1 CLI and ignored: the hot tier is a list of chunks, exact scan plus "
                   "an HNSW graph per sealed chunk (docs/CONTRACT.md D1). Rounded up to a power of two; 0 becomes 1.")
@click.option("--vector-madvise-mode", type=click.Choice(MADVISE_MODES, case_sensitive=False),
              default=_DEFAULTS.vector_madvise_mode, show_default=True,
              help="Advice for the segments' vector pages. random (the default; v2.1: normal) reads only the "
                   "pages a search touches, which keeps a segment larger than its page-cache share fast.")
@bool_option("--bootstrap-admin-key", False,
             "Create and print BOOTSTRAP_ADMIN_KEY=<token> when no non-revoked key exists.")
@click.option("--shutdown-timeout-secs", type=click.FloatRange(0), default=_DEFAULTS.shutdown_timeout_secs,
              show_default=True, help="How long graceful shutdown waits for in-flight requests.")
@click.option("--server-threads", type=click.IntRange(0), default=0, show_default=True,
              help="Executor threads for blocking work (0 = min(32, 4 x cpus + 4)).")
@bool_option("--inline-search", _DEFAULTS.inline_search,
             "Run small queries (k <= 100, ef <= 256) on the event loop instead of a worker thread: less CPU "
             "per query; a query that is slow (cold pages of a segment larger than memory) then delays the "
             "others. A small identify (<= 256 frames) runs there only when it is the one request in flight. "
             "false sends every query and identify to the executor.")
@bool_option("--fast-query-path", _DEFAULTS.fast_query_path,
             "Answer a well-formed, authorized small query (one that --inline-search runs on the loop) straight "
             "from the connection, without aiohttp's per-request objects: same response, metrics, audit row and "
             "access line, less CPU. Anything else (errors included) takes the regular route either way.")
@click.option("--query-workers", type=click.IntRange(0, 64), default=_DEFAULTS.query_workers, show_default=True,
              help="Processes serving HTTP on the port: 1, this one; N > 1, N query workers that answer "
                   "query/identify themselves and pass every other request to this one, the writer, which "
                   "leaves the port to them once they listen; 0, one worker per usable core (at most 8; "
                   "a single core: one worker beside the writer) (docs/SERVER.md).")
@click.option("--writer-nice", type=click.IntRange(0, 19), default=_DEFAULTS.writer_nice, show_default=True,
              help="With --query-workers > 1: the nice value the writer (ingest, checkpoint, compaction) takes "
                   "once the workers serve the port, so that queries come first when the cores are busy; a lower "
                   "value keeps more ingest under a heavy query load, 0 keeps it level with the workers "
                   "(docs/SERVER.md).")
@click.option("--pin-query-workers", type=click.Choice(PIN_MODES, case_sensitive=False),
              default=_DEFAULTS.pin_query_workers, show_default=True,
              help="With --query-workers > 1: auto runs worker i on the i-th CPU this process may use when there "
                   "is exactly one worker per such CPU (their caches stay warm; fewer workers, as under a CPU "
                   "quota, are never pinned); off leaves them to the scheduler (docs/SERVER.md).")
@click.option("--idle-spin-us", type=click.IntRange(0, 10_000), default=_DEFAULTS.idle_spin_us, show_default=True,
              help="After a wait that found requests, the serving event loop (each query worker's, or the one "
                   "process's) polls this many microseconds before it sleeps: a halted virtual CPU is slow to "
                   "wake for the next request. Idle servers do not poll; 0 never polls (docs/SERVER.md).")
@click.option("--audit-retention-days", type=click.IntRange(0), default=_DEFAULTS.audit_retention_days,
              show_default=True, help="Audit rows older than this are pruned (0 keeps them).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              default="info", show_default=True, help="JSON log lines go to stderr.")
@click.option("--keepalive-timeout-secs", type=click.FloatRange(0, min_open=True),
              default=_DEFAULTS.keepalive_timeout_secs, show_default=True,
              help="Close a connection idle (no request in progress) this long, also before its first request.")
@click.option("--header-timeout-secs", type=click.FloatRange(0, min_open=True),
              default=_DEFAULTS.header_timeout_secs, show_default=True,
              help="Time to receive a whole request head from its first byte (408 and close after).")
@click.option("--body-timeout-secs", type=click.FloatRange(0), default=_DEFAULTS.body_timeout_secs,
              show_default=True,
              help="Time to receive a request body after its head (408 and close after); "
                   "0 = max(30, --max-body-bytes / 64 KiB/s).")
@click.option("--hot-max-rows", type=click.IntRange(0), default=_DEFAULTS.hot_max_rows, show_default=True,
              help="Bound on un-checkpointed (hot) rows; at it, ingest waits for a checkpoint, then gets 429 with "
                   "Retry-After. 0 = 4 x the checkpoint size (200000).")
@click.option("--ingest-backpressure-wait-secs", type=click.FloatRange(0),
              default=_DEFAULTS.ingest_backpressure_wait_secs, show_default=True,
              help="How long an ingest at --hot-max-rows waits for room before its 429.")
@click.option("--max-connections", type=click.IntRange(1), default=_DEFAULTS.max_connections, show_default=True,
              help="Open client connections; beyond it new ones are answered 503 and closed.")
@click.option("--max-body-bytes", type=click.IntRange(1), default=_LIMITS.max_body_bytes, show_default=True,
              help="Largest JSON request body (413 above it).")
@click.option("--max-k", type=click.IntRange(1), default=_LIMITS.max_k, show_default=True)
@click.option("--max-ef", type=click.IntRange(1), default=_LIMITS.max_ef, show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=_LIMITS.max_batch, show_default=True,
              help="Vectors per /v2/vectors/batch request.")
@click.option("--max-identify-frames", type=click.IntRange(1), default=_LIMITS.max_identify_frames,
              show_default=True)
@click.option("--max-tags", type=click.IntRange(0), default=_LIMITS.max_tags, show_default=True,
              help="Tags per vector and per filter clause.")
@click.option("--max-tag-bytes", type=click.IntRange(1), default=_LIMITS.max_tag_bytes, show_default=True)
@click.option("--max-source-file-bytes", type=click.IntRange(0), default=_LIMITS.max_source_file_bytes,
              show_default=True)
@click.option("--max-idempotency-key-bytes", type=click.IntRange(1), default=_LIMITS.max_idempotency_key_bytes,
              show_default=True)
@click.option("--max-delete-ids", type=click.IntRange(1), default=_LIMITS.max_delete_ids, show_default=True,
              help="Ids per /v2/vectors/delete request.")
@click.option("--max-delete-source-files", type=click.IntRange(1), default=_LIMITS.max_delete_source_files,
              show_default=True, help="source_file names in one delete filter.")
def serve_v2(data_dir, collection, dim, port, host, checkpoint_interval_secs, compaction_interval_secs,
             orphan_ttl_hours, audio_colocated, public_health_metrics, catalog_read_timeout_ms,
             sqlite_wal_autocheckpoint_pages, quarantine_max_files, quarantine_max_bytes, background_io_mb_per_sec,
             hot_index_shards, vector_madvise_mode, bootstrap_admin_key, shutdown_timeout_secs, server_threads,
             inline_search, fast_query_path, query_workers, writer_nice, pin_query_workers, idle_spin_us,
             audit_retention_days, log_level, max_body_bytes, max_k, max_ef, max_batch, max_identify_frames,
             max_tags, max_tag_bytes, max_source_file_bytes, max_idempotency_key_bytes, max_delete_ids,
             max_delete_source_files, keepalive_timeout_secs, header_timeout_secs, body_timeout_secs,
             max_connections, hot_max_rows, ingest_backpressure_wait_secs):
    """Run the v2 HTTP server until SIGTERM/SIGINT (graceful shutdown, exit 0)."""
    from vibrato.server import logs
    from vibrato.server.app import serve

    try:
        config = Config(
            data_dir=data_dir, collection=collection, dim=dim, host=host, port=port,
            public_health_metrics=public_health_metrics, bootstrap_admin_key=bootstrap_admin_key,
            shutdown_timeout_secs=shutdown_timeout_secs, audit_retention_days=audit_retention_days,
            server_threads=server_threads, inline_search=inline_search, fast_query_path=fast_query_path,
            query_workers=query_workers, writer_nice=writer_nice, pin_query_workers=pin_query_workers,
            idle_spin_us=idle_spin_us,
            log_level=log_level.lower(),
            keepalive_timeout_secs=keepalive_timeout_secs, header_timeout_secs=header_timeout_secs,
            body_timeout_secs=body_timeout_secs, max_connections=max_connections,
            hot_max_rows=hot_max_rows, ingest_backpressure_wait_secs=ingest_backpressure_wait_secs,
            checkpoint_interval_secs=checkpoint_interval_secs, compaction_interval_secs=compaction_interval_secs,
            orphan_ttl_hours=orphan_ttl_hours, audio_colocated=audio_colocated,
            background_io_mb_per_sec=background_io_mb_per_sec, catalog_read_timeout_ms=catalog_read_timeout_ms,
            sqlite_wal_autocheckpoint_pages=sqlite_wal_autocheckpoint_pages,
            quarantine_max_files=quarantine_max_files, quarantine_max_bytes=quarantine_max_bytes,
            hot_index_shards=hot_index_shards, vector_madvise_mode=vector_madvise_mode,
            limits=Limits(max_k=max_k, max_ef=max_ef, max_batch=max_batch, max_identify_frames=max_identify_frames,
                          max_tags=max_tags, max_tag_bytes=max_tag_bytes,
                          max_source_file_bytes=max_source_file_bytes,
                          max_idempotency_key_bytes=max_idempotency_key_bytes, max_body_bytes=max_body_bytes,
                          max_delete_ids=max_delete_ids, max_delete_source_files=max_delete_source_files))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    logs.configure(config.log_level)
    try:
        serve(config)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - locked data dir, port in use, dim mismatch, ...
        _fail(exc)


# ---------------------------------------------------------------------------- API keys
def _open_catalog(data_dir: Path):
    """The catalog of a data dir, creating the whole layout as the server would (private, checked)."""
    from vibrato import datadir
    from vibrato.catalog import Catalog
    config = Config(data_dir=data_dir)
    datadir.prepare(config.data_dir)
    return Catalog(config.catalog_path, read_timeout_ms=config.catalog_read_timeout_ms)


@cli.command("key-create")
@data_dir_option
@click.option("--name", required=True, help="A label for the key.")
@click.option("--roles", default="admin,query,ingest", show_default=True,
              help="Comma-separated roles: query, ingest, admin (admin passes every check).")
def key_create(data_dir, name, roles):
    """Create an API key and print its id and token (the secret is shown only here)."""
    from vibrato import apikeys
    if not apikeys.parse_roles(roles):
        _error(f"No valid roles parsed from '{roles}'. Use comma-separated query,ingest,admin")
    try:
        pepper = apikeys.load_pepper(data_dir)
        with _open_catalog(data_dir) as catalog:
            key_id, token = apikeys.create_key(catalog, pepper, name, roles)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    click.echo(f"id={key_id}")
    click.echo(f"token={token}")


@cli.command("key-revoke")
@data_dir_option
@click.option("--key-id", required=True, help="The vbk_... id to revoke.")
def key_revoke(data_dir, key_id):
    """Revoke a key; a running server stops accepting it within 1 second. Unknown ids are not an error."""
    from vibrato import apikeys
    try:
        with _open_catalog(data_dir) as catalog:
            apikeys.revoke_key(catalog, key_id)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    click.echo(f"revoked={key_id}")


@cli.command("key-list")
@data_dir_option
def key_list(data_dir):
    """One line per key: id, name, roles, created (unix secs), revoked (unix secs or -). Never secrets."""
    from vibrato import apikeys
    try:
        with _open_catalog(data_dir) as catalog:
            rows = apikeys.list_keys(catalog)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    for r in rows:
        revoked = "-" if r["revoked_at"] is None else r["revoked_at"]
        click.echo(f"id={r['id']} name={shlex.quote(r['name'])} roles={r['roles']} created={r['created_at']} "
                   f"revoked={revoked}")


# ---------------------------------------------------------------------------- snapshots and replay
class DurationParam(click.ParamType):
    """An age such as 90s, 30m, 12h or 7d (a unit is required: a bare number is too easy to misread)."""
    name = "N{s|m|h|d}"
    UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if len(text) < 2 or text[-1] not in self.UNITS or not text[:-1].isdigit():
            self.fail(f"expected a number with a unit s, m, h or d (for example 7d), got {value!r}", param, ctx)
        return int(text[:-1]) * self.UNITS[text[-1]]


def snapshots_dir_option(f):
    return click.option("--snapshots-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="A directory of snapshots (e.g. a snapshot-create --out-dir); "
                             "default <data-dir>/snapshots.")(f)


@cli.command("snapshot-create")
@data_dir_option
@click.option("--collection", default="default", show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the snapshot into OUT_DIR/<snapshot_id> instead of <data-dir>/snapshots/ "
                   "(e.g. another disk); restore works from there.")
def snapshot_create(data_dir, collection, out_dir):
    """Write a consistent snapshot under <data-dir>/snapshots/ (works while a server runs)."""
    from vibrato import engine
    try:
        with _Progress() as progress:
            out = engine.snapshot_create(data_dir, collection, progress=progress, out_dir=out_dir)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    click.echo(f"snapshot_id={out['snapshot_id']}")
    click.echo(f"snapshot_dir={out['snapshot_dir']}")
    click.echo(f"segments={out['segments']}")


@cli.command("snapshot-restore")
@data_dir_option
@click.option("--snapshot-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="A snapshots/<snapshot_id> directory.")
def snapshot_restore(data_dir, snapshot_dir):
    """Verify every checksum, then swap the snapshot in atomically (the server must be stopped)."""
    from vibrato import engine
    try:
        with _Progress() as progress:
            out = engine.snapshot_restore(data_dir, snapshot_dir, progress=progress)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    click.echo(f"restored_snapshot={out['restored_snapshot']}")


@cli.command("snapshot-list")
@data_dir_option
@snapshots_dir_option
def snapshot_list(data_dir, snapshots_dir):
    """One line per snapshot, oldest first: id, created (unix secs and UTC ISO 8601), size in bytes,
    segments, verified (the last snapshot-verify result for the current manifest: yes, no or failed).
    Reads manifests only, so it is cheap and safe while a server runs."""
    import time
    from vibrato.engine import snapshot
    try:
        rows = snapshot.list_snapshots(snapshots_dir or Config(data_dir=data_dir).snapshots_dir)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    for s in rows:
        if s["error"] is not None:
            click.echo(f"id={s['snapshot_id']} error={shlex.quote(s['error'])}")
            continue
        iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s["created_at"]))
        click.echo(f"id={s['snapshot_id']} created={s['created_at']} created_iso={iso} size_bytes={s['size_bytes']} "
                   f"segments={s['segments']} verified={s['verified']}")


@cli.command("snapshot-verify")
@click.option("--snapshot-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="A snapshot directory.")
def snapshot_verify(snapshot_dir):
    """Check a snapshot as a restore would: manifest, every checksum, every segment's structure and the
    catalog's references. Exit 1 on any mismatch. The result is recorded for snapshot-list."""
    from vibrato.engine import snapshot
    try:
        with _Progress() as progress:
            out = snapshot.verify(snapshot_dir, progress=progress)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    click.echo(f"verified={out['snapshot_id']}")
    click.echo(f"segments={out['segments']}")
    click.echo(f"bytes_checked={out['bytes_checked']}")


@cli.command("snapshot-prune")
@data_dir_option
@snapshots_dir_option
@click.option("--keep-last", type=click.IntRange(0), default=None, help="Keep the newest N snapshots.")
@click.option("--older-than", type=DurationParam(), default=None,
              help="Remove snapshots created longer ago than this (90s, 30m, 12h, 7d); the newest "
                   "--keep-last stay regardless.")
def snapshot_prune(data_dir, snapshots_dir, keep_last, older_than):
    """Remove old snapshots (and leftovers of creates that died); prints each removed id. A snapshot that
    a restore or verify is reading is not removed (exit 1). Safe while a server runs."""
    from vibrato.engine import snapshot
    if keep_last is None and older_than is None:
        raise click.UsageError("give --keep-last N and/or --older-than AGE")
    try:
        res = snapshot.prune(snapshots_dir or Config(data_dir=data_dir).snapshots_dir, keep_last=keep_last,
                             older_than_secs=older_than, data_dir=data_dir)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    for sid in res["removed"]:
        click.echo(f"removed={sid}")
    for sid in res["abandoned"]:
        click.echo(f"removed_partial={sid}")
    click.echo(f"kept={len(res['kept'])}")
    if res["refused"]:
        _error(f"snapshot {', '.join(res['refused'])} is being read (a restore or verify holds it); not removed, "
               "run prune again later")


@cli.command("replay-to-lsn")
@data_dir_option
@click.option("--collection", default="default", show_default=True)
@click.option("--target-lsn", required=True, type=click.IntRange(0), help="Keep WAL rows with lsn <= this.")
def replay_to_lsn(data_dir, collection, target_lsn):
    """Drop WAL rows newer than --target-lsn (their ids are never re-issued); the server must be stopped."""
    from vibrato import engine
    try:
        with _Progress() as progress:
            out = engine.replay_to_lsn(data_dir, collection, target_lsn, progress=progress)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    click.echo(f"replayed_to_lsn={out['replayed_to_lsn']}")
    click.echo(f"collection={out['collection']}")


@cli.command("import")
@data_dir_option
@click.option("--collection", default="default", show_default=True)
@click.option("--vectors", "vectors_path", required=True, type=click.Path(dir_okay=False),
              help="A .npy array (rows, dim) of float16/32/64.")
@click.option("--metadata", "metadata_path", type=click.Path(dir_okay=False), default=None,
              help="JSON lines, one metadata object per vector, in row order.")
@click.option("--ef-construction", type=click.IntRange(1, 4096), default=_DEFAULTS.import_ef_construction,
              show_default=True,
              help="Graph quality of the imported L0 segments, which compaction rebuilds. Higher: better "
                   "recall until then, slower import.")
def import_(data_dir, collection, vectors_path, metadata_path, ef_construction):
    """Import vectors straight into segments (all or nothing; ids continue the collection's); the server
    must be stopped."""
    from vibrato.engine import bulk_import
    try:
        with _Progress() as progress:
            out = bulk_import.run(data_dir, collection, vectors_path, metadata_path, progress=progress,
                                  ef_construction=ef_construction)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    for key in ("imported", "id_start", "id_end", "segments"):
        click.echo(f"{key}={out[key]}")


# ---------------------------------------------------------------------------- deletes (over HTTP)
def server_options(timeout: float):
    """--url, --token (or VIBRATO_TOKEN, which keeps the secret out of the process list) and --timeout."""
    def wrap(f):
        f = click.option("--timeout", type=click.FloatRange(0, min_open=True), default=timeout, show_default=True,
                         help="Seconds to wait for the server's answer.")(f)
        f = click.option("--token", envvar="VIBRATO_TOKEN", required=True,
                         help="API key (vbk_....<secret>); default $VIBRATO_TOKEN.")(f)
        return click.option("--url", required=True, help="The running server, e.g. http://127.0.0.1:8080.")(f)
    return wrap


def _call_server(url: str, token: str, timeout: float, fn):
    """fn(client) against a running server; an HTTP error or an unreachable server exits 1."""
    from vibrato.client import Client, VibratoHTTPError
    try:
        client = Client(url, token, timeout=timeout)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        with client:
            return fn(client)
    except VibratoHTTPError as exc:
        _error(f"HTTP {exc.status} {exc.code}: {exc.message}")
    except OSError as exc:
        _error(f"cannot reach {url}: {exc}")


def _parse_ids(text: str, where: str) -> list[int]:
    """Vector ids separated by commas and/or whitespace."""
    out = []
    for part in text.replace(",", " ").split():
        if not (part.isascii() and part.isdigit()):
            raise ValueError(f"{where}: {part!r} is not a vector id (a non-negative integer)")
        out.append(int(part))
    return out


def _kv(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "-"
    return str(value)


@cli.command("delete")
@server_options(60.0)
@click.option("--ids", "ids_text", default=None, help="Comma-separated vector ids, e.g. 1,2,3.")
@click.option("--ids-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A file of vector ids separated by commas, spaces or newlines ('-': stdin).")
@click.option("--source-file", "source_files", multiple=True,
              help="Delete every vector whose metadata.source_file is NAME (repeat for several names).")
def delete_cmd(url, token, timeout, ids_text, ids_file, source_files):
    """Delete vectors on a running server (POST /v2/vectors/delete; role ingest): by id or by source_file,
    exactly one way. Prints deleted=<n> and lsn=<lsn or ->. The rows are never served again; their payloads
    leave the data dir as segments are rewritten, or at once with `vibrato purge`."""
    given = sum(x is not None and x != () for x in (ids_text, ids_file, source_files))
    if given != 1:
        raise click.UsageError("give exactly one of --ids, --ids-file or --source-file")
    ids = flt = None
    try:
        if ids_text is not None:
            ids = _parse_ids(ids_text, "--ids")
        elif ids_file is not None:
            text = sys.stdin.read() if str(ids_file) == "-" else ids_file.read_text()
            ids = _parse_ids(text, str(ids_file))
        else:
            flt = {"source_file": list(source_files) if len(source_files) > 1 else source_files[0]}
    except (OSError, ValueError) as exc:
        _fail(exc)
    out = _call_server(url, token, timeout, lambda c: c.delete(ids, filter=flt))
    click.echo(f"deleted={out['deleted']}")
    click.echo(f"lsn={_kv(out['lsn'])}")


@cli.command("purge")
@server_options(3600.0)
def purge_cmd(url, token, timeout):
    """Erase the payloads of every deleted vector now, on a running server (POST /v2/admin/compact
    {"purge": true}; role admin). Can take minutes. Prints job_id=, state= and each detail as key=value."""
    out = _call_server(url, token, timeout, lambda c: c.compact(purge=True))
    click.echo(f"job_id={out['job_id']}")
    click.echo(f"state={out['state']}")
    for key, value in out.get("details", {}).items():
        click.echo(f"{key}={_kv(value)}")


def main():
    cli(prog_name="vibrato")


if __name__ == "__main__":
    main()
