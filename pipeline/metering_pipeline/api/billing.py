"""Plans, subscriptions and the invoice preview."""

from __future__ import annotations

import uuid
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import Field, ValidationError

from metering_pipeline.api.context import ApiContext, context_of
from metering_pipeline.api.errors import ERROR_RESPONSES, ApiError, FieldProblem, invalid
from metering_pipeline.api.links import each, from_body, links
from metering_pipeline.api.security import AuthenticatedRoute, Caller, reader, writer
from metering_pipeline.billing.invoice import BillingError
from metering_pipeline.invoicing.preview import invoice_for
from metering_schemas import BillingPeriod, Invoice, Plan, Price, Subscription, TimeZoneName
from metering_schemas._base import Description, Identifier, Name, UtcDatetime, WireModel
from metering_schemas.billing import MAX_PRICES, Money

router = APIRouter(tags=["billing"], route_class=AuthenticatedRoute, responses=ERROR_RESPONSES)


class PlanBody(WireModel):
    """A plan without its key (PUT /v1/plans/{key} replaces the whole plan)."""

    name: Name
    description: Description = ""
    currency: str = Field(max_length=3, description="ISO 4217 code, e.g. USD")
    billing_period: BillingPeriod = BillingPeriod.MONTHLY
    flat_fee: Money | None = None
    prices: list[Price] = Field(default_factory=list, max_length=MAX_PRICES)
    org_id: Identifier | None = None


class PlanInput(PlanBody):
    key: Identifier = Field(pattern=r"^[A-Za-z0-9_.:-]+$")


class PlanList(WireModel):
    plans: list[Plan]


class SubscriptionInput(Subscription):
    """subscription.create: a Subscription whose id defaults to a random one."""

    id: Identifier | None = None  # type: ignore[assignment]  # optional here only: the contract's id is required


class SubscriptionChange(WireModel):
    """subscription.update: move the end (e.g. to switch plans), change the plan, or its billing cycles (for invoices
    computed from then on)."""

    plan_key: Identifier | None = None
    start_at: UtcDatetime | None = None
    end_at: UtcDatetime | None = None
    time_zone: TimeZoneName | None = None
    billing_time: Literal["calendar", "anniversary"] | None = None
    billing_anchor: int | None = Field(default=None, ge=1, le=31)


class SubscriptionList(WireModel):
    subscriptions: list[Subscription]


M = TypeVar("M", Plan, Subscription)


def _validated(model: type[M], fields: dict[str, Any]) -> M:
    """Whole-object rules (currency, tiers, dates) answer 422 with the fields they concern."""
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        raise invalid(error.errors(), ("body",)) from None


def _plan(key: str, who: Caller, context: ApiContext) -> Plan:
    found = context.plans.get(key)
    if found is None or not (found.org_id is None or who.may_act_for(found.org_id)):
        raise ApiError(404, "not_found", f"no plan {key!r}")
    return found


def _owned_plan(key: str, who: Caller, context: ApiContext) -> Plan:
    found = _plan(key, who, context)
    who.require_org(found.org_id, f"plan {key!r}")
    return found


def _plan_fields(key: str, body: PlanBody, who: Caller, context: ApiContext) -> dict[str, Any]:
    org = body.org_id if body.org_id is not None else who.org_id
    who.require_org(org, "a global plan" if org is None else f"org {org!r}")
    dimensions: dict[str, set[str]] = {}  # metric key -> the groupBy names of its definitions (global and per org)
    for definition in context.metrics.definitions():
        dimensions.setdefault(definition.key, set()).update(definition.group_by)
    unknown = [(i, p.metric_key) for i, p in enumerate(body.prices) if p.metric_key not in dimensions]
    if unknown:  # a typo would bill nothing, silently
        raise ApiError(
            422,
            "unknown_metric",
            f"no metric {unknown[0][1]!r}",
            [FieldProblem(field=f"body.prices.{i}.metricKey", message="no such metric") for i, _ in unknown],
        )
    ungrouped = [
        (i, p.metric_key, name)
        for i, p in enumerate(body.prices)
        for name in p.dimensions
        if name not in dimensions[p.metric_key]
    ]
    if ungrouped:  # likewise: no usage has a dimension the metric is not grouped by
        raise ApiError(
            422,
            "unknown_dimension",
            f"metric {ungrouped[0][1]!r} has no groupBy dimension {ungrouped[0][2]!r}",
            [
                FieldProblem(field=f"body.prices.{i}.dimensions.{name}", message=f"not a groupBy dimension of {key!r}")
                for i, key, name in ungrouped
            ],
        )
    return body.model_dump(by_alias=True) | {"key": key, "orgId": org}


