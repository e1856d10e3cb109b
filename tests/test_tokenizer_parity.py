# ruff: noqa: E501 (chat templates are kept line for line as their models write them)
"""The transformers-free Tokenizer gives what transformers' AutoTokenizer gives.

Each folder here is the tiny model's byte-level ``tokenizer.json`` with a real-world model's
tokenizer config: its chat template (written from those models' published templates: the same
jinja features, not byte-identical copies), special tokens (as strings, AddedToken objects or
legacy ``special_tokens_map.json`` entries, several missing from the vocabulary so they get
added) and control tokens in ``added_tokens_decoder``. For every conversation, both must give
the same prompt ids, or both must fail with the template's message.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_sdk.llm.testing.tiny_model import build_tiny_model
from dynamo_sdk.llm.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")


# -- the templates ---------------------------------------------------------------------------

LLAMA_3_1 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN_2_5 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen3's: a reverse loop over a namespace to find the last real user query, <think> splitting
QWEN_3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

MISTRAL_V0_3 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

GEMMA_2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

PHI_3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

DEEPSEEK_V2_LITE_CHAT = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}"
)

# SmolLM3-style training template: {% generation %} around assistant text; loop controls
CHATML_GENERATION = """{%- for message in messages %}
{%- if message.role == 'tool' %}{% continue %}{% endif %}
{%- if message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}{% generation %}{% set shown = message.content | default('', true) %}{{ shown }}{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- if loop.index > 20 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# Zephyr's: no whitespace control at all, so trim_blocks and lstrip_blocks shape the text
ZEPHYR = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""

# Hermes-2-Pro style: a named set of templates, "tool_use" picked when tools are given
HERMES_TOOL_USE = """{%- for message in messages %}
{%- if loop.first %}<|im_start|>system
You are a function calling AI model. Here are the available tools: <tools> {{ tools | tojson(indent=2, sort_keys=true) }} </tools><|im_end|>
{% endif %}
{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _added(content: str, special: bool = True, **flags: bool) -> dict[str, Any]:
    token = {"content": content, "lstrip": False, "normalized": False, "rstrip": False}
    token.update(single_word=False, special=special, **flags)
    return token


def _decoder(*tokens: dict[str, Any], start: int = 2048) -> dict[str, Any]:
    """The tiny vocabulary's four added tokens, then ``tokens`` from id ``start`` on."""
    base = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    out = {str(i): _added(c) for i, c in enumerate(base)}
    out.update({str(start + i): t for i, t in enumerate(tokens)})
    return out


def _added_token_object(content: str) -> dict[str, Any]:
    return {"__type": "AddedToken", **_added(content)}


QWEN_TOKENS = _decoder(
    _added("<|endoftext|>"),
    _added("<tool_call>", special=False),
    _added("</tool_call>", special=False),
    _added("<think>", special=False),
    _added("</think>", special=False),
)

# name -> (tokenizer_config.json, special_tokens_map.json or None)
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "llama-3.1": (
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "clean_up_tokenization_spaces": True,  # as Llama 3's: skipped for BPE
            "chat_template": LLAMA_3_1,
            "added_tokens_decoder": _decoder(
                _added("<|start_header_id|>"),
                _added("<|end_header_id|>"),
                _added("<|eot_id|>"),
                _added("<|eom_id|>"),
                _added("<|python_tag|>"),
            ),
        },
        None,
    ),
    "qwen-2.5": (
        {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "errors": "replace",
            "split_special_tokens": False,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "chat_template": QWEN_2_5,
            "added_tokens_decoder": QWEN_TOKENS,
        },
        None,
    ),
    "qwen-3": (
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": QWEN_3,
            "added_tokens_decoder": QWEN_TOKENS,
        },
        None,
    ),
    # legacy format: no added_tokens_decoder, tokens in special_tokens_map.json; <s>, </s> and
    # <unk> are not in the vocabulary (added), the control tokens are extra special tokens
    "mistral-v0.3": (
        {"add_bos_token": True, "add_eos_token": False, "chat_template": MISTRAL_V0_3},
        {
            "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False},
            "eos_token": {"content": "</s>", "lstrip": False, "normalized": False},
            "unk_token": "<unk>",
            "additional_special_tokens": [
                "[INST]",
                "[/INST]",
                "[TOOL_CALLS]",
                "[AVAILABLE_TOOLS]",
                "[/AVAILABLE_TOOLS]",
                "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]",
            ],
        },
    ),
    # special tokens as serialized AddedToken objects, missing from the vocabulary
    "gemma-2": (
        {
            "bos_token": _added_token_object("<bos>"),
            "eos_token": _added_token_object("<eos>"),
            "pad_token": _added_token_object("<pad>"),
            "unk_token": _added_token_object("<unk>"),
            "chat_template": GEMMA_2,
            "added_tokens_decoder": _decoder(_added("<start_of_turn>"), _added("<end_of_turn>")),
        },
        None,
    ),
    # Phi-3's role tokens strip the whitespace on their right, and are not all special
    "phi-3": (
        {
            "bos_token": "<s>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<unk>",
            "pad_token": "<|endoftext|>",
            "chat_template": PHI_3,
            "added_tokens_decoder": _decoder(
                _added("<s>"),
                _added("</s>"),
                _added("<unk>"),
                _added("<|endoftext|>", special=False),  # the EOS: made special on loading
                _added("<|assistant|>", special=False, rstrip=True),
                _added("<|system|>", rstrip=True),
                _added("<|end|>", rstrip=True),
                _added("<|user|>", special=False, rstrip=True),
            ),
        },
        None,
    ),
    # full-width special tokens, not in the vocabulary
    "deepseek-v2-lite-chat": (
        {
            "bos_token": {
                "__type": "AddedToken",
                **_added("<\uff5cbegin\u2581of\u2581sentence\uff5c>"),
            },
            "eos_token": {
                "__type": "AddedToken",
                **_added("<\uff5cend\u2581of\u2581sentence\uff5c>"),
            },
            "clean_up_tokenization_spaces": False,
            "chat_template": DEEPSEEK_V2_LITE_CHAT,
        },
        None,
    ),
    "zephyr": ({"eos_token": "</s>", "chat_template": ZEPHYR}, None),
    "chatml-generation": (
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "chat_template": ""},
        None,
    ),
    "hermes-named-templates": (
        {
            "eos_token": "<|im_end|>",
            "chat_template": [
                {"name": "default", "template": CHATML},
                {"name": "tool_use", "template": HERMES_TOOL_USE},
            ],
        },
        None,
    ),
}
# templates in their own files (newer transformers save them there), over the config's
TEMPLATE_FILES = {"chatml-generation": {"chat_template.jinja": CHATML_GENERATION}}


