"""Which teacher a run talks to: the oracle started on loopback, or a configured endpoint.

Either way the run checks the endpoint answers `/models` before any Ray work starts, so
a typo in a URL costs one clear line, not a stalled pipeline.
"""
from __future__ import annotations

from contextlib import contextmanager

import openai

from ..config import Config


class TeacherUnreachable(Exception):
    """The configured teacher endpoint did not answer."""


def check_reachable(cfg: Config, timeout_s: float = 10.0) -> None:
    client = openai.OpenAI(base_url=cfg.teacher.base_url, api_key=cfg.teacher_api_key(), max_retries=1, timeout=timeout_s)
    try:
        client.models.list()
    except openai.AuthenticationError:
        raise TeacherUnreachable(
            f"teacher.base_url: {cfg.teacher.base_url} rejected the API key from ${cfg.teacher.api_key_env}"
        ) from None
    except openai.NotFoundError:
        return  # some OpenAI-compatible servers have no /models; the server itself answered
    except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError) as e:
        raise TeacherUnreachable(f"teacher.base_url: {cfg.teacher.base_url} is unreachable ({e.__class__.__name__})") from None
    finally:
        client.close()


@contextmanager
def local_oracle(cfg: Config):
    """The oracle teacher on loopback for the duration of the block; yields its base URL."""
    from .oracle import start_oracle

    with start_oracle(cfg.teacher.oracle, model=cfg.teacher.model) as oracle:
        yield oracle.base_url


@contextmanager
def teacher_endpoint(cfg: Config):
    """Yields with `cfg.teacher.base_url` pointing at a live teacher."""
    if cfg.teacher.kind == "oracle" and not cfg.teacher.base_url:
        with local_oracle(cfg) as base_url:
            cfg.teacher.base_url = base_url
            try:
                yield
            finally:
                cfg.teacher.base_url = None
        return
    check_reachable(cfg)
    yield
