"""Step 2, tokenize: the ONE place that turns a conversation into `input_ids` and response labels.

`filter`, `score`, `train-ref` and `inspect` all call `ConversationTokenizer`, so the tokens that are scored are
exactly the tokens a trainer sees.

Contract of `Tokenized` for one `Conversation` (`toss_filter.data.conversation`):
- `input_ids` equal `tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)` for a chat template (the
  rendered text tokenised without added special tokens, so BOS appears once, where the template writes it); the
  paper template is tokenised with the tokenizer's special tokens, as the authors did.
- `labels[j] == input_ids[j]` when token j is a response token, else -100. The response of an assistant turn is
  everything the model generates in it: from the end of the template's generation prompt (what
  `add_generation_prompt=True` appends, e.g. `<|im_start|>assistant\\n`) to the special token that closes the
  turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`, `<|call|>`, ...), both included. So the turn's
  content, its reasoning, its tool calls, and the template's own markers between them that the model emits
  (`<think>` tags, a `<tool_call>` wrapper, a channel header) are response. System, user and tool turns, the tool
  schemas, the generation prompt and the text between turns are prompt. A template without a generation prompt
  prompts with the conversation before the turn, so the response starts where that rendering ends when what
  follows it, up to the turn's first field, is whitespace (Mistral-7B-v0.1's and Llama-2's `[/INST] ` + answer:
  the model generates the space, `▁` on SentencePiece) or when it ends on a special token (Mistral-Nemo's
  `[/INST]`); else (the paper template, whose `Assistant: ` is prompt) where the turn's first rendered field
  starts. A turn with `weight: 0` is prompt. A token that straddles a boundary (" Sure" after "Assistant:") is a
  response token.
- `unscored`: positions of response tokens that are trained but not scored, the tokens of reasoning when
  `score_reasoning=False` (reasoning fields, and whole `<think>...</think>` blocks, tags included); else empty.
- `truncated`: the conversation was longer than `max_length` and was cut to it.

How responses are found: the conversation is rendered twice, once as is and once with the text of every field
(contents, text parts, reasoning, tool-call names and string arguments) replaced by a unique sentinel, keeping
the field's outer whitespace and any special-token or `<think>`-like marker inside it, so that a template that
trims, strips newlines, splits reasoning out of content or checks a prefix does the same to both. The sentinel
rendering is the template's own text with the exact slot of each field; walking the two renderings together
gives every field's character span. Each trainable turn's response then runs from the generation prompt found
in the template text before its first field to the first closing special token in the template text after its
last field. The text is tokenised once with offsets, and a token is a response token if its characters overlap
a response span. A template that rewrites a field's text (upper-casing it, say) cannot be located exactly and is
refused, saying which field and what the template did. A field the template does not render at all is refused
too (the trainer would silently lose it), except the reasoning of earlier turns that a template drops by design
(Qwen3 renders reasoning only after the last user turn); `Tokenized.dropped_reasoning` counts those turns.

Why character offsets: the authors tokenised the prompt on its own and masked that many tokens. When the last
prompt character merges with the first response character into one token, that mask is one token too long and
the first response token is never scored or trained. Classifying each token of one tokenisation by its character
span means merges cannot shift the boundary.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from toss_filter.data.conversation import Conversation, content_text, to_conversation, trainable
from toss_filter.data.load import MAX_ROW_BYTES_ENV, max_row_bytes
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
REASONING_NAMES = ("reasoning_content", "thinking", "reasoning")
# Text a template may test content for (Qwen3 splits reasoning at </think> and finds tool results by their tag),
# kept verbatim in the sentinel rendering. Special tokens inside content are not among them: they are text of the
# turn, and a template that tested for them could not tell a turn's end from its content either.
MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
MARKER = re.compile("(" + "|".join(map(re.escape, MARKERS)) + ")")
SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template or tokenizer touches them
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class ChatFormat:
    """How conversations become text.

    `add_special_tokens` is False for chat templates, which write BOS themselves, and True for the paper template,
    which the authors tokenised with the tokenizer's default special tokens (BOS on Llama).
    """

    name: str
    template: str
    add_special_tokens: bool

    @cached_property
    def reasoning_name(self) -> str | None:
        """The message key the template reads reasoning from, or None if it reads none."""
        return next((name for name in REASONING_NAMES
                     if re.search(rf"\.{name}\b|\[\s*['\"]{name}['\"]\s*\]", self.template)), None)

    @cached_property
    def handles_think(self) -> bool:
        """Whether the template mentions `</think>`: it splits `<think>` blocks out of content, or deletes them."""
        return "</think>" in self.template

    @cached_property
    def arguments_as_text(self) -> bool:
        """Whether the template concatenates tool-call arguments as a JSON string (DeepSeek-V3) instead of
        rendering the object (`| tojson`, what transformers documents and most templates do)."""
        return bool(re.search(r"\[\s*['\"]arguments['\"]\s*\]\s*\+|\.arguments\s*\+|\+\s*\S*\.arguments\b|"
                              r"\+\s*\S*\[\s*['\"]arguments['\"]\s*\]", self.template))

    @cached_property
    def has_generation_markers(self) -> bool:
        return bool(GENERATION_BLOCK.search(self.template))


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    unscored: list[int] = field(default_factory=list)
    dropped_reasoning: int = 0

    @property
    def scored(self) -> list[bool]:
        """Per token: whether its NLL is scored (a response token that is not in `unscored`)."""
        skip = set(self.unscored)
        return [label != IGNORE_INDEX and j not in skip for j, label in enumerate(self.labels)]


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


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _sentinel(index: int) -> str:
    return f"\ue000{index}\ue001"


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = next((i for i in range(n) if a[i] != b[i]), n)
    return i


@dataclass
class _Field:
    """One sentinel: the text `core` of a field of message `message`, with the markers and whitespace of the value
    before (`head`) and after (`tail`) it when it is the value's first or last piece."""

    message: int
    path: str
    reasoning: bool
    core: str
    head: str = ""
    tail: str = ""


