"""Write observed outcomes into ``corpus.py``, one keyword per case.

``python -m tests.http.record FIELD FILE.json`` sets ``FIELD="..."`` (``haproxy``, ``nginx`` or
``llhttp``) on every case named in FILE.json, the ``{case id: text}`` object that
``python -m tests.http.run_corpus --emit`` prints. Cases the file does not name keep
what they had. The rest of ``corpus.py`` is left byte for byte as it was.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.py")
FIELDS = ("haproxy", "nginx", "llhttp")


def literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rewrite(source: str, field: str, values: Dict[str, str]) -> str:
    """``source`` with ``field=values[id]`` on each ``Case(id, ...)`` call."""
    data = source.encode("utf-8")
    starts = [0]
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def at(lineno: int, col: int) -> int:  # ast columns count UTF-8 bytes
        return starts[lineno - 1] + col

    edits: List[Tuple[int, int, bytes]] = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "Case" and node.args
                and isinstance(node.args[0], ast.Constant)):
            continue
        case_id = node.args[0].value
        if case_id not in values:
            continue
        text = literal(values[case_id]).encode("utf-8")
        existing: Optional[ast.keyword] = next((k for k in node.keywords if k.arg == field),
                                              None)
        if existing is not None:
            value = existing.value
            assert value.end_lineno is not None and value.end_col_offset is not None
            edits.append((at(value.lineno, value.col_offset),
                          at(value.end_lineno, value.end_col_offset), text))
        else:
            assert node.end_lineno is not None and node.end_col_offset is not None
            close = at(node.end_lineno, node.end_col_offset) - 1  # the call's ")"
            comma = b"" if data[:close].rstrip().endswith(b",") else b","
            edits.append((close, close, comma + b"\n         " + field.encode() + b"=" + text))
    for start, end, text in sorted(edits, reverse=True):
        data = data[:start] + text + data[end:]
    return data.decode("utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.http.record",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("field", choices=FIELDS)
    parser.add_argument("observed", help="JSON {case id: text} from run_corpus --emit")
    parser.add_argument("--corpus", default=CORPUS)
    args = parser.parse_args(argv)
    with open(args.observed, encoding="utf-8") as f:
        values = json.load(f)
    with open(args.corpus, encoding="utf-8") as f:
        source = f.read()
    with open(args.corpus, "w", encoding="utf-8") as f:
        f.write(rewrite(source, args.field, values))
    print(f"{args.corpus}: {args.field} set on {len(values)} cases", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
