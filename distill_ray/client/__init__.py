"""The one OpenAI-compatible client: teacher queries and student evaluation both use it."""
