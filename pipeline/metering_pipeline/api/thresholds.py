"""threshold.create / update / delete / list."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import Field

from metering_pipeline.api.context import ApiContext, context_of
from metering_pipeline.api.errors import ERROR_RESPONSES, ApiError, FieldProblem
from metering_pipeline.api.links import each, from_body, links
from metering_pipeline.api.security import AuthenticatedRoute, Caller, reader, writer
from metering_pipeline.warehouse.grouping import threshold_dimensions_problem
from metering_schemas import ThresholdAction, UsageThreshold
from metering_schemas._base import Identifier, Quantity, WireModel
from metering_schemas.metric import DimensionValues
from metering_schemas.threshold import NotifyEmails

router = APIRouter(
    prefix="/v1/thresholds", tags=["thresholds"], route_class=AuthenticatedRoute, responses=ERROR_RESPONSES
)


class ThresholdInput(WireModel):
    """threshold.create: a UsageThreshold whose id defaults to a random one."""

    id: Identifier | None = None
    metric_key: Identifier
    subject_type: Identifier
    subject_id: Identifier = Field(description='Subject id, or "*" for every subject of the type')
    threshold: Quantity
    action: ThresholdAction = ThresholdAction.ALERT
    notify_emails: NotifyEmails = Field(default_factory=list)
    org_id: Identifier | None = None
    dimensions: DimensionValues = Field(
        default_factory=dict,
        description="Every groupBy dimension of the metric with a value: the threshold watches "
        "that dimension row (empty: the metric's total)",
    )


class ThresholdChange(WireModel):
    """threshold.update: the fields to change."""

    threshold: Quantity | None = None
    action: ThresholdAction | None = None
    notify_emails: NotifyEmails | None = None


class ThresholdList(WireModel):
    thresholds: list[UsageThreshold]


def _owned(threshold_id: str, who: Caller, context: ApiContext) -> UsageThreshold:
    found = context.thresholds.get(threshold_id)
    if found is None or not who.may_act_for(found.org_id):
        raise ApiError(404, "not_found", f"no threshold {threshold_id!r}")
    return found


@router.post(
    "",
    status_code=201,
    response_model=UsageThreshold,
    summary="threshold.create",
    responses=links(201, *each(("put", "delete"), "/v1/thresholds/{threshold_id}", from_body(threshold_id="id"))),
)
async def create_threshold(body: ThresholdInput, request: Request, who: Caller = Depends(writer)) -> UsageThreshold:
    context = context_of(request)
    org = body.org_id if body.org_id is not None else who.org_id
    who.require_org(org, "a threshold without an org" if org is None else f"org {org!r}")
    if who.org_id is not None:
        if body.subject_id == "*":
            raise ApiError(403, "forbidden_org", "an org-scoped key cannot set thresholds on every subject of a type")
        if body.subject_type == "org" and body.subject_id != who.org_id:
            raise ApiError(403, "forbidden_org", f"subject org:{body.subject_id} is not org {who.org_id!r}")
    resolved = context.metrics.resolve(body.metric_key, org)
    candidates = (
        [resolved] if resolved is not None else [d for d in context.metrics.definitions() if d.key == body.metric_key]
    )
    if not candidates:
        raise ApiError(
            422,
            "unknown_metric",
            f"no metric {body.metric_key!r}",
            [FieldProblem(field="body.metricKey", message="no such metric")],
        )
    problem = threshold_dimensions_problem(body.dimensions, candidates)
    if problem is not None:
        raise ApiError(422, "invalid_dimensions", problem, [FieldProblem(field="body.dimensions", message=problem)])
    threshold = UsageThreshold(
        id=body.id or f"thr-{uuid.uuid4().hex[:12]}",
        metric_key=body.metric_key,
        subject_type=body.subject_type,
        subject_id=body.subject_id,
        threshold=body.threshold,
        action=body.action,
        notify_emails=body.notify_emails,
        org_id=org,
        dimensions=body.dimensions,
    )
    if threshold.id in context.thresholds:
        raise ApiError(409, "conflict", f"threshold {threshold.id!r} exists; use PUT /v1/thresholds/{threshold.id}")
    await context.publish(context.thresholds, threshold.id, threshold)
    return threshold


@router.put("/{threshold_id}", response_model=UsageThreshold, summary="threshold.update")
async def update_threshold(
    threshold_id: str, body: ThresholdChange, request: Request, who: Caller = Depends(writer)
) -> UsageThreshold:
    context = context_of(request)
    current = _owned(threshold_id, who, context)
    changes = body.model_dump(exclude_none=True)
    if not changes:
        raise ApiError(422, "validation_error", "give at least one field to change")
    updated = current.model_copy(update=changes)
    await context.publish(context.thresholds, threshold_id, updated)
    return updated


@router.delete("/{threshold_id}", status_code=204, summary="threshold.delete")
async def delete_threshold(threshold_id: str, request: Request, who: Caller = Depends(writer)) -> Response:
    context = context_of(request)
    _owned(threshold_id, who, context)
    await context.publish(context.thresholds, threshold_id, None)
    return Response(status_code=204)


@router.get("", response_model=ThresholdList, summary="threshold.list")
async def list_thresholds(
    request: Request,
    metric_key: str | None = Query(default=None, alias="metricKey"),
    subject_type: str | None = Query(default=None, alias="subjectType"),
    subject_id: str | None = Query(default=None, alias="subjectId", description='Also the "*" thresholds of the type'),
    who: Caller = Depends(reader),
) -> ThresholdList:
    found = [
        t
        for t in context_of(request).thresholds.values()
        if who.may_act_for(t.org_id)
        and (metric_key is None or t.metric_key == metric_key)
        and (subject_type is None or t.subject_type == subject_type)
        and (subject_id is None or t.subject_id in (subject_id, "*"))
    ]
    return ThresholdList(thresholds=sorted(found, key=lambda t: (t.metric_key, t.subject_type, t.subject_id, t.id)))
