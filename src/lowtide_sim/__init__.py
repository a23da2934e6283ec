"""A simulated OpenAI-compatible upstream (stand-in for vLLM or a hosted provider).

It also speaks Anthropic's Messages API (``POST /v1/messages``, see ``messages.py``) with
Anthropic's headers, auth and error envelope, answered by the same latency, fault and
rate-limit machinery.

Tests and benchmarks need a real HTTP server that answers like OpenAI, is fast,
deterministic, and can inject the failures a batch engine must survive (429s,
5xx, hung requests, dropped connections). It also counts how often each exact
request body arrived, so callers can check "at most N attempts per line".

Run it with ``python -m lowtide_sim --port 0``; once listening it prints exactly
one line ``READY http://HOST:PORT/v1`` on stdout. From Python, start it with
``lowtide_sim.launch.start_simulator``.

This package imports nothing from Lowtide: a stand-in that shares code with
what it tests would prove nothing.
"""
