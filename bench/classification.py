"""Easy classification on the embedded chat models: how often is the answer right?

Runs the labelled set in bench/data/classification.jsonl (200 short product and movie reviews,
positive or negative, and 100 support tickets: billing, shipping, technical or account; written
for this bench) through real Lowtide batches (`lowtide serve` in a fresh data folder, the SDK,
one batch per model, task and mode) on each bundled chat model, in three modes:

  free text       a system message asks for one word; the user message is the text. The
                  answer is parsed leniently (the first label word anywhere in it, any case);
                  an answer that names no label counts as wrong
  free text, question last
                  no system message: the text, then the question ("Is this review positive or
                  negative? Answer with one word."), in the user message; parsed the same way
  json_schema     the first prompt with a response_format whose schema is {"label": <enum>}:
                  the grammar makes every answer one of the labels

and prints, per model, task and mode: accuracy, answers that named no label, lines/s (batch
created to completed, the model already loaded) and completion tokens per answer.

    .venv/bin/python bench/classification.py [--limit 200] [--tasks sentiment,ticket]
        [--models SmolLM2-135M-Instruct,gemma-3-270m] [--gguf NAME=PATH ...]

--gguf serves another GGUF file as a route of that name for the run (to try a candidate model
before bundling it); --models picks routes (default: every bundled chat model).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import start_lowtide, stop  # noqa: E402

from lowtide.config import default_routes  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "classification.jsonl"
TASKS = {
    "sentiment": {
        "labels": ["positive", "negative"],
        "system": (
            "Classify the sentiment of the customer review. "
            "Answer with one word: positive or negative."
        ),
        "question": "Is this review positive or negative? Answer with one word.",
    },
    "ticket": {
        "labels": ["billing", "shipping", "technical", "account"],
        "system": (
            "Classify the support ticket by topic. Answer with one word: billing (charges, "
            "invoices, refunds, payments), shipping (delivery, parcels, tracking), technical "
            "(errors, crashes, devices not working) or account (login, password, profile)."
        ),
        "question": (
            "Is this support ticket about billing, shipping, technical or account? "
            "Answer with one word."
        ),
    },
}
MODES = ("free text", "free text, question last", "json_schema")
MAX_TOKENS = {"free text": 10, "free text, question last": 10, "json_schema": 32}


@dataclass
class Result:
    model: str
    task: str
    mode: str
    lines: int
    correct: int
    unlabelled: int
    seconds: float
    completion_tokens: int


def load_set(tasks: list[str], limit: int | None) -> dict[str, list[dict]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    by_task = {task: [r for r in rows if r["task"] == task] for task in tasks}
    return {task: items[:limit] if limit else items for task, items in by_task.items()}


def schema_format(labels: list[str]) -> dict:
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": labels}},
        "required": ["label"],
        "additionalProperties": False,
    }
    return {
        "type": "json_schema",
        "json_schema": {"name": "label", "schema": schema, "strict": True},
    }


def request_line(model: str, task: str, mode: str, item: dict) -> dict:
    if mode == "free text, question last":
        messages = [{"role": "user", "content": f"{item['text']}\n\n{TASKS[task]['question']}"}]
    else:
        messages = [
            {"role": "system", "content": TASKS[task]["system"]},
            {"role": "user", "content": item["text"]},
        ]
    body: dict = {
        "model": model,
        "messages": messages,
        "max_tokens": MAX_TOKENS[mode],
        "temperature": 0,
    }
    if mode == "json_schema":
        body["response_format"] = schema_format(TASKS[task]["labels"])
    return {"custom_id": item["id"], "method": "POST", "url": "/v1/chat/completions", "body": body}


def free_text_label(answer: str, labels: list[str]) -> str | None:
    """The label word that comes first in the answer (any case, whole words), else None."""
    found = []
    for label in labels:
        match = re.search(rf"\b{re.escape(label)}\b", answer, re.IGNORECASE)
        if match:
            found.append((match.start(), label))
    return min(found)[1] if found else None


def schema_label(answer: str, labels: list[str]) -> str | None:
    try:
        value = json.loads(answer)
    except ValueError:
        return None
    label = value.get("label") if isinstance(value, dict) else None
    return label if label in labels else None


def run_batch(client: OpenAI, lines: list[dict]) -> tuple[float, dict[str, dict]]:
    raw = "".join(json.dumps(line) + "\n" for line in lines).encode()
    f = client.files.create(file=("classify.jsonl", io.BytesIO(raw)), purpose="batch")
    started = time.perf_counter()
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = started + 1800
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        if time.perf_counter() > deadline:
            raise SystemExit(f"batch {batch.id} still {batch.status} after 30 minutes")
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    elapsed = time.perf_counter() - started
    if batch.status != "completed" or not batch.output_file_id:
        raise SystemExit(f"batch ended {batch.status}: {batch.request_counts} {batch.errors}")
    if batch.request_counts.failed:
        errors = client.files.content(batch.error_file_id).text.splitlines()[:3]
        raise SystemExit(f"{batch.request_counts.failed} lines failed, e.g. {errors}")
    rows = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    return elapsed, {row["custom_id"]: row["response"]["body"] for row in rows}


def measure(client: OpenAI, model: str, task: str, mode: str, items: list[dict]) -> Result:
    labels = TASKS[task]["labels"]
    seconds, bodies = run_batch(client, [request_line(model, task, mode, i) for i in items])
    parse = schema_label if mode == "json_schema" else free_text_label
    correct = unlabelled = tokens = 0
    for item in items:
        body = bodies[item["id"]]
        answer = body["choices"][0]["message"]["content"] or ""
        tokens += body["usage"]["completion_tokens"]
        label = parse(answer, labels)
        unlabelled += label is None
        correct += label == item["label"]
    return Result(model, task, mode, len(items), correct, unlabelled, seconds, tokens)


def config_for(extra: dict[str, str]) -> str | None:
    if not extra:
        return None
    return "".join(
        f'[[models]]\nname = "{name}"\nengine = "llamacpp"\nmodel_path = "{path}"\n'
        "max_concurrency = 64\n\n"
        for name, path in extra.items()
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--limit", type=int, default=None, help="lines per task (default: all)")
    p.add_argument("--tasks", default="sentiment,ticket")
    p.add_argument("--models", default=None, help="default: the bundled chat models")
    p.add_argument("--gguf", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--data-dir", default=None, help="reuse a data folder (its converted weights)")
    args = p.parse_args()
    extra = dict(spec.split("=", 1) for spec in args.gguf)
    bundled = [r.name for r in default_routes() if r.engine == "llamacpp"]
    models = args.models.split(",") if args.models else [*bundled, *extra]
    tasks = args.tasks.split(",")
    items = load_set(tasks, args.limit)
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="lowtide-bench-classify-"))
    proc, client = start_lowtide(data_dir, config_for(extra))
    results: list[Result] = []
    try:
        for model in models:
            started = time.perf_counter()
            run_batch(client, [request_line(model, tasks[0], "free text", items[tasks[0]][0])])
            print(f"{model}: loaded in {time.perf_counter() - started:.1f} s", flush=True)
            for task in tasks:
                for mode in MODES:
                    r = measure(client, model, task, mode, items[task])
                    results.append(r)
                    print(
                        f"  {task:9} {mode:24}: {r.correct}/{r.lines} right, "
                        f"{r.unlabelled} without a label, {r.lines / r.seconds:.1f} lines/s",
                        flush=True,
                    )
    finally:
        stop(proc)
    print()
    print("| model | task | mode | accuracy | answers without a label | lines/s | tokens/answer |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.model} | {r.task} ({r.lines}) | {r.mode} | {r.correct / r.lines:.1%} | "
            f"{r.unlabelled} | {r.lines / r.seconds:.1f} | {r.completion_tokens / r.lines:.1f} |"
        )


if __name__ == "__main__":
    main()
