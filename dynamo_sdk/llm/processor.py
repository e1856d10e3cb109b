"""Pre- and post-processing: OpenAI request → token ids → engine → text, with stop strings.

It owns everything model-specific about text: the chat template, tokenization, limits that
depend on the model (the context length, given per request: the smallest any live worker of
the model takes), incremental detokenization that never splits a UTF-8 character, and stop
strings (matched on text, across token boundaries). Engines only see and return token ids.
The engine is reached through `engine_call`, so the same code runs in the Frontend (calling
a worker over the runtime), in a Processor service, and in-process in `dynamo run`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from dynamo_sdk.llm.detokenizer import IncrementalDetokenizer, StopStringMatcher
from dynamo_sdk.llm.errors import ContextLengthError, InvalidRequestError
from dynamo_sdk.llm.openai_protocol import (
    ChatCompletionRequest,
    OpenAIRequest,
    SamplingFields,
    prompt_size,
)
from dynamo_sdk.llm.protocol import (
    EngineOutput,
    LogprobEntry,
    OutputOptions,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
    TextDelta,
    TopLogprob,
    Usage,
)
from dynamo_sdk.llm.tokenizer import ChatPrompt, Tokenizer, TokenizerError

EngineCall = Callable[[PreprocessedRequest], AsyncIterator[EngineOutput]]

# Prompts longer than this are prepared on a thread (`OpenAIProcessor.generate`): ~1 ms of
# tokenizing, about what a thread hop costs in latency under load.
OFF_LOOP_PROMPT_CHARS = 4_096


class Prepared:
    """A request ready for the engine, plus what post-processing needs."""

    def __init__(self, engine_request: PreprocessedRequest, stops: list[str]) -> None:
        self.engine_request = engine_request
        self.stops = stops


class OpenAIProcessor:
    """Turns OpenAI requests into engine requests and engine outputs into text deltas."""

    def __init__(self, tokenizer: Tokenizer, model_name: str) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name

    # ---- pre-processing ---------------------------------------------------------------

    def prompt_ids(self, body: OpenAIRequest) -> list[int]:
        return self.prompt(body).token_ids

    def prompt(self, body: OpenAIRequest) -> ChatPrompt:
        """The prompt's token ids (and, for a chat, where its latest message is in them)."""
        try:
            if isinstance(body, ChatCompletionRequest):
                messages = [msgspec.to_builtins(m) for m in body.messages]
                return self.tokenizer.render_chat(messages, add_generation_prompt=True)
            prompt = body.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                return ChatPrompt(self.tokenizer.encode(prompt, add_special_tokens=True))
            ids = [int(t) for t in prompt]
        except TokenizerError as exc:
            raise InvalidRequestError(str(exc)) from exc
        bad = [t for t in ids if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token ids out of the vocabulary: {bad[:5]}")
        return ChatPrompt(ids)

    def prepare(self, request_id: str, body: OpenAIRequest, context_length: int) -> Prepared:
        """The engine request for ``body`` (checked against ``context_length``)."""
        ids, latest = self.prompt(body)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        max_tokens = self._max_tokens(body, len(ids), context_length)
        if body.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({body.min_tokens}) is larger than max_tokens ({max_tokens})"
            )
        logprobs = body.logprobs_count()
        stop_ids = [] if body.ignore_eos else list(self.tokenizer.eos_token_ids)
        engine_request = PreprocessedRequest(
            request_id=request_id,
            model=self.model_name,
            token_ids=ids,
            stop=StopConditions(
                max_tokens=max_tokens,
                min_tokens=body.min_tokens,
                ignore_eos=body.ignore_eos,
                stop_token_ids=stop_ids,
            ),
            sampling=_sampling(body),
            output=OutputOptions(logprobs=logprobs),
            latest_message=latest,
        )
        return Prepared(engine_request, body.stop_list())

    def _max_tokens(self, body: SamplingFields, prompt_len: int, context_length: int) -> int:
        room = context_length - prompt_len
        if room < 1:
            raise ContextLengthError(
                f"This model's maximum context length is {context_length} tokens; the "
                f"prompt has {prompt_len} tokens, leaving no room for a completion."
            )
        requested = body.requested_max_tokens()
        if requested is None:
            return room
        if requested > room:
            raise ContextLengthError(
                f"This model's maximum context length is {context_length} tokens. However, "
                f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                f"{requested} for the completion). Please reduce the prompt or max_tokens."
            )
        return requested

    # ---- the stream -------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        body: OpenAIRequest,
        engine_call: EngineCall,
        context_length: int,
    ) -> AsyncIterator[TextDelta]:
        """Run one request; the last delta carries finish_reason and usage.

        A long prompt is tokenized (and its chat template rendered) on a thread: a megabyte
        of text takes the tokenizer a second or more, which on the event loop would stall
        every other stream of this process, its heartbeats included. Short ones stay inline,
        where a thread hop would cost more than the work."""
        if prompt_size(body)[0] > OFF_LOOP_PROMPT_CHARS:
            prepared = await asyncio.to_thread(self.prepare, request_id, body, context_length)
        else:
            prepared = self.prepare(request_id, body, context_length)
        engine_request = prepared.engine_request
        prompt_len = len(engine_request.token_ids)
        detok = IncrementalDetokenizer(self.tokenizer, engine_request.token_ids)
        matcher = StopStringMatcher(prepared.stops) if prepared.stops else None
        completion = 0
        cached = 0
        finish: Any = None
        stream = engine_call(engine_request)
        try:
            async for out in stream:
                if out.error:
                    raise RuntimeError(f"engine error: {out.error}")
                if out.cached_tokens is not None:
                    cached = out.cached_tokens
                completion += len(out.token_ids)
                text = detok.add(out.token_ids)
                finish = out.finish_reason
                if finish is not None:
                    text += detok.flush()
                stopped = False
                if matcher is not None:
                    text, stopped = matcher.feed(text)
                    if stopped:
                        finish = "stop"
                    elif finish is not None:
                        text += matcher.flush()
                logprobs = (
                    self._logprobs(out) if engine_request.output.logprobs is not None else None
                )
                if text or logprobs or finish is not None:
                    yield TextDelta(
                        text=text,
                        token_count=len(out.token_ids),
                        logprobs=logprobs,
                        finish_reason=finish,
                    )
                if finish is not None:
                    break
        finally:
            # Stopping early (stop string, client gone) closes the engine stream: it aborts.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if finish is None:
            finish = "length" if completion >= engine_request.stop.max_tokens else "stop"
            yield TextDelta(finish_reason=finish)
        yield TextDelta(usage=Usage(prompt_len, completion, cached))

    def _logprobs(self, out: EngineOutput) -> list[LogprobEntry]:
        entries = []
        tops = out.top_logprobs or [[] for _ in out.token_ids]
        lps = out.logprobs or [0.0 for _ in out.token_ids]
        for token_id, lp, top in zip(out.token_ids, lps, tops, strict=False):
            entries.append(
                LogprobEntry(
                    token=self.tokenizer.id_to_token_text(token_id),
                    logprob=lp,
                    top=[
                        TopLogprob(self.tokenizer.id_to_token_text(t.token_id), t.logprob)
                        for t in top
                    ],
                )
            )
        return entries


def _sampling(body: SamplingFields) -> SamplingOptions:
    top_k = body.top_k if body.top_k not in (None, 0) else None
    return SamplingOptions(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=top_k,
        min_p=body.min_p,
        seed=body.seed,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
    )
