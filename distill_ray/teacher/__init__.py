"""The teacher stage: prompts, the oracle teacher, and rationale collection."""
