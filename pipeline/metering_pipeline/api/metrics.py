"""metric.define / update / delete / get / list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import ValidationError, model_validator

from metering_pipeline.api.context import ApiContext, context_of
from metering_pipeline.api.errors import ERROR_RESPONSES, ApiError, invalid
from metering_pipeline.api.links import each, from_body, links
from metering_pipeline.api.security import AuthenticatedRoute, Caller, reader, writer
from metering_schemas import AggregationType, MetricDefinition, ResetPeriod
from metering_schemas._base import Description, Identifier, Name, WireModel
from metering_schemas.metric import FilterRules, GroupBy, RecordPath, Unit

router = APIRouter(prefix="/v1/metrics", tags=["metrics"], route_class=AuthenticatedRoute, responses=ERROR_RESPONSES)

OrgQuery = Query(default=None, alias="orgId", description="The org-scoped definition (default: the global one)")


class MetricInput(MetricDefinition):
    """metric.define: a MetricDefinition whose id defaults to the key (or `orgId:key`)."""

    id: Identifier | None = None  # type: ignore[assignment]  # optional here only: the contract's id is required

    @model_validator(mode="after")
    def _readable(self) -> MetricInput:
        """Replaces the contract's rules across fields (same name): they are checked on the definition that
        `define_metric` builds, after the caller's org is, so a request wrong in both is answered as before."""
        return self


class MetricChange(WireModel):
    """metric.update: the fields to change (key and org stay). A new valueProperty, groupBy or filter applies to
    the records processed after it."""

    name: Name | None = None
    description: Description | None = None
    unit: Unit | None = None
    aggregation_type: AggregationType | None = None
    reset_period: ResetPeriod | None = None
    value_property: RecordPath | None = None
    group_by: GroupBy | None = None
    filter: FilterRules | None = None


class MetricList(WireModel):
    metrics: list[MetricDefinition]


def _definition(fields: dict[str, Any]) -> MetricDefinition:
    """The definition, with its rules across fields checked (UNIQUE_COUNT needs valueProperty, ...): 422 if broken."""
    try:
        return MetricDefinition.model_validate(fields)
    except ValidationError as error:
        raise invalid(error.errors(include_url=False), ("body",)) from None


def _scoped(key: str, org_id: str | None, who: Caller, context: ApiContext) -> MetricDefinition:
    """The definition a caller addresses: an org key always means its own org's."""
    org = who.org_id if who.org_id is not None else org_id
    who.require_org(org, f"metric {key!r}")
    found = next((d for d in context.metrics.definitions() if d.key == key and d.org_id == org), None)
    if found is None:
        raise ApiError(404, "not_found", f"no metric {key!r}" + (f" for org {org!r}" if org else " (global)"))
    return found


@router.post(
    "",
    status_code=201,
    response_model=MetricDefinition,
    summary="metric.define",
    responses=links(201, *each(("get", "put", "delete"), "/v1/metrics/{key}", from_body(key="key"))),
)
async def define_metric(body: MetricInput, request: Request, who: Caller = Depends(writer)) -> MetricDefinition:
    org = body.org_id if body.org_id is not None else who.org_id
    who.require_org(org, "a global metric" if org is None else f"org {org!r}")
    definition = _definition(
        body.model_dump() | {"id": body.id or (f"{org}:{body.key}" if org else body.key), "org_id": org}
    )
    context = context_of(request)
    if context.metrics.get(definition.id) is not None:
        raise ApiError(409, "conflict", f"metric id {definition.id!r} exists; use PUT /v1/metrics/{body.key}")
    if any(d.key == definition.key and d.org_id == org for d in context.metrics.definitions()):
        raise ApiError(
            409, "conflict", f"metric key {definition.key!r} is already defined" + (f" for org {org!r}" if org else "")
        )
    await context.publish(context.metrics, definition.id, definition)
    return definition


@router.put("/{key}", response_model=MetricDefinition, summary="metric.update")
async def update_metric(
    key: str, body: MetricChange, request: Request, org_id: str | None = OrgQuery, who: Caller = Depends(writer)
) -> MetricDefinition:
    context = context_of(request)
    current = _scoped(key, org_id, who, context)
    changes = body.model_dump(exclude_none=True)
    if not changes:
        raise ApiError(422, "validation_error", "give at least one field to change")
    updated = _definition(current.model_dump() | changes)
    await context.publish(context.metrics, updated.id, updated)
    return updated


@router.delete("/{key}", status_code=204, summary="metric.delete")
async def delete_metric(
    key: str, request: Request, org_id: str | None = OrgQuery, who: Caller = Depends(writer)
) -> Response:
    context = context_of(request)
    current = _scoped(key, org_id, who, context)
    await context.publish(context.metrics, current.id, None)
    return Response(status_code=204)


@router.get("/{key}", response_model=MetricDefinition, summary="metric.get")
async def get_metric(
    key: str, request: Request, org_id: str | None = OrgQuery, who: Caller = Depends(reader)
) -> MetricDefinition:
    """The definition that applies: the org's own if it has one, else the global one."""
    org = who.org_id if who.org_id is not None else org_id
    who.require_org(org, f"metric {key!r}")
    found = context_of(request).metrics.resolve(key, org)
    if found is None:
        raise ApiError(404, "not_found", f"no metric {key!r}")
    return found


@router.get("", response_model=MetricList, summary="metric.list")
async def list_metrics(request: Request, org_id: str | None = OrgQuery, who: Caller = Depends(reader)) -> MetricList:
    """Global metrics and, for an org (an org key's own, or `orgId`), that org's."""
    org = who.org_id if who.org_id is not None else org_id
    who.require_org(org, "that list")
    visible = [
        d
        for d in context_of(request).metrics.definitions()
        if d.org_id is None or d.org_id == org or (who.org_id is None and org is None)
    ]
    return MetricList(metrics=sorted(visible, key=lambda d: (d.key, d.org_id or "")))
