"""The OpenAI-compatible server, live on 127.0.0.1, driven by the real `openai` client and raw HTTP.

A tiny random-weight bundle (32b preset: LLLG hybrid attention, window 8) is served by `python -m
exaone_deploy.server` in a subprocess. Greedy answers are checked against the offline Generator and,
under load, against the same requests served one at a time; fault tests (clients vanishing, bad inputs, a
full queue, a missing API key) are followed by requests that must still be answered correctly, and no cache
slot may stay in use.
"""

from __future__ import annotations

import concurrent.futures
import json
import queue
import random
import re
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from exaone_deploy.runtime.generate import Generator  # noqa: E402
from exaone_deploy.runtime.sampling import SamplingParams  # noqa: E402
from exaone_deploy.server.launcher import ServerProcess  # noqa: E402
from exaone_deploy.text.chat import (  # noqa: E402
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    StreamSplitter,
)
from exaone_deploy.text.tokenizer import Tokenizer  # noqa: E402

MODEL = "tiny-32b"
API_KEY = "sk-test-0123456789"
CONTEXT = 1024  # the tool-use system prompt alone is ~700 tokens of the tiny tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a time zone.",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
}


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    import warnings

    from exaone_deploy.exporter.export import ExportOptions, export_bundle
    from exaone_deploy.tiny.make import make_tiny

    root = tmp_path_factory.mktemp("serve")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_bundle(
            make_tiny(root / "ckpt", "32b"), root / "bundle", ExportOptions(max_seq_len=CONTEXT), progress=False
        )


class LiveServer(ServerProcess):
    def __init__(self, bundle, *args: str):
        super().__init__(bundle, "--served-model-name", MODEL, *args, timeout=60)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def client(self, api_key: str = "unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def health(self) -> dict:
        return self.http.get("/health").json()

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Poll /health until nothing runs or waits; return the last state."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if (h["slots_used"], h["running"], h["queue_depth"]) == (0, 0, 0) or time.monotonic() > deadline:
                return h
            time.sleep(0.05)

    def metric(self, name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", self.http.get("/metrics").text, re.M)
        return float(m.group(1)) if m else 0.0

    def close(self) -> None:
        super().close(timeout=20)


@pytest.fixture(scope="module")
def server(bundle):
    # prefill in chunks of 32 so that longer prompts go through chunked prefill (extend)
    s = LiveServer(bundle, "--max-batch", "8", "--max-queue", "64", "--prefill-chunk", "32")
    yield s
    s.close()
    assert s.proc.returncode == 0 or s.proc.returncode == -15, "".join(s.output)


@pytest.fixture(scope="module")
def guarded(bundle):
    """One slot, one queue place, an API key."""
    s = LiveServer(bundle, "--max-batch", "1", "--max-queue", "1", "--api-key", API_KEY, "--max-body-bytes", "65536")
    yield s
    s.close()


@pytest.fixture(scope="module")
def tok(bundle):
    return Tokenizer.from_dir(bundle)


@pytest.fixture(scope="module")
def offline(bundle):
    return Generator.from_bundle(bundle, max_batch=1, capacity=CONTEXT)


def _assert_idle(server) -> None:
    h = server.wait_idle()
    assert (h["slots_used"], h["running"], h["queue_depth"], h["cache_tokens"]) == (0, 0, 0, 0), h
    assert h["status"] == "ok" and h["alive"]


# ---- basics -------------------------------------------------------------------------------------


def test_models_health_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4o")
    h = server.health()
    assert h["status"] == "ok" and h["slots_total"] == 8 and h["context"] == CONTEXT and h["queue_max"] == 64
    text = server.http.get("/metrics").text
    for name in (
        "exaone_http_requests_total",
        "exaone_time_to_first_token_seconds_bucket",
        "exaone_request_latency_seconds_bucket",
        "exaone_queue_depth",
        "exaone_decode_batch_size_bucket",
        "exaone_generation_tokens_total",
        "exaone_cache_slots_used",
    ):
        assert name in text, name


def test_completion_matches_offline_generator(server, offline, tok):
    """The server's greedy text equals the offline Generator's, for text and token-id prompts."""
    client = server.client()
    for prompt in ["ROMEO:\nWhat light", "The quick brown fox jumps over the lazy dog. " * 4]:
        ids = tok.encode(prompt)
        want = offline.generate([ids], SamplingParams(max_new_tokens=12))[0]
        for p in (prompt, ids):
            r = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
            assert r.choices[0].text == want.text
            assert r.choices[0].finish_reason == want.finish_reason
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want.token_ids))
        # vLLM's return_token_ids extension: the ids themselves, whole and streamed
        r = client.completions.create(
            model=MODEL, prompt=ids, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
        )
        assert r.choices[0].token_ids == want.token_ids and r.choices[0].prompt_token_ids == ids
        chunks = client.completions.create(
            model=MODEL, prompt=ids, max_tokens=12, temperature=0, stream=True, extra_body={"return_token_ids": True}
        )
        assert [
            t for c in chunks if c.choices for t in getattr(c.choices[0], "token_ids", None) or ()
        ] == want.token_ids


