"""The API surface beyond plain generation, live on 127.0.0.1: logprobs and prompt scoring (lm-evaluation-harness
runs against it), the tokenizer endpoints, structured output and forced tool calls by grammar, reasoning controls.

The model is the bundled tiny EXAONE 4.0 (trained on Tiny Shakespeare: it knows no JSON), exported once for the
module. Oracles: the bundle's own backend (``score``: teacher-forced logits of a whole sequence), `jsonschema`,
and ``exaone-deploy eval-ppl``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from exaone_deploy.runtime.logprobs import log_softmax  # noqa: E402
from exaone_deploy.server.launcher import ServerProcess  # noqa: E402
from exaone_deploy.text.tokenizer import Tokenizer  # noqa: E402

MODEL = "tiny"
CONTEXT = 1024

# Nested objects, arrays, enums, required fields; strings and arrays bounded (a model that knows no JSON would
# otherwise write an unbounded string until max_tokens: see runtime/grammar.py).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["king", "queen", "fool", "ghost"]},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "castle": {"type": "boolean"}},
            "required": ["city", "castle"],
            "additionalProperties": False,
        },
        "lines": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "role", "home", "lines"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"offset": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["offset"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from exaone_deploy.exporter.export import ExportOptions, export_bundle

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_bundle(
            "tiny", tmp_path_factory.mktemp("api") / "bundle", ExportOptions(max_seq_len=CONTEXT), progress=False
        )


@pytest.fixture(scope="module")
def server(bundle):
    s = ServerProcess(bundle, "--served-model-name", MODEL, "--max-batch", "8", "--prefill-chunk", "256", timeout=120)
    s.http = httpx.Client(base_url=s.url, timeout=120)
    s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield s
    s.close()


@pytest.fixture(scope="module")
def tok(bundle):
    return Tokenizer.from_dir(bundle)


@pytest.fixture(scope="module")
def backend(bundle):
    from exaone_deploy.runtime.ort_backend import OrtBackend

    return OrtBackend(bundle, max_batch=1, max_seq_len=CONTEXT)


def _score(backend, ids) -> np.ndarray:
    """float32 log-softmax of the bundle's logits at every position of ``ids``."""
    return log_softmax(backend.score(list(ids), slot=0))


# ---- tokenizer endpoints -----------------------------------------------------------------------------------