@router.post(
    "/v1/plans",
    status_code=201,
    response_model=Plan,
    summary="plan.create",
    responses=links(201, *each(("get", "put", "delete"), "/v1/plans/{key}", from_body(key="key"))),
)
async def create_plan(body: PlanInput, request: Request, who: Caller = Depends(writer)) -> Plan:
    context = context_of(request)
    if body.key in context.plans:
        raise ApiError(409, "conflict", f"plan {body.key!r} exists; use PUT /v1/plans/{body.key}")
    plan = _validated(Plan, _plan_fields(body.key, body, who, context))
    await context.publish(context.plans, plan.key, plan)
    return plan


@router.put("/v1/plans/{key}", response_model=Plan, summary="plan.update")
async def update_plan(key: str, body: PlanBody, request: Request, who: Caller = Depends(writer)) -> Plan:
    """Replaces the plan; open and settling periods are repriced with it, FINAL invoices stay as stored."""
    context = context_of(request)
    _owned_plan(key, who, context)
    plan = _validated(Plan, _plan_fields(key, body, who, context))
    await context.publish(context.plans, key, plan)
    return plan


@router.delete("/v1/plans/{key}", status_code=204, summary="plan.delete")
async def delete_plan(key: str, request: Request, who: Caller = Depends(writer)) -> Response:
    context = context_of(request)
    _owned_plan(key, who, context)
    users = sorted(s.id for s in context.subscriptions.values() if s.plan_key == key)
    if users:
        raise ApiError(409, "plan_in_use", f"plan {key!r} has subscriptions: {', '.join(users[:10])}")
    await context.publish(context.plans, key, None)
    return Response(status_code=204)


@router.get("/v1/plans/{key}", response_model=Plan, summary="plan.get")
async def get_plan(key: str, request: Request, who: Caller = Depends(reader)) -> Plan:
    return _plan(key, who, context_of(request))


@router.get("/v1/plans", response_model=PlanList, summary="plan.list")
async def list_plans(request: Request, who: Caller = Depends(reader)) -> PlanList:
    plans = [p for p in context_of(request).plans.values() if p.org_id is None or who.may_act_for(p.org_id)]
    return PlanList(plans=sorted(plans, key=lambda p: p.key))


def _check_subject(subject_type: str, subject_id: str, who: Caller) -> None:
    if who.org_id is not None and subject_type == "org" and subject_id != who.org_id:
        raise ApiError(403, "forbidden_org", f"subject org:{subject_id} is not org {who.org_id!r}")


def _subscription(subscription_id: str, who: Caller, context: ApiContext) -> Subscription:
    found = context.subscriptions.get(subscription_id)
    if found is None or not who.may_act_for(found.org_id):
        raise ApiError(404, "not_found", f"no subscription {subscription_id!r}")
    return found


async def _put_subscription(context: ApiContext, who: Caller, fields: dict[str, Any]) -> Subscription:
    subscription = _validated(Subscription, fields)
    _plan(subscription.plan_key, who, context)  # 404 unless the caller can see the plan
    await context.publish(context.subscriptions, subscription.id, subscription)
    return subscription


