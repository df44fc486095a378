"""Students behind an OpenAI-compatible API on Ray Serve (transformers on CPU, vLLM on GPU)."""
from distill_ray.serve.backend import Backend, Completion, MissingExtraError, ModelInfo, SamplingParams
from distill_ray.serve.deploy import deploy_student, shutdown_serve

__all__ = [
    "Backend",
    "Completion",
    "MissingExtraError",
    "ModelInfo",
    "SamplingParams",
    "deploy_student",
    "shutdown_serve",
]
