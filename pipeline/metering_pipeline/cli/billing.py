"""`metering plan …`, `metering subscription …` and `metering invoice`.

Plans and subscriptions live on the compacted `metering.plans` / `metering.subscriptions` topics;
running workers mirror them into ClickHouse, the API follows them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from metering_pipeline import tables
from metering_pipeline.billing.selection import line_label
from metering_pipeline.cli import catalog
from metering_pipeline.cli.params import field_errors, subject as parse_subject, utc
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_pipeline.usage.periods import subject_zone
from metering_schemas import Invoice, Plan, SubjectSettings, Subscription


def _plans(settings: Settings) -> dict[str, Plan]:
    return catalog.read(settings, Topics.of(settings).plans, Plan)


def _subscriptions(settings: Settings) -> dict[str, Subscription]:
    return catalog.read(settings, Topics.of(settings).subscriptions, Subscription)


def _validated(model: type[Plan] | type[Subscription], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        raise click.UsageError(field_errors(error)) from None


def _show_plans(plans: list[Plan]) -> str:
    rows = []
    for plan in sorted(plans, key=lambda p: p.key):
        prices = ", ".join(f"{line_label(p.metric_key, p.dimensions)} {p.model.value}" for p in plan.prices)
        rows.append(
            (
                plan.key,
                plan.name,
                plan.currency,
                tables.decimal_text(plan.flat_fee) if plan.flat_fee else "",
                prices,
                plan.org_id or "",
            )
        )
    return tables.render(["key", "name", "currency", "flat fee", "prices", "org"], rows)


def _show_subscriptions(subscriptions: list[Subscription]) -> str:
    return tables.render(
        ["id", "subject", "plan", "from (UTC)", "until", "cycles"],
        [
            (
                s.id,
                f"{s.subject_type}:{s.subject_id}",
                s.plan_key,
                s.start_at.strftime("%Y-%m-%d %H:%M"),
                s.end_at.strftime("%Y-%m-%d %H:%M") if s.end_at else "",
                f"{s.billing_time} ({s.time_zone}" + (f", day {s.billing_anchor})" if s.billing_anchor else ")"),
            )
            for s in sorted(subscriptions, key=lambda s: (s.subject_type, s.subject_id, s.start_at))
        ],
    )


def _plan_file(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"{path}: not JSON ({error})") from None
    if not isinstance(loaded, dict):
        raise click.BadParameter(f"{path}: expected a JSON object (a Plan)")
    return loaded


@click.group()
def plan() -> None:
    """Create, replace, remove and list billing plans (topic metering.plans)."""


@plan.command("create")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="A Plan as JSON (see schemas/metering_schemas/json/plan.schema.json).",
)
@click.pass_obj
def create_plan(settings: Settings, path: Path) -> None:
    """plan.create"""
    new: Plan = _validated(Plan, _plan_file(path))
    if new.key in _plans(settings):
        raise click.UsageError(f"plan {new.key!r} exists; use `metering plan update`")
    catalog.write(settings, Topics.of(settings).plans, new.key, new)
    click.echo(_show_plans([new]))


@plan.command("update")
@click.argument("key")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The whole new Plan as JSON; its key is KEY.",
)
@click.pass_obj
def update_plan(settings: Settings, key: str, path: Path) -> None:
    """plan.update: replace the plan (FINAL invoices keep the prices they were computed with)."""
    if key not in _plans(settings):
        raise click.UsageError(f"no plan {key!r}")
    new: Plan = _validated(Plan, _plan_file(path) | {"key": key})
    catalog.write(settings, Topics.of(settings).plans, key, new)
    click.echo(_show_plans([new]))


@plan.command("delete")
@click.argument("key")
@click.pass_obj
def delete_plan(settings: Settings, key: str) -> None:
    """plan.delete (refused while subscriptions use it)."""
    if key not in _plans(settings):
        raise click.UsageError(f"no plan {key!r}")
    users = sorted(s.id for s in _subscriptions(settings).values() if s.plan_key == key)
    if users:
        raise click.UsageError(f"plan {key!r} has subscriptions: {', '.join(users)}")
    catalog.write(settings, Topics.of(settings).plans, key, None)
    click.echo(f"deleted plan {key}")


@plan.command("list")
@click.option("--json", "as_json", is_flag=True, help="One Plan per line as JSON.")
@click.pass_obj
def list_plans(settings: Settings, as_json: bool) -> None:
    """plan.list"""
    plans = list(_plans(settings).values())
    click.echo("\n".join(p.to_json().decode() for p in plans) if as_json else _show_plans(plans))


@click.group()
def subscription() -> None:
    """Put subjects on plans (topic metering.subscriptions)."""


@subscription.command("create")
@click.argument("subject")
@click.option("--plan", "plan_key", required=True, help="Plan key.")
@click.option("--start", type=click.DateTime(), required=True, help="From (UTC), e.g. 2026-11-01.")
@click.option("--end", type=click.DateTime(), default=None, help="Until (UTC, exclusive). [default: open-ended]")
@click.option("--id", "subscription_id", default=None, help="[default: sub-<random>]")
@click.option(
    "--time-zone", "zone_name", default=None, metavar="ZONE", help="Its billing cycles' zone. [default: the subject's]"
)
@click.option(
    "--billing-time",
    type=click.Choice(["calendar", "anniversary"]),
    default="calendar",
    show_default=True,
    help="Cycles by calendar month, or from an anchor day every month.",
)
@click.option(
    "--billing-anchor",
    type=click.IntRange(1, 31),
    default=None,
    help="Anniversary: the day cycles start on, clamped to short months. [default: the start's local day]",
)
@click.pass_obj
def create_subscription(
    settings: Settings,
    subject: str,
    plan_key: str,
    start: datetime,
    end: datetime | None,
    subscription_id: str | None,
    zone_name: str | None,
    billing_time: str,
    billing_anchor: int | None,
) -> None:
    """subscription.create: SUBJECT is TYPE:ID."""
    subject_type, subject_id = parse_subject(subject)
    if plan_key not in _plans(settings):
        raise click.UsageError(f"no plan {plan_key!r}")
    if zone_name is None:
        subjects = catalog.read(settings, Topics.of(settings).subjects, SubjectSettings)
        zone_name = subject_zone(subjects, subject_type, subject_id, settings.default_time_zone)
    new: Subscription = _validated(
        Subscription,
        {
            "id": subscription_id or f"sub-{uuid.uuid4().hex[:12]}",
            "subjectType": subject_type,
            "subjectId": subject_id,
            "planKey": plan_key,
            "startAt": utc(start),
            "endAt": utc(end),
            "timeZone": zone_name,
            "billingTime": billing_time,
            "billingAnchor": billing_anchor,
        },
    )
    if new.id in _subscriptions(settings):
        raise click.UsageError(f"subscription {new.id!r} exists; use `metering subscription update`")
    catalog.write(settings, Topics.of(settings).subscriptions, new.id, new)
    click.echo(_show_subscriptions([new]))


@subscription.command("update")
@click.argument("subscription_id")
@click.option("--plan", "plan_key", default=None)
@click.option("--start", type=click.DateTime(), default=None)
@click.option("--end", type=click.DateTime(), default=None, help="End it (UTC, exclusive), e.g. to switch plans.")
@click.pass_obj
def update_subscription(
    settings: Settings, subscription_id: str, plan_key: str | None, start: datetime | None, end: datetime | None
) -> None:
    """subscription.update"""
    current = _subscriptions(settings).get(subscription_id)
    if current is None:
        raise click.UsageError(f"no subscription {subscription_id!r}")
    if plan_key is not None and plan_key not in _plans(settings):
        raise click.UsageError(f"no plan {plan_key!r}")
    changes = {
        k: v for k, v in {"planKey": plan_key, "startAt": utc(start), "endAt": utc(end)}.items() if v is not None
    }
    if not changes:
        raise click.UsageError("give --plan, --start or --end")
    new: Subscription = _validated(Subscription, current.model_dump(by_alias=True) | changes)
    catalog.write(settings, Topics.of(settings).subscriptions, new.id, new)
    click.echo(_show_subscriptions([new]))


@subscription.command("delete")
@click.argument("subscription_id")
@click.pass_obj
def delete_subscription(settings: Settings, subscription_id: str) -> None:
    """subscription.delete"""
    if subscription_id not in _subscriptions(settings):
        raise click.UsageError(f"no subscription {subscription_id!r}")
    catalog.write(settings, Topics.of(settings).subscriptions, subscription_id, None)
    click.echo(f"deleted subscription {subscription_id}")


@subscription.command("list")
@click.option("--subject", default=None, help="Only TYPE:ID's subscriptions.")
@click.pass_obj
def list_subscriptions(settings: Settings, subject: str | None) -> None:
    """subscription.list"""
    found = list(_subscriptions(settings).values())
    if subject is not None:
        wanted = parse_subject(subject)
        found = [s for s in found if (s.subject_type, s.subject_id) == wanted]
    click.echo(_show_subscriptions(found))


@click.command()
@click.argument("subject")
@click.option("--period", required=True, help="Billing month, YYYY-MM.")
@click.option("--json", "as_json", is_flag=True, help="The Invoice as JSON.")
@click.pass_obj
def invoice(settings: Settings, subject: str, period: str, as_json: bool) -> None:
    """Invoice preview of SUBJECT (TYPE:ID) for a billing month, from usage_summary's rollups."""
    from metering_pipeline.billing.invoice import BillingError
    from metering_pipeline.invoicing.preview import invoice_for
    from metering_pipeline.warehouse.client import connect

    subject_type, subject_id = parse_subject(subject)
    plans, subscriptions = _plans(settings), _subscriptions(settings)
    with connect(settings) as client:

        async def query(function: Callable[..., Any], *args: Any) -> Any:
            return await asyncio.to_thread(function, client, *args)

        subjects = catalog.read(settings, Topics.of(settings).subjects, SubjectSettings)
        try:
            result = asyncio.run(
                invoice_for(
                    settings, query, plans, subscriptions.values(), subject_type, subject_id, period, subjects=subjects
                )
            )
        except BillingError as error:
            raise click.UsageError(f"{error.code}: {error}") from None  # the code the API answers with
    click.echo(result.to_json() if as_json else render_invoice(result))


