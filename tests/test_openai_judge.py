"""The OpenAI-compatible judge against a real server on loopback: ``reflectevo serve``'s server
wrapping the tiny model, and for failure modes a few lines of ``http.server`` that answer badly."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reflectevo.cli.main import main
from reflectevo.cli.serve import make_server
from reflectevo.config import GenerationParams, JudgeParams, ModelParams
from reflectevo.errors import JudgeError
from reflectevo.generation.engines import make_engine
from reflectevo.generation.requests import GenerationRequest
from reflectevo.prompts import judge_prompt
from reflectevo.reflection.judges import EngineJudge, OpenAIJudge, make_judge
from reflectevo.tasks import get_task

MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from reflectevo.models.loading import load_model

    return load_model(ModelParams(name=str(tiny_model_dir), device="cpu", dtype="float32", backend="transformers"))


def start(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server


def stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server(tiny):
    served = start(make_server(tiny, model_id="tiny"))
    yield served
    stop(served)


@pytest.fixture
def base_url(server):
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/v1"


REFLECTIONS = [
    "I misread option A.",
    "I should compare every option with the statements before answering.",
    "",
    "The answer must follow from the statements; I chose an option that only seemed plausible.",
    "Check B.",
    "Thought: x",
]


def judge_requests(count: int = 6) -> list[GenerationRequest]:
    """Judge prompts of different lengths and reflections, so answers differ and finish out of order."""
    items = get_task("logiqa").load_samples("train")
    requests = []
    for i in range(count):
        prompt = judge_prompt(
            items[i % len(items)],
            "Action: Finish[A]",
            "Your answer is wrong.",
            REFLECTIONS[i % len(REFLECTIONS)],
            REFLECTIONS[(5 * i + 1) % len(REFLECTIONS)],
        )
        requests.append(GenerationRequest(f"pair-{i}", [{"role": "user", "content": prompt}]))
    return requests


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- against the tiny model ------------------------------------------------------------------------
def test_replies_equal_the_engine_judge_in_request_order(tiny, base_url):
    requests = judge_requests()
    local = EngineJudge(
        make_engine(GenerationParams(engine="transformers"), tiny, progress=False), max_new_tokens=MAX_NEW_TOKENS
    ).complete(requests)
    judge = OpenAIJudge(base_url, "tiny", max_new_tokens=MAX_NEW_TOKENS, max_workers=4)
    remote = judge.complete(requests)
    assert [reply.key for reply in remote] == [request.key for request in requests]
    assert [reply.text for reply in remote] == [reply.text for reply in local]
    # every reply carries the prompt it answers, and the prompts differ, so the order is really checked
    # (whatever the stand-in answers: a build on another machine may give every pair the same verdict)
    assert len({json.dumps(request.messages) for request in requests}) == len(requests)
    assert [reply.prompt for reply in remote] == [
        json.dumps(request.messages, ensure_ascii=False) for request in requests
    ]
    assert remote[0].judge == judge.name == f"openai:tiny@{base_url}"
    assert judge.describe() == {
        "judge": judge.name,
        "url": base_url,
        "model": "tiny",
        "max_new_tokens": MAX_NEW_TOKENS,
        "cache_path": None,
        "from_cache": 0,
        "from_endpoint": len(requests),
    }
    assert judge.complete([]) == []


def test_the_cache_answers_a_rerun_without_the_endpoint(server, base_url, tmp_path):
    cache = tmp_path / "replies.jsonl"
    requests = judge_requests(4)
    first = OpenAIJudge(base_url, "tiny", max_new_tokens=MAX_NEW_TOKENS, cache_path=cache)
    replies = first.complete(requests)
    assert len(cache.read_text().splitlines()) == len(requests)

    before = server.completions
    rerun = OpenAIJudge(base_url, "tiny", max_new_tokens=MAX_NEW_TOKENS, cache_path=cache)
    assert rerun.complete(requests) == replies
    assert server.completions == before
    assert (rerun.describe()["from_cache"], rerun.describe()["from_endpoint"]) == (len(requests), 0)

    # a killed writer leaves a torn last line: ignored, and the next answer starts a clean line
    with open(cache, "a", encoding="utf-8") as handle:
        handle.write('{"key": "pair-0", "sha2')
    changed = [
        GenerationRequest("pair-0", [{"role": "user", "content": "Which reflection is better? A or B?"}]),
        *requests[1:],
    ]
    resumed = OpenAIJudge(base_url, "tiny", max_new_tokens=MAX_NEW_TOKENS, cache_path=cache)
    assert resumed.complete(changed)[1:] == replies[1:]
    assert server.completions == before + 1  # only the changed prompt went to the endpoint
    lines = [json.loads(line) for line in cache.read_text().splitlines()]  # answers are appended as they arrive
    assert (
        sorted(row["key"] for row in lines[:4]) == ["pair-0", "pair-1", "pair-2", "pair-3"]
        and lines[4]["key"] == "pair-0"
    )

    other_model = OpenAIJudge(base_url, "other", max_new_tokens=MAX_NEW_TOKENS, cache_path=cache)
    other_model.complete(requests[:1])
    assert other_model.describe()["from_endpoint"] == 1


def test_make_judge_builds_a_working_openai_judge(base_url, tmp_path):
    judge = make_judge(JudgeParams(kind="openai", url=base_url, model="tiny", max_new_tokens=8), store_dir=tmp_path)
    assert isinstance(judge, OpenAIJudge) and judge.max_new_tokens == 8
    [reply] = judge.complete(judge_requests(1))
    assert reply.text and (tmp_path / "openai-replies.jsonl").is_file()


def test_the_server_speaks_the_openai_shapes(base_url):
    messages = [{"role": "user", "content": judge_requests(1)[0].messages[0]["content"]}]
    status, reply = post(
        f"{base_url}/chat/completions",
        json.dumps({"model": "x", "messages": messages, "temperature": 0, "max_tokens": 3, "stop": "\n"}).encode(),
    )
    assert status == 200 and reply["object"] == "chat.completion" and reply["model"] == "tiny"
    choice = reply["choices"][0]
    assert (
        choice["index"] == 0
        and choice["message"]["role"] == "assistant"
        and choice["finish_reason"] in ("stop", "length")
    )
    usage = reply["usage"]
    assert (
        usage["completion_tokens"] <= 3 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )

    with urllib.request.urlopen(f"{base_url}/models", timeout=10) as response:
        assert [model["id"] for model in json.loads(response.read())["data"]] == ["tiny"]


@pytest.mark.parametrize(
    "body, complaint",
    [
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n must be 1"),
        ({"model": "tiny"}, "messages must be"),
        ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature must be a number"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "stop must be"),
    ],
)
def test_bad_requests_get_openai_style_400s(base_url, body, complaint):
    status, reply = post(f"{base_url}/chat/completions", json.dumps(body).encode())
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error" and complaint in reply["error"]["message"]


def test_malformed_json_and_unknown_paths(base_url):
    status, reply = post(f"{base_url}/chat/completions", b'{"messages": [')
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    status, reply = post(f"{base_url}/completions", b"{}")
    assert status == 404 and reply["error"]["type"] == "invalid_request_error"
    request = urllib.request.Request(f"{base_url}/models", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 501 and "DELETE" in json.loads(refused.value.read())["error"]["message"]


def test_a_4xx_is_a_judge_error_with_status_and_fix(base_url):
    judge = OpenAIJudge(f"{base_url}/nowhere", "tiny", retries=0)
    with pytest.raises(
        JudgeError, match=r"nowhere/chat/completions answered HTTP 404: .*no such endpoint.*reflect\.judge\.url"
    ):
        judge.complete(judge_requests(1))


# ---- failures, against servers that answer badly --------------------------------------------------
def test_a_refused_connection_names_the_url():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(JudgeError, match=rf"{url}/chat/completions: connection refused.*reflectevo serve"):
        OpenAIJudge(url, "tiny", retries=0).complete(judge_requests(1))


@pytest.mark.parametrize("url", ["ftp://example.org/v1", "127.0.0.1:8000/v1", ""])
def test_the_url_must_be_http(url):
    with pytest.raises(JudgeError, match="not an http"):
        OpenAIJudge(url, "tiny")


DROP = (0, None)  # a scripted answer that closes the connection instead


class Scripted(BaseHTTPRequestHandler):
    """Answers POSTs with the server's next (status, body) and records each request's headers."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append(dict(self.headers))
        status, body = self.server.answers.pop(0) if len(self.server.answers) > 1 else self.server.answers[0]
        if status == DROP[0]:
            return  # hang up without an answer
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    """A loopback server answering from ``server.answers``: (status, body), the last one repeated."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.answers, server.seen = [], []
    start(server)
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    stop(server)


OK = (200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Verdict: A"}}]})


def test_overload_and_server_errors_are_retried(scripted, monkeypatch):
    server, url = scripted
    server.answers = [(503, {"error": "busy"}), DROP, (429, {"error": "slow down"}), OK]
    monkeypatch.setenv("JUDGE_KEY", "secret")
    [reply] = OpenAIJudge(url, "m", api_key_env="JUDGE_KEY", retries=3, backoff_s=0.01).complete(judge_requests(1))
    assert reply.text == "Verdict: A" and len(server.seen) == 4
    assert server.seen[0]["Authorization"] == "Bearer secret"

    server.answers, server.seen = [(500, {"error": "model crashed"})], []
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(JudgeError, match=r"failed 2 times, last with HTTP 500: .*model crashed"):
        OpenAIJudge(url, "m", api_key_env="JUDGE_KEY", retries=1, backoff_s=0.01).complete(judge_requests(1))
    assert len(server.seen) == 2 and "Authorization" not in server.seen[0]


@pytest.mark.parametrize(
    "answer, complaint",
    [
        ((200, {"choices": []}), "without choices\\[0\\].message.content"),
        ((200, {"object": "list"}), "without choices"),
        ((401, {"error": {"message": "no key"}}), r"HTTP 401: .*no key.*\$OPENAI_API_KEY"),
    ],
)
def test_malformed_answers_and_4xx_are_not_retried(scripted, answer, complaint):
    server, url = scripted
    server.answers = [answer]
    with pytest.raises(JudgeError, match=complaint):
        OpenAIJudge(url, "m", retries=3, backoff_s=0.01).complete(judge_requests(1))
    assert len(server.seen) == 1


def test_an_answer_cut_off_at_max_tokens_keeps_its_finish_reason_through_the_cache(scripted, tmp_path):
    """An endpoint judge that explains before its verdict, cut off at max_tokens: no verdict, finish_reason length."""
    from reflectevo.prompts import parse_verdict
    from reflectevo.reflection import curation

    server, url = scripted
    explains = (
        "Reflection A finds the step where the attempt misread the premise, and its plan says to check every "
        "option against that premise. Reflection B is vaguer: it tells the solver to be careful without"
    )
    server.answers = [
        (
            200,
            {
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": explains}, "finish_reason": "length"}
                ]
            },
        )
    ]
    cache = tmp_path / "replies.jsonl"
    requests = judge_requests(2)
    replies = OpenAIJudge(url, "m", max_new_tokens=32, cache_path=cache).complete(requests)
    assert [(reply.text, reply.finish_reason) for reply in replies] == [(explains, "length")] * 2
    assert parse_verdict(replies[0].text) is None
    assert [json.loads(line)["finish_reason"] for line in cache.read_text().splitlines()] == ["length", "length"]
    rerun = OpenAIJudge(url, "m", max_new_tokens=32, cache_path=cache)
    assert rerun.complete(requests) == replies and len(server.seen) == 2  # answered from the cache, reason included
    comparison = curation.Comparison({"task": "logiqa", "id": "q"}, {}, {}, ["ab", "ba"], requests)
    record = curation.judgement(comparison, "ab", replies[0], None, "parse_failure")
    assert (record["verdict"], record["finish_reason"]) == (None, "length")

    server.answers = [OK]  # an endpoint that gives no finish_reason
    [reply] = OpenAIJudge(url, "m").complete(judge_requests(1))
    assert (reply.text, reply.finish_reason) == ("Verdict: A", None)


def test_serve_is_a_cli_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert all(option in shown for option in ("model", "--host", "--port", "--device", "--dtype"))


def test_a_local_judge_loads_its_own_model_and_answers_like_self(tiny, tmp_path):
    requests = judge_requests(4)
    engine = make_engine(GenerationParams(engine="transformers"), tiny, progress=False)
    self_judge = make_judge(JudgeParams(kind="self", max_new_tokens=MAX_NEW_TOKENS), engine=engine)
    local_judge = make_judge(
        JudgeParams(kind="local", model="builtin:tiny", max_new_tokens=MAX_NEW_TOKENS),
        model_params=ModelParams(device="cpu", dtype="float32", backend="transformers"),
        store_dir=tmp_path / "judge",
        progress=False,
    )
    assert local_judge.name == "local:builtin:tiny" and self_judge.name == "self"
    assert [r.text for r in local_judge.complete(requests)] == [r.text for r in self_judge.complete(requests)]
    assert list((tmp_path / "judge").glob("batch-*.jsonl")), "the local judge commits its batches like any stage"
    with pytest.raises(JudgeError, match="needs the generation engine"):
        make_judge(JudgeParams(kind="self"))
