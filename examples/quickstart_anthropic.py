"""The quick start with Anthropic's SDK: the same five reviews as a Message Batch.

make run                       # in another terminal
.venv/bin/python examples/quickstart_anthropic.py
"""

import json
import os
import time

import anthropic

client = anthropic.Anthropic(
    base_url=os.environ.get("LOWTIDE_ROOT_URL", "http://127.0.0.1:8080"),  # no /v1
    api_key=os.environ.get("LOWTIDE_API_KEY", "anything"),
)

# examples/requests.jsonl holds Chat Completions lines; as Messages params the system prompt
# is a field of its own.
requests = []
with open(os.path.join(os.path.dirname(__file__), "requests.jsonl")) as f:
    for line in f:
        body = json.loads(line)["body"]
        system = [m["content"] for m in body["messages"] if m["role"] == "system"]
        params = {
            "model": body["model"],
            "max_tokens": body["max_tokens"],
            "temperature": body["temperature"],
            "messages": [m for m in body["messages"] if m["role"] != "system"],
        }
        if system:
            params["system"] = system[0]
        requests.append({"custom_id": json.loads(line)["custom_id"], "params": params})

batch = client.messages.batches.create(requests=requests)
while batch.processing_status != "ended":
    time.sleep(1)
    batch = client.messages.batches.retrieve(batch.id)
    print(batch.processing_status, batch.request_counts)

for entry in client.messages.batches.results(batch.id):
    if entry.result.type == "succeeded":
        print(entry.custom_id, entry.result.message.content[0].text)
    else:
        print(entry.custom_id, entry.result.type, getattr(entry.result, "error", ""))
