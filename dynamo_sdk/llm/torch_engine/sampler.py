"""Turning a step's logits into tokens, per request: penalties, filters, seeds, logprobs.

Order of operations (vLLM's): logprobs are taken from the raw logits (what the model said,
before any processing); then repetition penalty (prompt and output tokens, HF/CTRL style:
positive logits divided, negative multiplied), frequency and presence penalties (output tokens,
OpenAI style), stop tokens banned until ``min_tokens``; greedy rows take the argmax, the others
are divided by their temperature and filtered by top-k, top-p and min-p before sampling.

Whatever one row's settings can make fail (top-k alternatives past the vocabulary, ids outside
it) runs before the first random draw: a batch whose sampling raises is then sampled again row
by row (`sample_rows`) with every seeded generator where it was, so the rows that can be
sampled are, exactly as they would have been, and only the failing row fails.

Sampling is a race of exponential clocks, ``argmax(p / Exp(1))``, which draws exactly from
``p``. A request with a ``seed`` draws its noise from its own generator, so its output depends
on the seed alone, not on which other requests share the batch. When every row is greedy and
plain (the common benchmark and test case) the whole step is one ``argmax``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dynamo_sdk.llm.protocol import PreprocessedRequest, TokenLogprob


@dataclass
class SamplingParams:
    """A request's sampling settings, resolved to plain values (0 / 1.0 mean "off")."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top alternatives to return (0: only the sampled token's)
    generator: torch.Generator | None = None  # set when the request has a seed

    @classmethod
    def from_request(cls, request: PreprocessedRequest, device: torch.device) -> SamplingParams:
        s = request.sampling
        generator = None
        if s.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(s.seed)
        temperature = 1.0 if s.temperature is None else float(s.temperature)
        return cls(
            temperature=temperature if temperature > 1e-5 else 0.0,
            top_p=1.0 if s.top_p is None else float(s.top_p),
            top_k=0 if s.top_k is None or s.top_k < 0 else int(s.top_k),
            min_p=0.0 if s.min_p is None else float(s.min_p),
            repetition_penalty=1.0 if s.repetition_penalty is None else s.repetition_penalty,
            presence_penalty=s.presence_penalty or 0.0,
            frequency_penalty=s.frequency_penalty or 0.0,
            logprobs=request.output.logprobs,
            generator=generator,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing else to do: the whole row is one argmax."""
        return self.greedy and not self.has_penalties and self.logprobs is None

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


@dataclass
class SampleRow:
    """One sequence to sample for: its settings and the tokens penalties look at."""

    params: SamplingParams
    prompt: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    banned: list[int] = field(default_factory=list)  # stop ids, while under min_tokens


@dataclass
class Sampled:
    token: int
    logprob: float | None = None
    top: list[TokenLogprob] | None = None
    error: str | None = None  # this row could not be sampled (its request fails, not the step)


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> list[Sampled]:
    """Sample one token per row of ``logits`` ([N, vocab], float32)."""
    assert logits.shape[0] == len(rows)
    plain = all(r.params.plain_greedy and not r.banned for r in rows)
    if plain:
        return [Sampled(t) for t in logits.argmax(dim=-1).tolist()]

    raw_logprobs = None
    tops: list[list[TokenLogprob] | None] = [None] * len(rows)
    if any(r.params.logprobs is not None for r in rows):
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        for i, row in enumerate(rows):  # before any draw (see the module docstring)
            n = row.params.logprobs
            if n is None:
                continue
            if n > 0:
                values, ids = raw_logprobs[i].topk(n)
                tops[i] = [
                    TokenLogprob(t, v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)
                ]
            else:
                tops[i] = []
    logits = logits.clone()
    for i, row in enumerate(rows):
        _apply_penalties(logits[i], row)
        if row.banned:
            logits[i, torch.tensor(row.banned, device=logits.device)] = float("-inf")

    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        tokens[idx] = _sample_random(logits[idx], [rows[i].params for i in random_rows])

    token_list = tokens.tolist()
    out = [Sampled(t) for t in token_list]
    if raw_logprobs is not None:
        for i, top in enumerate(tops):
            if top is not None:
                out[i].logprob = float(raw_logprobs[i, token_list[i]])
                out[i].top = top
    return out


def sample_rows(logits: torch.Tensor, rows: list[SampleRow]) -> list[Sampled]:
    """`sample`, one row at a time: a row that cannot be sampled gets a ``Sampled`` with its
    ``error`` instead of failing the others (what a step falls back to when `sample` over the
    whole batch raised)."""
    out: list[Sampled] = []
    for i, row in enumerate(rows):
        try:
            out.append(sample(logits[i : i + 1], [row])[0])
        except Exception as exc:
            out.append(Sampled(0, error=f"{type(exc).__name__}: {exc}"))
    return out


def sample_on_device(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor | None:
    """Token ids as a device tensor, without a host sync, when no row needs host-side work
    (logprobs, penalties, banned ids); None otherwise. Lets the next step start from them."""
    if any(r.banned or r.params.has_penalties or r.params.logprobs is not None for r in rows):
        return None
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        tokens[idx] = _sample_random(logits[idx], [rows[i].params for i in random_rows])
    return tokens


def _apply_penalties(logits: torch.Tensor, row: SampleRow) -> None:
    p = row.params
    if not p.has_penalties:
        return
    device = logits.device
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt) | set(row.output)), device=device)
        if seen.numel():
            values = logits[seen]
            logits[seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
    if row.output and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(
            torch.tensor(row.output, device=device), minlength=logits.shape[0]
        ).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _sample_random(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k / top-p / min-p, then the exponential race; returns token ids. The
    noise is drawn last: nothing after it can fail (see the module docstring)."""
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    logits = logits / temps
    if any(p.filters for p in params):
        logits = _filter(logits, params)
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs)
    for i, p in enumerate(params):
        if p.generator is not None:
            noise[i].exponential_(generator=p.generator)
        else:
            noise[i].exponential_()
    return (probs / noise).argmax(dim=-1)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude, row by row settings."""
    vocab = logits.shape[1]
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device).unsqueeze(0)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    drop = rank >= top_k.unsqueeze(1)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the better tokens
    drop |= before > top_p  # keeps the smallest set reaching top_p (never the first token)
    min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
    drop |= sorted_probs < min_p * sorted_probs[:, :1]
    drop[:, 0] = False
    masked = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, masked)
