"""Step 1, load: every accepted row shape and input format normalises to validated chat messages, in input order,
and every unusable input raises `InputError` naming the source, the row and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assistant, chat, system, user, write_jsonl
from toss_filter.data.conversation import to_conversation
from toss_filter.data.load import load_conversations, read_records
from toss_filter.errors import InputError, TossError


def to_messages(record, source, row, columns=None):
    return to_conversation(record, source, row, columns).messages


def loaded_messages(conversations) -> list:
    return [(row, conversation.messages) for row, conversation in conversations]

SRC = "data.jsonl"


# --------------------------------------------------------------------------------------------------- row shapes


def test_messages_multi_turn_with_system():
    record = {"messages": [system("Be brief."), user("Hi"), assistant("Hello."), user("And?"), assistant("Bye.")],
              "id": 7}
    assert to_messages(record, SRC, 0) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "Bye."},
    ]


def test_messages_pass_other_keys_through_and_keep_whitespace():
    """A key the loader does not know may be rendered by a template: it is never dropped."""
    record = {"messages": [{"role": "user", "content": "  Hi \n", "name": "x"},
                           {"role": "assistant", "content": " Yo ", "weight": 1}]}
    assert to_messages(record, SRC, 0) == [{**user("  Hi \n"), "name": "x"}, {**assistant(" Yo "), "weight": 1}]


def test_sharegpt_conversations():
    record = {"conversations": [
        {"from": "system", "value": "Sys."},
        {"from": "human", "value": "Q1"},
        {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"},
        {"from": "gpt", "value": "A2"},
    ]}
    assert to_messages(record, SRC, 0) == [system("Sys."), user("Q1"), assistant("A1"), user("Q2"), assistant("A2")]


def test_sharegpt_from_value_inside_messages_column():
    record = {"messages": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert to_messages(record, SRC, 0) == [user("Q"), assistant("A")]


def test_prompt_completion_strings():
    assert to_messages({"prompt": "What is 2+2?", "completion": " 4"}, SRC, 0) == [
        user("What is 2+2?"), assistant(" 4"),
    ]


def test_trl_conversational_prompt_completion_lists():
    record = {"prompt": [system("S"), user("Q")], "completion": [assistant("A")]}
    assert to_messages(record, SRC, 0) == [system("S"), user("Q"), assistant("A")]


def test_alpaca_with_input_joins_with_a_blank_line():
    record = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    messages = to_messages(record, SRC, 0)
    assert messages == [user("Translate to French.\n\nGood morning"), assistant("Bonjour")]
    assert messages[0]["content"] == "Translate to French." + "\n\n" + "Good morning"


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": "   "}, {"input": None}])
def test_alpaca_without_input_is_the_instruction_alone(extra):
    record = {"instruction": "Name a colour.", "output": "Blue.", **extra}
    assert to_messages(record, SRC, 0) == [user("Name a colour."), assistant("Blue.")]


def test_openorca_with_system_prompt():
    record = {"id": "x", "system_prompt": "You are an AI.", "question": "Why?", "response": "Because."}
    assert to_messages(record, SRC, 0) == [system("You are an AI."), user("Why?"), assistant("Because.")]


@pytest.mark.parametrize("extra", [{}, {"system_prompt": ""}, {"system_prompt": " "}, {"system_prompt": None}])
def test_openorca_without_system_prompt(extra):
    record = {"question": "Why?", "response": "Because.", **extra}
    assert to_messages(record, SRC, 0) == [user("Why?"), assistant("Because.")]


def test_column_remapping_to_prompt_completion():
    record = {"q": "Capital of France?", "a": "Paris.", "other": 1}
    assert to_messages(record, SRC, 0, columns={"prompt": "q", "completion": "a"}) == [
        user("Capital of France?"), assistant("Paris."),
    ]


def test_column_remapping_of_messages_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"dialog": chat("Hi", "Yo")["messages"]}])
    assert loaded_messages(load_conversations(str(path), columns={"messages": "dialog"})) == [(0, [user("Hi"), assistant("Yo")])]


def test_column_remapping_missing_actual_column_is_an_unknown_shape():
    with pytest.raises(InputError) as info:
        to_messages({"question": "Q", "answer": "A"}, SRC, 3, columns={"prompt": "q", "completion": "a"})
    assert info.value.row == 3
    assert "no known row shape" in str(info.value)
    assert "['answer', 'question']" in str(info.value)


def test_shape_priority_messages_wins_over_prompt_completion():
    record = {**chat("from messages", "M"), "prompt": "from prompt", "completion": "P"}
    assert to_messages(record, SRC, 0) == [user("from messages"), assistant("M")]


# ------------------------------------------------------------------------------------------------ input formats

ROWS = [
    chat("first", "one", system_text="sys"),
    {"prompt": "second", "completion": "two"},
    {"instruction": "third", "input": "ctx", "output": "three"},
    {"question": "fourth", "response": "four"},
    chat("fifth", "five"),
]
EXPECTED = [
    (0, [system("sys"), user("first"), assistant("one")]),
    (1, [user("second"), assistant("two")]),
    (2, [user("third\n\nctx"), assistant("three")]),
    (3, [user("fourth"), assistant("four")]),
    (4, [user("fifth"), assistant("five")]),
]
CHAT_ROWS = [chat(f"question {i}", f"answer {i}") for i in range(5)]
CHAT_EXPECTED = [(i, [user(f"question {i}"), assistant(f"answer {i}")]) for i in range(5)]


def test_jsonl_mixed_shapes_keep_order_and_row_indices(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert loaded_messages(load_conversations(str(path))) == EXPECTED


def test_jsonl_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n\n", encoding="utf-8")
    assert loaded_messages(load_conversations(str(path))) == EXPECTED[:2]


def test_ndjson_and_upper_case_suffix(tmp_path):
    for name in ("d.ndjson", "D.JSONL"):
        path = write_jsonl(tmp_path / name, ROWS[:2])
        assert loaded_messages(load_conversations(str(path))) == EXPECTED[:2]


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert loaded_messages(load_conversations(str(path))) == EXPECTED


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(CHAT_ROWS), path, row_group_size=2)  # several row groups
    assert pq.ParquetFile(path).num_row_groups == 3
    assert loaded_messages(load_conversations(str(path))) == CHAT_EXPECTED


def test_parquet_alpaca_with_null_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "a", "input": None, "output": "A"}, {"instruction": "b", "input": "x", "output": "B"}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert loaded_messages(load_conversations(str(path))) == [(0, [user("a"), assistant("A")]), (1, [user("b\n\nx"), assistant("B")])]


def test_save_to_disk_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list(CHAT_ROWS).save_to_disk(str(tmp_path / "ds"))
    assert loaded_messages(load_conversations(str(tmp_path / "ds"))) == CHAT_EXPECTED


def test_save_to_disk_dataset_dict_with_split(tmp_path):
    import datasets

    other = [chat("test question", "test answer")]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(CHAT_ROWS), "test": datasets.Dataset.from_list(other),
    }).save_to_disk(str(tmp_path / "dd"))
    assert loaded_messages(load_conversations(str(tmp_path / "dd"))) == CHAT_EXPECTED  # default split: train
    assert loaded_messages(load_conversations(str(tmp_path / "dd"), split="train")) == CHAT_EXPECTED
    assert loaded_messages(load_conversations(str(tmp_path / "dd"), split="test")) == [
        (0, [user("test question"), assistant("test answer")])
    ]


def test_save_to_disk_dataset_dict_without_train_needs_a_split(tmp_path):
    import datasets

    datasets.DatasetDict({"a": datasets.Dataset.from_list(CHAT_ROWS[:1]),
                          "b": datasets.Dataset.from_list(CHAT_ROWS[1:2])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError) as info:
        list(load_conversations(str(tmp_path / "dd")))
    assert info.value.source == str(tmp_path / "dd")
    assert "--split" in str(info.value) and "['a', 'b']" in str(info.value)
    assert loaded_messages(load_conversations(str(tmp_path / "dd"), split="b")) == [(0, [user("question 1"), assistant("answer 1")])]


def test_read_records_yields_plain_dicts_with_indices(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": 1}, {"b": 2}])
    assert list(read_records(str(path))) == [(0, {"a": 1}), (1, {"b": 2})]


# ------------------------------------------------------------------------------------------------------ errors


def load_error(path: Path, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        list(load_conversations(str(path), **kwargs))
    error = info.value
    assert isinstance(error, TossError) and error.exit_code == 2
    assert str(error).startswith(str(path) + ": ")
    assert "\n" not in str(error)  # one line
    return error


def bad_row(tmp_path: Path, row: dict, name: str = "d.jsonl") -> InputError:
    """The bad row is the third row (row 2), after two good ones."""
    return load_error(write_jsonl(tmp_path / name, [chat("a", "b"), chat("c", "d"), row]))


def test_broken_json_in_jsonl_reports_row_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    # line 1: row 0, line 2: blank, line 3: row 1, line 4: broken (row 2)
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + '\n{"messages": [\n', encoding="utf-8")
    error = load_error(path)
    assert (error.source, error.row, error.field) == (str(path), 2, None)
    assert "broken JSON on line 4" in str(error)
    assert str(error).startswith(f"{path}: row 2: broken JSON on line 4: ")


def test_broken_json_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": \n]', encoding="utf-8")
    error = load_error(path)
    assert (error.source, error.row, error.field) == (str(path), 1, None)  # the row that does not parse
    assert "broken JSON at line 4" in str(error)


def test_json_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": ROWS}), encoding="utf-8")
    error = load_error(path)
    assert error.row is None
    assert "a .json input must hold a list of rows, got dict" in str(error)


def test_row_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n", encoding="utf-8")
    error = load_error(path)
    assert error.row == 1
    assert "expected a JSON object per row, got list" in str(error)


def test_unknown_role(tmp_path):
    error = bad_row(tmp_path, {"messages": [user("q"), {"role": "bot", "content": "a"}]})
    assert (error.row, error.field) == (2, "messages[1].role")
    assert "unknown role 'bot'" in str(error)
    assert str(error) == (f"{tmp_path / 'd.jsonl'}: row 2: field 'messages[1].role': "
                          "unknown role 'bot' (expected one of system, developer, user, assistant, tool, ipython)")


def test_unknown_sharegpt_speaker(tmp_path):
    error = bad_row(tmp_path, {"conversations": [{"from": "human", "value": "q"}, {"from": "bard", "value": "a"}]})
    assert (error.row, error.field) == (2, "conversations[1].role")
    assert "unknown role 'bard'" in str(error)


def test_missing_role(tmp_path):
    error = bad_row(tmp_path, {"messages": [{"content": "q"}, assistant("a")]})
    assert (error.row, error.field) == (2, "messages[0]")
    assert "missing 'role'" in str(error)


def test_message_not_an_object(tmp_path):
    error = bad_row(tmp_path, {"messages": ["q", assistant("a")]})
    assert (error.row, error.field) == (2, "messages[0]")
    assert "expected an object with role and content, got str" in str(error)


@pytest.mark.parametrize("content", ["", "   \n\t"])
def test_empty_assistant_turn(tmp_path, content):
    error = bad_row(tmp_path, {"messages": [user("q"), assistant("a"), user("q2"), assistant(content)]})
    assert (error.row, error.field) == (2, "messages[3].content")
    assert "empty assistant turn" in str(error)


def test_empty_completion_string(tmp_path):
    error = bad_row(tmp_path, {"prompt": "q", "completion": " "})
    assert (error.row, error.field) == (2, "completion[1].content")
    assert "empty assistant turn" in str(error)


@pytest.mark.parametrize(("content", "field", "problem"), [
    (5, "messages[1].content", "expected a string or a list of text parts, got int"),
    (["a", "b"], "messages[1].content[0]", "expected a content part"),
    (None, "messages[1].content", "expected a string, got NoneType"),
])
def test_content_of_wrong_type(tmp_path, content, field, problem):
    error = bad_row(tmp_path, {"messages": [user("q"), {"role": "assistant", "content": content}]})
    assert (error.row, error.field) == (2, field)
    assert problem in str(error)


def test_user_content_of_wrong_type(tmp_path):
    error = bad_row(tmp_path, {"messages": [{"role": "user", "content": 3.5}, assistant("a")]})
    assert (error.row, error.field) == (2, "messages[0].content")
    assert "expected a string or a list of text parts, got float" in str(error)


def test_no_assistant_turn(tmp_path):
    error = bad_row(tmp_path, {"messages": [system("s"), user("q")]})
    assert (error.row, error.field) == (2, "messages")
    assert "no assistant turn" in str(error)


@pytest.mark.parametrize("messages", [[], "not a list"])
def test_messages_not_a_non_empty_list(tmp_path, messages):
    error = bad_row(tmp_path, {"messages": messages})
    assert (error.row, error.field) == (2, "messages")
    assert "expected a non-empty list of messages" in str(error)


@pytest.mark.parametrize("row", [{"messages": None}, {"question": "q", "response": None}])
def test_a_null_column_counts_as_absent(tmp_path, row):
    # Parquet and Arrow fill the columns of other row shapes with nulls, so null must mean "no such column".
    error = bad_row(tmp_path, row)
    assert (error.row, error.field) == (2, None)
    assert "no known row shape" in str(error)


@pytest.mark.parametrize(("row", "field", "type_name"), [
    ({"prompt": 5, "completion": "a"}, "prompt", "int"),
    ({"prompt": "q", "completion": {"text": "a"}}, "completion", "dict"),
    ({"prompt": [user("q")], "completion": "a"}, "prompt", "list"),  # mixed list / string
    ({"instruction": ["x"], "output": "a"}, "instruction", "list"),
    ({"instruction": "x", "input": 3, "output": "a"}, "input", "int"),
    ({"instruction": "x", "output": 1}, "output", "int"),
    ({"question": "q", "response": "a", "system_prompt": 1}, "system_prompt", "int"),
])
def test_string_fields_of_wrong_type(tmp_path, row, field, type_name):
    error = bad_row(tmp_path, row)
    assert (error.row, error.field) == (2, field)
    assert f"field '{field}': expected a string, got {type_name}" in str(error)


def test_unknown_row_shape(tmp_path):
    error = bad_row(tmp_path, {"text": "just text", "label": 1})
    assert (error.row, error.field) == (2, None)
    assert "no known row shape in columns ['label', 'text']" in str(error)
    assert "--column" in str(error)


def test_error_row_index_is_the_row_of_a_dataset(tmp_path):
    import datasets

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    error = load_error(tmp_path / "ds")
    assert (error.row, error.field) == (1, "completion[1].content")


def test_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("", encoding="utf-8")
    error = load_error(path)
    assert (error.source, error.row, error.field) == (str(path), None, None)
    assert str(error) == f"{path}: the input has no rows"


def test_file_of_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n  \n\t\n\n", encoding="utf-8")
    error = load_error(path)
    assert error.row is None
    assert "the input has no rows" in str(error)


def test_empty_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[]", encoding="utf-8")
    assert "the input has no rows" in str(load_error(path))


def test_unknown_extension(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\n", encoding="utf-8")
    error = load_error(path)
    assert error.row is None
    assert "unknown file type '.csv'" in str(error)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "missing.json"])
def test_missing_path(tmp_path, name):
    error = load_error(tmp_path / name)
    assert (error.row, error.field) == (None, None)
    assert "no such file" in str(error)


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.jsonl").write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    error = load_error(tmp_path / "plain")
    assert "not a `save_to_disk` dataset" in str(error)


def test_good_rows_before_a_bad_row_are_yielded_first(tmp_path):
    """Rows are never skipped: iteration stops at the bad row, after yielding the good rows before it."""
    path = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b"), {"text": "?"}, chat("c", "d")])
    iterator = load_conversations(str(path))
    assert loaded_messages([next(iterator)]) == [(0, [user("a"), assistant("b")])]
    with pytest.raises(InputError) as info:
        next(iterator)
    assert info.value.row == 1


# ------------------------------------------------------------------------------------------------- regressions

def test_a_remapped_column_wins_over_a_column_with_the_canonical_name():
    record = {"prompt": "OLD", "question": "Q", "completion": "A"}
    messages = to_messages(record, SRC, 0, {"prompt": "question"})
    assert messages[0] == user("Q")


def test_parquet_mixing_row_shapes_reads_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({  # as Arrow stores mixed shapes: the other shape's columns are null
        "messages": [chat("q1", "a1")["messages"], None], "prompt": [None, "q2"], "completion": [None, "a2"],
    })
    pq.write_table(table, tmp_path / "mixed.parquet")
    loaded = [c.messages for _, c in load_conversations(str(tmp_path / "mixed.parquet"))]
    assert loaded == [[user("q1"), assistant("a1")], [user("q2"), assistant("a2")]]


def test_a_byte_order_mark_is_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_text(json.dumps(chat("q", "a")) + "\n", encoding="utf-8-sig")
    assert [c.messages for _, c in load_conversations(str(path))] == [[user("q"), assistant("a")]]


def test_split_given_for_a_single_saved_dataset_is_an_error(tmp_path):
    from datasets import Dataset

    Dataset.from_list([chat("q", "a")]).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(InputError, match="holds a single dataset"):
        list(load_conversations(str(tmp_path / "single"), split="test"))
