"""bench/structured.py's schemas: each compiles to a grammar our server accepts, and no two are the same (so every
compile it times is a cold one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` is not an installed package

from bench.structured import distinct_schemas, response_format, schema  # noqa: E402
from server.structured.grammar import json_grammar  # noqa: E402


def test_schemas_are_distinct_and_compile():
    schemas = [schema(), *distinct_schemas(12, seed=3)]
    assert len({json.dumps(s, sort_keys=True) for s in schemas}) == len(schemas)
    grammars = {json_grammar(s, where="response_format.json_schema.schema") for s in schemas}
    assert len(grammars) == len(schemas)
    assert distinct_schemas(4, seed=3) == distinct_schemas(4, seed=3)  # reproducible from the seed


def test_response_format_is_the_openai_shape():
    rf = response_format(schema())["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["required"] == ["title", "tags", "score", "summary"]
