"""Step 2, tokenize: input_ids are exactly what a trainer using the template sees, and the labels mark exactly each
assistant turn's content plus the end-of-turn token, on ChatML, a Llama-3-style template and the paper template."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from toss_filter.data.tokenize import (
    IGNORE_INDEX,
    PAPER_TEMPLATE,
    ChatFormat,
    ConversationTokenizer,
    Tokenized,
    check_tokenizer,
    resolve_format,
)
from toss_filter.errors import ConfigError, InputError

# The Llama-3 Instruct template (generation prompt omitted: training rows always end with the assistant turn).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4, of course."},
]


def tokenize_conversation(messages, tokenizer, chat_format, max_length=None, *, source="<input>", row=0) -> Tokenized:
    return ConversationTokenizer(tokenizer, chat_format, max_length)(messages, source, row)


def ids_of(rendered) -> list[int]:
    """`apply_chat_template(tokenize=True)` returns a BatchEncoding in transformers 5 and a list in 4."""
    if hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return list(rendered)


def response_runs(tokens: Tokenized) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive labelled tokens."""
    runs, start = [], None
    for j, label in enumerate([*tokens.labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = j
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, j))
            start = None
    return runs


def check_label_invariants(tokens: Tokenized) -> None:
    assert len(tokens.labels) == len(tokens.input_ids)
    for token, label in zip(tokens.input_ids, tokens.labels):
        assert label in (IGNORE_INDEX, token)


def decode_runs(tokenizer, tokens: Tokenized) -> list[str]:
    return [tokenizer.decode(tokens.input_ids[a:b]) for a, b in response_runs(tokens)]


@pytest.fixture(scope="module")
def chatml(tokenizer) -> ChatFormat:
    return resolve_format(tokenizer, "chat")


@pytest.fixture(scope="module")
def paper(tokenizer) -> ChatFormat:
    return resolve_format(tokenizer, "paper")


