"""A batch's webhook deliveries (extension): list them with their attempts, resend one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from lowtide.api.auth import project_of
from lowtide.api.objects import list_page, webhook_delivery_object
from lowtide.api.responses import json_response
from lowtide.api.schemas import WebhookDelivery, WebhookDeliveryList, responses
from lowtide.service.webhooks import WebhookService

router = APIRouter(tags=["Batches"])
Project = Annotated[str, Depends(project_of)]


def _webhooks(request: Request) -> WebhookService:
    return request.app.state.runtime.webhooks


@router.get(
    "/v1/batches/{batch_id}/webhook_deliveries",
    summary="List a batch's webhook deliveries and their attempts (extension)",
    responses=responses(WebhookDeliveryList, 400, 401, 404),
)
async def list_webhook_deliveries(request: Request, batch_id: str, project: Project):
    views = await _webhooks(request).deliveries(project, batch_id)
    return json_response(list_page([webhook_delivery_object(v) for v in views], False))


@router.post(
    "/v1/batches/{batch_id}/webhook_deliveries/{delivery_id}/resend",
    summary="Send a webhook delivery again now, with the same webhook-id (extension)",
    responses=responses(
        WebhookDelivery, 400, 401, 404, (409, "The delivery is being attempted right now")
    ),
)
async def resend_webhook_delivery(
    request: Request, batch_id: str, delivery_id: str, project: Project
):
    view = await _webhooks(request).resend(project, batch_id, delivery_id)
    return json_response(webhook_delivery_object(view))
