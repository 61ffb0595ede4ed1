"""`docs/configuration.md`, generated from the settings models: `python -m metering_dev.docs` rewrites it.

Every ``METERING_*`` variable comes from the model that reads it: the product's `Settings` (grouped by the comments
that head its fields), the options of `metering` commands that read an env var, and the local stack's
`StackSettings` (development only). A field's meaning is its ``description``; the few fields that have none yet
take theirs from `MEANINGS` below, and a field with neither fails the generator (so the unit test that compares the
page with this rendering fails too: `tests/unit/test_docs_configuration.py`).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import click
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from metering_dev.settings import StackSettings
from metering_pipeline.settings import Settings

# The checkout this module is part of (deploy/dev/metering_dev/docs.py), when it runs from one.
CHECKOUT = Path(__file__).resolve().parents[3]
CONFIGURATION = CHECKOUT / "docs" / "configuration.md"

# Meanings of the fields whose model gives no `description` (better: give the field one, then drop it here).
MEANINGS: dict[str, str] = {
    "kafka_bootstrap": "Kafka bootstrap servers (`host:port`, comma-separated)",
    "kafka_security_protocol": "How every Kafka client of the product connects; the `SASL_*` protocols need "
    "`METERING_KAFKA_SASL_MECHANISM`, and a mechanism needs one of them",
    "kafka_sasl_mechanism": "SASL mechanism, with `SASL_SSL` or `SASL_PLAINTEXT` only",
    "kafka_sasl_username": "SASL user",
    "kafka_sasl_password": "SASL password; never shown in output, logs or `/metrics`",
    "kafka_ssl_cafile": "CA certificate (PEM) that signed the brokers' certificates, unless the system already "
    "trusts it; empty means none",
    "kafka_ssl_certfile": "Client certificate (PEM) for mutual TLS; empty means none",
    "kafka_ssl_keyfile": "Key of the client certificate (PEM); empty means none",
    "max_poll_records": "Records the router and the rollup stage each take from Kafka per poll",
    "smtp_host": "SMTP server of the notifier",
    "smtp_port": "Port of the SMTP server",
    "smtp_username": "SMTP user, if the server wants one",
    "smtp_password": "SMTP password",
    "smtp_from": "Sender address of alert e-mails",
    "smtp_timeout": "Seconds to wait for the SMTP server",
    "clickhouse_url": "ClickHouse's HTTP(S) interface; an `https://` URL without a port means 8443",
    "clickhouse_user": "ClickHouse user of every client (migrations, worker, API, CLI, notifier)",
    "clickhouse_password": "Its password; never shown in output, logs or `/metrics`",
    "clickhouse_database": "Database of the product's tables",
    "clickhouse_verify_tls": "Verify the certificate of an `https://` URL (`false` turns verification off)",
    "clickhouse_ca_cert": "CA certificate (PEM) for an `https://` URL whose certificate a private CA signed; "
    "empty means none",
    "stack_dir": "Data, logs and pid files of the local stack",
    "cache_dir": "Cache of the Apache Kafka broker resolved from Maven Central (`kafka-<version>/`)",
    "kafka_version": "Apache Kafka release the local stack resolves",
    "stack_kafka_heap": "Heap of the local Apache Kafka broker (its `-Xms` and `-Xmx`)",
}

TYPE_NAMES: dict[object, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Decimal: "decimal",
    Path: "path",
    SecretStr: "secret string",
    timedelta: "duration (ISO 8601, e.g. `PT5M`, or seconds)",
}

HEADER = """\
# Configuration

<!-- Generated from the settings models by `python -m metering_dev.docs`; do not edit by hand.
     tests/unit/test_docs_configuration.py fails when this page is stale. -->

Every process of the product (`metering worker`, `metering api`, `metering notifier` and the other
commands) reads one settings object, `metering_pipeline.settings.Settings`, from `METERING_*`
environment variables. Set them once per deployment (in `docker-compose.yml` they sit in the
`x-metering-env` block); the workers and the API must agree on them, in particular on
`METERING_ALLOWED_LATENESS`, the topic and group prefixes and the Kafka and ClickHouse addresses.
A variable the settings cannot read stops the command with one line naming it (never its value).

Durations take an ISO 8601 duration (`P35D`, `PT24H`) or a number of seconds. An empty path
means "no file". Secrets never appear in output, logs or `/metrics`.

