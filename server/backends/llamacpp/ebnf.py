"""xgrammar's EBNF as str(Grammar) prints it (what server/structured writes) -> a small tree, for gbnf.py.

Read: rules (`name ::= body`, the name first on its line), literals and classes with xgrammar's escapes (\\x with
any number of hex digits, \\u, \\U, \\0, \\e, C's and the punctuation ones), groups, alternatives, `? * + {m}
{m,} {m,n}` (`{m, -1}`: no bound), look-aheads `(= ...)` (dropped: see gbnf.py) and `Regex("...", json_string=true)`
(expanded by xgrammar's own regex converter). What has no GBNF counterpart is GrammarNotExpressible here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from server.errors import EngineError

_JSON_ESCAPED = [(0, 0x1F), (ord('"'), ord('"')), (ord("\\"), ord("\\"))]  # what a JSON string must escape
_MACROS = ("TagDispatch", "TokenTagDispatch", "ExcludeToken", "Token", "Substring", "Regex")
_ESCAPES = {"n": 10, "r": 13, "t": 9, "0": 0, "a": 7, "b": 8, "f": 12, "v": 11, "e": 27}
_RULE_START = re.compile(r"([A-Za-z_][\w.\-]*)[ \t]*(\[[^\]\n]*\])?[ \t]*::=")
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:(,)\s*(-?\d+)?\s*)?\}")
_HEX = re.compile(r"[0-9A-Fa-f]+")


class GrammarNotExpressible(EngineError):
    def __init__(self, what: str):
        super().__init__(f"Structured outputs on ENGINE=llamacpp: {what}, which llama.cpp's grammars cannot express "
                         "exactly; change the schema or use ENGINE=native or ENGINE=vllm.", code="invalid_schema")


# -- the tree -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lit:
    text: str


@dataclass(frozen=True)
class Cls:
    negated: bool
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Ref:
    name: str


@dataclass(frozen=True)
class Seq:
    items: tuple


@dataclass(frozen=True)
class Alt:
    items: tuple


@dataclass(frozen=True)
class Rep:
    item: object
    low: int
    high: int | None  # None: no upper bound


# -- reading xgrammar's EBNF ----------------------------------------------------------------------------------

class Reader:
    def __init__(self, text: str, prefix: str = ""):
        self.s, self.i, self.prefix = text, 0, prefix
        self.rules: dict[str, object] = {}

    def fail(self, what: str) -> EngineError:
        return EngineError(f"The grammar cannot be read at offset {self.i} ({self.s[self.i:self.i + 40]!r}): {what}.")

    def space(self) -> bool:
        """Skip blanks and comments; True when a newline was crossed (a rule may start there)."""
        newline = self.i == 0
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "#":
                while self.i < len(self.s) and self.s[self.i] != "\n":
                    self.i += 1
            elif c in " \t\r\n":
                newline |= c == "\n"
                self.i += 1
            else:
                break
        return newline

    def rule_start(self):
        return _RULE_START.match(self.s, self.i)

    def read(self) -> dict[str, object]:
        self.space()
        while self.i < len(self.s):
            m = self.rule_start()
            if not m:
                raise self.fail("expected a rule `name ::= ...`")
            if m.group(2):
                raise GrammarNotExpressible(f"the grammar's rule {m.group(1)} has attributes {m.group(2)}")
            self.i = m.end()
            body = self.alt(top=True)
            if self.s.startswith("(=", self.i):  # a look-ahead: no part of the language (module docstring)
                self.i += 2
                self.alt()
                self.expect(")")
            self.rules[self.prefix + m.group(1)] = body
            self.space()
        return self.rules

    def expect(self, token: str) -> None:
        self.space()
        if not self.s.startswith(token, self.i):
            raise self.fail(f"expected {token!r}")
        self.i += len(token)

    def alt(self, top: bool = False):
        options = [self.seq(top)]
        while self.s.startswith("|", self.i):
            self.i += 1
            options.append(self.seq(top))
        return options[0] if len(options) == 1 else Alt(tuple(options))

    def seq(self, top: bool):
        items = []
        while True:
            newline = self.space()
            if self.i >= len(self.s) or self.s[self.i] in "|)" or self.s.startswith("(=", self.i):
                break
            if top and newline and self.rule_start():
                break
            items.append(self.quantified(self.atom()))
        return items[0] if len(items) == 1 else Seq(tuple(items))

    def atom(self):
        c = self.s[self.i]
        if c == '"':
            return Lit(self.string())
        if c == "[":
            return self.char_class()
        if c == "(":
            self.i += 1
            inner = self.alt()
            self.expect(")")
            return inner
        m = _NAME.match(self.s, self.i)
        if not m:
            raise self.fail("unexpected character")
        self.i = m.end()
        if m.group(0) in _MACROS and self.s.startswith("(", self.i):
            return self.macro(m.group(0))
        return Ref(self.prefix + m.group(0))

    def quantified(self, item):
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in "*+?":
                self.i += 1
                item = Rep(item, 1 if c == "+" else 0, 1 if c == "?" else None)
            elif c == "{":
                m = _REPEAT.match(self.s, self.i)
                if not m:
                    raise self.fail("a repetition must read {m}, {m,} or {m,n}")
                self.i = m.end()
                low = int(m.group(1))
                high = low if not m.group(2) else None if m.group(3) in (None, "-1") else int(m.group(3))
                item = Rep(item, low, high)
            else:
                break
        return item

    def char(self, extra: str = "") -> int:
        s, i = self.s, self.i
        if i >= len(s) or s[i] in "\r\n":
            raise self.fail("unterminated literal or class")
        if s[i] != "\\":
            self.i += 1
            return ord(s[i])
        e = s[i + 1:i + 2]
        if e in _ESCAPES:
            self.i += 2
            return _ESCAPES[e]
        if e == "x":
            m = _HEX.match(s, i + 2)
            if not m:
                raise self.fail("\\x needs hex digits")
            self.i = m.end()
            return int(m.group(0), 16)
        if e in ("u", "U"):
            n = 4 if e == "u" else 8
            digits = s[i + 2:i + 2 + n]
            if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"\\{e} needs {n} hex digits")
            self.i += 2 + n
            return int(digits, 16)
        if e and e in "'\"?\\/^$.*+()[]{}|-" + extra:
            self.i += 2
            return ord(e)
        raise self.fail(f"unknown escape \\{e}")

    def string(self) -> str:
        self.i += 1
        out = []
        while self.s[self.i:self.i + 1] != '"':
            out.append(chr(self.char()))
        self.i += 1
        return "".join(out)

    def char_class(self) -> Cls:
        self.i += 1
        negated = self.s.startswith("^", self.i)
        self.i += negated
        ranges: list[tuple[int, int]] = []
        while self.s[self.i:self.i + 1] != "]":
            low = self.char()
            high = low
            if self.s[self.i:self.i + 1] == "-" and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                high = self.char()
            ranges.append((low, high))
        self.i += 1
        return Cls(negated, tuple(ranges))

    def macro(self, name: str):
        if name != "Regex":
            raise GrammarNotExpressible(f"the grammar uses xgrammar's {name}(...)")
        self.expect("(")
        self.space()
        pattern = self.string()
        self.space()
        json_string = False
        if self.s.startswith(",", self.i):
            self.expect(",")
            self.expect("json_string")
            self.expect("=")
            self.space()
            json_string = self.s.startswith("true", self.i)
            self.i += 4 if json_string else 5
        self.expect(")")
        return self.regex(pattern, json_string)

    def regex(self, pattern: str, json_string: bool) -> Ref:
        import xgrammar as xgr

        name = f"{self.prefix}re{len(self.rules)}_{self.i}."
        try:
            text = str(xgr.Grammar.from_regex(pattern))
        except Exception as exc:  # noqa: BLE001 - xgrammar compiled it before, for the other engines
            raise GrammarNotExpressible(f"the pattern {pattern!r} ({exc})") from None
        sub = Reader(text, name).read()
        if json_string and any(may_match(node, _JSON_ESCAPED) for node in sub.values()):
            raise GrammarNotExpressible(f"the pattern {pattern!r} can match a quote, a backslash or a control "
                                        "character, which a JSON string escapes")
        self.rules.update(sub)
        return Ref(name + "root")


def may_match(node, bad: list[tuple[int, int]]) -> bool:
    """Whether any literal or class inside `node` can match a code point in `bad`."""
    def hit(lo: int, hi: int) -> bool:
        return any(lo <= b_hi and b_lo <= hi for b_lo, b_hi in bad)

    if isinstance(node, Lit):
        return any(hit(ord(c), ord(c)) for c in node.text)
    if isinstance(node, Cls):
        if not node.negated:
            return any(hit(lo, hi) for lo, hi in node.ranges)
        return any(not any(lo <= c and c <= hi for lo, hi in node.ranges)
                   for b_lo, b_hi in bad for c in range(b_lo, b_hi + 1))
    if isinstance(node, (Seq, Alt)):
        return any(may_match(n, bad) for n in node.items)
    if isinstance(node, Rep):
        return may_match(node.item, bad)
    return False
