"""Plain-text tables for the benchmark scripts' stdout, and the agreement measure they share."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        padded = zip(row, widths, numeric, strict=True)
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


AGREE_TOKENS = 32


def agreement(a: list[int], b: list[int]) -> float:
    """Share of the first ``AGREE_TOKENS`` greedy tokens that two outputs have in common."""
    a, b = a[:AGREE_TOKENS], b[:AGREE_TOKENS]
    return sum(x == y for x, y in zip(a, b, strict=False)) / max(len(a), len(b), 1)
