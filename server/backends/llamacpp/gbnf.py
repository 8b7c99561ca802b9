"""Our grammars (xgrammar EBNF, server/structured) -> llama.cpp GBNF, the `grammar` field of POST /completion.

Both dialects describe the same kind of thing (rules of literals, character classes, groups, alternatives and
repetitions over Unicode code points), but they read differently, so the text is parsed and written again:
- Rule names: GBNF takes [A-Za-z0-9-] only (xgrammar's are `root_prop_0`): renamed, `root` kept.
- Escapes: GBNF reads \\x with exactly two hex digits, \\u, \\U, \\t \\r \\n \\\\ \\" \\[ \\] \\- and nothing else
  (xgrammar also writes \\0, \\e, \\xHHHH...): every character outside printable ASCII is written as \\xHH, \\uHHHH
  or \\UHHHHHHHH. A rule is one line in GBNF (a newline ends it outside parentheses): each is written on one.
- Repetitions `x{m, n}` (xgrammar writes `{0, -1}` for no bound): kept where llama.cpp expands them exactly. It
  refuses a bound above 2000 and, above 2000 for the upper one, silently drops it (llama-grammar.cpp,
  MAX_REPETITION_THRESHOLD), so those are a 400 here. Anything but a literal, a class or a rule under a repetition
  becomes a rule of its own: llama.cpp counts the rules a group generates against the same limit.
- Look-ahead assertions `rule ::= body (= ...)` are dropped: they do not change which texts match. xgrammar's
  parser never reads them (cpp/earley_parser.cc: Advance/Complete have no look-ahead step); its grammar compiler
  uses them to classify tokens early in the token-mask cache (IsTokenPassLookaheadAssertion), and the JSON
  converter writes them from what follows the rule anyway. Tested: xgrammar accepts a text that breaks one.
- `Regex("...", json_string=true)` (a schema's `pattern`): expanded with xgrammar's own regex converter. As a JSON
  string's content, it matches the same text only where it can never produce a character JSON escapes (`"`, `\\`,
  control characters); otherwise it is a 400.
- Refused with a 400 naming the construct: TagDispatch and the other macros (Token, ExcludeToken,
  TokenTagDispatch, Substring), rule attributes (`name[max_chars=...]`), left recursion (llama.cpp rejects it).
"""

from __future__ import annotations

import re
from functools import lru_cache

from server.backends.llamacpp.ebnf import Alt, Cls, GrammarNotExpressible, Lit, Reader, Ref, Rep, Seq
from server.errors import EngineError
from server.structured.grammar import CACHE_SIZE

__all__ = ["GrammarNotExpressible", "to_gbnf"]
MAX_REPEAT = 2000  # llama-grammar.cpp MAX_REPETITION_THRESHOLD (build 11434)


# -- writing GBNF ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=CACHE_SIZE)
def to_gbnf(ebnf: str) -> str:
    """GBNF for `ebnf`, matching the same texts; GrammarNotExpressible (a 400) where llama.cpp cannot."""
    rules = Reader(ebnf).read()
    if "root" not in rules:
        raise EngineError("The grammar has no root rule.")
    _check_left_recursion(rules)
    return _Writer(rules).write()


