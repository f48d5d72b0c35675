"""Named SQL statements, kept together in a domain's `queries.sql` as procrastinate keeps its own.

A file holds statements under headers `-- name --`; the comment lines of a statement document it in the file and
are left out of the text that is sent, so that a colon in a comment is never taken for a parameter. A line
`-- include name --` stands for the lines of a section above it: CTEs that two statements share are written once.
"""

import re
from pathlib import Path

_HEADER = re.compile(r"^-- ([a-z_]+) --$")
_INCLUDE = re.compile(r"^-- include ([a-z_]+) --$")


def load_queries(beside: str) -> dict[str, str]:
    """The statements of the `queries.sql` in the folder of the module file `beside` (pass `__file__`), by name."""
    queries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in (Path(beside).parent / "queries.sql").read_text().splitlines():
        if include := _INCLUDE.match(line):
            if current is None or include.group(1) not in queries:
                raise ValueError(f"{line!r} names no section above it")
            current.extend(queries[include.group(1)])
        elif header := _HEADER.match(line):
            current = queries.setdefault(header.group(1), [])
        elif current is not None and not line.lstrip().startswith("--"):
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in queries.items()}
