"""The student server: real Ray Serve, real HTTP, the stock openai client, a tiny trained model.

Every served answer is checked against `model.generate` run here, unbatched, on the same
weights: greedy decoding must give identical text and token counts whatever the batch.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
import torch
from ray import serve

from distill_ray.config import Config, ServeConfig
from distill_ray.serve import MissingExtraError, SamplingParams, deploy_student, shutdown_serve
from distill_ray.serve.app import BATCH_SIZE_HEADER
from distill_ray.serve.backend import encode_prompt, eos_token_ids
from distill_ray.serve.backend_vllm import MISSING_VLLM, VllmBackend
from distill_ray.serve.decoding import decode_batch
from distill_ray.serve.deploy import serve_session
from distill_ray.train.student import TinySpec
from tiny import addition_student, free_port

CONTEXT = 128
MAX_BATCH = 8


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    model, tok = addition_student(path, TinySpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                                 max_positions=CONTEXT))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process decoding tests share the box with the replica
    yield str(path), model, tok
    torch.set_num_threads(threads)


def expected(student, prompt: str, max_tokens: int, stop: tuple[str, ...] = ()) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) from unbatched greedy `generate`."""
    _, model, tok = student
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_tokens,
            pad_token_id=tok.pad_token_id,
        )
    new = out[0, len(ids):].tolist()
    for k in range(1, len(new) + 1):
        text = tok.decode(new[:k], skip_special_tokens=True)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[: min(hits)], "stop", k
        if new[k - 1] == tok.eos_token_id:
            return text, "stop", k
    return tok.decode(new, skip_special_tokens=True), "length", len(new)


def prompt(i: int) -> str:
    # Different lengths, so batched rows really are padded; half stop mid-question, so the
    # model has more to say than a short answer before its EOS.
    question = f"Q: what is {i * 7 % 40} plus {i * 113 % 25}? A:"
    return question if i % 2 else question[: 12 + i % 5]


# --- decoding, in process ---------------------------------------------------------------


def test_batched_decoding_matches_unbatched_generate_with_mixed_params(student):
    _, model, tok = student
    cases = [(prompt(i), 40 if i % 4 == 1 else 2 + i % 9, ("is",) if i % 3 == 0 else ()) for i in range(12)]
    params = [SamplingParams(max_tokens=m, stop=s) for _, m, s in cases]
    got = decode_batch(model, tok, [tok(p)["input_ids"] for p, _, _ in cases], params, eos_token_ids(model, tok))
    want = [expected(student, p, m, s) for p, m, s in cases]
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in got] == want
    assert {c.batch_size for c in got} == {12}
    # Guard the test's own strength: varied answers, and every way a row can finish.
    assert len({w[0] for w in want}) > 6
    assert any(w[1] == "stop" and not case[2] for w, case in zip(want, cases)), "no row ended on EOS"
    assert any(w[1] == "stop" and case[2] for w, case in zip(want, cases)), "no row ended on a stop sequence"
    assert any(w[1] == "length" for w in want)


def test_seeded_sampling_does_not_depend_on_the_batch(student):
    _, model, tok = student
    eos = eos_token_ids(model, tok)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    alone = decode_batch(model, tok, [tok(prompt(1))["input_ids"]], [seeded], eos)
    crowd = decode_batch(
        model,
        tok,
        [tok(prompt(i))["input_ids"] for i in range(4)],
        [SamplingParams(max_tokens=12, temperature=1.0)] + [seeded] + [SamplingParams(max_tokens=5)] * 2,
        eos,
    )
    assert crowd[1].text == alone[0].text


def test_prompt_encoding_uses_the_chat_template_only_when_there_is_one(student):
    _, _, tok = student
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: what is 2 plus 3? A:"}]
    assert encode_prompt(tok, messages) == tok("Be brief.\nQ: what is 2 plus 3? A:")["input_ids"]
    templated = tok.__class__.from_pretrained(student[0])
    templated.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"
    rendered = "[system]Be brief.[user]Q: what is 2 plus 3? A:[assistant]"
    assert encode_prompt(templated, messages) == templated(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("bad", "names"),
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"stop": ("",)}, "stop")],
)
def test_sampling_params_reject_bad_values(bad, names):
    with pytest.raises(ValueError, match=names):
        SamplingParams(**{"max_tokens": 4, **bad})