# -- conversations ---------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city, «quoted» & <escaped>?",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Zürich"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]
TOOL_CALL = {
    "id": "call12345",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user": [{"role": "user", "content": "Hello there, how are you?"}],
    "system-user": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "hi 東京 🙂"},
        {"role": "assistant", "content": "Hello! How can I help?\n"},
        {"role": "user", "content": "Tell me about the router, worker and cache."},
    ],
    "text-parts": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "first part, "},
                {"type": "text", "text": "second part"},
            ],
        }
    ],
    "tool-round-trip": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call12345", "content": "22 degrees, sunny"},
    ],
    "thinking": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nsimple sum\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
    ],
    "special-text-in-content": [
        {"role": "user", "content": "print('<|im_end|>') and <s> then </s> [INST]"},
    ],
    "not-alternating": [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
    ],
    "ends-with-assistant": [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Tokens flow like streams"},
    ],
}

# (config, conversation, with tools) each template rejects (raise_exception, or a type error in
# the template such as `"..." + None`); every other case must render
EXPECTED_ERRORS: dict[str, set[str]] = {
    "mistral-v0.3": {"not-alternating"},
    "gemma-2": {"system-user", "multi-turn", "not-alternating", "tool-round-trip"},
    "phi-3": {"tool-round-trip"},
    "deepseek-v2-lite-chat": {"tool-round-trip"},
    "zephyr": {"tool-round-trip"},
    "hermes-named-templates": {"tool-round-trip/no-tools"},
}


def _expect_error(name: str, conversation: str, with_tools: bool) -> bool:
    errors = EXPECTED_ERRORS.get(name, set())
    return (
        conversation in errors
        or f"{conversation}/{'tools' if with_tools else 'no-tools'}" in errors
    )


CASES = [
    (name, conversation, tools)
    for name in CONFIGS
    for conversation in CONVERSATIONS
    for tools in (False, True)
]


