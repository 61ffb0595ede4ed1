"""docker-compose.yml and the Dockerfile: what users run in production must be well-formed and
configure the worker through settings that exist (no Docker engine here, so no `up`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from metering_pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_uses_the_official_kafka_and_clickhouse_images(compose):
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_every_metering_variable_is_a_setting(compose):
    fields = {f"METERING_{name.upper()}" for name in Settings.model_fields}
    for name in ("migrate", "worker", "api", "notifier", "webhooks"):
        environment = compose["services"][name]["environment"]
        unknown = {key for key in environment if key not in fields}
        assert not unknown, f"{name} sets variables no setting reads: {unknown}"
        Settings.model_validate(
            {k.removeprefix("METERING_").lower(): v for k, v in environment.items() if "${" not in str(v)}
        )


def test_worker_scales_and_starts_after_healthy_dependencies_and_migrations(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker, "a fixed name or host port prevents --scale"
    assert worker["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "clickhouse": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert compose["services"]["migrate"]["command"] == ["migrate"]
    for name in ("kafka", "clickhouse"):
        assert "healthcheck" in compose["services"][name]
        assert compose["services"][name]["volumes"], f"{name} keeps its data in a volume"


def test_kafka_advertises_an_internal_and_a_host_listener(compose):
    environment = compose["services"]["kafka"]["environment"]
    advertised = dict(item.split("://") for item in environment["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised["INTERNAL"] == compose["services"]["worker"]["environment"]["METERING_KAFKA_BOOTSTRAP"]
    assert advertised["EXTERNAL"] == "localhost:29092"
    assert "29092:29092" in compose["services"]["kafka"]["ports"]


def test_clickhouse_credentials_are_shared_by_server_and_workers(compose):
    server = compose["services"]["clickhouse"]["environment"]
    worker = compose["services"]["worker"]["environment"]
    assert server["CLICKHOUSE_USER"] == worker["METERING_CLICKHOUSE_USER"]
    assert server["CLICKHOUSE_PASSWORD"] == worker["METERING_CLICKHOUSE_PASSWORD"]
    assert server["CLICKHOUSE_DB"] == worker["METERING_CLICKHOUSE_DATABASE"]


def test_dockerfile_runs_the_metering_cli_as_a_non_root_user():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert dockerfile.count("FROM python:3.11-slim") == 2
    assert 'ENTRYPOINT ["metering"]' in dockerfile
    assert "USER metering" in dockerfile
    assert "./schemas ." in dockerfile, "the image installs the contract and the pipeline from wheels"


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose is not installed (deploy/bootstrap.sh installs it from Debian when run as root)",
)
def test_docker_compose_accepts_the_file():
    result = subprocess.run(["docker-compose", "config", "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
