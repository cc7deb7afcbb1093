"""Step 1b, normalise: one input record → one validated `Conversation`, exactly as the chat template will get it.

Accepted row shapes (checked in this order; `--column canonical=actual` renames input columns first):
- chat: `messages` (OpenAI/HF `{role, content, ...}`; ShareGPT `conversations` with `{from, value}` too), and an
  optional row-level `tools` list of function schemas (or that list as a JSON string)
- `prompt` / `completion` (strings, or TRL-style lists of messages)
- Alpaca: `instruction` / optional `input` / `output`
- OpenOrca: optional `system_prompt` / `question` / `response`

Contract of each message in `Conversation.messages` (what the template receives; nothing the input carries is
dropped: a key this module does not know is passed through unchanged, so a template that renders it renders it):
- `role`: one of `CHAT_ROLES`. ShareGPT `from` maps human → user, gpt → assistant, observation → tool, and
  `function_call` (LLaMA-Factory) → an assistant turn whose `tool_calls` is the JSON call in `value`.
- `content`: a string; or a list of text parts `{"type": "text", "text": str}` (a part of any other type is an
  error naming it); or None on an assistant turn that makes tool calls (the template gets "": transformers drops
  None-valued keys, which Qwen3's and DeepSeek's templates cannot render).
- `reasoning_content`: the turn's reasoning, a string, on assistant turns only. The input may spell it
  `reasoning_content`, `reasoning` or `thinking`; the tokenizer hands it to the template under the name the
  template reads. `<think>` blocks inside `content` are left where they are: the template decides what they mean.
- `tool_calls`: a non-empty list of `{"type": "function", "function": {"name": str, "arguments": dict}, ...}` on
  assistant turns. The flat form `{name, arguments}` is accepted, and OpenAI's JSON-string `arguments` are decoded
  to an object, the form transformers' templates expect. Other keys of a call (`id`) are kept.
- `weight`: 0 or 1 on assistant turns (OpenAI's fine-tuning format). 0 means context only: never scored, never
  trained.
Keys of a record or a message whose value is null are absent (columnar inputs fill the columns of other shapes with
nulls); so are `tools` and `tool_calls` given as "" or []. Nulls deeper inside (a tool call's fields, a part's) are
kept as they are.
Every conversation has at least one assistant turn with weight 1, and each such turn has content, reasoning or a
tool call. A record that breaks any of this raises `InputError` naming the source, the row and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from toss_filter.errors import InputError

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool", "function_call": "assistant"}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class Conversation:
    """One row: `messages` as described in the module docstring, and `tools` (function schemas passed to the
    template as `tools=`, prompt text, never scored) or None."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


def to_conversation(record: Mapping[str, Any], source: str, row: int,
                    columns: Mapping[str, str] | None = None) -> Conversation:
    """Normalise one record to a validated `Conversation` (see the module docstring for the shapes)."""
    if columns:
        renamed = {canonical: record[actual] for canonical, actual in columns.items() if actual in record}
        record = {k: v for k, v in record.items() if k not in columns and k not in columns.values()} | renamed
    record = {key: value for key, value in record.items() if value is not None}
    # Columnar datasets store "no tools" as "" or []: absent, like a null.
    tools = _tools(record["tools"], source, row) if record.get("tools") not in (None, "", []) else None
    if "messages" in record:
        return Conversation(_validate_messages(record["messages"], source, row, "messages"), tools)
    if "conversations" in record:
        return Conversation(_validate_messages(record["conversations"], source, row, "conversations"), tools)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            return Conversation(_validate_messages(prompt + completion, source, row, "prompt+completion"), tools)
        _require_str(prompt, source, row, "prompt")
        _require_str(completion, source, row, "completion")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return Conversation(_validate_messages(messages, source, row, "completion"), tools)
    if "instruction" in record and "output" in record:
        instruction, extra = record["instruction"], record.get("input") or ""
        _require_str(instruction, source, row, "instruction")
        _require_str(extra, source, row, "input")
        _require_str(record["output"], source, row, "output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        return Conversation(_validate_messages(messages, source, row, "output"), tools)
    if "question" in record and "response" in record:
        system = record.get("system_prompt") or ""
        for field in ("question", "response"):
            _require_str(record[field], source, row, field)
        _require_str(system, source, row, "system_prompt")
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages += [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["response"]}]
        return Conversation(_validate_messages(messages, source, row, "response"), tools)
    raise InputError(
        source, row, None,
        f"no known row shape in columns {sorted(record)}: expected messages, prompt+completion, "
        "instruction+output or question+response (rename columns with --column canonical=actual)",
    )


def _require_str(value: Any, source: str, row: int, field: str) -> None:
    if not isinstance(value, str):
        raise InputError(source, row, field, f"expected a string, got {type(value).__name__}")
    _require_unicode(value, source, row, field)


