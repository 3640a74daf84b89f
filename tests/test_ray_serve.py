"""Ray Serve scale-out: a local Ray cluster on 127.0.0.1, two engine replicas of a tiny hybrid bundle (32b preset:
LLLG, window 8) behind Serve's proxy, driven by the real `openai` client.

Greedy answers under 64 concurrent requests equal the same requests served alone; killing an engine replica's
process during such a load loses no request silently (each completes, or gets a retryable error and then
succeeds on retry), and Serve brings the replica back; a conversation's turns stay on one replica and reuse
its cached prefix. Every wait is bounded; Serve and Ray are shut down in teardown.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import time
import warnings

import httpx
import pytest

openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from exaone_deploy.server.ray_serve import AffinityIndex, build_app  # noqa: E402

MODEL = "tiny-32b"
APP = "exaone"
API_KEY = "sk-ray-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from exaone_deploy.exporter.export import ExportOptions, export_bundle
    from exaone_deploy.tiny.make import make_tiny

    root = tmp_path_factory.mktemp("ray")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = export_bundle(
            make_tiny(root / "ckpt", "32b"), root / "bundle", ExportOptions(max_seq_len=512), progress=False
        )
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        namespace="exaone-deploy-test",
    )
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app(
                {
                    "bundle": str(bundle),
                    "replicas": "2",
                    "max_batch": "4",
                    "api_key": API_KEY,
                    "served_model_name": MODEL,
                }
            ),
            name=APP,
            route_prefix="/",
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _ask(client, i: int, stream: bool, n: int = 12):
    prompt = f"request {i % 16}: " + "to be or not to be " * (1 + i % 16 % 5)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
    if stream:
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    return client.completions.create(**kw).choices[0].text


def test_routes_auth_and_affinity_key(cluster):
    """The single server's validation and API key hold behind the proxy; /health aggregates both replicas."""
    assert httpx.post(cluster + "/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
    bad = httpx.post(cluster + "/v1/completions", content=b"{bad", headers={"Authorization": f"Bearer {API_KEY}"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert [m.id for m in _client(cluster).models.list()] == [MODEL]
    h = _wait(lambda: (h := _health(cluster))["replicas_alive"] == 2 and h, 30, "two replicas on /health")
    assert h["status"] == "ok" and h["slots_total"] == 8 and len(h["per_replica"]) == 2
    assert "exaone_decode_step_seconds_count{replica=" in httpx.get(cluster + "/metrics").text


def test_affinity_keys_follow_conversations():
    """Later turns get their conversation's key; a conversation sharing only the system prompt gets its own."""
    index, chat = AffinityIndex(), "/v1/chat/completions"
    sys_msg = {"role": "system", "content": "a long shared system prompt"}

    def key(msgs):
        return index.key(chat, json.dumps({"messages": msgs}).encode())

    a = [sys_msg, {"role": "user", "content": "q1"}]
    b = [sys_msg, {"role": "user", "content": "other"}]
    ka, kb = key(a), key(b)
    assert ka != kb
    a2 = a + [{"role": "assistant", "content": "r1"}, {"role": "user", "content": "q2"}]
    assert key(a2) == ka and key(a2 + [{"role": "assistant", "content": "r2"}, {"role": "user", "content": "q3"}]) == ka
    assert key(b + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]) == kb
    ids = list(range(100, 140))
    kt = index.key("/v1/completions", json.dumps({"prompt": ids}).encode())
    assert index.key("/v1/completions", json.dumps({"prompt": ids + [7] * 20}).encode()) == kt
    assert index.key("/v1/completions", b'{"prompt": "x", "user": "u1"}') == "user:u1"
    assert index.key("/v1/completions", b"{bad") is None


def test_64_concurrent_requests_equal_alone(cluster):
    client = _client(cluster)
    alone = {(i, s): _ask(client, i, s) for i in range(16) for s in (False, True)}
    before = {r: s["finished"] for r, s in _health(cluster)["per_replica"].items()}
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        futures = {pool.submit(_ask, client, i, i % 2 == 1): i for i in range(64)}
        for f in concurrent.futures.as_completed(futures, timeout=600):
            i = futures[f]
            assert f.result() == alone[(i % 16, i % 2 == 1)], i
    time.sleep(1.0)  # a report period
    after = {r: s["finished"] for r, s in _health(cluster)["per_replica"].items()}
    assert all(after[r] > before.get(r, 0) for r in after), (before, after)  # both replicas served


def test_conversation_stays_on_its_replica(cluster):
    """Three turns of two conversations (token-id prompts: each turn extends the last prompt and its completion
    exactly): every later turn lands where its prefix is cached, a prefix-cache hit each."""
    http = httpx.Client(base_url=cluster, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    hits0 = _health(cluster)["prefix_hits"]
    for conv in range(2):
        prompt = [20 + conv, *range(30, 45)]  # one unit (16 ids) of the affinity index
        for turn in range(3):
            prompt += [60 + turn, 70]
            r = http.post(
                "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": prompt,
                    "max_tokens": 6,
                    "temperature": 0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                },
            )
            prompt += r.json()["choices"][0]["token_ids"]
    _wait(lambda: _health(cluster)["prefix_hits"] - hits0 >= 4, 10, "4 prefix hits")


def _replica_pids(url: str) -> dict[str, int]:
    """Engine replica id -> process id, as the replicas report them on /health."""
    return {r: s["pid"] for r, s in _health(url)["per_replica"].items() if s["alive"]}


def test_killed_replica_loses_no_request(cluster):
    client = _client(cluster)
    alone = {(i, s): _ask(client, i, s, n=80) for i in range(16) for s in (False, True)}
    pids = _replica_pids(cluster)
    assert len(pids) == 2, pids
    outcomes: dict[int, str] = {}

    def one(i: int) -> str:
        for attempt in range(6):
            try:
                text = _ask(client, i, i % 2 == 1, n=80)
                outcomes[i] = outcomes.get(i, "ok") if attempt == 0 else "retried"
                return text
            except openai.APIStatusError as e:  # non-streamed: HTTP 503, code replica_unavailable
                assert e.status_code == 503 and e.response.json()["error"]["code"] == "replica_unavailable", e
            except openai.APIError as e:  # streamed: an error event ends the stream
                assert (e.body or {}).get("code") == "replica_unavailable", (e, e.body)
            time.sleep(1.0)
        raise AssertionError(f"request {i} failed 6 times")

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        futures = {pool.submit(one, i): i for i in range(64)}
        time.sleep(1.5)  # the load is running
        victim_name, victim = sorted(pids.items())[0]
        assert not all(f.done() for f in futures), "the load ended before the kill"
        os.kill(victim, signal.SIGKILL)
        for f in concurrent.futures.as_completed(futures, timeout=600):
            i = futures[f]
            assert f.result() == alone[(i % 16, i % 2 == 1)], i
    assert len(outcomes) == 64

    def back():
        now = _replica_pids(cluster)
        return len(now) == 2 and victim not in now.values() and victim_name not in now

    _wait(back, 120, "Serve to restart the killed replica")
    assert _ask(client, 3, False, n=80) == alone[(3, False)]
