"""What this machine has: chip, memory, GPU cores, OS, MLX version.

macOS facts come from ``sysctl`` and ``system_profiler`` (not testable on Linux CI, so each is a
small guarded function that says plainly when it cannot answer); Linux facts from /proc.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from herd import log

logger = log.get(__name__)


@dataclass(frozen=True)
class Machine:
    chip: str
    memory_bytes: int
    gpu_cores: int
    os: str
    mlx_version: str
    wired_limit_mb: int = 0  # macOS: how much the GPU may wire (0 = macOS's default share)
    ram_bytes: int = 0  # the RAM probed, when --memory declared memory_bytes (0: the same)

    def free_bytes(self, free_now: int | None) -> int:
        """What is free of the memory this worker declares, ``free_now`` being what the system
        says is available. A --memory above the RAM (a local cluster posing as big Macs) counts
        what other programs hold against the declared size: reporting min(declared, free) made
        placement refuse the jobs `herd plan` had planned on the declared memory (an outside
        run). Below the RAM it is the declared share, or less when less is free."""
        if not free_now:
            return self.memory_bytes
        beyond = max(0, self.memory_bytes - (self.ram_bytes or self.memory_bytes))
        return max(0, min(self.memory_bytes, free_now + beyond))


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        return done.stdout
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("probe_command_failed", command=cmd[0], error=str(e))
        return None


def _mlx_version() -> str:
    try:
        from importlib.metadata import version

        return version("mlx")
    except Exception:  # mlx-cpu wheels register under a different distribution name
        try:
            from importlib.metadata import version

            return version("mlx-cpu")
        except Exception:
            return "unknown"


# --- macOS -----------------------------------------------------------------------------------

def _mac_sysctl(name: str) -> str | None:
    out = _run(["sysctl", "-n", name])
    return out.strip() if out else None


def _mac_gpu_cores() -> int:
    """GPU core count from system_profiler ("Total Number of Cores: 76"); 0 when unknown."""
    out = _run(["system_profiler", "SPDisplaysDataType"], timeout=15.0)
    m = re.search(r"Total Number of Cores:\s*(\d+)", out or "")
    return int(m.group(1)) if m else 0


def _mac_wired_limit_mb() -> int:
    """``iogpu.wired_limit_mb`` (0 when unset: macOS then wires about 2/3-3/4 of RAM)."""
    value = _mac_sysctl("iogpu.wired_limit_mb")
    return int(value) if value and value.isdigit() else 0


def _probe_mac() -> Machine:
    mem = _mac_sysctl("hw.memsize")
    return Machine(
        chip=_mac_sysctl("machdep.cpu.brand_string") or "Apple Silicon (unknown)",
        memory_bytes=int(mem) if mem and mem.isdigit() else 0,
        gpu_cores=_mac_gpu_cores(),
        os=f"macOS {platform.mac_ver()[0]}",
        mlx_version=_mlx_version(),
        wired_limit_mb=_mac_wired_limit_mb(),
    )


# --- Linux -----------------------------------------------------------------------------------

def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    except OSError as e:
        logger.warning("probe_meminfo_failed", error=str(e))
    return out


def _linux_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError as e:
        logger.warning("probe_cpuinfo_failed", error=str(e))
    return platform.processor() or platform.machine()


def _probe_linux() -> Machine:
    return Machine(
        chip=f"{_linux_cpu()} ({os.cpu_count()} cores)",
        memory_bytes=_meminfo().get("MemTotal", 0),
        gpu_cores=0,
        os=f"Linux {platform.release()}",
        mlx_version=_mlx_version(),
    )


def free_memory_bytes() -> int:
    if platform.system() == "Darwin":
        # vm_stat counts pages; free + inactive + speculative is what a new process can get.
        out = _run(["vm_stat"]) or ""
        page = re.search(r"page size of (\d+) bytes", out)
        size = int(page.group(1)) if page else 16384
        pages = sum(int(m) for m in re.findall(
            r"Pages (?:free|inactive|speculative):\s+(\d+)", out))
        return pages * size
    return _meminfo().get("MemAvailable", 0)


def probe(memory_override: int | None = None, chip_override: str | None = None) -> Machine:
    """This machine. Overrides exist for local test clusters that pose as several machines."""
    m = _probe_mac() if platform.system() == "Darwin" else _probe_linux()
    if memory_override or chip_override:
        m = Machine(chip=chip_override or m.chip, memory_bytes=memory_override or m.memory_bytes,
                    gpu_cores=m.gpu_cores, os=m.os, mlx_version=m.mlx_version,
                    wired_limit_mb=m.wired_limit_mb, ram_bytes=m.memory_bytes)
    return m
