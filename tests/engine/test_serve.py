"""`sparc-engine serve` on loopback with the tiny ONNX model, talked to as users do: the openai client and
plain HTTP. Refusals (400/401/413/503), clients that hang up, and a bounded load test."""

import asyncio
import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from engine.cli import main
from engine.pipeline import Pipeline
from engine.spec import validate
from runtimes.protocol import Text
from tests.support import (
    DEMO_SPEC,
    OVERFLOWING_QUESTION,
    ROOT,
    blank_bitmap_png,
    demo_overrides,
    heavy_imports,
    picture,
)

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")
from engine.serve import Limits, build_app  # noqa: E402  (needs the [serve] extra)

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUEUE_SIZE = 3
MAX_BODY = 1_000_000
MAX_PIXELS = 500_000


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_qwen3vl_onnx):
    """The server in its own process; the tests check at the end that it is still the same one."""
    port = _free_port()
    command = [
        sys.executable, "-m", "engine.cli", "serve", str(DEMO_SPEC), *demo_overrides(tiny_qwen3vl_onnx),
        "--port", str(port), "--api-key", KEY, "--queue-size", str(QUEUE_SIZE),
        "--max-body-bytes", str(MAX_BODY), "--max-image-pixels", str(MAX_PIXELS),
        "--max-question-chars", str(len(OVERFLOWING_QUESTION)),
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
    yield url, process
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    assert "Traceback" not in process.stderr.read()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _chat(data_url: str, question: str) -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url}}]
    return {"model": "demo", "messages": [{"role": "user", "content": content}]}


def _timeless(result: dict) -> dict:
    return {**result, "stages": [{k: v for k, v in s.items() if k != "ms"} for s in result["stages"]]}