@router.post(
    "/v1/subscriptions",
    status_code=201,
    response_model=Subscription,
    summary="subscription.create",
    responses=links(
        201,
        *each(("put", "delete"), "/v1/subscriptions/{subscription_id}", from_body(subscription_id="id")),
        (
            "get",
            "/v1/subjects/{subject_type}/{subject_id}/invoice",
            from_body(subject_type="subjectType", subject_id="subjectId"),
        ),
    ),
)
async def create_subscription(body: SubscriptionInput, request: Request, who: Caller = Depends(writer)) -> Subscription:
    context = context_of(request)
    org = body.org_id if body.org_id is not None else who.org_id
    who.require_org(org, "a subscription without an org" if org is None else f"org {org!r}")
    _check_subject(body.subject_type, body.subject_id, who)
    subscription_id = body.id or f"sub-{uuid.uuid4().hex[:12]}"
    if subscription_id in context.subscriptions:
        raise ApiError(
            409, "conflict", f"subscription {subscription_id!r} exists; use PUT /v1/subscriptions/{subscription_id}"
        )
    fields = body.model_dump(by_alias=True) | {"id": subscription_id, "orgId": org}
    if "time_zone" not in body.model_fields_set:  # its cycles in the subject's zone, as it is when subscribed
        fields["timeZone"] = context.zone_of(body.subject_type, body.subject_id)
    return await _put_subscription(context, who, fields)


@router.put("/v1/subscriptions/{subscription_id}", response_model=Subscription, summary="subscription.update")
async def update_subscription(
    subscription_id: str, body: SubscriptionChange, request: Request, who: Caller = Depends(writer)
) -> Subscription:
    context = context_of(request)
    current = _subscription(subscription_id, who, context)
    changes = body.model_dump(by_alias=True, exclude_unset=True)
    if not changes:
        raise ApiError(422, "validation_error", "give at least one field to change")
    return await _put_subscription(context, who, current.model_dump(by_alias=True) | changes)


@router.delete("/v1/subscriptions/{subscription_id}", status_code=204, summary="subscription.delete")
async def delete_subscription(subscription_id: str, request: Request, who: Caller = Depends(writer)) -> Response:
    context = context_of(request)
    _subscription(subscription_id, who, context)
    await context.publish(context.subscriptions, subscription_id, None)
    return Response(status_code=204)


@router.get("/v1/subscriptions", response_model=SubscriptionList, summary="subscription.list")
async def list_subscriptions(
    request: Request,
    subject_type: str | None = Query(default=None, alias="subjectType"),
    subject_id: str | None = Query(default=None, alias="subjectId"),
    who: Caller = Depends(reader),
) -> SubscriptionList:
    found = [
        s
        for s in context_of(request).subscriptions.values()
        if who.may_act_for(s.org_id)
        and (subject_type is None or s.subject_type == subject_type)
        and (subject_id is None or s.subject_id == subject_id)
    ]
    return SubscriptionList(subscriptions=sorted(found, key=lambda s: (s.subject_type, s.subject_id, s.start_at, s.id)))


@router.get("/v1/subjects/{subject_type}/{subject_id}/invoice", response_model=Invoice, summary="invoice.preview")
async def get_invoice(
    subject_type: str,
    subject_id: str,
    request: Request,
    period: str = Query(pattern=r"^\d{4}-\d{2}$", description="Billing month, e.g. 2026-11"),
    who: Caller = Depends(reader),
) -> Invoice:
    """Line items from the subject's subscriptions and its hourly rollups; FINAL once the period can no longer change."""  # noqa: E501 - the operation's OpenAPI description, one line
    context = context_of(request)
    _check_subject(subject_type, subject_id, who)
    subscriptions = [
        s for s in context.subscriptions.values() if (s.subject_type, s.subject_id) == (subject_type, subject_id)
    ]
    if who.org_id is not None and subject_type != "org" and not any(s.org_id == who.org_id for s in subscriptions):
        raise ApiError(404, "not_found", f"no subscriptions for {subject_type}:{subject_id} in org {who.org_id!r}")
    try:
        return await invoice_for(
            context.settings,
            context.query,
            context.plans,
            subscriptions,
            subject_type,
            subject_id,
            period,
            subjects=context.subjects,
        )
    except BillingError as error:
        raise ApiError(422 if error.code == "invalid_period" else 409, error.code, str(error)) from None
