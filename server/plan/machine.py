"""This machine's memory: each CUDA GPU's and the RAM's, total and free."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("glm_serve.plan")

@dataclass
class Memory:
    name: str  # cuda:0, ..., RAM
    total: int
    free: int


def machine_memory() -> tuple[list[Memory], Memory]:
    """(each CUDA GPU, RAM). GPU figures come from the driver; RAM from /proc/meminfo (stdlib) or psutil."""
    gpus = []
    try:
        import torch

        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(Memory(f"cuda:{i}", total, free))
    except Exception as exc:  # a broken driver should not stop the plan from printing
        log.warning("could not query CUDA memory: %s", exc)
    return gpus, ram_memory()


def ram_memory() -> Memory:
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
        return Memory("RAM", info["MemTotal"], info.get("MemAvailable", info["MemFree"]))
    except (OSError, KeyError, ValueError):
        pass
    try:
        import psutil

        vm = psutil.virtual_memory()
        return Memory("RAM", vm.total, vm.available)
    except ImportError:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # macOS without psutil: total only
        return Memory("RAM", total, total)


