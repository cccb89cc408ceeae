"""What this process's cgroups allow it: a CPU quota and a memory limit, from cgroup v2 or v1.

A container run with `docker run --cpus 2 --memory 2g`, compose's `cpus` and `mem_limit`, or a Kubernetes pod's
limits, sees the machine's cores and memory but is throttled to its quota and killed past its limit. Each value is
read for the process's cgroup and each ancestor, and the tightest wins; inside a container whose cgroup has no
path of its own under the mount (no cgroup namespace), the mount's root is the container's cgroup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMBERSHIP = Path("/proc/self/cgroup")
NO_MEMORY_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2**63
# Where cgroup v1 mounts a controller: under its name, or with the controllers it is mounted together with.
V1_MOUNTS = {"cpu": ("cpu", "cpu,cpuacct", "cpuacct,cpu"), "memory": ("memory",)}
T = TypeVar("T")


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
class MemoryLimit:
    bytes: int
    file: str


def _ancestors(directory: Path, cgroup: str) -> Iterator[Path]:
    path = PurePosixPath("/", cgroup)
    yield from (directory / p.relative_to("/") for p in (path, *path.parents))


def _files(root: Path, membership: Path, v2_name: str, v1_controller: str, v1_name: str) -> Iterator[tuple[Path, bool]]:
    """Every file that may hold the value for this process's cgroups, each with whether it is cgroup v2's."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, cgroup = rest.partition(":")
        if hierarchy == "0" and not controllers:  # cgroup v2, the unified hierarchy
            for directory in _ancestors(root, cgroup):
                yield directory / v2_name, True
        elif v1_controller in controllers.split(","):  # cgroup v1
            for mount in dict.fromkeys((controllers, *V1_MOUNTS[v1_controller])):
                for directory in _ancestors(root / mount, cgroup):
                    yield directory / v1_name, False


def _read_cpu(file: Path, v2: bool) -> Quota | None:
    if v2:
        quota, _, period = file.read_text().strip().partition(" ")
        return None if quota == "max" else Quota(int(quota), int(period or 100_000), str(file))
    quota = int(file.read_text().strip())
    period = int((file.parent / "cpu.cfs_period_us").read_text().strip())
    return None if quota <= 0 else Quota(quota, period, str(file))


def _read_memory(file: Path, v2: bool) -> MemoryLimit | None:
    text = file.read_text().strip()  # v2 writes "max" for no limit, v1 a huge number
    if text == "max" or int(text) >= NO_MEMORY_LIMIT:
        return None
    return MemoryLimit(int(text), str(file))


def cpu_quota(root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP) -> Quota | None:
    """The tightest CPU quota over this process's cgroup and its ancestors; None when there is none."""
    quotas = _values(_files(root, membership, "cpu.max", "cpu", "cpu.cfs_quota_us"), _read_cpu)
    return min(quotas, key=lambda q: q.cores, default=None)


def memory_limit(root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP) -> MemoryLimit | None:
    """The tightest memory limit over this process's cgroup and its ancestors; None when there is none."""
    limits = _values(_files(root, membership, "memory.max", "memory", "memory.limit_in_bytes"), _read_memory)
    return min(limits, key=lambda limit: limit.bytes, default=None)


def _values(files: Iterable[tuple[Path, bool]], read: Callable[[Path, bool], T | None]) -> list[T]:
    """What `read` finds in each file that can be read (a file appears once however often it is named)."""
    values = []
    for file, v2 in dict.fromkeys(files):
        try:
            value = read(file, v2)
        except (OSError, ValueError):
            continue
        if value is not None:
            values.append(value)
    return values
