"""Budgets per project: refused at validation when they cannot fit, paused mid-run when the
day's budget is spent, resumed when it is raised; nothing fails or is lost."""

from __future__ import annotations

import time

from support import chat_line, make_config, submit_batch, wait_for_batch

from lowtide_sim.launch import start_simulator


def _config(sim_url: str, prices: str, budget: str) -> str:
    models = f"""
[[models]]
name = "sim-model"
base_url = "{sim_url}"
max_concurrency = 4
timeout = 2
{prices}
"""
    return make_config(models=models, extra=f"\n[projects.default]\n{budget}\n")


def _errors(batch) -> list[str]:
    assert batch.status == "failed", batch
    return [e.code for e in batch.errors.data]


def test_a_batch_over_the_enqueued_token_limit_is_refused(make_server, sim_url):
    srv = make_server(_config(sim_url, "", "max_enqueued_tokens = 200")).start()
    client = srv.client()
    big = submit_batch(client, [chat_line(f"t{i}", "word " * 40) for i in range(20)])
    failed = wait_for_batch(client, big.id)
    assert _errors(failed) == ["token_limit_exceeded"]
    assert "200" in failed.errors.data[0].message
    small = wait_for_batch(client, submit_batch(client, [chat_line("s", "hi")]).id)
    assert small.status == "completed"


def test_a_batch_whose_input_alone_exceeds_the_daily_budget_is_refused(make_server, sim_url):
    prices = "input_price = 100000.0\noutput_price = 0.0"
    srv = make_server(_config(sim_url, prices, "max_cost_per_day = 0.01")).start()
    client = srv.client()
    b = wait_for_batch(client, submit_batch(client, [chat_line("c", "word " * 50)]).id)
    assert _errors(b) == ["budget_exceeded"]
    assert "daily budget" in b.errors.data[0].message


def test_a_running_batch_pauses_at_the_daily_budget_and_resumes_when_raised(make_server):
    prices = "input_price = 0.0\noutput_price = 1000.0\nbatch_price_factor = 1.0"
    with start_simulator("--latency-ms", "200") as sim:  # 20 lines/s: the budget lands midway
        srv = make_server(_config(sim.url, prices, "max_cost_per_day = 0.05")).start()
        client = srv.client()
        b = submit_batch(client, [chat_line(f"p{i}", f"q{i}") for i in range(100)])
        deadline = time.monotonic() + 30
        while not (b := client.batches.retrieve(b.id)).model_extra["lowtide"]["paused_reason"]:
            assert time.monotonic() < deadline, b
            time.sleep(0.1)
        assert "daily budget" in b.model_extra["lowtide"]["paused_reason"]
        time.sleep(1.5)  # in-flight lines land, then nothing more starts
        held = client.batches.retrieve(b.id)
        sent = sim.stats()["requests"]
        time.sleep(1.5)
        assert sim.stats()["requests"] == sent
        assert held.status == "in_progress" and held.request_counts.failed == 0
        assert 20 <= held.request_counts.completed < 100
        # The operator raises the budget: restart with the new configuration.
        srv.stop()
        srv.config_path.write_text(
            srv.config_path.read_text().replace("max_cost_per_day = 0.05", "max_cost_per_day = 5")
        )
        srv.start()
        final = wait_for_batch(client, b.id, timeout=60)
        assert final.status == "completed" and final.request_counts.completed == 100
        assert final.model_extra["lowtide"]["paused_reason"] is None
        spent = final.model_extra["lowtide"]["cost"]["amount"]
        assert abs(spent - 100 * 2 * 1000.0 / 1e6) < 1e-9  # 2 output tokens a line
