"""The deployment server end to end: the `openai` client (streaming and not) against `efficientai serve`'s app on
loopback, per-request adapters loaded on demand, a client that disconnects mid-stream cancels its generation, and a
burst of concurrent requests with none failing."""
import json
import threading
import time
from pathlib import Path

import pytest

import efficientai  # noqa: F401  (fast BLAS before MLX)
import httpx

from efficientai.deploy.adapters import save_random_adapter
from efficientai.deploy.load import check_bad_requests, chat_bodies, load_test
from efficientai.deploy.server import ServerConfig, ServerThread, load_served

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(["pirate", "poet"]): save_random_adapter("smollm2-135m-instruct", root / name, seed=i, std=0.05)
    served = load_served(ServerConfig(adapter_dir=str(root), api_key="sk-test", embeddings=None, max_queue=512))
    with ServerThread(served) as url:
        yield url, served


def test_openai_client(server):
    url, served = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=12)
    assert "Paris" in r.choices[0].message.content and r.usage.completion_tokens <= 12
    stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=12, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == r.choices[0].message.content            # greedy: the same answer either way
    story = [{"role": "user", "content": "Write a sentence about the sea."}]
    base = client.chat.completions.create(model="smollm2-135m-instruct", messages=story, max_tokens=16)
    tuned = client.chat.completions.create(model="smollm2-135m-instruct:pirate", messages=story, max_tokens=16)
    assert tuned.choices[0].message.content != base.choices[0].message.content   # the adapter was applied
    assert served.engine.adapters.names == ["pirate"]               # loaded on demand from the adapter folder
    c = client.completions.create(model="poet", prompt="Once upon a time", max_tokens=6)
    assert c.choices[0].text and c.usage.completion_tokens == 6
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=msgs)


def test_disconnect_cancels(server):
    url, served = server
    before = served.engine.stats.finished.get("cancelled", 0)
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-test"},
                      timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 5: break                                          # the client goes away mid-answer
    deadline = time.time() + 30
    while served.engine.stats.finished.get("cancelled", 0) == before and time.time() < deadline: time.sleep(0.1)
    assert served.engine.stats.finished.get("cancelled", 0) == before + 1
    assert served.engine.active == 0


def test_burst_and_bad_requests(server):
    url, _ = server
    bodies = chat_bodies(300, max_tokens=2, models=[None, "pirate", "poet"])
    report = load_test(url, bodies, 16, headers={"authorization": "Bearer sk-test"}, progress=False)
    assert report.errors == 0, report.error_messages
    rows = check_bad_requests(url, api_key="sk-test")
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_timeout_is_504(server):
    url, served = server
    served.config.timeout, before = 0.3, served.config.timeout
    try:
        body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 2000}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-test"}, timeout=60)
        assert r.status_code == 504 and "no answer within" in r.json()["error"]["message"]
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                          headers={"authorization": "Bearer sk-test"}, timeout=60) as s:
            lines = [l for l in s.iter_lines() if l]
        assert "no answer within" in lines[-1]                  # the stream ends with an error event
    finally: served.config.timeout = before
    deadline = time.time() + 30
    while served.engine.active and time.time() < deadline: time.sleep(0.1)
    assert served.engine.active == 0                              # both generations were cancelled