def render_invoice(result: Invoice) -> str:
    header = (
        f"{result.subject_type}:{result.subject_id}  {result.period}  "
        f"({result.period_start:%Y-%m-%d} – {result.period_end:%Y-%m-%d} UTC)  {result.status.value}  "
        f"{result.currency or 'no plan'}"
    )
    rows = []
    for line in result.lines:
        what = line_label(line.metric_key, line.dimensions) if line.metric_key else "flat fee"
        detail = line.model.value if line.model else ""
        if line.tiers:
            detail += " " + "; ".join(
                f"t{t.tier}: {tables.decimal_text(t.units)} × {tables.decimal_text(t.unit_price)}"
                + (f" + {tables.decimal_text(t.flat_fee)}" if t.flat_fee else "")
                for t in line.tiers
            )
        if line.packages is not None:
            detail += f" {line.packages} package(s)"
        if line.adjustment:
            detail += f" ({line.adjustment.replace('_', ' ')})"
        rows.append(
            (
                line.plan_key,
                what,
                f"{line.starts_at:%m-%d %H:%M}–{line.ends_at:%m-%d %H:%M}",
                tables.decimal_text(line.quantity) if line.metric_key else "",
                detail.strip(),
                str(line.amount),
            )
        )
    rows.append(("", "subtotal", "", "", "", str(result.subtotal)))
    return header + "\n" + tables.render(["plan", "line", "dates", "quantity", "pricing", "amount"], rows)