def test_chat_non_stream_and_stream(server, offline, tok):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about Verona."}]
    ids = tok.apply_chat_template(messages)
    want = offline.generate([ids], SamplingParams(max_new_tokens=20))[0]
    reasoning, content = _split(want.text, reasoning_opened=False)

    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    msg = r.choices[0].message
    assert r.object == "chat.completion" and msg.role == "assistant"
    assert msg.content == content and reasoning is None
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want.token_ids))

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == msg.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    _assert_idle(server)


def test_tools_reach_the_prompt(server, tok):
    client = server.client()
    messages = [{"role": "user", "content": "Weather in Seoul?"}]

    def prompt_tokens(**kw):
        return client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=1, temperature=0, **kw
        ).usage.prompt_tokens

    both = len(tok.apply_chat_template(messages, tools=[WEATHER, TIME]))
    only_time = len(tok.apply_chat_template(messages, tools=[TIME]))
    none = len(tok.apply_chat_template(messages))
    assert both > only_time > none
    assert prompt_tokens(tools=[WEATHER, TIME]) == both
    assert prompt_tokens(tools=[WEATHER, TIME], tool_choice="auto") == both
    assert prompt_tokens(tools=[WEATHER, TIME], tool_choice="none") == none
    assert (
        prompt_tokens(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
        == only_time
    )
    # an assistant turn with a tool call and the tool's answer render too (OpenAI-style arguments string)
    history = messages + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Seoul"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 24}'},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(history, tools=[WEATHER]))


def _split(text: str, reasoning_opened: bool) -> tuple[str | None, str]:
    """(reasoning, content) of generated text, split the way a stream is: the server knows whether its prompt
    opened <think>, so it does not guess from a later </think> as chat.parse_assistant_output does for bare
    text (a random model writes stray </think> tokens)."""
    splitter = StreamSplitter(reasoning_opened=reasoning_opened)
    pieces = splitter.feed(text) + splitter.finish()
    reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
    return reasoning or None, "".join(t for kind, t in pieces if kind == "content")


@pytest.mark.parametrize("thinking", [False, True])
def test_reasoning_on_and_off(server, offline, tok, thinking):
    client = server.client()
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    ids = tok.apply_chat_template(messages, enable_thinking=thinking)
    assert tok.decode(ids).endswith("<think>\n") == thinking
    text = offline.generate([ids], SamplingParams(max_new_tokens=24))[0].text
    reasoning, content = _split(text, reasoning_opened=thinking)
    if thinking:
        assert reasoning  # the reply starts inside <think>
    else:
        assert reasoning is None
    kw = dict(
        model=MODEL,
        messages=messages,
        max_tokens=24,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
    )
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.usage.prompt_tokens == len(ids)
    assert (msg.content or "") == content
    assert getattr(msg, "reasoning_content", None) == reasoning
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == (reasoning or "")
    assert "".join(d.content or "" for d in deltas) == content


def test_stream_formatting_of_reasoning_and_tool_calls():
    """Assistant text with reasoning and tool calls (what a trained model writes) becomes OpenAI deltas and a
    message; any split of the text into stream deltas gives the same message, which the openai types accept."""
    from openai.types.chat import ChatCompletionMessage
    from openai.types.chat.chat_completion_chunk import ChoiceDelta

    from exaone_deploy.server.serving import ChatChoice

    def message_of(deltas):  # as it goes on the wire
        return ChatChoice.message(deltas).model_dump()

    text = (
        "The user wants the weather.\n</think>\n\nLet me check.\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Seoul"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"tz": "Asia/Seoul"}}</tool_call>'
    )
    whole = ChatChoice(reasoning_opened=True, parse_tools=True)
    message = message_of(whole.feed(text) + whole.finish())
    assert whole.finish_reason("stop") == "tool_calls"
    assert message["reasoning_content"] == "The user wants the weather."
    assert message["content"] == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Seoul"}),
        ("get_time", {"tz": "Asia/Seoul"}),
    ]
    ChatCompletionMessage.model_validate(message)
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), 12))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        c = ChatChoice(reasoning_opened=True, parse_tools=True)
        deltas = [d for p in pieces for d in c.feed(p)] + c.finish()
        for d in deltas:
            ChoiceDelta.model_validate(d.model_dump())
        streamed = message_of(deltas)
        assert [t["function"] for t in streamed["tool_calls"]] == [t["function"] for t in message["tool_calls"]]
        assert (streamed["content"], streamed["reasoning_content"]) == (
            message["content"],
            message["reasoning_content"],
        )
    # tools not offered (tool_choice "none"): the call stays text
    off = ChatChoice(reasoning_opened=True, parse_tools=False)
    msg = message_of(off.feed(text) + off.finish())
    assert "tool_calls" not in msg and off.finish_reason("stop") == "stop"
    assert TOOL_CALL_OPEN in msg["content"] and TOOL_CALL_CLOSE in msg["content"]


