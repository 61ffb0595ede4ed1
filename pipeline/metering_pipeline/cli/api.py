"""`metering api` (serve the HTTP API) and `metering api-key create | list | revoke`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from metering_pipeline import tables
from metering_pipeline.settings import Settings

if TYPE_CHECKING:  # the API's modules load when a command needs them
    from metering_pipeline.api.keys import Scope


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 to listen on every interface.")
@click.option("--port", type=int, default=8080, show_default=True)
@click.pass_obj
def api(settings: Settings, host: str, port: int) -> None:
    """Serve the commands and queries over HTTP (OpenAPI at /docs and /openapi.json)."""
    import uvicorn

    from metering_pipeline.api.app import create_app
    from metering_pipeline.api.keys import KeyRing

    if not KeyRing(settings.api_keys_file).keys():
        click.echo(
            f"warning: no API keys in {settings.api_keys_file}; every request will be refused. "
            "Create one with `metering api-key create`.",
            err=True,
        )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)


@click.group("api-key")
def api_key() -> None:
    """Manage the API's keys (stored hashed in METERING_API_KEYS_FILE)."""


@api_key.command()
@click.option("--name", required=True, help="Who or what uses it.")
@click.option(
    "--scope", "scopes", multiple=True, type=click.Choice(["read", "write"]), default=("read",), show_default=True
)
@click.option("--org-id", default=None, help="Limit the key to one org's metrics, thresholds and subjects.")
@click.pass_obj
def create(settings: Settings, name: str, scopes: tuple[Scope, ...], org_id: str | None) -> None:
    """Create a key; it is printed once and only its hash is kept."""
    from metering_pipeline.api.keys import KeyRing

    try:
        key = KeyRing(settings.api_keys_file).add(name, list(scopes), org_id)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    click.echo(key)


@api_key.command("list")
@click.pass_obj
def list_keys(settings: Settings) -> None:
    from metering_pipeline.api.keys import KeyRing

    click.echo(
        tables.render(
            ["name", "scopes", "org", "created"],
            [
                (k.name, ",".join(k.scopes), k.org_id or "(all)", k.created_at.strftime("%Y-%m-%d %H:%M"))
                for k in KeyRing(settings.api_keys_file).keys()
            ],
        )
    )


@api_key.command()
@click.argument("name")
@click.pass_obj
def revoke(settings: Settings, name: str) -> None:
    from metering_pipeline.api.keys import KeyRing

    if not KeyRing(settings.api_keys_file).revoke(name):
        raise click.UsageError(f"no key named {name!r}")
    click.echo(f"revoked {name}")
