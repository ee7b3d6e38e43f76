"""What the machine or container gives the service (memory, CPUs, open files), looked at once
when a server or worker starts, against what its settings may ask of it. Past those limits the
service did not refuse clearly: the kernel killed it under a memory cap, two live sessions on
one CPU ran a third of their frames late, and out of file handles the server spun at 100 % CPU
answering nothing. Here the soft open-files limit is raised to the hard one, and each shortfall
is logged at start-up naming the settings that would fit it.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
from pathlib import Path

from .settings import ServerConfig

log = logging.getLogger("sonic.http")

# resident memory, measured on this project's machines (README, docs/live.md): the service
# after a while of mixed work, each render helper, an ffmpeg encoding, the spare live helper and
# each live session's helper; the image decodes add up to limits.decode_memory_mb on top
SERVICE_MB, RENDER_HELPER_MB, FFMPEG_MB, SPARE_LIVE_MB, LIVE_SESSION_MB = 450, 120, 75, 130, 200
LOW_OPEN_FILES = 1024  # connections, event streams, helpers' pipes and ffmpeg's files each take some
NO_LIMIT = 1 << 60  # a cgroup's "unlimited" is a number near 2^63


def raise_open_files(ceiling: int | None = None) -> int:
    """The soft open-files limit raised to the hard one (a shell's default is often 1024 of a
    hard 1048576), or to `ceiling` if lower, never lowered; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if ceiling is None or (hard != resource.RLIM_INFINITY and hard <= ceiling) else ceiling
    if target == resource.RLIM_INFINITY or target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a platform's own ceiling below the hard limit
            pass
    return soft


def _read_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for none


def memory_limit_mb() -> float | None:
    """The memory this process may use: its cgroup's limit (v2 or v1) or the machine's, the smaller."""
    limits = []
    for line in _lines(Path("/proc/self/cgroup")):
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            limits.append(_read_number(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"))
        elif "memory" in controllers.split(","):  # v1
            limits.append(_read_number(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"))
    for line in _lines(Path("/proc/meminfo")):
        if line.startswith("MemTotal:"):
            limits.append(int(line.split()[1]) * 1024)
    found = [n for n in limits if n is not None and n < NO_LIMIT]
    return min(found) / 2**20 if found else None


def usable_cpus() -> float:
    """The CPUs this process may run on, or its cgroup's CPU quota (v2 or v1), the smaller."""
    cpus = float(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else float(os.cpu_count() or 1)
    for line in _lines(Path("/proc/self/cgroup")):
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            quota = _lines(Path("/sys/fs/cgroup") / path.lstrip("/") / "cpu.max")
            parts = quota[0].split() if quota else []
            if len(parts) == 2 and parts[0].isdigit():
                cpus = min(cpus, int(parts[0]) / int(parts[1]))
        elif "cpu" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/cpu,cpuacct") / path.lstrip("/")
            quota_us, period_us = (_lines(folder / name) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
            if quota_us and period_us and quota_us[0].isdigit() and int(period_us[0]) > 0:
                cpus = min(cpus, int(quota_us[0]) / int(period_us[0]))
    return cpus


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def worst_case_memory_mb(settings: ServerConfig, runs_here: bool = True) -> float:
    """The memory the service may take with every limit reached: the image decodes at their
    budget and, where jobs and live sessions run here (`runs_here`: not an API process in
    distributed mode), its helpers busy and every live session open."""
    decoding = SERVICE_MB + FFMPEG_MB + settings.limits.decode_memory_mb  # every process decodes uploads
    if not runs_here:
        return decoding
    live = settings.live
    sessions = SPARE_LIVE_MB + LIVE_SESSION_MB * live.max_sessions if live.enabled else 0
    return decoding + RENDER_HELPER_MB * settings.render_processes + sessions


def shortfalls(
    settings: ServerConfig, memory_mb: float | None, cpus: float, open_files: int, runs_here: bool = True
) -> list[str]:
    """What the settings may ask beyond what the host gives, each said with what would fit.
    `runs_here`: jobs and live sessions run in this process's machine (not so for an API
    process in distributed mode: its workers run them)."""
    found = []
    live = settings.live
    need = worst_case_memory_mb(settings, runs_here)
    if memory_mb is not None and need > memory_mb:
        found.append(
            f"memory: this process may use {memory_mb:.0f} MB, and these settings may take up to {need:.0f} MB "
            f"(limits.decode_memory_mb {settings.limits.decode_memory_mb:g}, render_processes "
            f"{settings.render_processes}, live.max_sessions {live.max_sessions if live.enabled else 0}): "
            "lower those, or give it more memory. Out of memory the kernel kills a helper (one job or "
            "session fails) or the service itself"
        )
    if runs_here and live.enabled and live.max_sessions > cpus:
        found.append(
            f"CPUs: {cpus:g} for live.max_sessions {live.max_sessions}: a live session needs about one core to "
            f"keep real time (two on one core ran a third of their frames late); set live.max_sessions to "
            f"{max(1, int(cpus))}"
        )
    if open_files < LOW_OPEN_FILES:
        found.append(
            f"open files: the limit is {open_files} (ulimit -n): raise it to {LOW_OPEN_FILES * 4} or more. Each "
            "connection, event stream, helper and encoder takes some; out of them no connection is answered"
        )
    return found


def check_host(settings: ServerConfig, runs_here: bool = True, open_files_ceiling: int | None = None) -> None:
    """At start-up: raise the open-files limit (to `open_files_ceiling` at most), then log what
    the host cannot give."""
    open_files = raise_open_files(open_files_ceiling)
    for warning in shortfalls(settings, memory_limit_mb(), usable_cpus(), open_files, runs_here):
        log.warning("%s", warning)


def short_of_disk(folders: list[Path], min_free_mb: float) -> float | None:
    """The free MB of the first folder's disk with less than min_free_mb free; None when each has
    room (or a folder is not there yet: it is made when first written)."""
    for folder in folders:
        try:
            free_mb = shutil.disk_usage(folder).free / 2**20
        except OSError:
            continue
        if free_mb < min_free_mb:
            return free_mb
    return None