# ---- load ---------------------------------------------------------------------------------------


def _load_requests(tok) -> list[dict]:
    """Distinct requests: chat and text, streamed or not, greedy or seeded sampling, short and chunked prompts."""
    rng = random.Random(1)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    reqs = []
    for i in range(48):
        n_words = rng.choice([3, 8, 20, 45])  # 45 words: prompts longer than one prefill chunk (32)
        text = " ".join(rng.choice(words) for _ in range(n_words))
        kind = ("chat", "text")[i % 2]
        sampling = {"temperature": 0} if i % 4 else {"temperature": 0.9, "top_p": 0.9, "seed": 1000 + i}
        reqs.append({"kind": kind, "stream": bool(i % 3), "text": text, "max_tokens": rng.randint(1, 10), **sampling})
    return reqs


def _run(client, spec: dict) -> tuple:
    kw = dict(model=MODEL, max_tokens=spec["max_tokens"], temperature=spec["temperature"])
    for k in ("top_p", "seed"):
        if k in spec:
            kw[k] = spec[k]
    if spec["kind"] == "chat":
        kw["messages"] = [{"role": "user", "content": spec["text"]}]
        if spec["stream"]:
            chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            return text, finish[0], chunks[-1].usage.completion_tokens
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    kw["prompt"] = spec["text"]
    if spec["stream"]:
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return text, finish[0], chunks[-1].usage.completion_tokens
    r = client.completions.create(**kw)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens


def test_load_concurrent_equals_alone(server, tok):
    """256 requests over 32 concurrent clients (8 slots, so 24 wait): all succeed, each answer equals the same
    request served alone, the batch really was shared, and no slot stays in use."""
    client = server.client()
    specs = _load_requests(tok)
    alone = [_run(client, s) for s in specs]
    assert any(a[2] > 1 for a in alone)
    steps0, batch0 = server.metric("exaone_decode_batch_size_count"), server.metric("exaone_decode_batch_size_sum")

    order = [i % len(specs) for i in range(256)]
    random.Random(2).shuffle(order)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: _run(client, specs[i]), order))
    for i, got in zip(order, results):
        assert got == alone[i], (specs[i], got, alone[i])

    steps = server.metric("exaone_decode_batch_size_count") - steps0
    batched = server.metric("exaone_decode_batch_size_sum") - batch0
    assert batched / steps > 2.0, f"mean decode batch {batched / steps:.2f}: requests were not batched"
    _assert_idle(server)


# ---- faults -------------------------------------------------------------------------------------


