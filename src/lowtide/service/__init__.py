"""The use cases, once: every face (OpenAI API, CLI, and later ones) calls these and nothing below."""

from lowtide.runner.rerun import RerunRequest
from lowtide.service.batches import BatchRequest, BatchService, BatchView
from lowtide.service.files import FileService, FileUpload
from lowtide.service.message_batches import MessageBatchService, MessageRequest
from lowtide.store.rows import BatchRow, Counts, FileRow

__all__ = [
    "BatchRequest",
    "BatchRow",
    "BatchService",
    "BatchView",
    "Counts",
    "FileRow",
    "FileService",
    "FileUpload",
    "MessageBatchService",
    "MessageRequest",
    "RerunRequest",
]
