"""The Models API: what the server serves, so `client.models.list()` works as on OpenAI."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from lowtide.api.objects import list_page
from lowtide.api.responses import json_response
from lowtide.api.schemas import Model, ModelList, responses
from lowtide.service.models import ModelInfo

router = APIRouter(tags=["Models"])


def model_object(info: ModelInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "model",
        "created": info.created,
        "owned_by": "lowtide",
        # Extension: what the model serves here, and how.
        "lowtide": {
            "endpoints": list(info.endpoints),
            "engine": info.engine,
            "pattern": info.pattern,
            "upstream_batch": info.upstream_batch,
        },
    }


@router.get(
    "/v1/models", summary="List the models served", responses=responses(ModelList, 400, 401)
)
async def list_models(request: Request):
    infos = request.app.state.runtime.models.list()
    return json_response(list_page([model_object(i) for i in infos], False))


@router.get(
    "/v1/models/{model_id:path}",
    summary="Retrieve a model",
    responses=responses(Model, 400, 401, 404),
)
async def retrieve_model(request: Request, model_id: str):
    return json_response(model_object(request.app.state.runtime.models.get(model_id)))
