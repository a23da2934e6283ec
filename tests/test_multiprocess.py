"""An API server with no workers, and separate worker processes that get killed and paused."""

from __future__ import annotations

import signal
import time

from support import (
    assert_output_exactly_once,
    chat_line,
    make_config,
    sim_stats,
    start_sim,
    start_worker,
    stop_process,
    submit_batch,
    wait_for_batch,
)


def test_workers_killed_and_paused_lose_and_duplicate_nothing(make_server):
    proc, url = start_sim("--latency-ms", "30")
    workers = []
    try:
        config = make_config(url).replace("max_concurrency = 32", "max_concurrency = 8")
        srv = make_server(config).start(30.0, "--no-workers")
        client = srv.client()
        workers = [start_worker(srv) for _ in range(2)]
        lines = [chat_line(f"m-{i}", f"multi {i}") for i in range(1500)]
        batch = submit_batch(client, lines)
        deadline = time.monotonic() + 60
        while (
            client.batches.retrieve(batch.id).request_counts.completed < 200
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        workers[0].kill()  # SIGKILL mid-shard
        workers[1].send_signal(signal.SIGSTOP)  # paused past its lease (3 s in tests)
        workers.append(start_worker(srv))
        time.sleep(5)
        workers[1].send_signal(signal.SIGCONT)  # wakes up holding stale leases: fenced out
        final = wait_for_batch(client, batch.id, timeout=120)
        assert final.status == "completed", srv.log()
        assert_output_exactly_once(client, final, 1500)
        # Only requests in flight when a worker died or froze can have reached the upstream twice.
        assert sim_stats(url)["max_per_body"] <= 3
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGCONT)
                stop_process(worker)
        stop_process(proc)


def test_fault_storm_api_and_three_workers(make_server):
    """20,000 lines; workers killed and paused at random, the API server killed once."""
    import random

    rng = random.Random(5)
    proc, url = start_sim("--latency-ms", "5")
    workers = []
    try:
        config = make_config(url).replace("max_concurrency = 32", "max_concurrency = 16")
        srv = make_server(config).start(30.0, "--no-workers")
        client = srv.client()
        workers = [start_worker(srv) for _ in range(3)]
        lines = [chat_line(f"f-{i}", f"storm {i}") for i in range(20_000)]
        batch = submit_batch(client, lines)
        api_killed = False
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 1.5))
            try:
                status = client.batches.retrieve(batch.id).status
            except Exception:
                status = "unknown"
            if status in ("completed", "failed", "cancelled", "expired"):
                break
            victim = rng.randrange(len(workers))
            if rng.random() < 0.5:
                workers[victim].kill()
                workers[victim] = start_worker(srv)
            else:
                workers[victim].send_signal(signal.SIGSTOP)
                time.sleep(rng.uniform(0.5, 4.0))  # sometimes past the 3 s lease
                workers[victim].send_signal(signal.SIGCONT)
            if not api_killed and rng.random() < 0.3:
                srv.kill()
                srv.start(30.0, "--no-workers")
                client = srv.client()
                api_killed = True
        if not api_killed:
            srv.kill()
            srv.start(30.0, "--no-workers")
            client = srv.client()
        final = wait_for_batch(client, batch.id, timeout=240)
        assert final.status == "completed", srv.log()
        assert_output_exactly_once(client, final, 20_000)
        # Repeats come only from requests in flight at a kill or pause: far below the retry budget.
        assert sim_stats(url)["max_per_body"] <= 1 + 8
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGCONT)
                stop_process(worker)
        stop_process(proc)