@pytest.fixture(scope="module")
def llama3(tokenizer, tmp_path_factory):
    """A copy of SmolLM2's tokenizer with Llama-3's special tokens and BOS, and the Llama-3 template as a file."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({
        "bos_token": "<|begin_of_text|>",
        "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    })
    path = tmp_path_factory.mktemp("templates") / "llama3.jinja"
    path.write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    return tok, resolve_format(tok, str(path)), path


# ------------------------------------------------------------------------------------------------------- ChatML


def test_chatml_input_ids_are_the_chat_template_ids(tokenizer, chatml):
    tokens = tokenize_conversation(MULTI_TURN, tokenizer, chatml)
    assert tokens.input_ids == ids_of(tokenizer.apply_chat_template(MULTI_TURN, tokenize=True))
    assert tokens.truncated is False
    check_label_invariants(tokens)


def test_chatml_labels_are_each_assistant_content_and_im_end(tokenizer, chatml):
    tokens = tokenize_conversation(MULTI_TURN, tokenizer, chatml)
    runs = response_runs(tokens)
    assert decode_runs(tokenizer, tokens) == ["Hello there.<|im_end|>", "It is 4, of course.<|im_end|>"]
    # Both runs end on <|im_end|>; the "\n" after it (and the text after that) is not a response token.
    im_end, newline = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.encode("\n")
    assert newline == [198]
    for _, end in runs:
        assert tokens.input_ids[end - 1] == im_end
        assert tokens.input_ids[end] == 198 and tokens.labels[end] == IGNORE_INDEX
    # Everything outside the runs is -100, in particular the "<|im_start|>assistant\n" header before each run.
    inside = {j for a, b in runs for j in range(a, b)}
    assert all(tokens.labels[j] == IGNORE_INDEX for j in range(len(tokens.labels)) if j not in inside)
    header = tokenizer.encode("<|im_start|>assistant\n")
    for start, _ in runs:
        assert tokens.input_ids[start - len(header):start] == header
    # Exactly one response token per token of the rendered content + <|im_end|>.
    expected = sum(len(tokenizer.encode(m["content"] + "<|im_end|>")) for m in MULTI_TURN if m["role"] == "assistant")
    assert sum(label != IGNORE_INDEX for label in tokens.labels) == expected


def test_chatml_rendered_text_round_trips(tokenizer, chatml):
    tokens = tokenize_conversation(MULTI_TURN, tokenizer, chatml)
    assert tokenizer.decode(tokens.input_ids) == tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)


# ------------------------------------------------------------------------------------------------- Llama-3 style


def test_llama3_template_from_a_file(llama3):
    tok, fmt, path = llama3
    assert fmt == ChatFormat(f"file:{path.name}", LLAMA3_TEMPLATE, add_special_tokens=False)


def test_llama3_bos_once_and_trimmed_content_plus_eot(llama3):
    tok, fmt, _ = llama3
    messages = [
        {"role": "system", "content": "Be helpful. "},
        {"role": "user", "content": "  Hi \n"},
        {"role": "assistant", "content": "  Hello there.  \n"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "  You are welcome!"},
    ]
    tokens = tokenize_conversation(messages, tok, fmt)
    check_label_invariants(tokens)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok.bos_token_id == bos
    assert tokens.input_ids[0] == bos
    assert tokens.input_ids.count(bos) == 1
    assert tokens.input_ids == ids_of(tok.apply_chat_template(messages, chat_template=LLAMA3_TEMPLATE, tokenize=True))
    assert decode_runs(tok, tokens) == ["Hello there.<|eot_id|>", "You are welcome!<|eot_id|>"]
    eot, end_header = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_header_id|>")
    for start, end in response_runs(tokens):
        assert tokens.input_ids[end - 1] == eot
        # "<|end_header_id|>\n\n" precedes the content and is not a response token
        assert end_header in tokens.input_ids[start - 3:start]
        assert all(label == IGNORE_INDEX for label in tokens.labels[start - 3:start])
    # the eot_id of system and user turns is not a response token
    eot_positions = [j for j, t in enumerate(tokens.input_ids) if t == eot]
    assert len(eot_positions) == 5
    assert [tokens.labels[j] != IGNORE_INDEX for j in eot_positions] == [False, False, True, False, True]


# ------------------------------------------------------------------------------------------------ paper template


def test_paper_format():
    assert resolve_format(SimpleNamespace(chat_template=None), "paper") == ChatFormat("paper", PAPER_TEMPLATE, True)


def test_paper_template_text(tokenizer, paper):
    messages = [{"role": "user", "content": "  How do I bake bread?\n"}, {"role": "assistant", "content": " Sure, mix flour. "}]
    text = tokenizer.apply_chat_template(messages, chat_template=paper.template, tokenize=False)
    assert text == "Human: How do I bake bread?\nAssistant: Sure, mix flour. <|im_end|>"


def test_paper_template_text_with_system(tokenizer, paper):
    messages = [{"role": "system", "content": " S "}, *MULTI_TURN[1:3]]
    text = tokenizer.apply_chat_template(messages, chat_template=paper.template, tokenize=False)
    assert text == "<|system|>\nS\nHuman: Hi\nAssistant: Hello there. <|im_end|>"
    tokens = tokenize_conversation(messages, tokenizer, paper)
    assert decode_runs(tokenizer, tokens) == [" Hello there. <|im_end|>"]


def test_paper_template_multi_turn_labels(tokenizer, paper):
    messages = [{"role": "system", "content": " S "}, *MULTI_TURN[1:]]
    tokens = tokenize_conversation(messages, tokenizer, paper)
    check_label_invariants(tokens)
    assert decode_runs(tokenizer, tokens) == [" Hello there. <|im_end|>", " It is 4, of course. <|im_end|>"]


def test_paper_first_response_token_is_labelled_and_naive_mask_is_one_too_long(tokenizer, paper):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, here you go."}]
    tokens = tokenize_conversation(messages, tokenizer, paper)
    check_label_invariants(tokens)
    full = tokenizer("Human: Hi\nAssistant: Sure, here you go. <|im_end|>")["input_ids"]
    assert tokens.input_ids == full
    pieces = tokenizer.convert_ids_to_tokens(tokens.input_ids)
    # " Sure" is ONE token: the space of "Assistant: " merged into the first response word.
    first = pieces.index("ĠSure")
    assert pieces[:first] == ["Human", ":", "ĠHi", "Ċ", "Ass", "istant", ":"]
    assert tokens.labels[first] == tokens.input_ids[first]  # the straddling token is a response token
    assert all(label == IGNORE_INDEX for label in tokens.labels[:first])
    assert all(label != IGNORE_INDEX for label in tokens.labels[first:])
    assert decode_runs(tokenizer, tokens) == [" Sure, here you go. <|im_end|>"]

    # The authors' mask: tokenize the prompt "Human: {u}\nAssistant: " on its own and mask that many tokens.
    prompt_ids = tokenizer("Human: Hi\nAssistant: ")["input_ids"]
    assert len(prompt_ids) == first + 1  # the lone trailing space is its own token when the prompt stands alone
    assert tokenizer.convert_ids_to_tokens(prompt_ids[-1]) == "Ġ"
    assert prompt_ids != full[:len(prompt_ids)]  # ... so the prompt is not a prefix of the conversation
    naive = [IGNORE_INDEX] * len(prompt_ids) + full[len(prompt_ids):]
    assert naive[first] == IGNORE_INDEX  # " Sure" would never be scored or trained
    assert sum(l != IGNORE_INDEX for l in naive) == sum(l != IGNORE_INDEX for l in tokens.labels) - 1
    assert [j for j, l in enumerate(tokens.labels) if l != IGNORE_INDEX and naive[j] == IGNORE_INDEX] == [first]


def test_paper_response_starting_with_punctuation(tokenizer, paper):
    """No merge here (" (" vs ":"); the boundary is still exact."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "(laughs) ok"}]
    tokens = tokenize_conversation(messages, tokenizer, paper)
    assert decode_runs(tokenizer, tokens) == [" (laughs) ok <|im_end|>"]
    prompt = tokenizer.decode([t for t, l in zip(tokens.input_ids, tokens.labels) if l == IGNORE_INDEX])
    assert prompt == "Human: Hi\nAssistant:"


