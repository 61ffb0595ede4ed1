"""`metering check TYPE:ID METRIC`: may this subject use more of this metric? (asks a worker)"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from urllib.parse import quote

import click
import orjson

from metering_pipeline import tables
from metering_pipeline.cli.params import subject as parse_subject

BLOCKED_EXIT = 3


@click.command()
@click.argument("subject")
@click.argument("metric_key")
@click.option(
    "--worker-url",
    default="http://localhost:6066",
    show_default=True,
    envvar="METERING_WORKER_URL",
    help="Any worker: it forwards to the one that owns the subject.",
)
@click.option("--json", "as_json", is_flag=True, help="The endpoint's JSON answer.")
def check(subject: str, metric_key: str, worker_url: str, as_json: bool) -> None:
    """Current-period usage of METRIC by SUBJECT against its thresholds.

    Exit status: 0 allowed, 3 blocked (a BLOCK threshold is exceeded), 1 on errors.
    """
    subject_type, subject_id = parse_subject(subject)
    url = (
        f"{worker_url.rstrip('/')}/v1/subjects/{quote(subject_type, safe='')}/{quote(subject_id, safe='')}"
        f"/metrics/{quote(metric_key, safe='')}"
    )
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = orjson.loads(error.read() or b"{}")
        raise click.ClickException(f"{error.code}: {detail.get('message', error.reason)}") from None
    except urllib.error.URLError as error:
        raise click.ClickException(f"no worker answered at {worker_url}: {error.reason}") from None
    if as_json:
        click.echo(orjson.dumps(body).decode())
    else:
        click.echo(
            f"{subject} {metric_key}: {body['value']} in {body['periodType']} period from {body['periodStart']} "
            f"— {body['status']}{', BLOCKED' if body['blocked'] else ''}"
        )
        if body["thresholds"]:
            click.echo(
                tables.render(
                    ["threshold id", "threshold", "action", "status", "blocked"],
                    [
                        (t["id"], t["threshold"], t["action"], t["status"], "yes" if t["blocked"] else "")
                        for t in body["thresholds"]
                    ],
                )
            )
    if body["blocked"]:
        sys.exit(BLOCKED_EXIT)
