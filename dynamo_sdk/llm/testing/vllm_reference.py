"""Greedy token ids from vLLM's own offline `LLM.generate`, as a reference for tests.

    python -m dynamo_sdk.llm.testing.vllm_reference MODEL '[[1, 2, 3], [4, 5]]' MAX_TOKENS

prints a JSON list of generated token-id lists. A separate process, because vLLM starts its
engine core with `spawn` and the caller (a test runner) has no `__main__` guard.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    model, prompts_json, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, enforce_eager=True, max_model_len=2048, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.loads(prompts_json)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    print("REFERENCE " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)


if __name__ == "__main__":
    main()