How to connect to a secured Kafka cluster or to ClickHouse over TLS:
[Operations](operations.md#secured-kafka-and-clickhouse-over-tls).
"""

SECTION_INTROS = {
    "cli": "Options of `metering` commands that fall back to an environment variable; they are not part of `Settings`.",
    "stack": "Read by the development distribution only (`metering_dev.settings.StackSettings`): where "
    "`metering stack` keeps its data and which broker it runs. The product ignores them.",
}


def _code(text: object) -> str:
    return f"`{text}`"


def _cell(text: str) -> str:
    """Markdown table cell: pipes escaped, angle brackets outside code spans written as entities."""
    parts = text.replace("|", "\\|").split("`")
    for index in range(0, len(parts), 2):  # outside code spans
        parts[index] = parts[index].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _type_text(field: FieldInfo) -> str:
    annotation = field.annotation
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        annotation = members[0] if len(members) == 1 else annotation
    if typing.get_origin(annotation) is typing.Literal:
        text = "one of " + ", ".join(_code(value) for value in typing.get_args(annotation))
    else:
        text = TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
    bounds = []
    for constraint in field.metadata:  # pydantic's Field(ge=…, gt=…, le=…, lt=…), one object per bound
        for attribute, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if (bound := getattr(constraint, attribute, None)) is not None:
                bounds.append(f"{sign} {_number(bound)}")
    if bounds:
        text += ", " + " and ".join(bounds)
    return text + (", optional" if optional else "")


def _number(value: object) -> str:
    large = isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000
    return f"{value:,}" if large else str(value)


def _duration(value: timedelta) -> str:
    if value.days > 1 and not value.seconds and not value.microseconds:
        return f"P{value.days}D"
    hours, rest = divmod(int(value.total_seconds()), 3600)
    minutes, seconds = divmod(rest, 60)
    parts = ((hours, "H"), (minutes, "M"), (seconds, "S"))
    return "PT" + "".join(f"{amount}{unit}" for amount, unit in parts if amount)


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True, validated_data={})
    if value is None:
        return "–"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, timedelta):
        return _code(_duration(value))
    if isinstance(value, Path):
        home = str(Path.home())
        text = str(value)
        return _code("~" + text[len(home) :] if text.startswith(home + "/") else text)
    if isinstance(value, bool):
        return _code(str(value).lower())
    if value == "":
        return "empty"
    return _code(value)


def _meaning(name: str, field: FieldInfo, model: type[BaseSettings]) -> str:
    meaning = field.description or MEANINGS.get(name)
    if not meaning:
        raise ValueError(
            f"{model.__name__}.{name} has no description: give the field one (or add it to metering_dev.docs.MEANINGS)"
        )
    return meaning


def _sections(model: type[BaseSettings]) -> list[tuple[str, list[str]]]:
    """The model's fields in order, under the `# Heading` comments of its class body."""
    heading_of: dict[str, str] = {}
    heading = ""
    for line in inspect.getsource(model).splitlines():
        if comment := re.fullmatch(r" {4}# (.+)", line):
            heading = comment.group(1).strip()
        elif assignment := re.match(r" {4}(\w+)\s*:", line):
            heading_of[assignment.group(1)] = heading
    sections: dict[str, list[str]] = {}
    for name in model.model_fields:
        sections.setdefault(heading_of.get(name) or "Other", []).append(name)
    return list(sections.items())


def _env_name(model: type[BaseSettings], name: str) -> str:
    return (str(model.model_config.get("env_prefix", "")) + name).upper()


def _settings_table(model: type[BaseSettings], names: list[str]) -> list[str]:
    lines = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name in names:
        field = model.model_fields[name]
        lines.append(
            f"| {_code(_env_name(model, name))} | {_cell(_type_text(field))} | {_cell(_default_text(field))} "
            f"| {_cell(_meaning(name, field, model))} |"
        )
    return lines


def _environment_options(command: click.Command, path: tuple[str, ...]) -> list[tuple[str, str, click.Option]]:
    """(env var, command path, option) for every option of `metering` and its subcommands that reads one."""
    found: list[tuple[str, str, click.Option]] = []
    for param in command.params:
        if isinstance(param, click.Option) and isinstance(param.envvar, str):
            found.append((param.envvar, " ".join(path), param))
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            found.extend(_environment_options(command.commands[name], (*path, name)))
    return found


def _options_table() -> list[str]:
    from metering_pipeline.cli import main as metering

    lines = ["| variable | command and option | default | meaning |", "|---|---|---|---|"]
    found = sorted(_environment_options(metering, ("metering",)), key=lambda entry: (entry[0], entry[1]))
    for envvar, command, option in found:
        default = "–" if option.default is None else _code(option.default)
        meaning = option.help or ""
        if not meaning:
            raise ValueError(f"{command} {option.opts[0]} reads {envvar} but has no help text")
        usage = _code(f"{command} {option.opts[0]}")
        lines.append(f"| {_code(envvar)} | {_cell(usage)} | {_cell(default)} | {_cell(meaning)} |")
    return lines


def render() -> str:
    """The whole of docs/configuration.md."""
    stale = sorted(set(MEANINGS) - set(Settings.model_fields) - set(StackSettings.model_fields))
    if stale:
        raise ValueError(f"metering_dev.docs.MEANINGS names settings that do not exist: {', '.join(stale)}")
    lines = [HEADER]
    for heading, names in _sections(Settings):
        lines += [f"## {heading}", "", *_settings_table(Settings, names), ""]
    lines += ["## Command options read from the environment", "", SECTION_INTROS["cli"], "", *_options_table(), ""]
    lines += ["## The local stack (development only)", "", SECTION_INTROS["stack"], ""]
    for _heading, names in _sections(StackSettings):
        lines += [*_settings_table(StackSettings, names), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metering_dev.docs", description="Write docs/configuration.md from the settings models."
    )
    parser.add_argument("--output", type=Path, default=CONFIGURATION, help=f"default: {CONFIGURATION}")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the rendering")
    arguments = parser.parse_args(argv)
    page = render()
    if arguments.check:
        current = arguments.output.read_text() if arguments.output.exists() else ""
        if current != page:
            print(f"{arguments.output} is stale: run python -m metering_dev.docs", file=sys.stderr)
            return 1
        return 0
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(page)
    print(f"wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
