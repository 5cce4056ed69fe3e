"""The deploy/ tree: systemd unit (sd_notify readiness), Prometheus rules, Grafana dashboard.

* sd_notify: a real serve-v2 child with NOTIFY_SOCKET pointing at a datagram socket bound here
  sends READY=1 exactly when /v2/health/ready answers 200, and STOPPING=1 on SIGTERM.
* `systemd-analyze verify` on the unit and `promtool check/test rules` on the rules (skipped where
  the tool is missing; .ci/run installs both with CI=true).
* Every metric name used by the rules and the dashboard exists in a real /v2/metrics exposition.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
import yaml  # PyYAML: a dependency of schemathesis (test extra)
from prometheus_client.parser import text_string_to_metric_families

from server_util import REPO, ServerProcess
from vibrato.client import Client
from vibrato.server import notify

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "vibrato.service"
ENV_FILE = DEPLOY / "systemd" / "vibrato.env"
RULES = DEPLOY / "prometheus" / "vibrato-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "vibrato-rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "vibrato-dashboard.json"

# Series Prometheus itself makes for every target (not in the exposition).
SCRAPE_SERIES = {"up"}
METRIC_NAME = re.compile(r"\b(vibrato_[a-zA-Z0-9_]+|up)\b(?!\s*\()")


# ---------------------------------------------------------------------------- sd_notify
def _bind_notify_socket(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    return sock


def _recv_until(sock, key, deadline, seen):
    """Read datagrams until one holds `key` (e.g. "READY=1"); every message goes to `seen`."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {key} within the deadline; got {seen}")
        sock.settimeout(left)
        try:
            message = sock.recv(4096).decode()
        except socket.timeout:
            continue
        seen.append(message)
        if key in message.split("\n"):
            return message


def test_sd_notify_ready_when_health_ready_then_stopping_on_sigterm(tmp_path):
    path = tmp_path / "notify.sock"
    sock = _bind_notify_socket(str(path))
    seen = []
    try:
        with ServerProcess(tmp_path / "data", env={"NOTIFY_SOCKET": str(path)}) as srv:
            ready = _recv_until(sock, "READY=1", time.monotonic() + 60, seen)
            # At the moment READY=1 arrives the server answers ready (not just "port bound").
            status, _, body = Client(srv.url, timeout=5).request("GET", "/v2/health/ready")
            assert status == 200, body
            assert any(line.startswith("STATUS=ready: recovered") for line in ready.split("\n")), ready
            srv.proc.send_signal(signal.SIGTERM)
            stopping = _recv_until(sock, "STOPPING=1", time.monotonic() + 30, seen)
            assert "STATUS=draining in-flight requests" in stopping.split("\n")
            assert srv.wait_exit(60) == 0, srv.output()
    finally:
        sock.close()


def test_sd_notify_abstract_socket_and_failures_are_harmless(monkeypatch, tmp_path):
    name = f"vibrato-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = _bind_notify_socket("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.send("STATUS=hello")
        sock.settimeout(5)
        assert sock.recv(4096) == b"STATUS=hello"
    finally:
        sock.close()
    # Unset, missing socket, non-unix address: no exception, nothing sent.
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify.send("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing.sock"))
    assert notify.send("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.send("READY=1") is False


# ---------------------------------------------------------------------------- systemd unit
def _unit_settings():
    """[Service] key -> list of values, with backslash continuations joined."""
    text = re.sub(r"\\\n\s*", " ", UNIT.read_text())
    section, out = None, {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key), []).append(value)
    return out


