"""The Socratic dialogue: a decomposer and a solver take turns on one question.

    decomposer(Q + steps so far) -> next sub-question, or "[done]"
    solver(Q + steps so far + sub-question) -> sub-answer

until the decomposer is done or `max_steps` sub-questions are answered. It runs where
both adapters live (`multiplex_app.AdapterReplica.dialogue`): its calls then go straight
to the replica's batcher, and the ingress makes one call per question, not one per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from distill_ray.methods.socratic_format import (
    DECOMPOSER,
    SOLVER,
    decomposer_prompt,
    is_done,
    one_line,
    reply_text,
    solver_prompt,
)
from distill_ray.serve.backend import Completion
from distill_ray.tasks.record import Step

# A sub-question or sub-answer is one line: a student that writes on has said its part.
STEP_STOP = ("\n",)


@dataclass(frozen=True)
class DialogueSettings:
    model_name: str  # what clients ask for to get the pair
    max_steps: int
    step_max_tokens: int
    decomposer: str = DECOMPOSER
    solver: str = SOLVER


@dataclass
class Dialogue:
    steps: list[Step] = field(default_factory=list)
    calls: list[tuple[str, Completion]] = field(default_factory=list)  # (adapter, completion), in order
    limit_hit: bool = False

    def text(self) -> str:
        return reply_text(self.steps, limit_hit=self.limit_hit)


async def run_dialogue(complete, question: str, s: DialogueSettings, max_steps: int, *, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int | None = None, max_tokens: int | None = None) -> Dialogue:
    """Alternate the two students on `question`; `complete(adapter, prompt, max_tokens, **sampling)`
    returns a Completion, or None when the prompt has outgrown the context (that ends the
    dialogue like the step limit does)."""
    d = Dialogue()
    per_call = min(s.step_max_tokens, max_tokens or s.step_max_tokens)

    async def ask(adapter: str, prompt: str) -> Completion | None:
        # Each call its own seed: the same seed would replay the same random stream at every turn.
        call_seed = None if seed is None else seed + len(d.calls)
        done = await complete(adapter, prompt, per_call, temperature=temperature, top_p=top_p,
                              stop=STEP_STOP, seed=call_seed)
        if done is not None:
            d.calls.append((adapter, done))
        return done

    for _ in range(max_steps):
        asked = await ask(s.decomposer, decomposer_prompt(question, d.steps))
        if asked is None:
            d.limit_hit = True
            return d
        sub_question = one_line(asked.text)
        if is_done(sub_question) or not sub_question:  # nothing more to ask
            return d
        answered = await ask(s.solver, solver_prompt(question, d.steps, sub_question))
        if answered is None:
            d.limit_hit = True
            return d
        d.steps.append(Step(sub_question, one_line(answered.text)))
    d.limit_hit = True
    return d