def test_tokenize_detokenize_tokenizer_info(server, tok):
    text = "ROMEO:\nBut soft, what light"
    r = server.http.post("/tokenize", json={"prompt": text, "add_special_tokens": False, "return_token_strs": True})
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == tok.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == CONTEXT and body["token_strs"] == [tok.id_to_token(t) for t in body["tokens"]]
    assert server.http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": text}
    # special tokens in text are the special tokens (what lm-eval's remote tokenizer reads the BOS id from)
    info = server.http.get("/tokenizer_info").json()
    assert info["bos_token"] == "[BOS]" and info["eos_token"] == "[|endofturn|]" and info["chat_template"]
    assert server.http.post("/tokenize", json={"prompt": info["bos_token"], "add_special_tokens": False}).json()[
        "tokens"
    ] == [tok.bos_id]
    # chat messages render exactly as the chat endpoint renders them (its prompt_tokens), reasoning_effort too
    messages = [{"role": "user", "content": "Who art thou?"}]
    for effort, thinking in (("none", False), ("high", True)):
        counted = server.http.post("/tokenize", json={"messages": messages, "reasoning_effort": effort}).json()
        assert counted["tokens"] == tok.apply_chat_template(messages, enable_thinking=thinking)
        chat = server.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=1, reasoning_effort=effort
        )
        assert chat.usage.prompt_tokens == counted["count"]
    for path, payload, param in [
        ("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
        ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
    ]:
        r = server.http.post(path, json=payload)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


# ---- logprobs ----------------------------------------------------------------------------------------------


def test_chat_logprobs_equal_log_softmax_of_the_bundle(server, tok, backend):
    messages = [{"role": "user", "content": "Speak, good sir."}]
    kw = dict(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    r = server.client.chat.completions.create(**kw)
    choice = r.choices[0]
    prompt = tok.apply_chat_template(messages)
    ids = choice.model_extra["token_ids"]
    content = choice.logprobs.content
    assert len(ids) == len(content) == 16
    expected = _score(backend, prompt + ids)[len(prompt) - 1 : -1]  # row i predicts completion token i
    for i, (t, entry) in enumerate(zip(ids, content)):
        assert abs(entry.logprob - float(expected[i, t])) < 1e-4, (i, entry.logprob, expected[i, t])
        top = entry.top_logprobs
        assert len(top) == 5 and [x.logprob for x in top] == sorted((x.logprob for x in top), reverse=True)
        assert top[0].token == entry.token and top[0].logprob == entry.logprob  # greedy: the chosen is the best
        best = np.sort(expected[i])[::-1][:5]
        assert np.allclose([x.logprob for x in top], best, atol=1e-4)
        assert bytes(entry.bytes).decode("utf-8", "replace") == tok.decode([t]) or entry.token.startswith("bytes:")
    # streamed: the same entries, chunk by chunk
    stream = server.client.chat.completions.create(stream=True, **kw)
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_completion_echo_scores_prompts_in_one_batch(server, tok, backend):
    texts = ["ROMEO:\nWhat light through yonder", "JULIET:\nO Romeo, Romeo", "KING:\nNow is the winter"]
    r = server.http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": [tok.encode(t) for t in texts], "max_tokens": 0, "echo": True, "logprobs": 2},
    )
    assert r.status_code == 200, r.text
    for choice, text in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), texts):
        ids = tok.encode(text)
        lp = choice["logprobs"]
        assert choice["text"] == text and lp["tokens"] == [tok.decode([t]) for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = _score(backend, ids)
        for i in range(1, len(ids)):
            assert abs(lp["token_logprobs"][i] - float(want[i - 1, ids[i]])) < 1e-4
            assert max(lp["top_logprobs"][i].values()) == pytest.approx(float(want[i - 1].max()), abs=1e-4)
        assert lp["text_offset"] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    # lm-eval's shape: max_tokens 1, the generated token's logprob appended after the prompt's
    r = server.client.completions.create(
        model=MODEL, prompt=texts[0], max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(tok.encode(texts[0])) + 1 and r.choices[0].text.startswith(texts[0])
    # streamed: the echo (with the prompt's logprobs) first, then the tokens; the same text and numbers
    kw = dict(model=MODEL, prompt=texts[0], max_tokens=6, echo=True, logprobs=1, temperature=0)
    whole = server.client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in server.client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    streamed = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs
    offsets = [x for c in chunks if c.logprobs for x in c.logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset


def test_scheduler_scores_many_prompts_in_one_backend_call(bundle, tok, backend):
    """The prompts of one scoring request are prefilled together (one backend.prefill over their slots)."""
    from exaone_deploy.runtime.ort_backend import OrtBackend
    from exaone_deploy.runtime.sampling import SamplingParams
    from exaone_deploy.runtime.scheduler import Done, Request, Scheduler

    inner = OrtBackend(bundle, max_batch=8, max_seq_len=256)
    calls = []
    original = inner.prefill

    def counting(slots, prompts, all_logits=False):
        calls.append((list(slots), all_logits))
        return original(slots, prompts, all_logits)

    inner.prefill = counting
    sched = Scheduler(inner, tok, prefill_chunk=512).start()
    prompts = [tok.encode(t) for t in ("ROMEO:", "Good morrow, cousin.", "To be, or not", "Alas, poor", "Ay me")]
    done = {}
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=0)
    requests = [Request(p, params, lambda e: done.__setitem__(e.index, e), index=i) for i, p in enumerate(prompts)]
    sched.submit(*requests)
    try:
        for _ in range(200):
            if len(done) == len(prompts):
                break
            __import__("time").sleep(0.05)
    finally:
        sched.stop()
    assert calls == [([0, 1, 2, 3, 4], True)], calls
    for i, p in enumerate(prompts):
        assert isinstance(done[i], Done) and done[i].result.token_ids == []
        got = [e.logprob for e in done[i].result.prompt_logprobs]
        want = _score(backend, p)
        assert got[0] is None and np.allclose(got[1:], [want[j - 1, p[j]] for j in range(1, len(p))], atol=1e-5)


# ---- structured output ---------------------------------------------------------------------------------------


def _json_schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_schema_50_samples_validate(server):
    messages = [{"role": "user", "content": "Describe a character of the play as JSON."}]
    answers = []
    for seed in range(5):  # 5 x n=10 sampled answers at temperature 1
        r = server.client.chat.completions.create(
            model=MODEL,
            messages=messages,
            n=10,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
            response_format=_json_schema_format(PERSON),
        )
        answers += [(c.message.content, c.finish_reason) for c in r.choices]
    assert len(answers) == 50
    for content, reason in answers:
        assert reason == "stop", content  # the grammar ended the answer, not max_tokens
        jsonschema.validate(json.loads(content), PERSON)
    assert len({c for c, _ in answers}) > 10  # sampled, not one answer repeated
    # json_object: any JSON object
    r = server.client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=300, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_constrained_and_free_requests_share_a_batch(server):
    """A free request decoded next to constrained ones gets the same greedy answer as alone."""
    messages = [{"role": "user", "content": "Speak."}]
    free = dict(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    alone = server.client.chat.completions.create(**free).choices[0].message.content
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(server.client.chat.completions.create, **free, response_format=_json_schema_format(PERSON))
            for _ in range(3)
        ] + [pool.submit(server.client.chat.completions.create, **free)]
        results = [f.result() for f in futures]
    assert results[-1].choices[0].message.content == alone
    for r in results[:3]:
        if r.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_tool_choice_required_and_named_are_enforced(server):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    messages = [{"role": "user", "content": "What is the weather in Verona?"}]
    for choice in ["required", {"type": "function", "function": {"name": "get_time"}}]:
        for parallel in (False, True):
            r = server.client.chat.completions.create(
                model=MODEL,
                messages=messages,
                tools=[WEATHER, TIME],
                n=8,
                tool_choice=choice,
                temperature=1.0,
                seed=1,
                max_tokens=200,
                parallel_tool_calls=parallel,
            )
            for c in r.choices:
                assert c.message.tool_calls, c
                if not parallel:  # one call, then the grammar ends the answer
                    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1 and not c.message.content
                for call in c.message.tool_calls:  # parallel: calls until max_tokens, each one whole and valid
                    if isinstance(choice, dict):
                        assert call.function.name == "get_time"
                    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_langchain_with_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=200, max_retries=0
    )
    schema = {"title": "Character", "description": "A character of the play.", **PERSON}
    got = llm.with_structured_output(schema).invoke("Describe the king.")  # default method: json_schema
    jsonschema.validate(got, PERSON)


def test_cli_and_python_api_json_schema(bundle, tmp_path):
    import exaone_deploy

    model = exaone_deploy.load(bundle)
    text = model.generate("ROMEO:", json_schema=PERSON, max_new_tokens=200, temperature=1.0, seed=3)
    jsonschema.validate(json.loads(text), PERSON)
    reply = model.chat("Who art thou?", json_schema=PERSON, max_new_tokens=200, temperature=1.0, seed=4)
    jsonschema.validate(json.loads(reply["content"]), PERSON)
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(PERSON))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "exaone_deploy",
            "generate",
            str(bundle),
            "--prompt",
            "ROMEO:",
            "--json-schema",
            str(path),
            "--max-new-tokens",
            "200",
            "--temperature",
            "1",
            "--seed",
            "5",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(json.loads(out.stdout)["text"]), PERSON)


