"""The memory ceilings, parsed from the kernel's files' text, and the live reading under a real address-space limit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medtransfer.memory_budget import available_bytes, parse_cgroup_limit, parse_meminfo_available, parse_vm_size

MEMINFO = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\n"
STATUS = "Name:\tpython\nVmPeak:\t  900000 kB\nVmSize:\t  812345 kB\nVmRSS:\t  100000 kB\n"


def test_meminfo_available_in_bytes():
    assert parse_meminfo_available(MEMINFO) == 12000000 * 1024
    assert parse_meminfo_available("MemTotal: 5 kB\n") is None


def test_vm_size_in_bytes():
    assert parse_vm_size(STATUS) == 812345 * 1024
    assert parse_vm_size("Name:\tpython\n") is None


def test_cgroup_limit_left_and_unlimited():
    assert parse_cgroup_limit("1073741824\n", "73741824\n") == 1_000_000_000
    assert parse_cgroup_limit("100\n", "250\n") == 0  # over the limit already: nothing left, never negative
    assert parse_cgroup_limit("max\n", "250\n") is None
    assert parse_cgroup_limit("", "") is None


@pytest.mark.skipif(sys.platform != "linux", reason="address-space limits and /proc are Linux features")
def test_an_address_space_limit_bounds_what_is_available(cap_address_space):
    # With an address-space limit 2 GB above what the process has mapped, nothing above 2 GB more can be allocated,
    # whatever the machine has free (the limit is set after the imports: `cap_address_space`).
    code = (f"from medtransfer.memory_budget import available_bytes; {cap_address_space(2 * 10**9)}; "
            "print(available_bytes())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    left = int(done.stdout.strip())
    assert 0 < left <= 2 * 10**9


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/meminfo is a Linux feature")
def test_without_limits_available_memory_is_at_most_the_free_memory():
    def free() -> int:
        with open("/proc/meminfo") as meminfo:
            return parse_meminfo_available(meminfo.read())

    before = free()
    left = available_bytes()
    after = free()
    assert left is not None and before is not None and after is not None
    # MemAvailable moves while other processes run (read on both sides of the call); a cgroup whose usage, page cache
    # included, has reached its limit leaves 0.
    assert 0 <= left <= max(before, after) * 1.5


@pytest.mark.parametrize(("needed", "available", "expected"), [
    (int(2.4 * 2**30), int(1.1 * 2**30), ("2.4 GiB", "1.1 GiB")),
    (int(1.54 * 2**30), int(1.46 * 2**30), ("1.54 GiB", "1.46 GiB")),  # equal at one decimal
    (3 * 2**30 + int(0.51 * 2**20), 3 * 2**30 + int(0.49 * 2**20), ("3,073 MiB", "3,072 MiB")),  # same to 3 decimals
    (2**30 + 1, 2**30, ("1,073,741,825 bytes", "1,073,741,824 bytes")),
])
def test_a_shortfall_never_reads_as_two_equal_amounts(needed, available, expected):
    from medtransfer.memory_budget import describe_shortfall

    assert describe_shortfall(needed, available) == expected
