"""`--query-workers 0` (the default): one query worker per usable core, at most MAX_AUTO_QUERY_WORKERS;
usable means the CPU affinity, lowered by the cgroup's CPU quota (docs/SERVER.md)."""
import os

import pytest

from vibrato import config as C
from vibrato.config import Config, cgroup_cpu_quota


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_process_own_cgroup(tmp_path):
    _write(tmp_path / "proc", "0::/system.slice/vibrato.service\n")
    _write(tmp_path / "cg/system.slice/vibrato.service/cpu.max", "150000 100000\n")
    _write(tmp_path / "cg/cpu.max", "max 100000\n")  # the root's: not this process's
    assert cgroup_cpu_quota(tmp_path / "proc", tmp_path / "cg") == 1.5
    _write(tmp_path / "cg/system.slice/vibrato.service/cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path / "proc", tmp_path / "cg") is None


def test_cgroup_v2_in_a_container_namespace_reads_the_root(tmp_path):
    _write(tmp_path / "proc", "0::/\n")
    _write(tmp_path / "cg/cpu.max", "100000 100000\n")
    assert cgroup_cpu_quota(tmp_path / "proc", tmp_path / "cg") == 1.0


def test_cgroup_v1_quota(tmp_path):
    _write(tmp_path / "proc", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    _write(tmp_path / "cg/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "250000\n")
    _write(tmp_path / "cg/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path / "proc", tmp_path / "cg") == 2.5
    _write(tmp_path / "cg/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(tmp_path / "proc", tmp_path / "cg") is None


def test_unreadable_or_malformed_cgroup_files_mean_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path / "missing", tmp_path / "cg") is None
    _write(tmp_path / "proc", "0::/a\n")
    _write(tmp_path / "cg/a/cpu.max", "lots\n")
    assert cgroup_cpu_quota(tmp_path / "proc", tmp_path / "cg") is None


@pytest.mark.parametrize("cores, quota, want", [(1, None, 1), (2, None, 2), (16, None, C.MAX_AUTO_QUERY_WORKERS),
                                                (8, 1.5, 2), (8, 0.5, 1)])
def test_the_default_is_one_worker_per_usable_core(monkeypatch, cores, quota, want):
    """One per usable core, a single core included (one worker beside the writer); an explicit count is
    taken as given, and --query-workers 1 starts none (the writer serves alone)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(C, "cgroup_cpu_quota", lambda: quota)
    assert Config().worker_processes == want
    assert Config(query_workers=3).worker_processes == 3
    assert Config(query_workers=1).worker_processes == 0


def test_query_workers_out_of_range_is_refused():
    with pytest.raises(ValueError, match="--query-workers"):
        Config(query_workers=65)
    with pytest.raises(ValueError, match="--query-workers"):
        Config(query_workers=-1)


@pytest.mark.parametrize("workers,allowed,want", [
    (2, {0, 1}, [0, 1]),            # one worker per allowed CPU: each on its own
    (4, {3, 5, 8, 9}, [3, 5, 8, 9]),  # the affinity's CPUs, ascending, whatever their numbers
    (2, {0, 1, 2, 3}, [None, None]),  # fewer workers than CPUs (a quota, or --query-workers 2): free
    (3, {0, 1}, [None, None, None]),  # more workers than CPUs: free
    (1, {0}, [None]),               # the writer serves alone: nothing to pin
])
def test_workers_are_pinned_only_when_there_is_one_per_allowed_cpu(workers, allowed, want):
    assert [C.worker_cpu(i, workers, allowed) for i in range(1, workers + 1)] == want
    assert C.worker_cpu(0, workers, allowed) is None and C.worker_cpu(workers + 1, workers, allowed) is None


def test_pin_query_workers_takes_auto_or_off():
    assert Config(data_dir="/tmp/x", dim=4).pin_query_workers == "auto"
    assert Config(data_dir="/tmp/x", dim=4, pin_query_workers=" OFF ").pin_query_workers == "off"
    with pytest.raises(ValueError, match="--pin-query-workers"):
        Config(data_dir="/tmp/x", dim=4, pin_query_workers="always")
