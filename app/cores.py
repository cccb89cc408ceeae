"""How many cores this process may use: its CPU affinity, or its cgroup's CPU quota when that is smaller.

A container run with `docker run --cpus 2`, compose's `cpus: 2` or a Kubernetes `limits.cpu: 2` on a 16-vCPU machine
sees 16 cores in its affinity but is throttled to 2 cores' worth of time: sizing thread pools, layouts and costs by
the affinity would oversubscribe it eightfold. The quota is read from cgroup v2 (`cpu.max`) or v1
(`cpu.cfs_quota_us` / `cpu.cfs_period_us`) for the process's cgroup and each ancestor (the tightest wins), rounded
down, one core at least. Read once per process (`usable_cores`); `count_cores` takes the paths, for tests.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMBERSHIP = Path("/proc/self/cgroup")
AFFINITY, CGROUP = "affinity", "cgroup"


@dataclass(frozen=True)
class Quota:
    """A CPU quota: `quota` microseconds of CPU time every `period` microseconds."""

    quota: int
    period: int
    file: str  # where it was read, for the log

    @property
    def cores(self) -> float:
        return self.quota / self.period


@dataclass(frozen=True)
class CoreCount:
    count: int
    source: str  # AFFINITY or CGROUP: which one limits the count
    affinity: int
    quota: Quota | None

    def describe(self) -> str:
        """'2 (cgroup quota 200000/100000 in /sys/fs/cgroup/cpu.max; affinity 16)'."""
        if self.quota is None:
            return f"{self.count} (CPU affinity; no cgroup CPU quota)"
        limit = f"cgroup quota {self.quota.quota}/{self.quota.period} in {self.quota.file}"
        if self.source == AFFINITY:
            return f"{self.count} (CPU affinity; {limit} = {self.quota.cores:g} cores)"
        return f"{self.count} ({limit}; CPU affinity {self.affinity})"


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ancestors(directory: Path, cgroup: str) -> Iterator[Path]:
    """directory/cgroup, then each parent up to directory itself (inside a container the cgroup's own path may
    not exist under the mount, whose root is then the container's cgroup)."""
    path = PurePosixPath("/", cgroup)
    yield from (directory / p.relative_to("/") for p in (path, *path.parents))


def _read_v2(file: Path) -> Quota | None:
    quota, _, period = file.read_text().strip().partition(" ")
    return None if quota == "max" else Quota(int(quota), int(period or 100_000), str(file))


def _read_v1(file: Path) -> Quota | None:
    quota = int(file.read_text().strip())
    period = int((file.parent / "cpu.cfs_period_us").read_text().strip())
    return None if quota <= 0 else Quota(quota, period, str(file))


def _quota_files(root: Path, membership: Path) -> Iterator[tuple[Path, bool]]:
    """Every file that may hold a quota of this process's cgroups, each with whether it is cgroup v2's."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, cgroup = rest.partition(":")
        if hierarchy == "0" and not controllers:  # cgroup v2, the unified hierarchy
            for directory in _ancestors(root, cgroup):
                yield directory / "cpu.max", True
        elif "cpu" in controllers.split(","):  # cgroup v1, mounted as cpu or cpu,cpuacct
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                for directory in _ancestors(mount, cgroup):
                    yield directory / "cpu.cfs_quota_us", False


def cpu_quota(root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP) -> Quota | None:
    """The tightest CPU quota over this process's cgroup and its ancestors; None when there is none."""
    quotas = []
    for file, v2 in dict.fromkeys(_quota_files(root, membership)):  # v1's mount names may repeat a file
        try:
            quota = _read_v2(file) if v2 else _read_v1(file)
        except (OSError, ValueError):
            continue
        if quota is not None:
            quotas.append(quota)
    return min(quotas, key=lambda q: q.cores, default=None)


def count_cores(root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP, affinity: int | None = None) -> CoreCount:
    """The affinity's core count, or the quota's rounded down (one at least) when that is smaller."""
    affinity = _affinity() if affinity is None else affinity
    quota = cpu_quota(root, membership)
    if quota is not None and math.floor(quota.cores) < affinity:
        return CoreCount(max(1, math.floor(quota.cores)), CGROUP, affinity, quota)
    return CoreCount(affinity, AFFINITY, affinity, quota)


@cache
def usable_cores() -> CoreCount:
    """This process's cores, read once: every thread count, layout and cost of the service is sized by it."""
    return count_cores()


def available_cores() -> int:
    """usable_cores()'s count."""
    return usable_cores().count
