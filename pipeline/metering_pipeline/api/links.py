"""OpenAPI links from an operation that creates something to the operations that address it, so that clients,
generators and stateful API testers (schemathesis) can follow a create to its reads, updates and deletes."""

from __future__ import annotations

from typing import Any

_DESCRIPTIONS = {201: "Created", 202: "Accepted: acknowledged by Kafka"}
Target = tuple[str, str, dict[str, str]]  # method, path template, {parameter: runtime expression}


def links(status: int, *targets: Target) -> dict[int | str, dict[str, Any]]:
    """`responses` for a route whose `status` answer links to each target operation."""
    return {
        status: {
            "description": _DESCRIPTIONS[status],
            "links": {
                method + path.replace("/", "_").replace("{", "").replace("}", ""): {
                    "operationRef": f"#/paths/{path.replace('~', '~0').replace('/', '~1')}/{method}",
                    "parameters": parameters,
                }
                for method, path, parameters in targets
            },
        }
    }


def from_body(**fields: str) -> dict[str, str]:
    """Parameters taken from the answer's body: `subject_id="records/0/subjectId"`."""
    return {parameter: f"$response.body#/{field}" for parameter, field in fields.items()}


def each(methods: tuple[str, ...], path: str, parameters: dict[str, str]) -> tuple[Target, ...]:
    return tuple((method, path, parameters) for method in methods)
