"""What this process may use: cores (its CPU affinity, or its cgroup's CPU quota when that is smaller) and
memory (its cgroup's memory limit, or the machine's memory), and what it uses now.

Under `docker run --cpus 2`, compose's `cpus: 2` or a Kubernetes `limits.cpu: 2` on a 16-vCPU machine, the
affinity shows 16 cores but the process gets 2 cores' worth of time: sizing thread pools, layouts and costs by the
affinity would oversubscribe it eightfold. The quota is rounded down, one core at least. Read once per process
(`usable_cores`); `count_cores` takes the paths, for tests. Memory likewise (`usable_memory`, `memory_size`).

Worker processes (WORKERS > 1) share them: each sizes its sessions and image threads by its share of the cores
(`CoreCount.share`, of its group's count: app.workers) and its memory budget by its share of the memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from app.engine.cgroup import CGROUP_ROOT, MEMBERSHIP, Quota, cpu_quota, memory_limit
from ensemble_contract.modes import cores_each

AFFINITY, CGROUP = "affinity", "cgroup"


@dataclass(frozen=True)
class CoreCount:
    count: int
    source: str  # AFFINITY or CGROUP: which one limits the count
    affinity: int
    quota: Quota | None
    workers: int = 1  # processes sharing them

    @property
    def share(self) -> int:
        """The cores each worker process sizes its sessions by (one at least)."""
        return cores_each(self.count, self.workers)

    def describe(self) -> str:
        """'2 (cgroup quota 200000/100000 in /sys/fs/cgroup/cpu.max; CPU affinity 16)', and each worker's share."""
        if self.quota is None:
            where = f"{self.count} (CPU affinity; no cgroup CPU quota)"
        elif self.source == AFFINITY:
            limit = f"cgroup quota {self.quota.quota}/{self.quota.period} in {self.quota.file}"
            where = f"{self.count} (CPU affinity; {limit} = {self.quota.cores:g} cores)"
        else:
            limit = f"cgroup quota {self.quota.quota}/{self.quota.period} in {self.quota.file}"
            where = f"{self.count} ({limit}; CPU affinity {self.affinity})"
        return where if self.workers == 1 else f"{where}, {self.share} for each of {self.workers} workers"


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def count_cores(
    root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP, affinity: int | None = None, workers: int = 1
) -> CoreCount:
    """The affinity's core count, or the quota's rounded down (one at least) when that is smaller."""
    affinity = _affinity() if affinity is None else affinity
    quota = cpu_quota(root, membership)
    if quota is not None and math.floor(quota.cores) < affinity:
        return CoreCount(max(1, math.floor(quota.cores)), CGROUP, affinity, quota, workers)
    return CoreCount(affinity, AFFINITY, affinity, quota, workers)


@cache
def usable_cores() -> CoreCount:
    """This process's cores, read once: costs are counted on them, thread counts and layouts on a worker's share."""
    return count_cores()


MEMINFO = Path("/proc/meminfo")
STATUS = Path("/proc/self/status")
MIB = 2**20


@dataclass(frozen=True)
class MemorySize:
    bytes: int
    source: str  # the cgroup file of the limit, or /proc/meminfo

    def describe(self) -> str:
        return f"{self.bytes / MIB:,.0f} MiB ({self.source})"


def memory_size(root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP, meminfo: Path = MEMINFO) -> MemorySize:
    """The cgroup's memory limit, or the machine's memory when that is smaller or there is no limit."""
    lines = meminfo.read_text().splitlines()
    total = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemTotal:"))
    limit = memory_limit(root, membership)
    if limit is not None and limit.bytes < total:
        return MemorySize(limit.bytes, f"cgroup limit in {limit.file}")
    return MemorySize(total, "the machine's memory, no cgroup limit")


@cache
def usable_memory() -> MemorySize:
    return memory_size()


def charged_bytes() -> int:
    """The memory this process holds and cannot give back: its resident anonymous and shared pages (RssAnon +
    RssShmem), what a cgroup's limit charges it. VmRSS would count the libraries' mapped files too (OpenVINO's are
    over 100 MiB), page cache the kernel reclaims under that limit. 0 where /proc has none."""
    try:
        lines = STATUS.read_text().splitlines()
    except OSError:
        return 0
    return sum(int(line.split()[1]) * 1024 for line in lines if line.startswith(("RssAnon:", "RssShmem:")))