def _require_unicode(value: Any, source: str, row: int, field: str) -> None:
    """Refuse a lone surrogate (from a JSON escape such as `\\ud800` without its pair) in any string inside `value`:
    no tokenizer, Arrow column or UTF-8 file can hold it."""
    if isinstance(value, str):
        if not value.isascii() and (match := SURROGATE.search(value)):
            raise InputError(source, row, field, f"a lone surrogate U+{ord(match.group()):04X} at character "
                             f"{match.start()} (half of a UTF-16 pair, e.g. a JSON \\u{ord(match.group()):04x} escape "
                             "without its other half) is not valid Unicode text")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _require_unicode(key, source, row, f"{field} (a key)")
            _require_unicode(item, source, row, f"{field}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _require_unicode(item, source, row, f"{field}[{index}]")


def _json_value(value: Any, kind: type, source: str, row: int, field: str) -> Any:
    """`value`, or the JSON it holds when it is a string (datasets often store nested fields as JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise InputError(source, row, field, f"a string that is not valid JSON: {err}") from None
    if not isinstance(value, kind):
        raise InputError(source, row, field, f"expected {'a list' if kind is list else 'an object'}, "
                         f"got {type(value).__name__}")
    return value


def _tools(value: Any, source: str, row: int) -> list[dict[str, Any]] | None:
    tools = _json_value(value, list, source, row, "tools") if str(value).strip() else []
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise InputError(source, row, f"tools[{index}]", f"expected a function schema object, got {type(tool).__name__}")
    _require_unicode(tools, source, row, "tools")
    return [dict(tool) for tool in tools] or None


def _tool_calls(value: Any, source: str, row: int, where: str) -> list[dict[str, Any]]:
    calls = []
    for index, call in enumerate(_json_value(value, list, source, row, where)):
        at = f"{where}[{index}]"
        if not isinstance(call, Mapping):
            raise InputError(source, row, at, f"expected an object, got {type(call).__name__}")
        flat = "function" not in call
        function = {key: call[key] for key in ("name", "arguments") if key in call} if flat else call["function"]
        if not isinstance(function, Mapping):
            raise InputError(source, row, f"{at}.function", f"expected an object, got {type(function).__name__}")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(source, row, f"{at}.function.name", "a tool call needs a non-empty name")
        arguments = _json_value(function.get("arguments") or {}, dict, source, row, f"{at}.function.arguments")
        extra = {key: item for key, item in call.items() if key not in ("function", "name", "arguments", "type")}
        calls.append({"type": call.get("type", "function"), "function": {**function, "name": name, "arguments": arguments},
                      **extra})
    return calls


def _content(value: Any, source: str, row: int, where: str) -> str | list[dict[str, Any]] | None:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InputError(source, row, where, f"expected a string or a list of text parts, got {type(value).__name__}")
    for index, part in enumerate(value):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise InputError(source, row, f"{where}[{index}]", "expected a content part {\"type\": ..., ...}")
        if part["type"] != "text":
            raise InputError(source, row, f"{where}[{index}].type", f"a {part['type']!r} part: toss-filter scores "
                             "text only; drop the part or describe it in text")
        if not isinstance(part.get("text"), str):
            raise InputError(source, row, f"{where}[{index}].text", "expected a string")
    return [dict(part) for part in value]


def content_text(content: str | list[dict[str, Any]] | None) -> str:
    """The text of a content: the string, or its text parts joined (what a template without part support gets)."""
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content or ""


def _normalise_message(message: Any, source: str, row: int, where: str) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise InputError(source, row, where, f"expected an object with role and content, got {type(message).__name__}")
    message = {key: value for key, value in message.items() if value is not None}
    if "role" in message:
        role, content = message.pop("role"), message.pop("content", None)
    elif "from" in message:
        sender, content = message.pop("from"), message.pop("value", None)
        if not isinstance(sender, str):
            raise InputError(source, row, f"{where}.from", f"expected a string, got {type(sender).__name__}")
        role = SHAREGPT_ROLES.get(sender, sender)
        if sender == "function_call":
            message["tool_calls"], content = [_json_value(content, dict, source, row, f"{where}.value")], None
    else:
        raise InputError(source, row, where, "missing 'role'")
    if role not in CHAT_ROLES:
        raise InputError(source, row, f"{where}.role",
                         f"unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
    normalised: dict[str, Any] = {"role": role, "content": _content(content, source, row, f"{where}.content")}
    spellings = [key for key in REASONING_KEYS if key in message]
    if len(spellings) > 1:
        raise InputError(source, row, f"{where}.{spellings[1]}", f"two reasoning fields, {' and '.join(spellings)}: keep one")
    for key, value in message.items():
        if key in REASONING_KEYS:
            _require_str(value, source, row, f"{where}.{key}")
            normalised["reasoning_content"] = value
        elif key == "tool_calls":
            if value:  # an empty list renders as no calls in every template, like an absent key
                normalised["tool_calls"] = _tool_calls(value, source, row, f"{where}.tool_calls")
        elif key == "weight":
            if isinstance(value, bool) or value not in (0, 1):
                raise InputError(source, row, f"{where}.weight", f"expected 0 or 1, got {value!r}")
            normalised["weight"] = int(value)
        else:
            normalised[key] = value
    for key in ("reasoning_content", "tool_calls", "weight"):
        if key in normalised and role != "assistant":
            raise InputError(source, row, f"{where}.{key}", f"{key} belongs on assistant turns, not on a {role} turn")
    if normalised["content"] is None and not (role == "assistant" and "tool_calls" in normalised):
        raise InputError(source, row, f"{where}.content", "expected a string, got NoneType")
    _require_unicode(normalised, source, row, where)
    return normalised


def trainable(message: Mapping[str, Any]) -> bool:
    """Whether a normalised message is an assistant turn to score and train (not `weight: 0`)."""
    return message["role"] == "assistant" and message.get("weight", 1) == 1


def _validate_messages(messages: Any, source: str, row: int, field: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InputError(source, row, field, "expected a non-empty list of messages")
    normalised = [_normalise_message(message, source, row, f"{field}[{turn}]") for turn, message in enumerate(messages)]
    for turn, message in enumerate(normalised):
        if trainable(message) and not (content_text(message["content"]).strip() or message.get("tool_calls")
                                       or message.get("reasoning_content", "").strip()):
            raise InputError(source, row, f"{field}[{turn}].content", "empty assistant turn")
    if not any(trainable(message) for message in normalised):
        raise InputError(source, row, field, "no assistant turn: nothing to score")
    return normalised
