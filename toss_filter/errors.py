"""Errors that the CLI turns into one clear line and a non-zero exit code."""

from __future__ import annotations


class TossError(Exception):
    """A problem the user can fix: bad input, a bad option, a missing model. Printed without a traceback."""

    exit_code = 2


class InputError(TossError):
    """A row of the input data is unusable. The message names the file, the row and the field."""

    def __init__(self, source: str, row: int | None, field: str | None, problem: str):
        self.source, self.row, self.field, self.problem = source, row, field, problem
        where = [source]
        if row is not None:
            where.append(f"row {row}")
        if field:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {problem}")

    def __reduce__(self) -> tuple:  # raised in tokenizer worker processes, so it must survive pickling
        return type(self), (self.source, self.row, self.field, self.problem)


class ConfigError(TossError):
    """An option, a model path or a model pair is unusable."""