def _long_body(i: int, stream: bool = True) -> dict:
    return {
        "model": MODEL,
        "prompt": f"request {i}: once upon a time",
        "max_tokens": 900,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def test_client_disconnects_free_slots(server, tok):
    before = server.health()["cancelled"]
    # streams that vanish after their first chunk (8 fill the slots, 4 more wait in the queue)
    clients = [httpx.Client(base_url=server.url, timeout=30) for _ in range(12)]
    streams = []
    for i, c in enumerate(clients):
        cm = c.stream("POST", "/v1/completions", json=_long_body(i))
        streams.append((cm, cm.__enter__()))
    for _cm, r in streams[:8]:
        assert r.status_code == 200
        next(r.iter_lines())
    for (cm, _), c in zip(streams, clients):
        cm.__exit__(None, None, None)
        c.close()
    # a non-streamed request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=_long_body(99, stream=False), timeout=0.05)
    h = server.wait_idle()
    _assert_idle(server)
    assert h["cancelled"] - before == 13, h  # none ran to its 900 tokens
    # the server still answers, and correctly
    r = server.client().completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


BAD_REQUESTS = [
    # (path, body (bytes = raw), status, code or None, param or None)
    ("/v1/chat/completions", b'{"model": "tiny-32b", "messages": [', 400, "invalid_json", None),
    ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json", None),
    ("/v1/chat/completions", b"", 400, "invalid_json", None),
    ("/v1/chat/completions", {"model": MODEL}, 400, None, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, None, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, None, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 42}]}, 400, None, "messages.0.content"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        400,
        None,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 3.5},
        400,
        None,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        400,
        None,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        400,
        None,
        "temperature",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, None, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, None, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_k": -2}, 400, None, "top_k"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
        400,
        None,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        400,
        None,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"},
        400,
        None,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12},
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, None, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, None, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, None, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 1000}, 400, None, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, None, "stop"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"},
        404,
        "model_not_found",
        "model",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
        400,
        None,
        "tool_choice",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
        400,
        None,
        "tools.0.function",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"enable_thinking": "yes"}},
        400,
        None,
        "chat_template_kwargs.enable_thinking",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5},
        400,
        "unsupported_parameter",
        "presence_penalty",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi " * 1500}]},
        400,
        "context_length_exceeded",
        "messages",
    ),
    ("/v1/completions", {"prompt": [i % 500 for i in range(CONTEXT + 10)]}, 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": 12}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": CONTEXT}, 400, "context_length_exceeded", "max_tokens"),
    ("/v1/nope", {"prompt": "hi"}, 404, "not_found", None),
]


