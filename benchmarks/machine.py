"""What the numbers were measured on: cores, memory, load, Python, Kafka and library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from importlib import resources
from typing import Any

__all__ = ["describe", "kafka_version", "load_average"]


def kafka_version() -> str:
    """The Kafka version of the local broker's pom (what ``LocalBroker`` runs)."""
    pom = resources.files("stream_knn.broker").joinpath("pom.xml").read_text()
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    return found.group(1) if found else "unknown"


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (other users of the machine show up here)."""
    return os.getloadavg()


def _meminfo_gib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return float("nan")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe() -> dict[str, Any]:
    """A JSON-ready description of this machine and the software versions in use."""
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(_meminfo_gib(), 1),
        "cpu": _cpu_model(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "kafka": kafka_version(),
        "packages": {
            name: _version(name)
            for name in (
                "faust-streaming",
                "aiokafka",
                "confluent-kafka",
                "annoy",
                "hnswlib",
                "numpy",
                "rocksdict",
                "orjson",
            )
        },
        "load_average_start": [round(x, 2) for x in load_average()],
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
