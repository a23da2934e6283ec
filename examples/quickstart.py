"""Submit examples/requests.jsonl to a Lowtide server, wait, and print one answer per line.

make run                       # in another terminal
.venv/bin/python examples/quickstart.py [requests.jsonl]
"""

import json
import os
import sys
import time

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("LOWTIDE_URL", "http://127.0.0.1:8080/v1"),
    api_key=os.environ.get("LOWTIDE_API_KEY", "anything"),
)
path = (
    sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "requests.jsonl")
)

with open(path, "rb") as f:
    batch_file = client.files.create(file=f, purpose="batch")
batch = client.batches.create(
    input_file_id=batch_file.id, endpoint="/v1/chat/completions", completion_window="24h"
)
while batch.status not in ("completed", "failed", "expired", "cancelled"):
    time.sleep(1)
    batch = client.batches.retrieve(batch.id)
    print(batch.status, batch.request_counts.completed, "/", batch.request_counts.total)

if batch.status == "failed":  # the file did not validate: each error names its line
    for error in batch.errors.data:
        print(f"line {error.line}: {error.code}: {error.message}")
    sys.exit(2)

# Results come back as JSONL, one line per request, matched by custom_id (never by position).
answers = {}
if batch.output_file_id:
    for line in client.files.content(batch.output_file_id).text.splitlines():
        result = json.loads(line)
        body = result["response"]["body"]
        answers[result["custom_id"]] = body["choices"][0]["message"]["content"].strip()
failed = {}
if batch.error_file_id:
    for line in client.files.content(batch.error_file_id).text.splitlines():
        result = json.loads(line)
        failed[result["custom_id"]] = result["error"]["message"]

for custom_id, answer in sorted(answers.items()):
    print(f"{custom_id}: {answer}")
for custom_id, message in sorted(failed.items()):
    print(f"{custom_id}: FAILED: {message}")
sys.exit(0 if not failed else 1)