class _Writer:
    def __init__(self, rules: dict[str, object]):
        self.rules = rules
        self.names: dict[str, str] = {}
        self.taken: set[str] = set()
        self.lines: list[str] = []

    def write(self) -> str:
        todo, seen = ["root"], {"root"}
        self.name("root")
        while todo:  # only what root reaches: xgrammar's text keeps rules nothing refers to
            rule = todo.pop()
            body = self.expr(self.rules[rule], top=True)
            self.lines.append(f"{self.names[rule]} ::= {body}")
            for ref in _refs(self.rules[rule]):
                if ref not in self.rules:
                    raise EngineError(f"The grammar refers to an undefined rule {ref!r}.")
                if ref not in seen:
                    seen.add(ref)
                    todo.append(ref)
        return "\n".join(self.lines) + "\n"

    def name(self, rule: str) -> str:
        if rule not in self.names:
            base = "root" if rule == "root" else re.sub(r"[^A-Za-z0-9-]+", "-", rule).strip("-") or "r"
            self.names[rule] = self.fresh(base)
        return self.names[rule]

    def fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self.taken or (name == "root" and base != "root"):
            n += 1
            name = f"{base}-{n}"
        self.taken.add(name)
        return name

    def expr(self, node, top: bool = False) -> str:
        if isinstance(node, Lit):
            return '"' + "".join(_char(ord(c), False) for c in node.text) + '"'
        if isinstance(node, Cls):
            if not node.ranges:
                if node.negated:
                    return "."
                raise GrammarNotExpressible("the grammar has an empty character class")
            body = "".join(_char(lo, True) + ("" if hi == lo else "-" + _char(hi, True)) for lo, hi in node.ranges)
            return f"[{'^' if node.negated else ''}{body}]"
        if isinstance(node, Ref):
            return self.name(node.name)
        if isinstance(node, Seq):
            return " ".join(self.expr(item) for item in node.items) if node.items else '""'
        if isinstance(node, Alt):
            text = " | ".join(self.expr(item, top=True) for item in node.items)
            return text if top else f"({text})"
        if isinstance(node, Rep):
            return self.repeat(node)
        raise TypeError(node)

    def repeat(self, node: Rep) -> str:
        low, high = node.low, node.high
        if high is not None and high < low:
            raise EngineError(f"The grammar has a repetition {{{low},{high}}} whose bounds are reversed.")
        if low > MAX_REPEAT or (high is not None and high > MAX_REPEAT):
            bound = high if high is not None and high > MAX_REPEAT else low
            raise GrammarNotExpressible(f"the grammar repeats an item up to {bound} times (a maxLength, "
                                        f"minLength, maxItems or minItems above {MAX_REPEAT})")
        item = node.item
        if high == 0 or item == Lit(""):
            return '""'
        if (low, high) == (1, 1):
            return self.expr(item)
        if isinstance(item, (Cls, Ref)) or (isinstance(item, Lit) and item.text):
            atom = self.expr(item)
        else:  # a group of its own: llama.cpp counts the rules a group generates against its repetition limit
            atom = self.fresh("rep")
            self.lines.append(f"{atom} ::= {self.expr(item, top=True)}")
        suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((low, high))
        if suffix is None:
            suffix = f"{{{low}}}" if low == high else f"{{{low},}}" if high is None else f"{{{low},{high}}}"
        return atom + suffix


def _char(cp: int, in_class: bool) -> str:
    c = chr(cp)
    if c in '"\\' or (in_class and c in "[]-"):
        return "\\" + c
    if c == "^" and in_class:
        return "\\x5E"  # GBNF has no \^; a caret first in a class would negate it
    if 0x20 <= cp < 0x7F:
        return c
    if c in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c]
    return f"\\x{cp:02X}" if cp < 0x100 else f"\\u{cp:04X}" if cp < 0x10000 else f"\\U{cp:08X}"


def _refs(node) -> list[str]:
    if isinstance(node, Ref):
        return [node.name]
    if isinstance(node, (Seq, Alt)):
        return [r for item in node.items for r in _refs(item)]
    if isinstance(node, Rep):
        return _refs(node.item)
    return []


def _check_left_recursion(rules: dict[str, object]) -> None:
    """llama.cpp refuses a grammar where a rule can reach itself before reading a character (llama_grammar_init:
    "left recursion detected"); xgrammar accepts them. Its repetitions x* are `s ::= x s |`, left-recursive when x
    can be empty."""
    nullable: dict[str, bool] = dict.fromkeys(rules, False)

    def empty(node) -> bool:
        if isinstance(node, Lit):
            return not node.text
        if isinstance(node, Ref):
            return nullable.get(node.name, False)
        if isinstance(node, Seq):
            return all(empty(i) for i in node.items)
        if isinstance(node, Alt):
            return any(empty(i) for i in node.items)
        if isinstance(node, Rep):
            return node.low == 0 or empty(node.item)
        return False

    changed = True
    while changed:
        changed = False
        for name, body in rules.items():
            if not nullable[name] and empty(body):
                nullable[name] = changed = True

    def first(node) -> set[str]:
        if isinstance(node, Ref):
            return {node.name}
        if isinstance(node, Alt):
            return set().union(*(first(i) for i in node.items))
        if isinstance(node, Seq):
            out: set[str] = set()
            for item in node.items:
                out |= first(item)
                if not empty(item):
                    break
            return out
        if isinstance(node, Rep):
            if node.high != node.low and node.high != 1 and empty(node.item):
                raise GrammarNotExpressible("the grammar repeats an item that can be empty (left recursion)")
            return first(node.item)
        return set()

    edges = {name: first(body) for name, body in rules.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str) -> None:
        state[name] = 1
        for nxt in edges.get(name, ()):
            if state.get(nxt) == 1:
                raise GrammarNotExpressible(f"the grammar's rule {nxt} is left-recursive")
            if nxt not in state:
                visit(nxt)
        state[name] = 2

    for name in rules:
        if name not in state:
            visit(name)
