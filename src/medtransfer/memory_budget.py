"""How much memory this process may still allocate, read from the limits Linux enforces.

Three ceilings can stop an allocation: the address-space limit (`ulimit -v`, RLIMIT_AS) minus what the process has
mapped already, a cgroup v2 memory limit (containers, CI runners) minus what the group uses, and the memory the
kernel reports available. `available_bytes` is the smallest of those that apply, or None where none can be read
(another operating system). The parsers are pure functions of the files' text so tests need no special machine.
"""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["available_bytes", "describe_shortfall", "parse_meminfo_available", "parse_cgroup_limit", "parse_vm_size"]

_PROC_SELF_STATUS = Path("/proc/self/status")
_MEMINFO = Path("/proc/meminfo")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def parse_meminfo_available(text: str) -> int | None:
    """Bytes of `MemAvailable` in /proc/meminfo's text, or None when the line is absent."""
    return _kib_field(text, "MemAvailable:")


def parse_vm_size(text: str) -> int | None:
    """Bytes of `VmSize` (the address space mapped so far) in /proc/self/status's text, or None."""
    return _kib_field(text, "VmSize:")


def parse_cgroup_limit(max_text: str, current_text: str) -> int | None:
    """Bytes left under a cgroup v2 limit from memory.max and memory.current, or None when unlimited ("max")."""
    limit = max_text.strip()
    if not limit or limit == "max":
        return None
    try:
        return max(0, int(limit) - int(current_text.strip()))
    except ValueError:
        return None


def available_bytes() -> int | None:
    """The smallest of the applicable ceilings (address-space limit, cgroup limit, available memory), or None."""
    ceilings = [_address_space_left(), _cgroup_left(), _read(_MEMINFO, parse_meminfo_available)]
    known = [value for value in ceilings if value is not None]
    return min(known) if known else None


def _address_space_left() -> int | None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    mapped = _read(_PROC_SELF_STATUS, parse_vm_size) or 0
    return max(0, soft - mapped)


def _cgroup_left() -> int | None:
    try:
        relative = _cgroup_path(Path("/proc/self/cgroup").read_text())
        folder = _CGROUP_ROOT / relative if relative is not None else None
        if folder is None or not (folder / "memory.max").is_file():
            folder = _CGROUP_ROOT
        return parse_cgroup_limit((folder / "memory.max").read_text(), (folder / "memory.current").read_text())
    except OSError:
        return None


def _cgroup_path(text: str) -> str | None:
    """The process's cgroup v2 path (the line `0::/path`), relative to the cgroup root."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].lstrip("/")
    return None


def _read(path: Path, parse) -> int | None:
    try:
        return parse(path.read_text())
    except OSError:
        return None


def _kib_field(text: str, name: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(name):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024
    return None


def describe_shortfall(needed: int, available: int) -> tuple[str, str]:
    """``needed`` and ``available`` bytes (needed > available) as GiB with as many decimals as it takes to show them
    apart (up to 3; then whole MiB, then bytes), so a message never reads "needs 1.5 GiB but only 1.5 GiB"."""
    for decimals in range(1, 4):
        shown = (f"{needed / 2**30:.{decimals}f} GiB", f"{available / 2**30:.{decimals}f} GiB")
        if shown[0] != shown[1]:
            return shown
    shown = (f"{needed / 2**20:,.0f} MiB", f"{available / 2**20:,.0f} MiB")
    return shown if shown[0] != shown[1] else (f"{needed:,} bytes", f"{available:,} bytes")
