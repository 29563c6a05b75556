"""Host-side sampling and the decode loop every runtime shares.

Sampling runs in numpy on the logits a runtime returns, one seeded random stream per sequence, so a
rollout draws the same tokens whether it is decoded alone or in a batch of N, on any runtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from runtimes.protocol import Generation, Sampling


class Sampler:
    def __init__(self, sampling: Sampling, n: int) -> None:
        self.sampling = sampling
        self.greedy = sampling.temperature <= 0.0
        if not self.greedy and len(sampling.seeds) != n:
            raise ValueError(
                f"sampling needs one seed per sequence: {n} sequences, {len(sampling.seeds)} seeds"
            )
        self.rngs = [] if self.greedy else [np.random.default_rng(seed) for seed in sampling.seeds]

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits (n, vocab) -> next token per sequence (n,)"""
        if self.greedy:
            return logits.argmax(axis=-1)
        scaled = logits.astype(np.float64) / self.sampling.temperature
        probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        return np.array([self._draw(p, rng) for p, rng in zip(probs, self.rngs)])

    def _draw(self, probs: np.ndarray, rng: np.random.Generator) -> int:
        if self.sampling.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # the nucleus: the smallest head whose mass reaches top_p (always at least the top token)
            kept = order[: int(np.searchsorted(cumulative, self.sampling.top_p)) + 1]
            nucleus = np.zeros_like(probs)
            nucleus[kept] = probs[kept]
            probs = nucleus
        return int(rng.choice(len(probs), p=probs / probs.sum()))


class Detokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class DecodeResult:
    token_ids: list[list[int]]
    finish_reasons: list[str]
    ms: float
    first_token_at: float  # time.perf_counter() when the first tokens were sampled

    def generations(
        self, tokenizer: Detokenizer, prefix_tokens: int, suffix_tokens: int, started: float
    ) -> list[Generation]:
        """One Generation per sequence, accounted as a fork: the first computed the suffix on top of the
        prefix, the others took both from its KV. `started`: time.perf_counter() at the start of the
        generate call, which its times count from."""
        ms = (time.perf_counter() - started) * 1000
        first_token_ms = (self.first_token_at - started) * 1000
        return [
            Generation(
                text=tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=ids,
                prompt_tokens=suffix_tokens if i == 0 else 0,
                reused_tokens=prefix_tokens + (0 if i == 0 else suffix_tokens),
                generated_tokens=len(ids),
                ms=ms,
                first_token_ms=first_token_ms,
                finish_reason=reason,
            )
            for i, (ids, reason) in enumerate(zip(self.token_ids, self.finish_reasons))
        ]


def decode(
    first_logits: np.ndarray,
    step: Callable[[np.ndarray], np.ndarray],
    sampling: Sampling,
    eos_ids: Sequence[int],
) -> DecodeResult:
    """Decode n sequences together.

    first_logits: (n, vocab) logits after the prompt; step(tokens (n,)) feeds one token per sequence and
    returns the next (n, vocab) logits. Finished sequences keep being fed (their eos) so the batch keeps
    one shape; their outputs are ignored. With sampling.ignore_eos no token finishes a sequence.
    """
    start = time.perf_counter()
    n = first_logits.shape[0]
    sampler = Sampler(sampling, n)
    eos = np.array([] if sampling.ignore_eos else sorted(set(eos_ids)), dtype=np.int64)
    first_token_at = start
    tokens: list[list[int]] = [[] for _ in range(n)]
    finished = np.zeros(n, dtype=bool)
    logits = first_logits
    for i in range(sampling.max_new_tokens):
        chosen = sampler(logits)
        if i == 0:
            first_token_at = time.perf_counter()
        for seq in np.flatnonzero(~finished):
            tokens[seq].append(int(chosen[seq]))
        finished |= np.isin(chosen, eos)
        if finished.all() or i == sampling.max_new_tokens - 1:
            break
        logits = step(np.where(finished, eos[0] if len(eos) else chosen, chosen))
    reasons = ["stop" if seq and seq[-1] in set(eos.tolist()) else "length" for seq in tokens]
    return DecodeResult(tokens, reasons, (time.perf_counter() - start) * 1000, first_token_at)
