"""Request bodies parsed with every digit kept: a JSON number quantity becomes a Decimal, never a float."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import jiter
from fastapi import Request, Response
from fastapi.routing import APIRoute


class DecimalJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = jiter.from_json(body, float_mode="decimal", allow_inf_nan=False)
            except ValueError as error:  # FastAPI turns this into a 422 naming the problem
                raise json.JSONDecodeError(str(error), body.decode(errors="replace"), 0) from None
        return self._json


class DecimalJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(DecimalJSONRequest(request.scope, request.receive))

        return handle
