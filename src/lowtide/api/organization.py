"""Usage and costs over time, in the shapes of OpenAI's organization usage and costs APIs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from lowtide.api.auth import project_of
from lowtide.api.params import ASCII_DIGITS
from lowtide.api.responses import json_response
from lowtide.api.schemas import CompletionsUsagePage, CostsPage, EmbeddingsUsagePage, responses
from lowtide.service.usage import COMPLETIONS, EMBEDDINGS, UsageGroup, UsagePage, UsageService

router = APIRouter(tags=["Usage and costs"])
Project = Annotated[str, Depends(project_of)]
StartTime = Annotated[
    int, Query(ge=0, le=10**11, description="Unix seconds, inclusive"), ASCII_DIGITS
]
EndTime = Annotated[
    int | None, Query(ge=1, le=10**11, description="Unix seconds, exclusive"), ASCII_DIGITS
]
Width = Annotated[Literal["1d"], Query(description="only daily buckets are kept")]
Limit = Annotated[int, Query(ge=1, le=31, description="buckets per page"), ASCII_DIGITS]


def _usage(request: Request) -> UsageService:
    return request.app.state.runtime.usage


def _admin(request: Request) -> bool:
    return bool(request.scope["state"].get("admin"))


def _page(page: UsagePage, result) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": b.start_time,
                "end_time": b.end_time,
                "results": [result(g) for g in b.groups],
            }
            for b in page.buckets
        ],
        "has_more": page.next_page is not None,
        "next_page": page.next_page,
    }


def _completions_result(group: UsageGroup) -> dict[str, Any]:
    return {
        "object": "organization.usage.completions.result",
        "input_tokens": group.input_tokens,
        "output_tokens": group.output_tokens,
        "input_cached_tokens": group.cached_tokens,
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
        "num_model_requests": group.requests,
        "project_id": group.project,
        "user_id": None,
        "api_key_id": None,
        "model": group.model,
        "batch": True,
    }


def _embeddings_result(group: UsageGroup) -> dict[str, Any]:
    return {
        "object": "organization.usage.embeddings.result",
        "input_tokens": group.input_tokens,
        "num_model_requests": group.requests,
        "project_id": group.project,
        "user_id": None,
        "api_key_id": None,
        "model": group.model,
    }


def _cost_result(currency: str):  # type: ignore[no-untyped-def]
    def result(group: UsageGroup) -> dict[str, Any]:
        return {
            "object": "organization.costs.result",
            "amount": {"value": group.cost, "currency": currency.lower()},
            "line_item": group.model,
            "project_id": group.project,
            # Extension: the same tokens at the synchronous price, and what batching saved.
            "lowtide": {"sync_value": group.sync_cost, "saved": group.sync_cost - group.cost},
        }

    return result


class _Window:
    """The query every usage and costs endpoint takes: which days, which page, which projects."""

    def __init__(
        self,
        start_time: StartTime,
        end_time: EndTime = None,
        bucket_width: Width = "1d",
        project_ids: Annotated[list[str] | None, Query()] = None,
        limit: Limit = 7,
        page: Annotated[str | None, Query(pattern="^[0-9]{1,12}$")] = None,
    ) -> None:
        self.options = {
            "start_time": start_time,
            "end_time": end_time,
            "bucket_width": bucket_width,
            "project_ids": project_ids,
            "limit": limit,
            "page": page,
        }


Window = Annotated[_Window, Depends()]
Models = Annotated[list[str] | None, Query()]


async def _buckets(
    request: Request, project: str, window: _Window, group_by: list[str] | None, **options: Any
) -> UsagePage:
    return await _usage(request).buckets(
        project, admin=_admin(request), group_by=list(group_by or []), **window.options, **options
    )


@router.get(
    "/v1/organization/usage/completions",
    summary="Completions usage in daily buckets",
    responses=responses(CompletionsUsagePage, 400, 401),
)
async def completions_usage(
    request: Request,
    project: Project,
    window: Window,
    group_by: Annotated[list[Literal["project_id", "model", "batch"]] | None, Query()] = None,
    models: Models = None,
):
    found = await _buckets(request, project, window, group_by, endpoints=COMPLETIONS, models=models)
    return json_response(_page(found, _completions_result))


@router.get(
    "/v1/organization/usage/embeddings",
    summary="Embeddings usage in daily buckets",
    responses=responses(EmbeddingsUsagePage, 400, 401),
)
async def embeddings_usage(
    request: Request,
    project: Project,
    window: Window,
    group_by: Annotated[list[Literal["project_id", "model"]] | None, Query()] = None,
    models: Models = None,
):
    found = await _buckets(request, project, window, group_by, endpoints=EMBEDDINGS, models=models)
    return json_response(_page(found, _embeddings_result))


@router.get(
    "/v1/organization/costs",
    summary="Costs in daily buckets",
    responses=responses(CostsPage, 400, 401),
)
async def costs(
    request: Request,
    project: Project,
    window: Window,
    group_by: Annotated[list[Literal["project_id", "line_item"]] | None, Query()] = None,
):
    found = await _buckets(request, project, window, group_by, endpoints=None)
    return json_response(_page(found, _cost_result(_usage(request).currency)))