class _Skeleton:
    """The conversation with every field's text replaced by a sentinel, and what each sentinel stands for."""

    def __init__(self, messages: list[dict[str, Any]]):
        self.fields: list[_Field] = []
        self.messages = [self._message(i, message) for i, message in enumerate(messages)]

    def _message(self, index: int, message: dict[str, Any]) -> dict[str, Any]:
        out = dict(message)
        where = f"messages[{index}]"
        content = message.get("content")
        if isinstance(content, str):
            out["content"] = self._text(content, index, f"{where}.content", False)
        elif isinstance(content, list):
            out["content"] = [{**part, "text": self._text(part["text"], index, f"{where}.content[{k}].text", False)}
                              if part.get("type") == "text" else part for k, part in enumerate(content)]
        for name in REASONING_NAMES:
            if isinstance(message.get(name), str):
                out[name] = self._text(message[name], index, f"{where}.{name}", True)
        if message.get("tool_calls"):
            out["tool_calls"] = [self._tool_call(call, index, f"{where}.tool_calls[{k}]")
                                 for k, call in enumerate(message["tool_calls"])]
        return out

    def _tool_call(self, call: dict[str, Any], index: int, where: str) -> dict[str, Any]:
        function = call["function"]
        return {**call, "function": {**function, "name": self._text(function["name"], index, f"{where}.function.name", False),
                                     "arguments": self._leaves(function["arguments"], index, f"{where}.function.arguments")}}

    def _leaves(self, value: Any, index: int, where: str) -> Any:
        if isinstance(value, str):
            return self._text(value, index, where, False)
        if isinstance(value, dict):
            return {key: self._leaves(item, index, f"{where}.{key}") for key, item in value.items()}
        if isinstance(value, list):
            return [self._leaves(item, index, f"{where}[{k}]") for k, item in enumerate(value)]
        return value

    def _text(self, value: str, index: int, where: str, reasoning: bool) -> str:
        """`value` with each text piece between markers replaced by a sentinel, outer whitespace and markers kept.
        Pieces inside `<think>...</think>`, and any before a `</think>` (DeepSeek-R1's outputs open the block in
        the prompt; Qwen3 and DeepSeek templates cut content at the last `</think>`), count as reasoning. A value
        made of markers only is one piece."""
        pieces = MARKER.split(value)
        if value.strip() and not any(piece.strip() for piece in pieces[::2]):
            pieces = [value]
        closes = [False] * len(pieces)  # whether a </think> comes after piece k: templates treat what is before as reasoning
        for k in range(len(pieces) - 2, -1, -1):
            closes[k] = pieces[k + 1] == "</think>" or closes[k + 1]
        out, position, first, in_think, tail_start = [], 0, None, reasoning, None
        for k, piece in enumerate(pieces):
            position += len(piece)
            core = piece.strip()
            if k % 2 or not core:
                out.append(piece)
                in_think = True if piece == "<think>" else False if piece == "</think>" else in_think
                continue
            lead = piece[:len(piece) - len(piece.lstrip())]
            self.fields.append(_Field(index, where, reasoning or in_think or closes[k], core))
            if first is None:
                first = self.fields[-1]
                first.head = value[:position - len(piece) + len(lead)]
            tail_start = position - len(piece) + len(lead) + len(core)
            out.append(lead + _sentinel(len(self.fields) - 1) + piece[len(lead) + len(core):])
        if tail_start is not None:
            self.fields[-1].tail = value[tail_start:]
        return "".join(out)