# ---------------------------------------------------------------------------------- response quoted in the prompt


def test_response_quoted_in_user_prompt_chatml(tokenizer, chatml):
    messages = [
        {"role": "system", "content": "Echo."},
        {"role": "user", "content": "Repeat after me: Hello there"},
        {"role": "assistant", "content": "Hello there"},
    ]
    tokens = tokenize_conversation(messages, tokenizer, chatml)
    (start, end), = response_runs(tokens)
    assert tokenizer.decode(tokens.input_ids[start:end]) == "Hello there<|im_end|>"
    assert tokenizer.decode(tokens.input_ids[:start]).endswith("Repeat after me: Hello there<|im_end|>\n<|im_start|>assistant\n")
    assert end == len(tokens.input_ids) - 1  # only the final "\n" follows


def test_response_quoted_in_user_prompt_paper(tokenizer, paper):
    messages = [{"role": "user", "content": "Repeat after me: Hello there"}, {"role": "assistant", "content": "Hello there"}]
    tokens = tokenize_conversation(messages, tokenizer, paper)
    (start, end), = response_runs(tokens)
    assert tokenizer.decode(tokens.input_ids[start:end]) == " Hello there <|im_end|>"
    assert tokenizer.decode(tokens.input_ids[:start]) == "Human: Repeat after me: Hello there\nAssistant:"
    assert end == len(tokens.input_ids)


def test_identical_responses_in_two_turns_are_both_labelled(tokenizer, chatml):
    messages = [{"role": "system", "content": "s"},
                {"role": "user", "content": "a"}, {"role": "assistant", "content": "OK"},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "OK"}]
    tokens = tokenize_conversation(messages, tokenizer, chatml)
    assert decode_runs(tokenizer, tokens) == ["OK<|im_end|>", "OK<|im_end|>"]


# -------------------------------------------------------------------------------------------------- truncation


