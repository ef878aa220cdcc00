"""Merged result files (the Evalkit's `<model>_<DATASET>.jsonl`) read the way its scorers read them.

Every Evalkit scorer reads the merged file with pandas `read_json(lines=True)` and takes columns
with `astype(str)`. pandas' default dtype inference re-formats a column whose values *all* parse as
Python floats (`"007"` -> 7 -> `"7"`, or 7.0 -> `"7.0"` when some value is not integral); one
non-numeric value anywhere in the file keeps the column as text (spec/evaluation.md section 2.1).
We reproduce that rule without pandas: `read_results` returns rows with the column values "as read"
(numbers where pandas would hold numbers), `as_str` is `astype(str)`, and `dump_rows` writes the
Evalkit's dump files (`to_json(orient="records", lines=True)`; compare them as parsed JSON).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kimia_jax.errors import ManifestError

_INT64 = (-(2**63), 2**63 - 1)


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool) or v is None or isinstance(v, (list, dict)):
        return None
    try:
        return float(v)  # what numpy's object -> float64 cast calls per element
    except (TypeError, ValueError, OverflowError):
        return None


def coerce_column(values: Sequence[Any]) -> list[Any]:
    """pandas read_json's per-column inference: all float-like -> int64 if every value is integral
    and fits, else float64; otherwise the values stay as they are."""
    if not values or all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return list(values)
    floats = [_as_float(v) for v in values]
    if any(f is None for f in floats):
        return list(values)
    if all(math.isfinite(f) and f == int(f) and _INT64[0] <= int(f) <= _INT64[1] for f in floats):
        return [int(f) for f in floats]
    return floats


def as_str(v: Any) -> str:
    """`Series.astype(str)` of one value as read (float64 prints like Python's repr)."""
    return str(v)


def iter_jsonl(path: str | os.PathLike[str], what: str = "a row") -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object is a
    ManifestError naming the file and line (`what` names the row in the message)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{n}: {what} must be a JSON object")
            yield n, row


def parse_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a jsonl file; a bad line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result file {path} does not exist")
    return [row for _, row in iter_jsonl(path)]


def coerce_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows as pandas holds them after read_json: numeric-looking columns converted."""
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    out = [dict(r) for r in rows]
    for c in cols:
        if any(c not in r for r in rows):
            continue  # a missing value makes the column NaN-padded; left as is (no fixture has it)
        new = coerce_column([r[c] for r in rows])
        for r, v in zip(out, new, strict=True):
            r[c] = v
    return out


def read_results(path: str | os.PathLike[str], *, strict: bool = False) -> list[dict[str, Any]]:
    """A merged result file as the Evalkit's scorers see it (strict: strings exactly as written)."""
    rows = parse_jsonl(path)
    return [dict(r) for r in rows] if strict else coerce_rows(rows)


def group_by_subset(rows: Sequence[Mapping[str, Any]]) -> dict[Any, list[Mapping[str, Any]]]:
    """pandas `groupby('subset')`: subsets in sorted order, rows in file order inside each."""
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        if "subset" not in r:
            raise ManifestError("every result row needs a 'subset' field (the metric grouping key)")
        groups.setdefault(r["subset"], []).append(r)
    return {k: groups[k] for k in sorted(groups)}


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # pandas writes NaN/inf as null
    return v


def dump_rows(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], *, ensure_ascii: bool = False
) -> None:
    """One compact JSON object per line, like pandas `to_json(orient='records', lines=True)`."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            obj = {k: _json_value(v) for k, v in r.items()}
            f.write(json.dumps(obj, ensure_ascii=ensure_ascii, separators=(",", ":")) + "\n")
