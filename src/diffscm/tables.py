"""One Markdown table helper for the reports of `evaluation/` and `benchmarks/`."""


def markdown_table(header: list[str], rows: list[list], numeric: list[bool] | None = None) -> str:
    """A GitHub Markdown table; columns are right-aligned where `numeric` says so (default: all but the first)."""
    numeric = numeric if numeric is not None else [False] + [True] * (len(header) - 1)
    if len(numeric) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError(f"Every row needs {len(header)} cells, as the header has.")
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