def test_serve_imports_leave_vllm_unimported():
    # In a fresh interpreter: this one may have imported vllm for another test file already.
    code = ("import sys, distill_ray.serve, distill_ray.serve.app, distill_ray.serve.backend_vllm, "
            "distill_ray.serve.deploy; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", f"importing distill_ray.serve must not import vllm: {out.stdout[:500]}"


def test_vllm_backend_names_the_missing_extra(student, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets without the extra
    with pytest.raises(MissingExtraError, match=r"pip install distill-ray\[vllm\]") as e:
        VllmBackend(student[0], ServeConfig(backend="vllm"))
    assert str(e.value) == MISSING_VLLM


def test_deploy_rejects_a_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        deploy_student(Config(), str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        deploy_student(Config(), str(tmp_path))


# --- the served API ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(student):
    ray.init(num_cpus=2, include_dashboard=False)
    # A long batch window and a small batch cap: concurrent requests must batch, and the
    # cap from the config (not the decorator's default) must hold.
    cfg = Config(serve=ServeConfig(port=0, max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.1, max_new_tokens=16))
    url = deploy_student(cfg, student[0])
    yield url
    shutdown_serve()
    ray.shutdown()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server, api_key="x", max_retries=0, timeout=60)


def test_models_lists_the_served_name(server):
    reply = httpx.get(f"{server}/models", timeout=10)
    assert reply.status_code == 200
    assert [(m["id"], m["max_model_len"]) for m in reply.json()["data"]] == [("student", CONTEXT)]
    assert httpx.get(server.removesuffix("/v1") + "/health", timeout=10).json() == {"status": "ok"}


def test_completion_text_and_exact_usage(student, client):
    out = client.completions.create(model="student", prompt=prompt(3), max_tokens=12, temperature=0)
    text, finish, n = expected(student, prompt(3), 12)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (text, finish)
    assert out.usage.prompt_tokens == len(student[2](prompt(3))["input_ids"])
    assert out.usage.completion_tokens == n
    assert out.usage.total_tokens == out.usage.prompt_tokens + n


def test_completion_default_max_tokens_comes_from_config(student, client):
    out = client.completions.create(model="student", prompt="Q: what", temperature=0)
    assert out.choices[0].text == expected(student, "Q: what", 16)[0]


def test_chat_completion_joins_messages_for_a_template_free_student(student, client):
    messages = [{"role": "system", "content": "Q: what is 1 plus 1? A: 2."}, {"role": "user", "content": prompt(5)}]
    out = client.chat.completions.create(model="student", messages=messages, max_tokens=10, temperature=0)
    joined = "\n".join(m["content"] for m in messages)
    text, finish, n = expected(student, joined, 10)
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (text, finish)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(student[2](joined)["input_ids"]), n)


def test_greedy_and_seeded_requests_repeat_exactly(client):
    def ask(**kw):
        return client.completions.create(model="student", prompt=prompt(2), max_tokens=12, **kw).choices[0].text

    assert ask(temperature=0) == ask(temperature=0)
    assert ask(temperature=1.0, seed=11) == ask(temperature=1.0, seed=11)


def test_stop_sequences_cut_the_text(student, client):
    full, _, _ = expected(student, prompt(4), 16)
    stop = full[len(full) // 2 :][:3]  # a piece from the middle of what the model would say
    assert len(full) > 6 and full.find(stop) > 0
    out = client.completions.create(model="student", prompt=prompt(4), max_tokens=16, temperature=0, stop=[stop, "zzz"])
    text, finish, n = expected(student, prompt(4), 16, (stop, "zzz"))
    assert (out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens) == (text, "stop", n)
    assert out.choices[0].text == full[: full.find(stop)]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(student, client):
    cases = [(prompt(i), 40 if i % 4 == 1 else 3 + i % 8, ("is",) if i % 5 == 0 else ()) for i in range(16)]
    start = threading.Barrier(len(cases))

    def ask(case):
        p, m, s = case
        start.wait()
        raw = client.completions.with_raw_response.create(model="student", prompt=p, max_tokens=m, temperature=0, stop=list(s) or None)
        out = raw.parse()
        return int(raw.headers[BATCH_SIZE_HEADER]), (out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens)

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(ask, cases))
    sizes = [size for size, _ in results]
    assert max(sizes) > 1, f"no request shared a batch: {sizes}"
    assert max(sizes) <= MAX_BATCH, f"a batch exceeded serve.max_batch_size={MAX_BATCH}: {sizes}"
    assert [answer for _, answer in results] == [expected(student, *case) for case in cases]


def test_a_prompt_list_is_one_request_with_summed_usage(student, client):
    prompts = [prompt(6), prompt(7), prompt(8)]
    out = client.completions.create(model="student", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.text for c in out.choices] == [expected(student, p, 6)[0] for p in prompts]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.prompt_tokens == sum(len(student[2](p)["input_ids"]) for p in prompts)
    assert out.usage.completion_tokens == sum(expected(student, p, 6)[2] for p in prompts)


def test_unknown_model_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="Q:", max_tokens=2)
    assert e.value.status_code == 404
    error = e.value.response.json()["error"]
    assert error["code"] == "model_not_found" and "gpt-9" in error["message"] and error["type"]


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/completions", b"{not json", "not valid JSON"),
        ("/completions", b'{"model": "student", "prompt": 5, "max_tokens": -1}', "prompt"),
        ("/completions", b'{"model": "student", "prompt": "Q:", "max_tokens": -1}', "max_tokens"),
        ("/completions", b'["a list"]', "JSON object"),
        ("/completions", b'{"model": "student", "prompt": "Q:", "n": 2}', "n=2"),
        ("/completions", b'{"model": "student", "prompt": "Q:", "stream": true}', "stream"),
        ("/completions", b'{"model": "student", "prompt": "Q:", "temperature": "hot"}', "temperature"),
        ("/completions", b'{"model": "student", "prompt": "' + b"Q: " * CONTEXT + b'"}', "context"),
        ("/chat/completions", b'{"model": "student"}', "messages"),
        ("/chat/completions", b'{"model": "student", "messages": [{"role": "wizard", "content": "hi"}]}', "role"),
        ("/chat/completions", b'{"model": "student", "messages": [{"role": "user", "content": "hi"}], "stop": 3}', "stop"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_reason(server, path, body, says):
    reply = httpx.post(server + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= reply.status_code < 500, reply.text
    error = reply.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"


def test_server_still_answers_after_bad_requests(student, server, client):
    for body in (b"{not json", b'{"model": "student", "prompt": 5, "max_tokens": -1}', b"\xff\xfe"):
        assert httpx.post(f"{server}/completions", content=body, timeout=30).status_code == 400
    assert httpx.get(f"{server}/models", timeout=10).status_code == 200
    out = client.completions.create(model="student", prompt=prompt(9), max_tokens=5, temperature=0)
    assert out.choices[0].text == expected(student, prompt(9), 5)[0]


def test_an_over_long_max_tokens_is_trimmed_to_the_context(student, client):
    p = prompt(0)
    room = CONTEXT - len(student[2](p)["input_ids"])
    out = client.completions.create(model="student", prompt=p, max_tokens=10_000, temperature=0)
    assert out.usage.completion_tokens <= room
    assert out.choices[0].text == expected(student, p, room)[0]


def test_a_replica_that_cannot_start_fails_the_deploy_with_its_reason(student, server, tmp_path):
    # Serve itself only says "failed to update the deployments"; the caller needs the why.
    # A model dir whose config names no model type: the replica's constructor raises at load.
    broken = tmp_path / "broken-student"
    shutil.copytree(student[0], broken)
    config = json.loads((broken / "config.json").read_text())
    del config["model_type"]
    (broken / "config.json").write_text(json.dumps(config))
    cfg = Config(serve=ServeConfig(port=0, replica_cpus=0.5, start_attempts=1))
    try:
        with pytest.raises(RuntimeError, match=r"'broken'.*model_type"):
            deploy_student(cfg, str(broken), app_name="broken", route_prefix="/broken")
    finally:
        serve.delete("broken")
    assert httpx.get(f"{server}/models", timeout=10).status_code == 200  # the other app is untouched


def test_a_serve_session_stops_only_the_serve_it_started(server):
    # Last in this module: it takes the module's Serve down.
    def running() -> bool:
        return serve.context._get_global_client(raise_if_no_controller_running=False) is not None

    with serve_session():  # Serve was already up (a shared cluster's): left alone
        pass
    assert running() and httpx.get(f"{server}/models", timeout=10).status_code == 200

    serve.shutdown()
    with serve_session():  # a comparison's: every method's evaluation inside it
        with serve_session():
            serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        assert running(), "an inner session (one method's run) leaves Serve up for the next"
    assert not running()