def test_max_length_truncation(tokenizer, chatml):
    full = tokenize_conversation(MULTI_TURN, tokenizer, chatml)
    n = len(full.input_ids)
    runs = response_runs(full)
    cut = runs[1][0] + 2  # in the middle of the second response
    short = tokenize_conversation(MULTI_TURN, tokenizer, chatml, max_length=cut)
    assert short.truncated is True
    assert len(short.input_ids) == len(short.labels) == cut
    assert short.input_ids == full.input_ids[:cut]
    assert short.labels == full.labels[:cut]
    assert response_runs(short) == [runs[0], (runs[1][0], cut)]

    for max_length in (n, n + 10, None):
        same = tokenize_conversation(MULTI_TURN, tokenizer, chatml, max_length=max_length)
        assert same == Tokenized(full.input_ids, full.labels, False)
    one_less = tokenize_conversation(MULTI_TURN, tokenizer, chatml, max_length=n - 1)
    assert one_less.truncated is True and one_less.input_ids == full.input_ids[:-1]


def test_truncation_before_any_response(tokenizer, chatml):
    short = ConversationTokenizer(tokenizer, chatml, max_length=4)(MULTI_TURN)
    assert short.truncated is True
    assert len(short.input_ids) == 4
    assert short.labels == [IGNORE_INDEX] * 4


# ----------------------------------------------------------------------------------------------------- errors


def test_resolve_format_chat(tokenizer):
    assert resolve_format(tokenizer) == ChatFormat("chat", tokenizer.chat_template, add_special_tokens=False)


def test_resolve_format_without_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="the tokenizer has no chat template"):
        resolve_format(tok, "chat")
    assert resolve_format(tok, "paper").name == "paper"  # the paper template needs none
    assert tokenizer.chat_template  # the shared fixture is untouched


def test_resolve_format_missing_template_file(tokenizer, tmp_path):
    missing = tmp_path / "nope.jinja"
    with pytest.raises(ConfigError) as info:
        resolve_format(tokenizer, str(missing))
    assert str(info.value) == f"--template must be chat, paper or a Jinja file; {str(missing)!r} is none of these"
    with pytest.raises(ConfigError):
        resolve_format(tokenizer, str(tmp_path))  # a directory is not a template file


def test_template_that_rewrites_content_is_an_input_error(tokenizer, tmp_path):
    path = tmp_path / "upper.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}", encoding="utf-8")
    fmt = resolve_format(tokenizer, str(path))
    with pytest.raises(InputError) as info:
        tokenize_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                              tokenizer, fmt, source="d.jsonl", row=4)
    assert (info.value.source, info.value.row, info.value.field) == ("d.jsonl", 4, "messages[0].content")
    assert ("the file:upper.jinja template rewrites the text of messages[0].content (at character 6 it renders 'HI\\n"
            "assistant: YO\\n' where the field reads 'hi')") in str(info.value)


def test_slow_tokenizer_is_refused(tokenizer, chatml):
    slow = SimpleNamespace(is_fast=False)
    with pytest.raises(ConfigError, match="a fast \\(Rust\\) tokenizer is required"):
        check_tokenizer(slow)
    with pytest.raises(ConfigError, match="fast"):
        ConversationTokenizer(slow, chatml)
    assert tokenizer.is_fast is True
    assert check_tokenizer(tokenizer) is None


# ------------------------------------------------------------------------- regressions: locating short responses

@pytest.mark.parametrize("answer", ["A", "a", "start", "Assistant"])
def test_a_short_response_is_never_matched_inside_the_template_text(tokenizer, chatml, paper, answer):
    messages = [{"role": "user", "content": "Pick one: (A) yes (B) no"}, {"role": "assistant", "content": answer}]
    assert decode_runs(tokenizer, tokenize_conversation(messages, tokenizer, chatml)) == [f"{answer}<|im_end|>"]
    assert decode_runs(tokenizer, tokenize_conversation(messages, tokenizer, paper)) == [f" {answer} <|im_end|>"]


def test_leading_whitespace_that_a_template_trims_is_not_labelled(llama3):
    tok, fmt, _ = llama3
    messages = [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "\nYou are welcome!"}]
    assert decode_runs(tok, tokenize_conversation(messages, tok, fmt)) == ["You are welcome!<|eot_id|>"]