def test_unit_settings_match_the_server():
    from vibrato.config import Config
    s = _unit_settings()

    def one(key, section="Service"):
        return s[(section, key)][-1]

    assert one("Type") == "notify" and one("NotifyAccess") == "main"
    assert (one("User"), one("Group")) == ("vibrato", "vibrato")
    assert (one("StateDirectory"), one("StateDirectoryMode")) == ("vibrato", "0700")
    assert one("KillSignal") == "SIGTERM" and one("Restart") == "on-failure"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ReadWritePaths": "/var/lib/vibrato",
                       "PrivateTmp": "yes", "ProtectHome": "yes", "LimitNOFILE": "65536", "UMask": "0077"}.items():
        assert one(key) == value, key
    assert "AF_UNIX" in one("RestrictAddressFamilies").split()  # the NOTIFY_SOCKET datagrams
    # The stop timeout covers the drain (--shutdown-timeout-secs) with room for the engine close.
    stop = one("TimeoutStopSec")
    assert stop.endswith("s") and float(stop[:-1]) >= 2 * Config().shutdown_timeout_secs
    env = dict(line.split("=", 1) for line in ENV_FILE.read_text().splitlines()
               if line and not line.startswith("#"))
    assert float(env["VIBRATO_SHUTDOWN_TIMEOUT_SECS"]) == Config().shutdown_timeout_secs
    assert env["VIBRATO_DATA_DIR"] == "/var/lib/vibrato"
    # Every ${VAR} of ExecStart is set by the environment file, and each maps to a real serve-v2 flag.
    exec_start = one("ExecStart")
    used = set(re.findall(r"\$\{?([A-Z_]+)\}?", exec_start))
    assert used <= set(env), used - set(env)
    from click.testing import CliRunner
    from vibrato.cli import cli
    help_text = CliRunner().invoke(cli, ["serve-v2", "--help"], terminal_width=200).output
    for flag in re.findall(r"(--[a-z0-9-]+) \$\{", exec_start):
        assert flag in help_text, flag


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd; .ci/run does it with CI=true)")
    # verify insists the ExecStart binary exists: point a copy at one that does.
    unit = tmp_path / "vibrato.service"
    text = UNIT.read_text()
    assert "ExecStart=/opt/vibrato/bin/vibrato serve-v2" in text
    unit.write_text(text.replace("/opt/vibrato/bin/vibrato", shutil.which("true") or "/bin/true"))
    out = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if "vibrato.service" in line]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr


# ---------------------------------------------------------------------------- rules and dashboard
def _rule_exprs():
    doc = yaml.safe_load(RULES.read_text())
    return {r.get("alert") or r["record"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def _dashboard_exprs():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def _names(exprs):
    return {m for e in exprs for m in METRIC_NAME.findall(e)}


def test_promtool_check_and_test_rules(tmp_path):
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; .ci/run does it with CI=true)")
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        out = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    # Every alert has unit tests.
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert set(_rule_exprs()) == tested
    # The dashboard's queries parse as PromQL (Grafana's variables given concrete values).
    records = [{"record": f"vibrato:dashboard_expr_{i}",
                "expr": e.replace("$__rate_interval", "5m").replace("$instance", ".*")}
               for i, e in enumerate(_dashboard_exprs()) if not e.startswith("label_values(")]
    check = tmp_path / "dashboard-exprs.yml"
    check.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    out = subprocess.run([tool, "check", "rules", str(check)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_is_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash["schemaVersion"], int) and dash["title"] and dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"] and t["datasource"]["uid"] == "${DS_PROMETHEUS}"
    # CONTRACT.md §7.1 (SLO triage checklist): stats fields, background counters, segment states — each
    # on the dashboard.
    names = _names(_dashboard_exprs())
    for name in ("vibrato_wal_pending", "vibrato_checkpoint_jobs_inflight", "vibrato_compaction_jobs_inflight",
                 "vibrato_checkpoint_total", "vibrato_compaction_total", "vibrato_active_segments",
                 "vibrato_obsolete_segments", "vibrato_failed_segments", "vibrato_sqlite_wal_bytes", "vibrato_ready",
                 "vibrato_http_requests_total", "vibrato_http_request_duration_seconds_bucket"):
        assert name in names, name


def test_rule_and_dashboard_metrics_exist_in_the_exposition(tmp_path):
    with ServerProcess(tmp_path / "data") as srv:
        srv.wait_ready()
        c = srv.client(srv.bootstrap_token)
        rng = np.random.default_rng(3)
        x = rng.standard_normal((4, 8)).astype(np.float32)
        c.ingest_batch(x.tolist())
        c.query(x[0].tolist(), k=2)
        c.checkpoint()
        text = c.metrics()
    exposed = set()
    for family in text_string_to_metric_families(text):
        exposed.add(family.name)
        exposed.update(sample.name for sample in family.samples)
    used = _names(list(_rule_exprs().values())) | _names(_dashboard_exprs())
    assert "vibrato_http_request_duration_seconds_bucket" in used and len(used) > 15
    missing = sorted(n for n in used - SCRAPE_SERIES if n not in exposed)
    assert not missing, f"not in /v2/metrics: {missing}"
    # The label values the rules select on are the ones the server emits.
    assert 'vibrato_http_request_duration_seconds_bucket{le="0.25",method="POST",route="/v2/query"}' in text
