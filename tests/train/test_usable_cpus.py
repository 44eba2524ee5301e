"""train.tools.usable_cpus, which the tools' default --workers count: the CPUs this process may use, from its
CPU affinity and its cgroup's CPU quota (read under a folder that stands for the file system's root), not the
host's cores that os.cpu_count() counts."""

from __future__ import annotations

import os
import sys

import pytest

from train.tools import usable_cpus

HOST_CPUS = 64


@pytest.fixture(params=["process_cpu_count", "sched_getaffinity"])
def affinity(request, monkeypatch):
    """This process bound to 8 of a host's 64 CPUs, as Python 3.13's os.process_cpu_count tells it, or as
    os.sched_getaffinity does where that is missing (Python 3.12 and older)."""
    monkeypatch.setattr(os, "cpu_count", lambda: HOST_CPUS)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    if request.param == "process_cpu_count":
        monkeypatch.setattr(os, "process_cpu_count", lambda: 8, raising=False)
    else:
        monkeypatch.delattr(os, "process_cpu_count", raising=False)
    return 8


def write(root, path: str, text: str | bytes) -> None:
    path = root.joinpath(*path.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)


def test_the_affinity_is_counted_not_the_hosts_cpus(affinity, tmp_path):
    assert usable_cpus(str(tmp_path)) == affinity  # (no cgroup files: no quota)


def test_without_an_affinity_the_hosts_cpus(tmp_path, monkeypatch):
    # (macOS, Windows: neither function)
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cpus(str(tmp_path)) == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # (undetermined)
    assert usable_cpus(str(tmp_path)) == 1


