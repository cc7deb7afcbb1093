"""Step 2, tokenize: the ONE place that turns chat messages into `input_ids` and response labels.

`filter`, `score` and any later training step all call `tokenize_conversation`, so the tokens that are scored are
exactly the tokens a trainer sees.

Contract of `Tokenized` for one conversation:
- `input_ids[j]` is what a trainer using the same template would feed the model at position j.
- `labels[j] == input_ids[j]` when token j is a response token, else -100. Response tokens are the tokens of
  each assistant turn's content plus the end-of-turn special token that closes the turn (e.g. `<|im_end|>`,
  `<|eot_id|>`, `</s>`), with any whitespace between the two. A token that straddles the boundary between
  prompt and response (" Sure" after "Assistant:") counts as a response token.

How responses are found: the conversation is rendered twice, once as is and once with every content replaced by a
unique sentinel. The sentinel rendering is the template's own text with the exact slot of each content, so walking
the two renderings together gives each response's character span (see `response_char_spans`). The text is then
tokenised once with offsets, and a token is a response token if its characters overlap a response span.

Why character offsets: the authors tokenised the prompt on its own and masked that many tokens. When the last
prompt character merges with the first response character into one token, that mask is one token too long and
the first response token is never scored or trained. Classifying each token of one tokenisation by its character
span means merges cannot shift the boundary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from toss_filter.data.load import MAX_ROW_BYTES_ENV, Message, max_row_bytes
from toss_filter.errors import ConfigError, InputError

# The authors' format ("Human: {prompt}\nAssistant: {response} {eos}", contents stripped, system as
# "<|system|>\n...\n"), written as a chat template so it goes through the same rendering and masking path.
PAPER_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] | trim }}\n"
    "{% elif message['role'] == 'user' %}{% if not loop.first and loop.previtem['role'] == 'assistant' %}{{ '\\n' }}{% endif %}Human: {{ message['content'] | trim }}\n"
    "{% else %}Assistant: {{ message['content'] | trim }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ChatFormat:
    """How conversations become text.

    `add_special_tokens` is False for chat templates, which write BOS themselves, and True for the paper template,
    which the authors tokenised with the tokenizer's default special tokens (BOS on Llama).
    """

    name: str
    template: str
    add_special_tokens: bool


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def resolve_format(tokenizer: PreTrainedTokenizerBase, template: str = "chat") -> ChatFormat:
    """`chat` (the tokenizer's own chat template), `paper`, or a path to a Jinja chat-template file."""
    if template == "chat":
        if not tokenizer.chat_template:
            raise ConfigError("the tokenizer has no chat template: use --template paper or --template FILE.jinja")
        return ChatFormat("chat", tokenizer.chat_template, add_special_tokens=False)
    if template == "paper":
        return ChatFormat("paper", PAPER_TEMPLATE, add_special_tokens=True)
    path = Path(template)
    if not path.is_file():
        raise ConfigError(f"--template must be chat, paper or a Jinja file; {template!r} is none of these")
    return ChatFormat(f"file:{path.name}", path.read_text(encoding="utf-8"), add_special_tokens=False)


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    if not tokenizer.is_fast:
        raise ConfigError("a fast (Rust) tokenizer is required: response tokens are found from character offsets")


def _special_token_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return sorted((s for s in specials if s), key=len, reverse=True)


SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template or tokenizer touches them


def _sentinel(index: int) -> str:
    return f"\ue000{index}\ue001"


def response_char_spans(text: str, skeleton: str, messages: list[Message], special_tokens: list[str]) -> list[tuple[int, int]] | None:
    """Character spans of the response part of each assistant turn in the rendered `text`.

    `skeleton` is the same conversation rendered with each content replaced by a unique sentinel, so it holds the
    template's own text and, exactly, where each content goes. Walking both strings together pins every content
    to its place: a short answer ("A") cannot be matched inside a role header, and a response quoted in a user
    turn cannot be taken for the real one. A template may trim contents, so each content is matched verbatim or
    stripped, whichever makes the template text that follows line up. Returns None if the two renderings cannot
    be aligned (a template whose text depends on the content itself).
    """
    cursor, skeleton_cursor, spans = 0, 0, []
    placed = list(SENTINEL.finditer(skeleton))
    for index, match in enumerate(placed):
        before = skeleton[skeleton_cursor:match.start()]
        after = skeleton[match.end():placed[index + 1].start() if index + 1 < len(placed) else len(skeleton)]
        if not text.startswith(before, cursor):
            return None
        cursor += len(before)
        message = messages[int(match.group(1))]
        content = message["content"]
        for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if text.startswith(candidate, cursor) and text.startswith(after, cursor + len(candidate)):
                break
        else:
            return None
        if message["role"] == "assistant":
            end = cursor + len(candidate)
            spans.append((cursor, _end_of_turn(text, end, end + len(after), special_tokens)))
        cursor += len(candidate)
        skeleton_cursor = match.end()
    return spans if text[cursor:] == skeleton[skeleton_cursor:] else None


def _end_of_turn(text: str, content_end: int, limit: int, special_tokens: list[str]) -> int:
    """Extend a response span over the special token that closes the turn, if only whitespace comes before it."""
    gap = text[content_end:limit]
    stripped = gap.lstrip()
    for token in special_tokens:
        if stripped.startswith(token):
            return content_end + (len(gap) - len(stripped)) + len(token)
    return content_end


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def tokenize_conversation(
    messages: list[Message],
    tokenizer: PreTrainedTokenizerBase,
    chat_format: ChatFormat,
    max_length: int | None = None,
    *,
    source: str = "<input>",
    row: int = 0,
    special_tokens: list[str] | None = None,
) -> Tokenized:
    """Render, tokenise and label one conversation (see the module docstring for the contract).

    A conversation longer than `max_row_bytes()` characters is refused (an `InputError`) before it is rendered:
    it is tokenised whole before `max_length` truncates it, so its size must stay bounded. A template that
    refuses the conversation (its own `raise_exception`, or any Jinja error while rendering) is an `InputError`
    naming the row and the template's message; a template that does not compile is a `ConfigError`."""
    limit = max_row_bytes()

    def refuse_if_long(length: int) -> None:
        if length > limit:
            raise InputError(source, row, "messages", f"the conversation is {length:,} characters long, over the "
                             f"limit of {limit:,} on one row: shorten or split it, or raise the limit with "
                             f"{MAX_ROW_BYTES_ENV}=N")

    def render(conversation: list[Message]) -> str:
        try:
            return tokenizer.apply_chat_template(conversation, chat_template=chat_format.template, tokenize=False)
        except jinja2.TemplateSyntaxError as err:
            raise ConfigError(f"the {chat_format.name} template does not compile: {_one_line(err)}") from None
        except jinja2.TemplateError as err:
            raise InputError(source, row, "messages",
                             f"the {chat_format.name} template refused this conversation: {_one_line(err)}") from None

    refuse_if_long(sum(len(message["content"]) for message in messages))
    text = render(messages)
    refuse_if_long(len(text))
    skeleton = render([{**message, "content": _sentinel(i)} for i, message in enumerate(messages)])
    spans = response_char_spans(text, skeleton, messages, special_tokens or _special_token_strings(tokenizer))
    if spans is None:
        raise InputError(source, row, "messages",
                         f"the {chat_format.name} template renders this conversation in a way that depends on its "
                         "content, so response tokens cannot be located exactly; use --template paper or a Jinja file")
    encoding = tokenizer(text, add_special_tokens=chat_format.add_special_tokens, return_offsets_mapping=True)
    input_ids, labels = list(encoding["input_ids"]), [IGNORE_INDEX] * len(encoding["input_ids"])
    span_index = 0
    for j, (start, end) in enumerate(encoding["offset_mapping"]):
        if end <= start:  # tokens added by the tokenizer itself (BOS) cover no characters
            continue
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index < len(spans) and start < spans[span_index][1] and end > spans[span_index][0]:
            labels[j] = input_ids[j]
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Tokenized(input_ids, labels, truncated)


class ConversationTokenizer:
    """`tokenize_conversation` bound to one tokenizer, format and max length, for many rows."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat, max_length: int | None = None):
        check_tokenizer(tokenizer)
        self.tokenizer, self.chat_format, self.max_length = tokenizer, chat_format, max_length
        self.special_tokens = _special_token_strings(tokenizer)

    def __call__(self, messages: list[Message], source: str = "<input>", row: int = 0) -> Tokenized:
        return tokenize_conversation(
            messages, self.tokenizer, self.chat_format, self.max_length,
            source=source, row=row, special_tokens=self.special_tokens,
        )


def tokenize_rows(conversations: Iterable[tuple[int, list[Message]]], encode: ConversationTokenizer,
                  source: str) -> pa.Table:
    """Every conversation as one table row, in input order.

    Columns: `row` (int64, the input row index), `input_ids` and `labels` (list<int32>, see `Tokenized`),
    `truncated` (bool).
    """
    rows, input_ids, labels, truncated = [], [], [], []
    for row, messages in conversations:
        tokens = encode(messages, source, row)
        rows.append(row)
        input_ids.append(tokens.input_ids)
        labels.append(tokens.labels)
        truncated.append(tokens.truncated)
    return pa.table({
        "row": pa.array(rows, pa.int64()),
        "input_ids": pa.array(input_ids, pa.list_(pa.int32())),
        "labels": pa.array(labels, pa.list_(pa.int32())),
        "truncated": pa.array(truncated, pa.bool_()),
    })