def test_bad_inputs_get_openai_errors(server, offline, tok):
    for path, body, status, code, param in BAD_REQUESTS:
        if isinstance(body, bytes):
            r = server.http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = server.http.post(path, json=body)
        assert r.status_code == status, (path, body, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        if code is not None:
            assert err["code"] == code, (body, err)
        if param is not None:
            assert err["param"] == param, (body, err)
    # a body over the limit (the main server allows 2 MiB)
    r = server.http.post("/v1/completions", content=b'{"prompt": "' + b"a" * (3 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # the openai client turns them into its exceptions
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-this-one", prompt="hi", max_tokens=1)
    # a temperature so small that 1/T overflows is served as greedy, as in vLLM
    r = client.completions.create(model=MODEL, prompt="ROMEO:\n", max_tokens=8, temperature=1e-30)
    assert r.choices[0].text == offline.generate(["ROMEO:\n"], SamplingParams(max_new_tokens=8))[0].text
    # and the server still serves correctly
    ids = tok.encode("ROMEO:\n")
    want = offline.generate([ids], SamplingParams(max_new_tokens=8))[0]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == want.text
    _assert_idle(server)


def test_engine_generate_streams_and_cancels_on_close(bundle, offline, tok):
    """The async engine facade without HTTP: a group's events carry each sequence's index and end with its Done
    (tokens equal the offline Generator's); closing a group, before or after its first event, frees its slots."""
    import asyncio

    from exaone_deploy.server.engine import AsyncEngine, Delta, Done, QueueFull

    engine = AsyncEngine.from_bundle(bundle, max_batch=2, context=CONTEXT, max_queue=2, model_name=MODEL)
    prompts = [tok.encode("to be or not"), tok.encode("that is the question")]
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    endless = SamplingParams(max_new_tokens=900, ignore_eos=True)

    async def idle() -> dict:
        for _ in range(400):
            stats = engine.stats()
            if (stats["slots_used"], stats["running"], stats["queue_depth"]) == (0, 0, 0):
                return stats
            await asyncio.sleep(0.01)
        return stats

    async def main():
        gen = engine.generate(prompts, [greedy, greedy])
        events = [e async for e in gen]
        done = {e.index: e.result for e in events if isinstance(e, Done)}
        text = {i: "".join(e.text for e in events if isinstance(e, Delta) and e.index == i) for i in (0, 1)}
        want = offline.generate(prompts, greedy)
        assert [done[i].token_ids for i in (0, 1)] == [w.token_ids for w in want]
        assert [text[i] for i in (0, 1)] == [w.text for w in want]

        running = engine.generate(prompts, [endless, endless])  # both slots
        first = await running.__anext__()
        assert isinstance(first, Delta)
        waiting = engine.generate(prompts[:1], [endless])  # one of two queue places
        with pytest.raises(QueueFull):  # all or none: a group of two does not fit
            engine.generate(prompts, [greedy, greedy])
        await waiting.aclose()  # never iterated
        await running.aclose()
        stats = await idle()
        assert (stats["slots_used"], stats["cache_tokens"], stats["cancelled"]) == (0, 0, 3), stats
        async with engine.generate(prompts[:1], [greedy]) as again:  # still serves
            assert [e.result.token_ids async for e in again if isinstance(e, Done)] == [want[0].token_ids]

    engine.start()
    try:
        asyncio.run(main())
    finally:
        asyncio.run(engine.stop())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the broken request overflows on purpose
def test_scheduler_survives_failing_requests(bundle, offline, tok):
    """A failing decode step fails the requests in it, a request whose sampling breaks fails alone; their slots
    come back and the next requests are served correctly (the scheduler without HTTP)."""
    from exaone_deploy.runtime.ort_backend import OrtBackend
    from exaone_deploy.runtime.scheduler import Done, Failed, Request, Scheduler

    class FlakyBackend(OrtBackend):  # the real backend, with one injected fault
        fail_next_decode = False

        def decode(self, slots, tokens):
            if self.fail_next_decode:
                self.fail_next_decode = False
                raise RuntimeError("injected decode failure")
            return super().decode(slots, tokens)

    backend = FlakyBackend(bundle, max_batch=4, capacity=CONTEXT)
    scheduler = Scheduler(backend, tok).start()

    def run(prompts, params):
        events: queue.Queue = queue.Queue()
        reqs = [Request(tok.encode(p), sp, events.put, index=i) for i, (p, sp) in enumerate(zip(prompts, params))]
        scheduler.submit(*reqs)
        out = {}
        while len(out) < len(reqs):
            event = events.get(timeout=30)
            if isinstance(event, (Done, Failed)):
                out[event.index] = event
        return [out[i] for i in range(len(reqs))]

    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompts = ["to be or not", "that is the question", "whether tis nobler"]
    try:
        backend.fail_next_decode = True
        failed = run(prompts, [greedy] * 3)
        assert all(isinstance(e, Failed) and "injected" in e.message for e in failed)

        # A request whose sampling breaks inside the loop fails alone; its batch-mates finish
        class BrokenParams(SamplingParams):
            @property
            def greedy(self):
                raise FloatingPointError("injected sampling failure")

        broken = BrokenParams(max_new_tokens=6, ignore_eos=True)
        mixed = run(prompts, [greedy, broken, greedy])
        assert [type(e) for e in mixed] == [Done, Failed, Done]
        stats = scheduler.stats()
        assert (stats["slots_used"], stats["running"], stats["cache_tokens"], stats["failed"]) == (0, 0, 0, 4)
        assert stats["alive"]
        done = run(prompts, [greedy] * 3)
        want = offline.generate([tok.encode(p) for p in prompts], greedy)
        assert [e.result.token_ids for e in done] == [w.token_ids for w in want]
        assert [e.result.token_ids for e in mixed if isinstance(e, Done)] == [want[0].token_ids, want[2].token_ids]
    finally:
        scheduler.stop()


def test_api_key_queue_limit_and_body_limit(guarded):
    # without the key, or with a wrong one: 401 (health and metrics stay open)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = guarded.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        guarded.client("sk-wrong").models.list()
    assert guarded.http.get("/health").status_code == 200
    assert guarded.http.get("/metrics").status_code == 200
    client = guarded.client(API_KEY)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).usage.completion_tokens

    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = guarded.http.post("/v1/completions", content=b"x" * 70000, headers=auth)
    assert r.status_code == 413

    # one slot and one queue place: a third request is refused with 429 while two are in
    hold = [httpx.Client(base_url=guarded.url, timeout=30, headers=auth) for _ in range(2)]
    streams = []
    try:
        for i, c in enumerate(hold):
            cm = c.stream("POST", "/v1/completions", json=_long_body(i))
            streams.append((cm, cm.__enter__()))
        deadline = time.monotonic() + 10
        while guarded.health()["queue_depth"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 429
    finally:
        for (cm, _), c in zip(streams, hold):
            cm.__exit__(None, None, None)
            c.close()
    _assert_idle(guarded)
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
