"""Our grammars (xgrammar EBNF) as llama.cpp GBNF (server/backends/llamacpp/gbnf.py): every grammar the structured-
output tests use translates, llama.cpp's own llama-server takes each one, and what it writes under it is text
xgrammar accepts for the original grammar; what GBNF cannot express exactly is a 400 that says what.
The end-to-end structured-output suite runs on ENGINE=llamacpp too (tests/test_structured_outputs.py)."""

from __future__ import annotations

import re

import httpx
import pytest

from server.backends.llamacpp.gbnf import GrammarNotExpressible, to_gbnf
from server.structured.grammar import json_grammar
from tests.test_llamacpp import raw_llama  # noqa: F401 - llama.cpp's own server on the embedded GGUF
from tests.test_structured_outputs import SEARCH, WEATHER, schema_format

# A safe pattern never writes what a JSON string escapes; the awkward literal crosses every escape both dialects have.
PATTERN = {"type": "object", "required": ["code"], "additionalProperties": False,
           "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"}}}
AWKWARD = 'root ::= "a\\"b\\\\c[d]-e^f\\tg\\u00e9h\\U0001F600i" [\\^\\-\\]x] [^\\0-\\x1f"\\\\]\n'


def structured_grammars() -> dict[str, str]:
    """Each grammar the structured-output tests make, for chat-template models and for ChatGLM3."""
    from server.families.chatglm3.grammar import PLAIN_ANSWER, call_grammar, metadata_and_call
    from server.structured.formats import json_call_grammar, response_grammar

    person = {"type": "json_schema", "schema": schema_format()["json_schema"]["schema"]}
    tools = [(0, WEATHER["function"]), (1, SEARCH["function"])]
    flag = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False}
    return {
        "json_object": response_grammar({"type": "json_object"}),
        "person": response_grammar(person),
        "flag": response_grammar({"type": "json_schema", "schema": flag}),
        "pattern": json_grammar(PATTERN, where="response_format.json_schema.schema"),
        "named_call": json_call_grammar(tools[:1], named=True),
        "required_call": json_call_grammar(tools, named=False),
        "chatglm3_person": response_grammar(person, prefix=PLAIN_ANSWER),
        "chatglm3_call": call_grammar(WEATHER["function"], 0),
        "chatglm3_required": metadata_and_call(tools),
        "awkward_literal": AWKWARD,
    }


def xgrammar_reads(ebnf: str, text: str) -> tuple[bool, bool]:
    """(the text is a prefix of the grammar's language, it is a whole sentence of it), by xgrammar itself."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo(["a"], xgr.VocabType.RAW, vocab_size=1)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(ebnf), terminate_without_stop_token=True)
    return matcher.accept_string(text), matcher.is_terminated()


@pytest.mark.parametrize("name", list(structured_grammars()))
def test_every_structured_output_grammar_translates(name):
    text = to_gbnf(structured_grammars()[name])
    assert to_gbnf(structured_grammars()[name]) is text  # cached by the grammar's text
    for line in text.splitlines():  # one rule a line, GBNF's names, none of xgrammar's own syntax left
        assert re.fullmatch(r"[A-Za-z0-9-]+ ::= .+", line), line
        assert "(=" not in line and ", -1}" not in line and "Regex(" not in line, line
    assert text.startswith("root ::= ")


def test_lookaheads_are_no_part_of_xgrammars_language():
    """Why dropping them keeps the language: xgrammar accepts a text that breaks a look-ahead (its parser never
    reads them; they only sort tokens early in its mask cache)."""
    assert xgrammar_reads('root ::= a ")"\na ::= "x" (= "y")\n', "x)") == (True, True)
    assert to_gbnf('root ::= a ")"\na ::= "x" (= "y")\n') == 'root ::= a ")"\na ::= "x"\n'


@pytest.mark.parametrize("ebnf, what", [
    (json_grammar({"type": "string", "pattern": "^a.b$"}, where="x"), "can match a quote"),
    (json_grammar({"type": "string", "maxLength": 5000}, where="x"), "up to 5000 times"),
    (json_grammar({"type": "array", "items": {"type": "integer"}, "minItems": 2500}, where="x"), "2499 times"),
    ('root ::= TagDispatch(("<t>", a), loop_after_dispatch=true, excludes=())\na ::= "x"\n', "TagDispatch"),
    ('root ::= Token(5) "a"\n', "Token(...)"),
    ('root ::= a\na[max_chars=3] ::= [a-z]*\n', "attributes"),
    ('root ::= root "a" | "a"\n', "left-recursive"),
    ('root ::= ("" | "a")* "b"\n', "can be empty"),
])
def test_what_gbnf_cannot_express_is_a_400_saying_what(ebnf, what):
    with pytest.raises(GrammarNotExpressible) as err:
        to_gbnf(ebnf)
    assert what in err.value.message and "ENGINE=llamacpp" in err.value.message
    assert err.value.code == "invalid_schema"


def test_llama_server_takes_every_translated_grammar(raw_llama):  # noqa: F811
    """llama.cpp's own server parses each translation (a bad grammar there is a 400), and greedy text under it is
    text xgrammar accepts for our grammar: all of it, or a prefix where n_predict cut it."""
    for name, ebnf in structured_grammars().items():
        r = httpx.post(raw_llama + "/completion", timeout=300, json={
            "prompt": "Write the answer.\n", "n_predict": 160, "temperature": 0, "grammar": to_gbnf(ebnf)})
        assert r.status_code == 200, (name, r.text)
        out = r.json()
        prefix, whole = xgrammar_reads(ebnf, out["content"])
        assert prefix, (name, out["content"])
        assert whole or out["stop_type"] == "limit", (name, out["content"], out["stop_type"])
        if name == "awkward_literal":
            assert out["content"].startswith('a"b\\c[d]-e^f\tgéh😀i')


def test_llama_server_refuses_a_grammar_with_a_400(raw_llama):  # noqa: F811
    """What gbnf.py exists to avoid, as llama-server answers it (glm-serve maps it to a 400 too: backend.http_error)."""
    r = httpx.post(raw_llama + "/completion", timeout=60, json={
        "prompt": "x", "n_predict": 1, "grammar": 'root ::= root_1\nroot_1 ::= "a"\n'})
    assert r.status_code == 400 and "grammar" in r.text
