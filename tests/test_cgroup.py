"""What the cgroup allows, read from fake cgroup trees here (and from real containers under `--cpus` and `--memory`
in tests/test_docker.py): the core count honours the CPU quota (v2 and v1) and the CPU affinity, whichever is
smaller; the memory the process may use is its cgroup's limit, or the machine's memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engine.resources import AFFINITY, CGROUP, MemorySize, count_cores, memory_size, usable_cores


def v2_tree(tmp_path: Path, cgroup: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 hierarchy with `cpu.max` in the given directories, and the process's /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    (root / cgroup.strip("/")).mkdir(parents=True)
    for directory, limit in limits.items():
        (root / directory.strip("/") / "cpu.max").write_text(limit + "\n")
    membership = tmp_path / "membership"
    membership.write_text(f"0::{cgroup}\n")
    return root, membership


def v1_tree(tmp_path: Path, mount: str, cgroup: str, quota_dir: str, quota: int, period: int) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    directory = root / mount / quota_dir.strip("/")
    directory.mkdir(parents=True)
    (directory / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (directory / "cpu.cfs_period_us").write_text(f"{period}\n")
    membership = tmp_path / "membership"
    membership.write_text(f"12:memory:/x\n4:{mount}:{cgroup}\n0::/\n")
    return root, membership


def test_no_quota_means_the_affinity(tmp_path: Path) -> None:
    root, membership = v2_tree(tmp_path, "/system.slice/app.service", {"/system.slice/app.service": "max 100000"})
    cores = count_cores(root, membership, affinity=16)
    assert (cores.count, cores.source) == (16, AFFINITY)
    assert cores.describe() == "16 (CPU affinity; no cgroup CPU quota)"  # "max": no limit
    assert cores.quota is None


@pytest.mark.parametrize(
    ("limit", "expected"), [("200000 100000", 2), ("150000 100000", 1), ("50000 100000", 1), ("350000 50000", 7)]
)
def test_a_v2_quota_is_rounded_down_to_whole_cores_one_at_least(tmp_path: Path, limit: str, expected: int) -> None:
    root, membership = v2_tree(tmp_path, "/kubepods/pod1/c1", {"/kubepods/pod1/c1": limit})
    cores = count_cores(root, membership, affinity=16)
    assert (cores.count, cores.source) == (expected, CGROUP)
    assert f"cgroup quota {limit.replace(' ', '/')}" in cores.describe() and "CPU affinity 16" in cores.describe()


def test_the_tightest_ancestor_wins(tmp_path: Path) -> None:
    limits = {"/kubepods": "max 100000", "/kubepods/pod1": "300000 100000", "/kubepods/pod1/c1": "800000 100000"}
    root, membership = v2_tree(tmp_path, "/kubepods/pod1/c1", limits)
    assert count_cores(root, membership, affinity=16).count == 3


def test_inside_a_container_the_mount_root_is_the_cgroup(tmp_path: Path) -> None:
    """Docker without a cgroup namespace: /proc/self/cgroup names /docker/<id>, the mount's root holds its quota."""
    root, membership = v2_tree(tmp_path, "/", {"/": "100000 100000"})
    membership.write_text("0::/docker/0123abcd\n")
    assert count_cores(root, membership, affinity=2).count == 1


def test_the_affinity_wins_when_it_is_smaller(tmp_path: Path) -> None:
    root, membership = v2_tree(tmp_path, "/a", {"/a": "800000 100000"})
    cores = count_cores(root, membership, affinity=2)
    assert (cores.count, cores.source) == (2, AFFINITY)
    assert "= 8 cores" in cores.describe()


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_a_v1_quota_is_read(tmp_path: Path, mount: str) -> None:
    root, membership = v1_tree(tmp_path, mount, "/docker/0123abcd", "/", quota=200_000, period=100_000)
    cores = count_cores(root, membership, affinity=16)
    assert (cores.count, cores.source) == (2, CGROUP)
    assert cores.quota is not None and cores.quota.file.endswith("cpu.cfs_quota_us")


def test_a_v1_quota_of_minus_one_is_no_quota(tmp_path: Path) -> None:
    root, membership = v1_tree(tmp_path, "cpu", "/", "/", quota=-1, period=100_000)
    assert count_cores(root, membership, affinity=4).source == AFFINITY


def test_unreadable_or_missing_files_mean_no_quota(tmp_path: Path) -> None:
    assert count_cores(tmp_path / "nothing", tmp_path / "no-membership", affinity=3).count == 3
    root, membership = v2_tree(tmp_path, "/a", {"/a": "garbage"})
    assert count_cores(root, membership, affinity=3).count == 3


def test_this_process_is_counted_once() -> None:
    assert usable_cores() is usable_cores()
    assert usable_cores().count >= 1


def test_a_memory_limit_is_read_from_v2_and_v1_and_the_machine_caps_it(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000000 kB\nMemFree:        100 kB\n")
    root = tmp_path / "cgroup"
    (root / "app").mkdir(parents=True)
    (root / "app" / "memory.max").write_text(f"{2**30}\n")
    membership = tmp_path / "membership"
    membership.write_text("0::/app\n")
    assert memory_size(root, membership, meminfo).bytes == 2**30
    (root / "app" / "memory.max").write_text("max\n")
    machine = MemorySize(8_000_000 * 1024, "the machine's memory, no cgroup limit")
    assert memory_size(root, membership, meminfo) == machine
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    membership.write_text("4:memory:/docker/abc\n")
    assert memory_size(v1, membership, meminfo).bytes == 8_000_000 * 1024
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{512 * 2**20}\n")
    assert memory_size(v1, membership, meminfo).bytes == 512 * 2**20


def test_worker_processes_each_size_by_their_share(tmp_path: Path) -> None:
    """A quota of 8 cores shared by 3 workers: each sizes its sessions by 2 (and costs stay counted on 8)."""
    root, membership = v2_tree(tmp_path, "/a", {"/a": "800000 100000"})
    cores = count_cores(root, membership, affinity=16, workers=3)
    assert (cores.count, cores.share) == (8, 2)
    assert cores.describe().endswith("2 for each of 3 workers")
    assert count_cores(root, membership, affinity=16, workers=16).share == 1
