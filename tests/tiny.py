"""Tiny real models and small helpers shared by the tests."""
from __future__ import annotations

import socket
from pathlib import Path

import torch

from distill_ray.train.student import TinySpec, tiny_model, train_tokenizer

# `student.tiny` for the training tests: a 2-layer Llama that trains in seconds on CPU.
TRAIN_SPEC = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "vocab_size": 320}

ADDITIONS = [f"Q: what is {a} plus {b}? A: {a} plus {b} makes {a + b}, so the answer is {a + b}.</s>"
             for a in range(40) for b in range(25)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def addition_student(path: str | Path, spec: TinySpec, steps: int = 40):
    """A tiny Llama trained for a few seconds on addition sentences, saved to `path`.

    Trained, not random: greedy outputs then differ by prompt and end in EOS, so a
    mixed-up or truncated answer shows, and argmax is not decided by rounding.
    Returns (model, tokenizer), the model in eval mode.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core box more threads only spin against each other
    try:
        tok = train_tokenizer(ADDITIONS)
        model = tiny_model(tok, spec)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            batch = [ADDITIONS[i] for i in torch.randint(len(ADDITIONS), (32,), generator=gen).tolist()]
            enc = tok(batch, return_tensors="pt", padding=True)
            model(**enc, labels=enc.input_ids.masked_fill(enc.attention_mask == 0, -100)).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok
