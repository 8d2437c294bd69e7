"""Copy the Compose Specification JSON schema out of a Docker Compose v2 binary.

Docker Compose embeds the schema it validates every compose file against (from the
compose-go library) as plain JSON text in its executable. This finds that text and writes
it out unchanged, so the schema the tests use is exactly the one a given Compose release
enforces. Usage:

    python docker/schema/extract_schema.py PATH/TO/docker-compose docker/schema/compose-spec.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARKER = b'"$id": "compose_spec.json"'
START = b'{\n  "$schema"'


def extract(binary: bytes) -> bytes:
    marker = binary.index(MARKER)
    start = binary.rindex(START, 0, marker)
    text = binary[start:].decode("utf-8", errors="replace")
    schema, end = json.JSONDecoder().raw_decode(text)
    if schema.get("title") != "Compose Specification":
        raise ValueError("the embedded JSON found is not the Compose Specification schema")
    return text[:end].encode("utf-8") + b"\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    Path(argv[1]).write_bytes(extract(Path(argv[0]).read_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
