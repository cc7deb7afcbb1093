"""Where rows come from: the source family of each row, so that a reference's training data and an evaluation set
can be compared by source.

A row's family is its `family` field; without one, its `source` field up to the first "/" or "#" (the bundled
files' `source` is "dataset/part#index"), where datasets of one origin are one family (`ONE_ORIGIN`: HH-RLHF's
harmless and helpful parts come from one crowd and one model); without either, it is unknown (None). A reference trained on any row of
unknown family cannot vouch that an evaluated family is out of its sources.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from toss_filter.data.load import read_records

UNKNOWN = "?"  # the family key of rows that name none
ONE_ORIGIN = {"hh-rlhf-helpful": "hh-rlhf", "hh-rlhf-harmless-base": "hh-rlhf"}


def row_family(record: Mapping[str, Any], family_column: str = "family", source_column: str = "source") -> str | None:
    """The source family of one row, or None when it names none."""
    family = record.get(family_column)
    if isinstance(family, str) and family.strip():
        return family.strip()
    source = record.get(source_column)
    if isinstance(source, str) and source.strip():
        dataset = re.split(r"[/#]", source.strip(), maxsplit=1)[0]
        return ONE_ORIGIN.get(dataset, dataset)
    return None


def data_families(sources: Iterable[str], split: str | None = None, max_rows: int | None = None) -> dict[str, int]:
    """Rows per family over `sources` read in order (the first `max_rows` rows in all, as `train-ref` reads them);
    rows that name no family count under UNKNOWN."""
    counts: Counter[str] = Counter()
    records = itertools.chain.from_iterable(read_records(source, split) for source in sources)
    for _, record in itertools.islice(records, max_rows):
        counts[row_family(record) or UNKNOWN] += 1
    return dict(sorted(counts.items()))
