"""The request mix of the locust load test: named workloads, their prompts and their weights.

Three workloads stress different parts of the server: `short_chat` (a one-line question through
the chat template, a short answer: TTFT-bound), `long_prompt` (a prompt of several hundred words,
a few new tokens: prefill-bound) and `long_generation` (a short prompt, many new tokens with EOS
ignored: decode-bound). `parse_mix("short_chat=6,long_prompt=2,long_generation=2")` gives their
weights; every prompt varies per request (a counter), so no cache can answer it twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a hash table is in one sentence.",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "Name two planets larger than Earth.",
    "How do I boil an egg?",
    "What does a compiler do?",
)

PARAGRAPH = (
    "The history of computing is a history of ideas about memory, arithmetic and language. "
    "Early machines were built to tabulate census data and to compute artillery tables; later "
    "ones stored their own programs, which made software a thing apart from the machine. "
    "Operating systems grew to share one computer among many users, networks joined computers "
    "into services, and languages moved from machine codes to notations close to mathematics. "
)


@dataclass(frozen=True)
class Workload:
    """One kind of request: how its prompt is made and how much it asks to generate."""

    name: str
    """Label in locust's tables (`ChatStream short_chat`, `TTFT short_chat`, ...)."""
    chat: bool
    """Send through ChatStream (the model's chat template) instead of GenerateStream."""
    max_new_tokens: int
    """Tokens to generate (at most)."""
    ignore_eos: bool
    """Keep generating past EOS, so the length is exactly max_new_tokens."""
    prompt_words: int = 0
    """Approximate prompt length in words for plain prompts (0: a short question)."""
    truncate_prompt_tokens: int = 0
    """Server-side cut of the prompt to its last N tokens (0: none); keeps any model's window."""


WORKLOADS = {
    "short_chat": Workload("short_chat", chat=True, max_new_tokens=32, ignore_eos=False),
    "long_prompt": Workload("long_prompt", chat=False, max_new_tokens=16, ignore_eos=True,
                            prompt_words=320, truncate_prompt_tokens=384),
    "long_generation": Workload("long_generation", chat=False, max_new_tokens=192,
                                ignore_eos=True),
}
DEFAULT_MIX = "short_chat=6,long_prompt=2,long_generation=2"


def parse_mix(spec: str) -> dict[str, int]:
    """`name=weight,...` -> {name: weight}; unknown names and negative weights are refused."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition("=")
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})")
        w = int(weight or 1)
        if w < 0:
            raise ValueError(f"{name}: weight must be >= 0")
        out[name] = w
    if not any(out.values()):
        raise ValueError(f"mix {spec!r} has no workload with a positive weight")
    return out


def prompt_for(w: Workload, n: int) -> str:
    """The prompt of request number n of workload w (different for every n)."""
    question = QUESTIONS[n % len(QUESTIONS)]
    if w.prompt_words:
        words = PARAGRAPH.split()
        body = " ".join(words[i % len(words)] for i in range(w.prompt_words))
        return f"Document {n}: {body}\nQuestion: {question}\nAnswer:"
    if w.chat:
        return f"{question} (request {n})"
    return f"Story {n}. Once upon a time, {question.lower()}"


def pick(mix: dict[str, int], rng: random.Random) -> Workload:
    names = [n for n, w in mix.items() if w > 0]
    return WORKLOADS[rng.choices(names, weights=[mix[n] for n in names])[0]]