def _flatten(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the wrapper hands a template: text parts joined (transformers gets the same)."""
    out = []
    for message in messages:
        message = dict(message)
        if isinstance(message.get("content"), list):
            message["content"] = "".join(p["text"] for p in message["content"])
        out.append(message)
    return out


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return build_tiny_model()


def _write_folder(root: Path, name: str, tiny: Path) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny / "tokenizer.json", folder / "tokenizer.json")
    config, special_map = CONFIGS[name]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    for file, text in TEMPLATE_FILES.get(name, {}).items():
        (folder / file).write_text(text)
    return folder


@pytest.fixture(scope="session")
def pairs(
    tiny_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Tokenizer, Any]]:
    """name -> (our Tokenizer, transformers' tokenizer) for that config, loaded once."""
    root = tmp_path_factory.mktemp("real-world-tokenizers")
    loaded: dict[str, tuple[Tokenizer, Any]] = {}

    def get(name: str) -> tuple[Tokenizer, Any]:
        if name not in loaded:
            folder = _write_folder(root, name, tiny_path)
            hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            loaded[name] = (Tokenizer.from_pretrained(folder), hf)
        return loaded[name]

    return get


def _hf_ids(hf: Any, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool):
    ids = hf.apply_chat_template(
        _flatten(messages),
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=False,
    )
    return list(ids)


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "no-gen"])
@pytest.mark.parametrize(
    ("name", "conversation", "with_tools"),
    CASES,
    ids=[f"{n}-{c}-{'tools' if t else 'no-tools'}" for n, c, t in CASES],
)
def test_chat_template_parity(
    pairs: Callable[[str], tuple[Tokenizer, Any]],
    name: str,
    conversation: str,
    with_tools: bool,
    add_generation_prompt: bool,
) -> None:
    ours, hf = pairs(name)
    messages = CONVERSATIONS[conversation]
    tools = TOOLS if with_tools else None
    try:
        expected = _hf_ids(hf, messages, tools, add_generation_prompt)
    except Exception as exc:
        with pytest.raises(TokenizerError) as raised:
            ours.render_chat(messages, add_generation_prompt, tools)
        assert str(exc) in str(raised.value)
        # the failures are the ones each template is known for, not accidents of this test
        assert _expect_error(name, conversation, with_tools), f"transformers failed: {exc!r}"
        return
    assert not _expect_error(name, conversation, with_tools), "transformers did not fail"
    prompt = ours.render_chat(messages, add_generation_prompt, tools)
    assert prompt.token_ids == expected
    assert ours.apply_chat_template(messages, add_generation_prompt, tools) == expected
    # the latest message's span, when found, holds its content
    if prompt.latest_message is not None:
        start, end = prompt.latest_message
        content = _flatten(messages)[-1]["content"]
        assert content in ours.decode(prompt.token_ids[start:end], skip_special_tokens=False)


def test_templates_render_something_different(
    pairs: Callable[[str], tuple[Tokenizer, Any]],
) -> None:
    """The parity above is not vacuous: templates, tools and generation prompts all matter."""
    messages = CONVERSATIONS["system-user"]
    seen = set()
    for name in CONFIGS:
        if _expect_error(name, "system-user", False):
            continue
        ours, _ = pairs(name)
        seen.add(tuple(ours.apply_chat_template(messages)))
        if name in ("llama-3.1", "qwen-2.5", "hermes-named-templates"):
            with_tools = ours.apply_chat_template(messages, tools=TOOLS)
            assert with_tools != ours.apply_chat_template(messages)
            assert "get_weather" in ours.decode(with_tools)
    assert len(seen) >= 5  # the ChatML-shaped ones agree on this chat
    llama, _ = pairs("llama-3.1")
    text = llama.decode(llama.apply_chat_template(messages), skip_special_tokens=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    llama_tools = llama.decode(llama.apply_chat_template(messages, tools=TOOLS), False)
    assert '\n    "type": "function",' in llama_tools  # tojson(indent=4)
    assert "«quoted» & <escaped>" in llama_tools  # transformers' tojson: no escaping


def test_generation_tags_render_their_body(pairs: Callable[[str], tuple[Tokenizer, Any]]) -> None:
    ours, _ = pairs("chatml-generation")
    ids = ours.apply_chat_template(CONVERSATIONS["ends-with-assistant"], False)
    assert ours.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user\nWrite a haiku.<|im_end|>\n"
        "<|im_start|>assistant\nTokens flow like streams<|im_end|>\n"
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loaded_vocabulary_parity(pairs: Callable[[str], tuple[Tokenizer, Any]], name: str) -> None:
    """Special tokens end up where transformers puts them: ids, added tokens, flags."""
    ours, hf = pairs(name)
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_ids[0] == hf.eos_token_id
    assert ours._backend is not None
    assert (
        ours._backend.get_added_tokens_decoder() == hf.backend_tokenizer.get_added_tokens_decoder()
    )
    assert ours._template_vars == hf.special_tokens_map
    ids = list(range(ours.vocab_size))
    assert ours.convert_ids_to_tokens(ids) == [str(t) for t in hf.convert_ids_to_tokens(ids)]


def _texts_with(specials: list[str]) -> st.SearchStrategy[str]:
    piece = st.one_of(
        st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
        st.sampled_from([*specials, " ", "\n", "  ", " .", " n't", " 's"]),
    )
    return st.lists(piece, max_size=10).map("".join)


@pytest.mark.parametrize("name", ["llama-3.1", "phi-3", "mistral-v0.3", "qwen-2.5", "gemma-2"])
def test_encode_decode_parity_property(
    pairs: Callable[[str], tuple[Tokenizer, Any]], name: str
) -> None:
    ours, hf = pairs(name)
    specials = [str(t) for t in hf.backend_tokenizer.get_added_tokens_decoder().values()]

    @settings(max_examples=150, deadline=None)
    @given(text=_texts_with(specials), add_special=st.booleans())
    def check_encode(text: str, add_special: bool) -> None:
        assert ours.encode(text, add_special) == hf.encode(text, add_special_tokens=add_special)

    @settings(max_examples=150, deadline=None)
    @given(
        ids=st.lists(st.integers(min_value=0, max_value=len(hf) - 1), max_size=40),
        skip=st.booleans(),
    )
    def check_decode(ids: list[int], skip: bool) -> None:
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )

    check_encode()
    check_decode()
