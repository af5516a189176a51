#!/usr/bin/env python3
"""Prints the values reference of helm/beseda as a Markdown table, from the `# --` comments of
values.yaml (each describes the key on the next line).

  values_table.py                 print the table
  values_table.py --check FILE    exit 1 unless FILE holds the current table between the markers
  values_table.py --write FILE    replace the table between the markers in FILE

The markers are the lines `<!-- values-table:begin -->` and `<!-- values-table:end -->`.
"""

import json
import re
import sys
from pathlib import Path

import yaml

VALUES = Path(__file__).resolve().parent / "beseda" / "values.yaml"
BEGIN = "<!-- values-table:begin -->"
END = "<!-- values-table:end -->"
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):")


def described_keys(text):
    """Yields (dotted key path, description) for every key preceded by a `# --` comment."""
    path = []  # (indent, key) of the enclosing mappings
    description = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            description = stripped[len("# --"):].strip()
            continue
        if stripped.startswith("#") and description is not None:
            description += " " + stripped.lstrip("#").strip()
            continue
        match = KEY_LINE.match(line)
        if not match or stripped.startswith("- "):
            continue
        indent = len(match["indent"])
        while path and path[-1][0] >= indent:
            path.pop()
        path.append((indent, match["key"]))
        if description is not None:
            yield ".".join(k for _, k in path), description
            description = None


def lookup(values, dotted):
    node = values
    for part in dotted.split("."):
        node = node[part]
    return node


def render_default(value):
    if value == "" or value is None:
        return '`""`' if value == "" else "`null`"
    text = json.dumps(value, separators=(", ", ": ")) if isinstance(value, (dict, list, bool)) else str(value)
    return "`" + text.replace("|", "\\|") + "`"


def table():
    text = VALUES.read_text()
    values = yaml.safe_load(text)
    rows = ["| Key | Default | Description |", "|---|---|---|"]
    for dotted, description in described_keys(text):
        escaped = description.replace("|", "\\|")
        rows.append(f"| `{dotted}` | {render_default(lookup(values, dotted))} | {escaped} |")
    return "\n".join(rows) + "\n"


def replace_between_markers(document, generated):
    begin, end = document.find(BEGIN), document.find(END)
    if begin < 0 or end < begin:
        raise SystemExit(f"the markers {BEGIN} and {END} are missing")
    return document[: begin + len(BEGIN)] + "\n" + generated + document[end:]


def main(arguments):
    generated = table()
    if not arguments:
        sys.stdout.write(generated)
        return 0
    mode, target = arguments[0], Path(arguments[1])
    if not target.exists():
        raise SystemExit(f"{target} does not exist")
    document = target.read_text()
    updated = replace_between_markers(document, generated)
    if mode == "--write":
        target.write_text(updated)
        return 0
    if mode == "--check":
        if updated != document:
            print(f"{target}: the values table differs from helm/beseda/values.yaml; "
                  f"run python3 helm/values_table.py --write {target}", file=sys.stderr)
            return 1
        return 0
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