@pytest.mark.parametrize("function", ["process_cpu_count", "sched_getaffinity"])
def test_an_affinity_that_cannot_be_read_counts_the_hosts_cpus(tmp_path, monkeypatch, function):
    # Python 3.13's os.process_cpu_count() is len(os.sched_getaffinity(0)), which raises OSError where the call is
    # refused (a seccomp sandbox): every tool's parser raised it.
    def refused(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.setattr(os, "sched_getaffinity", refused, raising=False)
    if function == "process_cpu_count":
        monkeypatch.setattr(os, "process_cpu_count", refused, raising=False)
    else:
        monkeypatch.delattr(os, "process_cpu_count", raising=False)
    assert usable_cpus(str(tmp_path)) == 6


@pytest.mark.parametrize("cpu_max, cpus", [
    ("max 100000\n", 8),  # no quota
    ("150000 100000\n", 2),  # 1.5 CPUs, rounded up
    ("400000 100000\n", 4),
    ("50000 100000\n", 1),  # half a CPU: one worker still
    ("1600000 100000\n", 8),  # a quota above the affinity
    ("lots of CPUs\n", 8), ("\n", 8), ("1 2 3\n", 8), ("0 100000\n", 8), ("100000 0\n", 8), (b"\xff\xfe\x00", 8),
])
def test_a_cgroup_v2_quota_caps_the_count(affinity, tmp_path, cpu_max, cpus):
    write(tmp_path, "proc/self/cgroup", "0::/slurm/job7/step0\n")
    write(tmp_path, "sys/fs/cgroup/slurm/job7/step0/cpu.max", cpu_max)
    assert usable_cpus(str(tmp_path)) == cpus


def test_a_parent_cgroups_quota_caps_the_count(affinity, tmp_path):
    write(tmp_path, "proc/self/cgroup", "0::/slurm/job7/step0\n")
    write(tmp_path, "sys/fs/cgroup/slurm/job7/step0/cpu.max", "max 100000\n")
    write(tmp_path, "sys/fs/cgroup/slurm/job7/cpu.max", "300000 100000\n")
    write(tmp_path, "sys/fs/cgroup/slurm/cpu.max", "500000 100000\n")
    write(tmp_path, "sys/fs/cgroup/elsewhere/cpu.max", "100000 100000\n")  # (not this process's)
    assert usable_cpus(str(tmp_path)) == 3


def test_a_containers_quota_at_the_mount_whatever_path_the_host_gives(affinity, tmp_path):
    # docker --cpus 4 or a Kubernetes limit: /sys/fs/cgroup is the container's own cgroup, while
    # /proc/self/cgroup may give the host's path for it, which is not there.
    write(tmp_path, "proc/self/cgroup", "0::/kubepods/burstable/pod1/0123abc\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "400000 100000\n")
    assert usable_cpus(str(tmp_path)) == 4
    write(tmp_path, "proc/self/cgroup", "0::/\n")  # (a cgroup namespace of its own)
    assert usable_cpus(str(tmp_path)) == 4


def test_a_cgroup_outside_its_namespaces_root_has_no_quota_under_the_mount(affinity, tmp_path):
    # In a cgroup namespace the mount's root is the namespace's, and a cgroup outside it is given with "..": they
    # were dropped, and the quotas of the mount's root (which does not hold this process) and of "other" below it
    # (another cgroup) were read as this process's.
    write(tmp_path, "proc/self/cgroup", "0::/../other\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "100000 100000\n")
    write(tmp_path, "sys/fs/cgroup/other/cpu.max", "200000 100000\n")
    assert usable_cpus(str(tmp_path)) == affinity
    write(tmp_path, "proc/self/cgroup", "0::/other\n")  # (below the root: both count)
    assert usable_cpus(str(tmp_path)) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="a file name that is not UTF-8 (cgroups are Linux's)")
def test_a_cgroup_named_in_bytes_that_are_not_utf8(affinity, tmp_path):
    # A cgroup's name is any bytes: read as UTF-8 with U+FFFD in place of \xe9, the path named no folder, and the
    # walk went past the cgroup's own quota to its parent's (none here).
    write(tmp_path, "proc/self/cgroup", b"0::/jobs/caf\xe9\n")
    write(tmp_path, "sys/fs/cgroup/jobs/" + os.fsdecode(b"caf\xe9") + "/cpu.max", "200000 100000\n")
    assert usable_cpus(str(tmp_path)) == 2


@pytest.mark.parametrize("quota, period, cpus", [
    ("-1\n", "100000\n", 8),  # no quota
    ("250000\n", "100000\n", 3),
    ("150000\n", "100000\n", 2),
    ("250000\n", None, 8),  # (no period: no quota)
    (None, "100000\n", 8),
    ("a lot\n", "100000\n", 8), ("250000\n", "\n", 8), ("250000 1\n", "100000\n", 8),
])
@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_a_cgroup_v1_quota_caps_the_count(affinity, tmp_path, mount, quota, period, cpus):
    write(tmp_path, "proc/self/cgroup", "12:memory:/docker/0123abc\n4:cpu,cpuacct:/docker/0123abc\n"
          "1:name=systemd:/docker/0123abc\n0::/\n")
    for name, text in (("cpu.cfs_quota_us", quota), ("cpu.cfs_period_us", period)):
        if text is not None:
            write(tmp_path, f"sys/fs/cgroup/{mount}/docker/0123abc/{name}", text)
    assert usable_cpus(str(tmp_path)) == cpus


def test_files_that_cannot_be_read_set_no_quota(affinity, tmp_path):
    (tmp_path / "proc" / "self" / "cgroup").mkdir(parents=True)  # (a folder: open() raises)
    (tmp_path / "sys" / "fs" / "cgroup" / "cpu.max").mkdir(parents=True)
    (tmp_path / "sys" / "fs" / "cgroup" / "cpu" / "cpu.cfs_quota_us").mkdir(parents=True)
    assert usable_cpus(str(tmp_path)) == affinity
    assert usable_cpus(str(tmp_path / "nothing here")) == affinity
    write(tmp_path / "other", "proc/self/cgroup", "no colons\n::\n0::\n3:cpu:../../..\n")
    write(tmp_path / "other", "sys/fs/cgroup/cpu.max", "200000 100000\n")
    assert usable_cpus(str(tmp_path / "other")) == 2  # (a path of garbage: the mount's own quota still)


def test_this_machine(tmp_path):
    # (whatever it is: no error, and no more than its cores)
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