class ConversationTokenizer:
    """Tokenizes conversations for one tokenizer, format and max length (see the module docstring's contract).

    A conversation longer than `max_row_bytes()` characters is refused (an `InputError`) before it is rendered: it
    is tokenised whole before `max_length` truncates it, so its size must stay bounded. A template that refuses the
    conversation (its own `raise_exception`, or any Jinja error while rendering) is an `InputError` naming the row
    and the template's message; a template that does not compile is a `ConfigError`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat, max_length: int | None = None,
                 score_reasoning: bool = True):
        check_tokenizer(tokenizer)
        self.tokenizer, self.chat_format, self.max_length = tokenizer, chat_format, max_length
        self.score_reasoning = score_reasoning
        self.special_tokens = _special_token_strings(tokenizer)
        self.special_pattern = re.compile("|".join(map(re.escape, self.special_tokens)) or "(?!)")
        added = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.content), key=len, reverse=True)
        self.added_pattern = re.compile("|".join(map(re.escape, added)) or "(?!)")  # DeepSeek's <｜Assistant｜> is not special
        probe = _Row(self, Conversation([{"role": "user", "content": _sentinel(0)},
                                         {"role": "assistant", "content": _sentinel(1)}]), "<probe>", 0)
        self.non_closing_tokens = probe.non_closing_tokens()
        self.accepts_content_parts = probe.accepts_content_parts()

    def __call__(self, conversation: Conversation | list[dict[str, Any]], source: str = "<input>",
                 row: int = 0) -> Tokenized:
        if not isinstance(conversation, Conversation):
            conversation = to_conversation({"messages": list(conversation)}, source, row)
        return _Row(self, conversation, source, row).tokenize()


class _Row:
    """The work of tokenizing one conversation."""

    def __init__(self, encode: ConversationTokenizer, conversation: Conversation, source: str, row: int):
        self.encode, self.source, self.row = encode, source, row
        self.format = encode.chat_format
        self.tools = conversation.tools
        self.messages = [self._for_template(message) for message in conversation.messages]
        self.endings: dict[str, str] = {}

    def _for_template(self, message: dict[str, Any]) -> dict[str, Any]:
        """The message as this template reads it: arguments as text for a template that concatenates them, parts
        joined for one that does not walk them, reasoning under the name it reads."""
        out = dict(message)
        if self.format.arguments_as_text and "tool_calls" in out:
            out["tool_calls"] = [{**call, "function": {**call["function"], "arguments": json.dumps(
                call["function"]["arguments"], ensure_ascii=False)}} for call in out["tool_calls"]]
        if isinstance(out.get("content"), list) and not self.encode.accepts_content_parts:
            out["content"] = content_text(out["content"])
        if out.get("content") is None:
            out["content"] = ""  # transformers drops None-valued keys, and Qwen3's or DeepSeek's template then fails
        if "reasoning_content" in out and self.format.reasoning_name not in (None, "reasoning_content"):
            out[self.format.reasoning_name] = out.pop("reasoning_content")
        return out

    def error(self, problem: str, field: str = "messages") -> InputError:
        return InputError(self.source, self.row, field, problem)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        try:
            return self.encode.tokenizer.apply_chat_template(
                messages, tools=self.tools, chat_template=self.format.template, tokenize=False,
                add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateSyntaxError as err:
            raise ConfigError(f"the {self.format.name} template does not compile: {_one_line(err)}") from None
        except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError) as err:
            raise self.error(f"the {self.format.name} template refused this conversation: {_one_line(err)}") from None

    def refuse_if_long(self, length: int) -> None:
        limit = max_row_bytes()
        if length > limit:
            raise self.error(f"the conversation is {length:,} characters long, over the limit of {limit:,} on one "
                             f"row: shorten or split it, or raise the limit with {MAX_ROW_BYTES_ENV}=N")

    def tokenize(self) -> Tokenized:
        self.refuse_if_long(_text_length(self.tools) + sum(_text_length(value) for m in self.messages
                                                         for key, value in m.items() if key != "role"))
        text = self.render(self.messages)
        self.refuse_if_long(len(text))
        skeleton = _Skeleton(self.messages)
        spans = self.field_spans(text, self.render(skeleton.messages), skeleton.fields)
        dropped = self.check_rendered(skeleton.fields, spans)
        responses = self.response_spans(text, skeleton, spans)
        reasoning = [] if self.encode.score_reasoning else self.reasoning_spans(text, skeleton, spans, responses)
        encoding = self.encode.tokenizer(text, add_special_tokens=self.format.add_special_tokens,
                                         return_offsets_mapping=True)
        input_ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
        in_response = _overlaps(offsets, responses)
        labels = [token if inside else IGNORE_INDEX for token, inside in zip(input_ids, in_response)]
        unscored = [j for j, inside in enumerate(_overlaps(offsets, reasoning)) if inside and in_response[j]]
        if self.format.has_generation_markers:
            self.check_generation_markers(input_ids, in_response)
        truncated = self.encode.max_length is not None and len(input_ids) > self.encode.max_length
        if truncated:
            n = self.encode.max_length
            input_ids, labels, unscored = input_ids[:n], labels[:n], [j for j in unscored if j < n]
        return Tokenized(input_ids, labels, truncated, unscored, dropped)

    def reasoning_spans(self, text: str, skeleton: _Skeleton, spans: list[list[tuple[int, int]]],
                        responses: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """What `--no-score-reasoning` leaves unscored: the reasoning fields of trainable turns, and every
        `<think>...</think>` block in a response with the whitespace after it, tags included (Qwen3 writes an empty
        one into turns without reasoning: it is reasoning markup, not the answer)."""
        fields = [span for f, found in zip(skeleton.fields, spans) if f.reasoning
                  and trainable(self.messages[f.message]) for span in found]
        blocks = [match.span() for start, end in responses for match in THINK_BLOCK.finditer(text, start, end)]
        merged: list[tuple[int, int]] = []
        for start, end in sorted(fields + blocks):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def field_spans(self, text: str, skeleton: str, fields: list[_Field]) -> list[list[tuple[int, int]]]:
        """Every field's character spans in `text` (a template may render a field twice, or not at all), found by
        walking `text` and the sentinel rendering `skeleton` together."""
        spans: list[list[tuple[int, int]]] = [[] for _ in fields]
        cursor, skeleton_cursor = 0, 0
        placed = list(SENTINEL.finditer(skeleton))
        for k, match in enumerate(placed):
            before = skeleton[skeleton_cursor:match.start()]
            after = skeleton[match.end():placed[k + 1].start() if k + 1 < len(placed) else len(skeleton)]
            if not text.startswith(before, cursor):
                raise self.transformed_error(text, cursor, before, fields, placed, k)
            cursor += len(before)
            f = fields[int(match.group(1))]
            # A field rendered through `tojson` appears JSON-escaped.
            for candidate in dict.fromkeys((f.core, json.dumps(f.core, ensure_ascii=False)[1:-1], json.dumps(f.core)[1:-1])):
                if text.startswith(candidate, cursor) and text.startswith(after, cursor + len(candidate)):
                    break
            else:
                raise self.error(f"the {self.format.name} template rewrites the text of {f.path} (at character "
                                 f"{cursor} it renders {_excerpt(text[cursor:])} where the field reads "
                                 f"{_excerpt(f.core)}), so its tokens cannot be located exactly; use a template that "
                                 "renders fields verbatim (--template FILE.jinja)", f.path)
            spans[int(match.group(1))].append((cursor, cursor + len(candidate)))
            cursor += len(candidate)
            skeleton_cursor = match.end()
        if text[cursor:] != skeleton[skeleton_cursor:]:
            raise self.transformed_error(text, cursor, skeleton[skeleton_cursor:], fields, placed, len(placed))
        return spans

    def transformed_error(self, text: str, cursor: int, expected: str, fields: list[_Field], placed: list[re.Match[str]],
                    k: int) -> InputError:
        """The error for a template whose own text depends on a field's content."""
        at = cursor + _common_prefix(text[cursor:], expected)
        near = fields[int(placed[k - 1].group(1))].path if k else "the start"
        return self.error(f"the {self.format.name} template renders this conversation in a way that depends on "
                          f"its content: after {near}, at character {at}, it renders {_excerpt(text[at:])} where the "
                          f"same conversation with other text renders {_excerpt(expected[at - cursor:])}; response "
                          "tokens cannot be located exactly (use --template paper or a Jinja file)")

    def check_rendered(self, fields: list[_Field], spans: list[list[tuple[int, int]]]) -> int:
        """Refuse a field the template does not render; return how many turns' reasoning it dropped by design."""
        missing = [f for f, found in zip(fields, spans) if not found]
        reasoning_dropped = {f.message for f in missing if f.reasoning}
        for f in missing:
            if not f.reasoning:
                raise self.error(f"the {self.format.name} template does not render {f.path}: a trainer using it "
                                 "would never see it; remove the field or use a template that renders it", f.path)
        if not reasoning_dropped:
            return 0
        assistant = [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]
        rendered = {f.message for f, found in zip(fields, spans) if f.reasoning and found}
        if assistant[-1] in reasoning_dropped or not (rendered or self.format.reasoning_name or self.format.handles_think):
            path = next(f.path for f in missing if f.reasoning and f.message == max(reasoning_dropped))
            raise self.error(f"the {self.format.name} template does not render the reasoning in {path} "
                             f"({'it deletes reasoning from every turn, as DeepSeek-R1 does' if self.format.handles_think else 'it reads no reasoning field'}): "
                             "a trainer using it would never see it; drop the reasoning or use a template that "
                             "renders it", path)
        return len(reasoning_dropped)  # earlier turns only: the template keeps reasoning for the last turns

    def response_spans(self, text: str, skeleton: _Skeleton, spans: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
        # A field the template renders again later (gpt-oss names the called tool in the result's header) is
        # generated where it first appears.
        placed = sorted((found[0][0], found[0][1], f.message, f) for f, found in zip(skeleton.fields, spans) if found)
        starts, ends = [p[0] for p in placed], [p[1] for p in placed]
        by_message: dict[int, list[int]] = {}
        for k, p in enumerate(placed):
            by_message.setdefault(p[2], []).append(k)
        not_closing = self.encode.non_closing_tokens
        responses, prompts = [], {}
        for index, message in enumerate(self.messages):
            mine = by_message.get(index, []) if trainable(message) else []
            if not mine:
                continue  # a turn whose only field is reasoning the template drops: nothing of it is generated
            own = [(self.extend_head(text, placed[k][0], placed[k][3]), self.extend_tail(text, placed[k][1], placed[k][3]))
                   for k in mine]
            first, last = own[0][0], max(e for _, e in own)
            gap_start = ends[mine[0] - 1] if mine[0] else 0
            # The generation prompt may end inside the markers a content opens with (DeepSeek-R1 prompts `<think>`).
            own_start = placed[mine[0]][0]
            # The generation prompt follows from the message before the turn: computed once per role of it, so a
            # long conversation is not rendered again for every turn.
            previous = skeleton.messages[index - 1]["role"] if index else ""
            if previous not in prompts:
                prompts[previous] = self.generation_prompt(skeleton.messages[:index])
            prompt = prompts[previous]
            start = self.response_start(text, gap_start, own_start, prompt, skeleton.messages[:index])
            following = bisect.bisect_left(starts, last)
            limit = starts[following] if following < len(starts) else len(text)
            responses.append((first if start is None else start, self.response_end(text, last, limit, not_closing)))
        return responses

    def generation_prompt(self, messages: list[dict[str, Any]]) -> str:
        """What `add_generation_prompt=True` appends after `messages` ("" for a template without one)."""
        try:
            with_prompt, without = self.render(messages, True), self.render(messages)
        except InputError:  # a template that refuses this prefix (e.g. an empty conversation) has no prompt here
            return ""
        return with_prompt[_common_prefix(with_prompt, without):]

    def non_closing_tokens(self) -> set[str]:
        """Special tokens that open an assistant turn (in its generation prompt) or mark its parts before the
        content (gpt-oss's `<|channel|>`, `<|message|>`), from this one-turn probe row: none of them closes a turn."""
        try:
            prompt, rendered = self.generation_prompt(self.messages[:1]), self.render(self.messages)
        except InputError:
            return set()
        start = rendered.find(prompt, rendered.find(_sentinel(0))) if prompt else -1
        turn = prompt + rendered[start + len(prompt):rendered.find(_sentinel(1))] if start >= 0 else ""
        return {token for token in self.encode.special_tokens if token in turn}

    def accepts_content_parts(self) -> bool:
        """Whether the template walks a list of content parts (Gemma-3), from this probe row's texts as parts: one
        that prints the list, or fails on it, gets the parts' text joined instead."""
        parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in self.messages]
        try:
            rendered = self.render(parts)
        except InputError:
            return False
        return _sentinel(0) in rendered and _sentinel(1) in rendered and "'text'" not in rendered

    @staticmethod
    def extend_head(text: str, start: int, f: _Field) -> int:
        """Move a field's start back over the markers the value opens with (`<think>`), when rendered there."""
        head = f.head.lstrip()
        return start - len(head) if head.strip() and text.startswith(head, start - len(head)) else start

    @staticmethod
    def extend_tail(text: str, end: int, f: _Field) -> int:
        tail = f.tail.rstrip()
        return end + len(tail) if tail.strip() and text.startswith(tail, end) else end

    def response_start(self, text: str, gap_start: int, limit: int, prompt: str,
                       before: list[dict[str, Any]]) -> int | None:
        """Where the model starts generating: after the generation prompt in the template text before the turn's
        first field (or the longest start of it that is there, down to its leading added token: DeepSeek-R1
        prompts `<｜Assistant｜><think>\\n`, and a training row without reasoning has no `<think>`). A template without a generation prompt starts the turn where the
        rendering of the messages `before` it ends, when that ends on a special token (Mistral-Nemo's `[/INST]`, so
        a `[TOOL_CALLS]` header is response) or only whitespace follows it up to the turn's first field (Mistral
        v0.1's `[/INST] `: SentencePiece writes that space as a token of the answer, or alone before a digit or a
        newline). None: at the turn's first field (the paper template)."""
        leading = self.encode.added_pattern.match(prompt)
        for length in range(len(prompt), leading.end() - 1 if leading else len(prompt) - 1, -1):
            found = text.rfind(prompt[:length], gap_start, limit)
            if length and found >= 0:
                return found + length
        if not before:
            return None
        ending = self.endings.get(before[-1]["role"])
        if ending is None or not text.startswith(ending, gap_start):
            ending = self.prompt_ending(before)
        if ending is None or not text.startswith(ending, gap_start):
            return None
        end = gap_start + len(ending)
        if self.encode.special_pattern.search(ending) or not text[end:limit].strip():
            return min(end, limit)
        return None

    def prompt_ending(self, before: list[dict[str, Any]]) -> str | None:
        """The template text that ends the rendering of `before` after its last field. Remembered by the last
        message's role (`response_start` tries it first, so a long conversation is not rendered again for every
        turn)."""
        try:
            rendered = self.render(before)
        except InputError:  # a template that refuses this prefix gives no ending here
            return None
        placed = list(SENTINEL.finditer(rendered))
        ending = rendered[placed[-1].end():] if placed else rendered
        self.endings[before[-1]["role"]] = ending
        return ending

    def response_end(self, text: str, last: int, limit: int, not_closing: set[str]) -> int:
        """After the first special token that closes the turn in the template text after its last field (the
        turn's last field itself if there is none before the next field)."""
        for match in self.encode.special_pattern.finditer(text, last, limit):
            if match.group() not in not_closing:
                return match.end()
        return last

    def check_generation_markers(self, input_ids: list[int], in_response: list[bool]) -> None:
        """A template with `{% generation %}` blocks marks its own assistant tokens: they must be ours, except
        what a template marks after a turn's closing token (TRL's training templates mark the newline after
        `<|im_end|>`, and the end-of-sequence token Phi-3.5 appends after the last turn): the turn has ended."""
        if any(m["role"] == "assistant" and not trainable(m) for m in self.messages):
            return  # the template marks weight-0 turns too; they are prompt here by the row's own choice
        marked = self.encode.tokenizer.apply_chat_template(
            self.messages, tools=self.tools, chat_template=self.format.template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True)["assistant_masks"]
        eos, after_turn, differ = self.encode.tokenizer.eos_token_id, False, []
        for j, (a, b) in enumerate(zip(marked, in_response)):
            trailer = bool(a) and not b and after_turn and (
                input_ids[j] == eos or not self.encode.tokenizer.decode(input_ids[j:j + 1]).strip())
            if bool(a) != b and not trailer:
                differ.append(j)
            after_turn = b or trailer
        if differ:
            j = differ[0]
            raise self.error(f"the {self.format.name} template's {{% generation %}} blocks and toss-filter's response "
                             f"spans disagree on {len(differ)} token(s), first at token {j} "
                             f"({'marked by the template only' if marked[j] else 'a response token the template does not mark'})")


def _text_length(value: Any) -> int:
    """Characters of text in a field: strings, and those inside the lists and objects of tool calls and parts."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_length(item) for item in value.values())
    if isinstance(value, list):
        return sum(_text_length(item) for item in value)
    return 0


def _excerpt(text: str, width: int = 24) -> str:
    return repr(text[:width] + ("…" if len(text) > width else ""))


def _overlaps(offsets: Any, spans: list[tuple[int, int]]) -> list[bool]:
    """Per token: whether its characters overlap one of the sorted, disjoint `spans` (tokens added by the
    tokenizer itself, such as BOS, cover no characters and overlap nothing)."""
    spans = sorted(spans)
    out, k = [], 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        out.append(end > start and k < len(spans) and start < spans[k][1] and end > spans[k][0])
    return out
