"""The policy seam: what the agent loop needs from a model, and a scripted fake for tests.

``Policy.sample`` takes a conversation and returns ``n`` samples from the same prompt, each with
the exact token ids and behaviour log-probabilities the server produced. ``OpenAIPolicy`` in
``exitagent.client`` is the real one; ``ScriptedPolicy`` below replays fixed answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from exitagent.types import Message, PolicyVersion, Sample

# The temperature the policy is trained at: collect samples rollouts with it, update corrects for it,
# and evaluate and the embedding API sample at it by default, so that they measure the trained policy
# (another temperature is another policy). The main job's value; a recipe sets its own for all of them.
TRAINING_TEMPERATURE = 0.7


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


DEFAULT_PARAMS = SamplingParams()
BASE_VERSION = PolicyVersion(0, "base")


class Policy(Protocol):
    async def sample(self, messages: Sequence[Message], *, n: int = 1, params: SamplingParams = DEFAULT_PARAMS,
                     tools: Sequence[dict[str, Any]] | None = None) -> list[Sample]:
        """``n`` completions of one prompt (one request). Raises ``ServerError`` when the server fails."""
        ...

    @property
    def max_context(self) -> int:
        """Context length of the served model, in tokens."""
        ...

    def estimate_tokens(self, text: str) -> int:
        """An upper estimate of the tokens ``text`` takes in a prompt (for text not yet sent)."""
        ...


def room(policy: Policy, messages: Sequence[Message]) -> int:
    """Tokens left for the answer once ``messages`` fill ``policy``'s context (from the over-counting
    estimate, so a prompt that leaves room never overflows the server)."""
    return policy.max_context - sum(policy.estimate_tokens(m.content) for m in messages)


Script = Callable[[Sequence[Message]], str | Sample]


@dataclass
class ScriptedPolicy:
    """Answers from a script: a list of texts consumed in order, or a function of the conversation.

    Token ids are synthetic but consistent: the prompt ids of every call are the ids of the
    conversation rendered one token per character, so later prompts extend earlier ones exactly as
    they would with a real chat template (unless ``break_prefix`` is set, to test that path).
    """

    script: list[str | Sample] | Script
    version: PolicyVersion = BASE_VERSION
    max_context: int = 4096
    break_prefix: bool = False
    calls: list[list[Message]] = field(default_factory=list)

    async def sample(self, messages: Sequence[Message], *, n: int = 1, params: SamplingParams = DEFAULT_PARAMS,
                     tools: Sequence[dict[str, Any]] | None = None) -> list[Sample]:
        self.calls.append(list(messages))
        return [self._one(messages, params) for _ in range(n)]

    def estimate_tokens(self, text: str) -> int:
        return len(text) + 40  # one token per character, plus role tags and the generation prompt (safe side)

    def _one(self, messages: Sequence[Message], params: SamplingParams) -> Sample:
        answer = self.script(messages) if callable(self.script) else self.script.pop(0)
        if isinstance(answer, Sample):
            return answer
        # break_prefix: later prompts render earlier turns differently (a leading mark), as some
        # chat templates do, so they no longer extend the previous prompt.
        prompt = ("\u2028" if self.break_prefix and len(self.calls) > 1 else "") + render(messages)
        completion = answer[: params.max_tokens]
        return Sample(
            text=completion, prompt_ids=tuple(ord(c) for c in prompt), completion_ids=tuple(ord(c) for c in completion),
            logprobs=tuple(-0.5 for _ in completion), version=self.version,
            finish_reason="length" if len(answer) > params.max_tokens else "stop",
        )


def render(messages: Sequence[Message]) -> str:
    """A toy chat template (one token per character) with the prefix property real templates have."""
    return "".join(f"<{m.role}>{m.content}</{m.role}>" for m in messages) + "<assistant>"