def _refusal(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert message and "\n" not in message
    return message


def _healthy(url: str) -> dict:
    """/health once the queue has drained (requests abandoned by their clients may still be finishing)."""
    for _ in range(200):
        health = httpx.get(f"{url}/health").json()
        if health["queue_depth"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the queue does not drain: {health}")


def test_openai_client_gets_the_answer_and_the_trace(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    assert [model.id for model in client.models.list()] == ["demo"]
    data = _png(picture(200, 150, seed=11))
    completion = client.chat.completions.create(**_chat(_data_url(data), "What colour is the car?"))
    trace = completion.model_extra["sparc"]
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == trace["answer"]
    assert [stage["name"] for stage in trace["stages"]] == ["perceive", "fuse", "crop", "reason"]
    assert completion.usage.completion_tokens == sum(s["generated_tokens"] for s in trace["stages"]) > 0

    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(**_chat(_data_url(data), "What colour?"), stream=True)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()


def test_sparc_equals_run_json_and_reuses_the_image_kv(server, tmp_path, capsys, tiny_qwen3vl_onnx):
    url, _ = server
    image = picture(240, 180, seed=12)  # an image no other request sends: its first query computes its KV
    (tmp_path / "scene.png").write_bytes(data := _png(image))
    question = "Where is the red square?"
    args = ["run", str(DEMO_SPEC), *demo_overrides(tiny_qwen3vl_onnx), "--image", str(tmp_path / "scene.png")]
    assert main([*args, "--question", question, "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)

    upload = httpx.post(
        f"{url}/v1/sparc", headers=AUTH, files={"image": ("scene.png", data)}, data={"question": question}
    )
    assert upload.status_code == 200, upload.text
    assert set(upload.json()) == set(expected) and _timeless(upload.json()) == _timeless(expected)

    body = {"image": base64.b64encode(data).decode(), "question": question}
    again = httpx.post(f"{url}/v1/sparc?viz=1", headers=AUTH, json=body).json()
    assert {k: again[k] for k in ("answer", "regions", "crops")} == {
        k: expected[k] for k in ("answer", "regions", "crops")
    }
    assert again["stages"][0]["visual_tokens_computed"] == 0  # the view's KV from the first request
    drawn = Image.open(io.BytesIO(base64.b64decode(again.pop("viz_png"))))
    assert drawn.format == "PNG" and drawn.size == image.size


def test_bad_requests_get_400_with_one_line(server):
    url, _ = server
    data_url = _data_url(_png(picture(64, 48)))
    sparc, chat = f"{url}/v1/sparc", f"{url}/v1/chat/completions"
    send = {"headers": {**AUTH, "content-type": "application/json"}}
    assert "not valid JSON" in _refusal(httpx.post(sparc, content=b"{bad", **send), 400)
    assert "image: Field required" in _refusal(httpx.post(sparc, json={"question": "q"}, headers=AUTH), 400)
    bad_base64 = {"image": "%%%", "question": "q"}
    assert "base64" in _refusal(httpx.post(sparc, json=bad_base64, headers=AUTH), 400)
    not_image = {"image": base64.b64encode(b"not an image").decode(), "question": "q"}
    assert "not an image" in _refusal(httpx.post(sparc, json=not_image, headers=AUTH), 400)
    truncated = {"image": base64.b64encode(_png(picture(64, 48))[:200]).decode(), "question": "q"}
    assert "truncated" in _refusal(httpx.post(sparc, json=truncated, headers=AUTH), 400)
    assert "'question'" in _refusal(httpx.post(sparc, files={"image": ("a.png", b"x")}, headers=AUTH), 400)
    assert "multipart" in _refusal(httpx.post(sparc, content=b"x", headers=AUTH), 400)
    assert "viz" in _refusal(httpx.post(f"{sparc}?viz=maybe", json=not_image, headers=AUTH), 400)

    no_image = {"messages": [{"role": "user", "content": "hello"}]}
    assert "exactly one image_url" in _refusal(httpx.post(chat, json=no_image, headers=AUTH), 400)
    remote = _chat("https://example.com/cat.png", "q")
    assert "data: URL" in _refusal(httpx.post(chat, json=remote, headers=AUTH), 400)
    assert "messages" in _refusal(httpx.post(chat, json={"messages": []}, headers=AUTH), 400)
    no_text = _chat(data_url, " ")
    assert "question" in _refusal(httpx.post(chat, json=no_text, headers=AUTH), 400)
    # a query the runtime refuses: over the model's context
    overflow = _refusal(httpx.post(chat, json=_chat(data_url, OVERFLOWING_QUESTION), headers=AUTH), 400)
    assert overflow.startswith("the prompt needs") and overflow.endswith("the model takes 4096")


def test_a_missing_or_wrong_key_gets_401(server):
    url, _ = server
    body = {"image": "", "question": "q"}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        response = httpx.post(f"{url}/v1/sparc", json=body, headers=headers)
        assert "API key" in _refusal(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # liveness probes carry no key


def test_over_a_limit_gets_413(server):
    url, _ = server
    sparc = f"{url}/v1/sparc"
    huge = {"image": "A" * MAX_BODY, "question": "q"}
    assert "--max-body-bytes" in _refusal(httpx.post(sparc, json=huge, headers=AUTH), 413)

    def streamed():  # no content-length: the limit counts what arrives
        for _ in range(MAX_BODY // 50_000 + 2):
            yield b"A" * 50_000

    assert "--max-body-bytes" in _refusal(httpx.post(sparc, content=streamed(), headers=AUTH), 413)
    for side in (1000, 20_000):  # over --max-image-pixels; a bomb, over Pillow's own guard too
        body = {"image": base64.b64encode(blank_bitmap_png(side, side)).decode(), "question": "q"}
        assert "pixels" in _refusal(httpx.post(sparc, json=body, headers=AUTH), 413)
    long = {"image": "", "question": "q" * (len(OVERFLOWING_QUESTION) + 1)}
    assert "characters" in _refusal(httpx.post(sparc, json=long, headers=AUTH), 413)


def test_a_full_queue_gets_503_with_retry_after(server):
    url, _ = server
    files = {"image": ("a.png", _png(picture(320, 240, seed=3)))}

    def post(i: int) -> httpx.Response:
        return httpx.post(
            f"{url}/v1/sparc", headers=AUTH, files=files, data={"question": f"q{i}"}, timeout=60
        )

    with ThreadPoolExecutor(4 * QUEUE_SIZE) as pool:
        responses = list(pool.map(post, range(4 * QUEUE_SIZE)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) == {200, 503} and statuses.count(200) >= QUEUE_SIZE + 1
    busy = next(response for response in responses if response.status_code == 503)
    assert "busy" in _refusal(busy, 503) and int(busy.headers["retry-after"]) >= 1
    assert _healthy(url)["status"] == "ok"


def test_clients_that_hang_up_do_not_hold_the_queue(server):
    url, _ = server
    abandoned = _healthy(url)["abandoned"]

    def hang_up(i: int) -> None:  # each its own image: a call takes far longer than the client waits
        files = {"image": ("a.png", _png(picture(320, 240, seed=100 + i)))}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/sparc", headers=AUTH, files=files, data={"question": "q"}, timeout=0.01)

    with ThreadPoolExecutor(QUEUE_SIZE + 1) as pool:  # one runs, the others wait, and all hang up
        list(pool.map(hang_up, range(QUEUE_SIZE + 1)))
    # the server learns of a hang-up when the waiting call's turn comes: give the queue a moment to drain
    deadline = time.monotonic() + 30
    while (health := _healthy(url))["abandoned"] == abandoned and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health["status"] == "ok" and health["abandoned"] > abandoned  # skipped, not run for nobody
    files = {"image": ("a.png", _png(picture(320, 240, seed=4)))}
    after = httpx.post(f"{url}/v1/sparc", headers=AUTH, files=files, data={"question": "q"}, timeout=60)
    assert after.status_code == 200 and "answer" in after.json()


def test_load_200_requests_from_8_clients(server, record_property):
    """Every request is answered; a 503 (the queue is smaller than the clients) is retried after a short
    pause and counted. Nothing else may fail, and the server is healthy afterwards."""
    url, process = server
    images = [_png(picture(160 + 32 * i, 120, seed=20 + i)) for i in range(4)]
    counts, lock = {"ok": 0, "busy": 0, "other": 0}, threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
            for n in range(25):
                data, question = images[(index + n) % len(images)], f"What is at {index}/{n}?"
                while True:
                    if n % 2:
                        response = http.post("/v1/chat/completions", json=_chat(_data_url(data), question))
                    else:
                        files = {"image": ("i.png", data)}
                        response = http.post("/v1/sparc", files=files, data={"question": question})
                    kind = {200: "ok", 503: "busy"}.get(response.status_code, "other")
                    with lock:
                        counts[kind] += 1
                    if kind != "busy":
                        break
                    time.sleep(0.05)

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    seconds = time.perf_counter() - start
    record_property("load", {**counts, "seconds": round(seconds, 1)})
    print(f"load: {counts} in {seconds:.1f} s")
    assert counts["ok"] == 200 and counts["other"] == 0
    health = _healthy(url)
    assert {k: health[k] for k in ("status", "model", "model_loaded", "queue_depth", "queue_size")} == {
        "status": "ok",
        "model": "demo",
        "model_loaded": True,
        "queue_depth": 0,
        "queue_size": QUEUE_SIZE,
    }
    assert health["served"] >= 200
    assert process.poll() is None


def test_the_server_imports_neither_torch_nor_transformers():
    assert heavy_imports("engine.serve") == []


def test_an_unexpected_error_is_a_500_and_the_next_request_runs(scripted_runtime):
    """In process, on a scripted runtime that breaks on one question: the worker survives it."""

    class Breaking(scripted_runtime):
        def generate(self, prefix, suffix, n, sampling):
            if any("break" in s.text for s in suffix if isinstance(s, Text)):
                raise RuntimeError("the runtime broke")
            return super().generate(prefix, suffix, n, sampling)

    spec = validate({"model": {"bundle": "unused", "runtime": "onnx"}, "stages": [{"reason": {}}]})
    limits = Limits(
        max_body_bytes=MAX_BODY, max_image_pixels=MAX_PIXELS, max_question_chars=100, queue_size=1
    )
    app = build_app(Pipeline(spec, Breaking([], answer="fine")), "scripted", limits, api_key=None)
    data_url = _data_url(_png(picture(64, 48)))

    async def ask() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # as uvicorn: logged, not raised
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.post("/v1/chat/completions", json=_chat(data_url, question))
                for question in ("please break", "and now?")
            ]

    broken, after = asyncio.run(ask())
    assert _refusal(broken, 500) == "internal error: RuntimeError: the runtime broke"
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == "fine"