# ---- rejected combinations -----------------------------------------------------------------------------------

REJECTED = [
    ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"parallel_tool_calls": False}, "parallel_tool_calls"),
    ("/v1/chat/completions", {"reasoning_effort": "huge"}, "reasoning_effort"),
    (
        "/v1/chat/completions",
        {"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}},
        "reasoning_effort",
    ),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
    (
        "/v1/chat/completions",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
            }
        },
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
        "tool_choice",
    ),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
]


def test_openai_rejected_combinations_are_400(server):
    base = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]}, "/v1/completions": {}}
    for path, extra, param in REJECTED:
        r = server.http.post(
            path,
            json={**base[path], "max_tokens": 4, **extra} if "max_tokens" not in extra else {**base[path], **extra},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


# ---- lm-evaluation-harness -----------------------------------------------------------------------------------

WINDOW = 128  # tokens per eval-ppl window = [BOS] + one lm-eval document


def _documents(tok, count: int) -> list[list[int]]:
    """Consecutive WINDOW-1-token pieces of the held-out Tiny Shakespeare text that round-trip through text."""
    from exaone_deploy.assets import heldout_text

    ids = tok.encode(heldout_text()[:60000])
    n = WINDOW - 1
    docs = [ids[i : i + n] for i in range(0, len(ids) - n, n)]
    docs = [
        d for d in docs if tok.encode(tok.decode(d)) == d and tok.encode("[BOS]" + tok.decode(d)) == [tok.bos_id] + d
    ]
    assert len(docs) >= count
    return docs[:count]


@pytest.mark.slow
def test_lm_eval_local_completions(server, tok, backend, bundle, tmp_path, monkeypatch):
    """lm-eval's local-completions (remote tokenizer) runs a rolling-perplexity and a multiple-choice task.

    Perplexity, apples to apples: eval-ppl scores windows of WINDOW tokens from an empty cache, every token but
    the first, on the concatenation of its documents. lm-eval's rolling loglikelihood scores every token of a
    document given the prefix token (the tokenizer's BOS, from /tokenizer_info) and, for a document of at most
    max_length - 2 tokens, in one window. So each eval-ppl document is "[BOS]" + text (exactly WINDOW tokens)
    and lm-eval's is the text alone: the same tokens, scored with the same context. lm-eval reports
    byte_perplexity = exp(-sum ll / bytes); the token perplexity is exp(log(byte_perplexity) * bytes / tokens).
    """
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = _documents(tok, 12)
    texts = [tok.decode(d) for d in docs]
    (tmp_path / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "ppl_ref.jsonl").write_text("".join(json.dumps({"text": "[BOS]" + t}) + "\n" for t in texts))
    # multiple choice: which line follows? (the true next line, or three others from the held-out text)
    lines = [x for x in "\n".join(texts).split("\n") if len(x.split()) >= 3]
    rng = np.random.default_rng(0)
    mc = []
    for i in range(0, len(lines) - 1, 3)[:24]:
        others = [lines[j] for j in rng.choice(len(lines), 3, replace=False) if j != i + 1][:3]
        choices = [lines[i + 1]] + others
        order = rng.permutation(len(choices))
        mc.append({"context": lines[i], "choices": [choices[k] for k in order], "label": int(np.argmin(order))})
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    for name, body in {
        "shakespeare_ppl": f"task: shakespeare_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'ppl.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: byte_perplexity\n",
        "shakespeare_mc": f"task: shakespeare_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{context}}\\n\"\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n",
    }.items():
        (tmp_path / f"{name}.yaml").write_text(body)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=remote,"
        f"max_length={WINDOW + 1},batch_size=8,max_retries=1",
        tasks=["shakespeare_ppl", "shakespeare_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    results = out["results"]

    # perplexity: lm-eval vs eval-ppl on the same tokens
    n_tokens = sum(len(d) for d in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    ppl_lm_eval = math.exp(math.log(results["shakespeare_ppl"]["byte_perplexity,none"]) * n_bytes / n_tokens)
    ref = subprocess.run(
        [
            sys.executable,
            "-m",
            "exaone_deploy",
            "eval-ppl",
            str(bundle),
            "--data",
            str(tmp_path / "ppl_ref.jsonl"),
            "--seq-len",
            str(WINDOW),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr
    ref = json.loads(ref.stdout)
    assert ref["tokens"] == n_tokens and ref["windows"] == len(docs)
    assert abs(ppl_lm_eval / ref["ppl"] - 1) < 1e-3, (ppl_lm_eval, ref["ppl"])

    # multiple choice: lm-eval's accuracy vs the argmax of loglikelihoods from the bundle's score
    correct = 0
    for doc in mc:
        lls = []
        for choice in doc["choices"]:  # lm-eval moves the context's trailing "\n" into the continuation
            whole, head = tok.encode(doc["context"] + "\n" + choice), tok.encode(doc["context"])
            lp = _score(backend, whole)
            lls.append(sum(float(lp[j - 1, whole[j]]) for j in range(len(head), len(whole))))
        correct += int(np.argmax(lls)) == doc["label"]
        sample = next(x for x in out["samples"]["shakespeare_mc"] if x["doc"]["context"] == doc["context"])
        assert [a[0] + a[1] for a in sample["arguments"]] == [doc["context"] + "\n" + c for c in doc["choices"]]
        assert np.allclose([r[0][0] for r in sample["resps"]], lls, atol=1e-3)
    assert results["shakespeare_mc"]["acc,none"] == pytest.approx(correct / len(mc), abs=1e-9)
    assert 0 < correct < len(mc)  # a task the model neither always passes nor always fails
