"""CLI tests: flag parsing and defaults of serve-v2 (CONTRACT.md §1.8), the key commands, snapshot-create /
snapshot-restore / replay-to-lsn, exit codes. In-process through click's CliRunner, plus subprocesses."""
import os
import stat

import numpy as np
import pytest
from click.testing import CliRunner

from server_util import run_cli
from vibrato import apikeys
from vibrato.catalog import Catalog, keys as keys_sql
from vibrato.cli import cli
from vibrato.engine import Engine

SERVE_DEFAULTS = {
    "data_dir": "vibrato_data", "collection": "default", "dim": 128, "port": 8080, "host": "0.0.0.0",
    "checkpoint_interval_secs": 30, "compaction_interval_secs": 180, "orphan_ttl_hours": 168,
    "audio_colocated": True, "public_health_metrics": True, "catalog_read_timeout_ms": 5000,
    "sqlite_wal_autocheckpoint_pages": 1000, "quarantine_max_files": 50, "quarantine_max_bytes": 5368709120,
    "background_io_mb_per_sec": 40, "hot_index_shards": 8, "vector_madvise_mode": "random",
    "bootstrap_admin_key": False, "max_body_bytes": 2 * 1024 * 1024, "max_k": 1000, "max_ef": 4096,
    "max_batch": 10_000, "max_identify_frames": 4096, "max_tags": 64, "max_tag_bytes": 128,
}


@pytest.fixture(autouse=True)
def no_env_pepper(monkeypatch):
    monkeypatch.delenv("VIBRATO_API_PEPPER", raising=False)


def serve_params(*args):
    cmd = cli.commands["serve-v2"]
    ctx = cmd.make_context("serve-v2", list(args))
    return ctx.params


def test_serve_v2_defaults_match_the_reference():
    """Every default is v2.1's (CONTRACT.md §1.8, R1) but the madvise mode's (random, D39)."""
    params = serve_params()
    for name, value in SERVE_DEFAULTS.items():
        assert str(params[name]) == str(value) if name == "data_dir" else params[name] == value, name


@pytest.mark.parametrize("args, expected", [
    (["--audio-colocated"], True), (["--audio-colocated", "true"], True), (["--audio-colocated", "false"], False),
    (["--audio-colocated", "FALSE"], False), (["--audio-colocated=false"], False),
    (["--audio-colocated", "--port", "9"], True),
])
def test_bool_flags_accept_value_and_bare_form(args, expected):
    assert serve_params(*args)["audio_colocated"] is expected


def test_runbook_serve_command_parses():
    params = serve_params(*("--data-dir ./vibrato_data --collection default --dim 128 --port 8080 --host 0.0.0.0 "
                            "--checkpoint-interval-secs 30 --compaction-interval-secs 180 --orphan-ttl-hours 168 "
                            "--audio-colocated true --public-health-metrics true --bootstrap-admin-key true").split())
    assert params["bootstrap_admin_key"] is True and params["public_health_metrics"] is True
    assert serve_params("--bootstrap-admin-key")["bootstrap_admin_key"] is True
    assert serve_params("-p", "9999", "--vector-madvise-mode", "random", "--host", "::1")["port"] == 9999


@pytest.mark.parametrize("args", [["--audio-colocated", "maybe"], ["--dim", "0"], ["--port", "70000"],
                                  ["--vector-madvise-mode", "fast"], ["--no-such-flag"], ["--max-k", "x"]])
def test_serve_v2_usage_errors_exit_2(args):
    result = CliRunner().invoke(cli, ["serve-v2", *args])
    assert result.exit_code == 2, result.output


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and "vibrato" in result.output
    result = runner.invoke(cli, ["serve-v2", "--help"])
    assert result.exit_code == 0 and "--public-health-metrics" in result.output


