"""`toss-filter inspect`: what rows become, before any model is paid for. Only the tokenizer is loaded.

    inspect_rows(source, encode, rows, split, columns, name) -> [(row, Tokenized)]   the first `rows` input rows
    render(inspected, tokenizer) -> rich Group                                         print it with any rich Console

Each row is shown as its tokens, in the styles of `STYLES`: `scored` for a response token TOSS scores (and may
mask), `trained` for one a trainer learns but TOSS does not score (reasoning under --no-score-reasoning), `prompt`
for the rest. A header line per row counts its tokens, response tokens (`labels != -100`) and scored tokens
(`Tokenized.scored`); a last line gives the totals.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import islice

import numpy as np
from rich.console import Group
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from toss_filter.data.load import load_conversations
from toss_filter.data.tokenize import IGNORE_INDEX, ConversationTokenizer, Tokenized

STYLES = {"prompt": "dim", "scored": "black on green3", "trained": "black on steel_blue1"}
CONTEXT_TOKENS = 4  # tokens decoded before each piece, so the piece keeps a leading space SentencePiece drops
MAX_PIECE_TOKENS = 4  # the longest run of tokens one character can span (UTF-8 has at most 4 bytes)


def inspect_rows(source: str, encode: ConversationTokenizer, rows: int, split: str | None = None,
                 columns: Mapping[str, str] | None = None, name: str | None = None) -> list[tuple[int, Tokenized]]:
    """The first `rows` rows of `source`, tokenized exactly as `filter` tokenizes them; a bad row raises its
    `InputError`."""
    conversations = islice(load_conversations(source, split, columns, name), rows)
    return [(row, encode(conversation, source, row)) for row, conversation in conversations]


def token_kinds(tokens: Tokenized) -> np.ndarray:
    """Per token: 0 prompt, 1 scored, 2 trained but not scored."""
    response = np.asarray(tokens.labels) != IGNORE_INDEX
    return np.where(np.asarray(tokens.scored, dtype=bool), 1, np.where(response, 2, 0)).astype(np.int8)


def row_counts(tokens: Tokenized) -> dict[str, int]:
    """`{"tokens", "response", "scored"}` of one row."""
    kinds = token_kinds(tokens)
    return {"tokens": len(kinds), "response": int((kinds > 0).sum()), "scored": int((kinds == 1).sum())}


def token_pieces(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[tuple[str, range]]:
    """The text of each token, in order, as `(text, token positions)`. Each piece is decoded after a few tokens of
    context: alone, a token can lose its leading space (SentencePiece) or be part of a UTF-8 character, so the
    tokens of one character come as one piece."""
    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        context = ids[max(0, start - CONTEXT_TOKENS):start]
        prefix, text = decode(context), decode(context + ids[start:end])
        if text.endswith("\ufffd") and end < len(ids) and end - start < MAX_PIECE_TOKENS:
            continue  # an unfinished character: its next byte is in the next token
        pieces.append((text[len(prefix):] if text.startswith(prefix) else text, range(start, end)))
        start = end
    return pieces


def row_text(tokenizer: PreTrainedTokenizerBase, tokens: Tokenized) -> Text:
    """One row's tokens in the styles of `STYLES`; a newline inside a response shows as ↵, so it can be seen."""
    kinds = token_kinds(tokens)
    styles = [STYLES["prompt"], STYLES["scored"], STYLES["trained"]]
    text = Text()
    for piece, positions in token_pieces(tokenizer, list(tokens.input_ids)):
        kind = int(kinds[positions.start])
        text.append(piece.replace("\n", "↵\n") if kind else piece, style=styles[kind])
    return text


def _counts_line(counts: Mapping[str, int]) -> str:
    return f"{counts['tokens']:,} tokens, {counts['response']:,} response, {counts['scored']:,} scored"


def render(inspected: list[tuple[int, Tokenized]], tokenizer: PreTrainedTokenizerBase) -> Group:
    """Every inspected row (a header with its counts, then its tokens), a legend and the totals."""
    parts: list[Text] = [Text.assemble("legend: ", ("prompt", STYLES["prompt"]), " ",
                                       ("scored response", STYLES["scored"]), " ",
                                       ("trained, not scored", STYLES["trained"]))]
    totals = {"tokens": 0, "response": 0, "scored": 0}
    for row, tokens in inspected:
        counts = row_counts(tokens)
        totals = {key: totals[key] + counts[key] for key in totals}
        truncated = " (truncated by --max-length)" if tokens.truncated else ""
        parts += [Text(f"\nrow {row}: {_counts_line(counts)}{truncated}", style="bold"), row_text(tokenizer, tokens)]
    parts.append(Text(f"\n{len(inspected)} row{'' if len(inspected) == 1 else 's'}: {_counts_line(totals)}", style="bold"))
    return Group(*parts)
