"""Step 1b, normalise: tool turns, tool calls, tools, reasoning, content parts and `weight` reach the template as
the contract of toss_filter/data/conversation.py says, and every malformed field is one error naming row and field."""

from __future__ import annotations

import json

import pytest

from toss_filter.data.conversation import Conversation, content_text, to_conversation, trainable
from toss_filter.errors import InputError

SRC = "agent.jsonl"
TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]


def convert(record: dict) -> Conversation:
    return to_conversation(record, SRC, 3)


def error_of(record: dict) -> InputError:
    with pytest.raises(InputError) as info:
        convert(record)
    assert (info.value.source, info.value.row) == (SRC, 3)
    return info.value


def test_openai_tool_call_with_json_string_arguments_and_tool_turn():
    record = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"expression": "2+3"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "assistant", "content": "5."},
    ]}
    conversation = convert(record)
    assert conversation.tools == TOOLS
    assert conversation.messages[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "calc", "arguments": {"expression": "2+3"}}, "id": "c1"}]}
    assert conversation.messages[2] == {"role": "tool", "content": "5", "tool_call_id": "c1"}


def test_flat_tool_call_and_tools_as_a_json_string():
    conversation = convert({"tools": json.dumps(TOOLS), "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "calc", "arguments": {"expression": "1"}}]}]})
    assert conversation.tools == TOOLS
    assert conversation.messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "calc", "arguments": {"expression": "1"}}}]


@pytest.mark.parametrize("spelling", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_spellings_become_reasoning_content(spelling):
    conversation = convert({"messages": [{"role": "user", "content": "q"},
                                         {"role": "assistant", spelling: "Think.", "content": "A"}]})
    assert conversation.messages[1] == {"role": "assistant", "content": "A", "reasoning_content": "Think."}


def test_inline_think_blocks_stay_in_content():
    content = "<think>\nHmm.\n</think>\n\nA"
    conversation = convert({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]})
    assert conversation.messages[1]["content"] == content


def test_text_parts_are_kept_and_their_text_joined_on_request():
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
    conversation = convert({"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Hi"}]})
    assert conversation.messages[0]["content"] == parts
    assert content_text(parts) == "Hello world"


def test_weight_zero_turn_is_context_only():
    conversation = convert({"messages": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "bad", "weight": 0},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "good", "weight": 1.0}]})
    assert [trainable(m) for m in conversation.messages] == [False, False, False, True]


def test_sharegpt_function_call_and_observation():
    conversation = convert({"tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "2+3?"},
        {"from": "function_call", "value": '{"name": "calc", "arguments": {"expression": "2+3"}}'},
        {"from": "observation", "value": "5"},
        {"from": "gpt", "value": "5."}]})
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "tool", "assistant"]
    assert conversation.messages[1]["tool_calls"][0]["function"] == {"name": "calc", "arguments": {"expression": "2+3"}}


def test_null_fields_from_columnar_inputs_are_absent():
    conversation = convert({"messages": [{"role": "user", "content": "q", "tool_calls": None},
                                         {"role": "assistant", "content": "A", "reasoning_content": None}]})
    assert conversation.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize(("message", "field", "problem"), [
    ({"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages[1].content[0].type",
     "a 'image_url' part: toss-filter scores text only"),
    ({"role": "assistant", "content": "A", "weight": 0.5}, "messages[1].weight", "expected 0 or 1, got 0.5"),
    ({"role": "assistant", "content": "A", "reasoning": "x", "thinking": "y"}, "messages[1].thinking",
     "two reasoning fields, reasoning and thinking"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "calc", "arguments": "{oops"}}]},
     "messages[1].tool_calls[0].function.arguments", "a string that is not valid JSON"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "", "arguments": {}}}]},
     "messages[1].tool_calls[0].function.name", "a tool call needs a non-empty name"),
    ({"role": "assistant", "content": None}, "messages[1].content", "expected a string, got NoneType"),
    ({"role": "assistant", "content": "  ", "tool_calls": []}, "messages[1].content", "empty assistant turn"),
    ({"role": "assistant", "content": "A", "tool_calls": [{"function": {"name": "f", "arguments": "\ud800"}}]},
     "messages[1].tool_calls[0].function.arguments", "a string that is not valid JSON"),
])
def test_malformed_fields_name_row_and_field(message, field, problem):
    error = error_of({"messages": [{"role": "user", "content": "q"}, message]})
    assert error.field == field
    assert problem in str(error)


def test_reasoning_on_a_user_turn_is_refused():
    error = error_of({"messages": [{"role": "user", "content": "q", "reasoning_content": "r"},
                                   {"role": "assistant", "content": "A"}]})
    assert (error.field, error.problem) == ("messages[0].reasoning_content",
                                            "reasoning_content belongs on assistant turns, not on a user turn")


def test_a_lone_surrogate_inside_tool_arguments_names_the_leaf():
    error = error_of({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                                   "tool_calls": [{"function": {"name": "f", "arguments": {"x": "\ud800"}}}]}]})
    assert error.field == "messages[1].tool_calls[0].function.arguments.x"
    assert "lone surrogate U+D800" in error.problem


def test_only_weight_zero_turns_is_nothing_to_score():
    error = error_of({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A", "weight": 0}]})
    assert error.field == "messages" and "no assistant turn" in error.problem


def test_bad_tools_value():
    assert error_of({"tools": "{not json", "messages": []}).field == "tools"
    assert error_of({"tools": [1], "messages": []}).field == "tools[0]"


def test_review_cases_are_row_errors_or_absent():
    """Keys with lone surrogates, a ShareGPT `from` that is not a string, and `tools` stored as "" (columnar data)."""
    bad_key = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": {"\ud800k": "v"}}}]}]}
    assert "lone surrogate" in error_of(bad_key).problem
    assert error_of({"conversations": [{"from": ["x"], "value": "a"}]}).field == "conversations[0].from"
    assert convert({"tools": "", "messages": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "A"}]}).tools is None


def test_flat_tool_call_keeps_its_id_outside_the_function():
    conversation = convert({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                            "tool_calls": [{"id": "c1", "name": "calc", "arguments": {}}]}]})
    assert conversation.messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "calc", "arguments": {}}, "id": "c1"}]