def test_key_create_list_revoke(tmp_path):
    runner = CliRunner()
    data = tmp_path / "data"
    result = runner.invoke(cli, ["key-create", "--data-dir", str(data), "--name", "prod-query", "--roles", "query"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 and lines[0].startswith("id=vbk_") and lines[1].startswith("token=")
    key_id, token = lines[0][3:], lines[1][6:]
    assert token.startswith(key_id + ".") and len(token.split(".")[1]) == 48
    # CONTRACT.md D18: the pepper file was created once with mode 0600 and the stored hash uses it.
    pepper_file = data / "api_pepper"
    assert stat.S_IMODE(pepper_file.stat().st_mode) == 0o600
    with Catalog(data / "catalog.sqlite3") as cat:
        row = cat.read(keys_sql.get, key_id)
    assert row["roles"] == "query" and row["revoked_at"] is None
    assert row["key_hash"] == apikeys.hash_secret(pepper_file.read_text().strip(), token.split(".")[1])
    assert token.split(".")[1] not in (data / "catalog.sqlite3").read_bytes().decode(errors="replace")

    result = runner.invoke(cli, ["key-create", "--data-dir", str(data), "--name", "all"])
    assert result.exit_code == 0
    listing = runner.invoke(cli, ["key-list", "--data-dir", str(data)])
    assert listing.exit_code == 0
    assert f"id={key_id} name=prod-query roles=query created=" in listing.output
    assert "roles=admin,query,ingest" in listing.output and "revoked=-" in listing.output
    result = runner.invoke(cli, ["key-revoke", "--data-dir", str(data), "--key-id", key_id])
    assert result.exit_code == 0 and result.output == f"revoked={key_id}\n"
    result = runner.invoke(cli, ["key-revoke", "--data-dir", str(data), "--key-id", "vbk_unknown"])
    assert result.exit_code == 0 and result.output == "revoked=vbk_unknown\n"
    listing = runner.invoke(cli, ["key-list", "--data-dir", str(data)]).output
    assert "revoked=-" in listing and f"id={key_id} name=prod-query roles=query" in listing
    assert [ln for ln in listing.splitlines() if ln.startswith(f"id={key_id}")][0].split("revoked=")[1] != "-"


def test_key_create_errors(tmp_path):
    out = run_cli("key-create", "--data-dir", tmp_path / "d", "--name", "x", "--roles", "root, superuser")
    assert out.returncode == 1
    assert out.stderr.strip() == ("Error: No valid roles parsed from 'root, superuser'. "
                                  "Use comma-separated query,ingest,admin")
    out = run_cli("key-create", "--data-dir", tmp_path / "d")
    assert out.returncode == 2 and "--name" in out.stderr
    out = run_cli("key-revoke", "--data-dir", tmp_path / "d")
    assert out.returncode == 2


def test_pepper_from_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("VIBRATO_API_PEPPER", "from-env")
    assert apikeys.load_pepper(tmp_path) == "from-env"
    assert not (tmp_path / "api_pepper").exists()
    monkeypatch.delenv("VIBRATO_API_PEPPER")
    first = apikeys.load_pepper(tmp_path)
    assert first == apikeys.load_pepper(tmp_path) and len(first) == 64


def test_snapshot_restore_and_replay_commands(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 8)).astype(np.float32)
    with Engine.open(data, dim=8, background=False, audio_colocated=False) as eng:
        eng.ingest_batch([{"vector": v} for v in x[:20]])
        eng.checkpoint()
        eng.ingest_batch([{"vector": v} for v in x[20:]])
    runner = CliRunner()
    result = runner.invoke(cli, ["snapshot-create", "--data-dir", str(data), "--collection", "default"])
    assert result.exit_code == 0, result.output
    out = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert set(out) == {"snapshot_id", "snapshot_dir", "segments"} and out["snapshot_id"].startswith("snap_")
    assert int(out["segments"]) >= 1 and os.path.isdir(out["snapshot_dir"])
    with Engine.open(data, dim=8, background=False, audio_colocated=False) as eng:
        eng.ingest_batch([{"vector": v} for v in x[:5]])  # diverge from the snapshot
    result = runner.invoke(cli, ["snapshot-restore", "--data-dir", str(data), "--snapshot-dir", out["snapshot_dir"]])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"restored_snapshot={out['snapshot_dir']}"
    with Engine.open(data, dim=8, background=False, audio_colocated=False) as eng:
        assert eng.stats()["total_vectors"] == 30
    result = runner.invoke(cli, ["replay-to-lsn", "--data-dir", str(data), "--collection", "default",
                                 "--target-lsn", "25"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["replayed_to_lsn=25", "collection=default"]
    result = runner.invoke(cli, ["snapshot-create", "--data-dir", str(data), "--collection", "nope"])
    assert result.exit_code == 1 and "Error: " in result.stderr and "nope" in result.stderr
    result = runner.invoke(cli, ["snapshot-restore", "--data-dir", str(data), "--snapshot-dir",
                                 str(tmp_path / "missing")])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ")


def test_bind_host_accepts_hostnames_and_bracketed_ipv6():
    from vibrato.server.app import bind_host
    assert bind_host("[::1]") == "::1" and bind_host("::1") == "::1"
    assert bind_host("localhost") == "localhost" and bind_host(" 0.0.0.0 ") == "0.0.0.0"
