"""Parse glmmTMB-style formula strings into fixed, offset and random-effect parts.

A small tokenizer that respects parentheses, brackets and quotes; no regular
expression ever sees the whole formula. The pieces handed on are text that
``formulaic`` understands (the fixed-effect part, the left side of each bar,
offset and response expressions), each with the position in the original
formula where it starts so that later errors can point at it.

What is recognised (as glmmTMB 1.1.5 does, see its ``splitForm``,
``findbars_x`` and ``expandAllGrpVar``):

- ``(lhs | g)``: a random-effect term with an unstructured (``us``) covariance;
- ``(lhs || g)``: the same with a diagonal covariance (glmmTMB's
  ``expand_doublevert_method = "diag_special"``: one ``diag`` term, not split);
- ``struct(lhs | g, args...)`` for each name in :data:`STRUCTURES`;
- grouping expressions ``a/b`` (``a`` and ``a:b``), ``a*b`` (``a``, ``b``,
  ``a:b``), ``a + b``, ``a:b`` on the right of the bar, in R's term order;
- ``offset(expr)`` terms (any number) and ``cbind(successes, failures)``
  responses.

R's ``^`` means a power inside function calls (``I(x^2)``, ``log(x^2)``) and in
response, offset and ``cbind`` expressions; it is rewritten to Python's ``**``
there and left alone where it is a formula operator (``(a + b)^2``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

STRUCTURES: tuple[str, ...] = (
    "us", "diag", "homdiag", "cs", "homcs", "toep", "ar1", "hetar1",
    "ou", "exp", "gau", "mat", "rr", "propto", "equalto",
)
"""Covariance-structure wrappers accepted around a bar term (glmmTMB's names)."""


class FormulaError(ValueError):
    """A formula that cannot be used, with the formula and a caret at the problem."""


def formula_error(text: str, pos: int | None, message: str) -> FormulaError:
    """Build a :class:`FormulaError` whose message shows ``text`` with a caret at ``pos``."""
    if pos is None:
        return FormulaError(f"{message}\n    {text}")
    pos = max(0, min(pos, len(text)))
    return FormulaError(f"{message}\n    {text}\n    {' ' * pos}^")


def suggest(name: str, candidates) -> str:
    """' Did you mean ...?' for the closest of ``candidates``, or ''."""
    close = difflib.get_close_matches(name, [str(c) for c in candidates], n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


# --------------------------------------------------------------------------- tokens

@dataclass(frozen=True)
class Token:
    kind: str   # "name", "number", "string", "op"
    text: str   # as written (backticks kept on quoted names)
    start: int
    end: int

    @property
    def name(self) -> str:
        """A name token's identifier, without backticks."""
        return self.text[1:-1] if self.text.startswith("`") else self.text


_OPS = ("||", "**", "==", "!=", "<=", ">=", "&&")
_SINGLE = "~+-*/:^|(),=<>[]{}!&@$"
_OPEN = {"(": ")", "[": "]", "{": "}"}


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens; raise :class:`FormulaError` on a stray character."""
    tokens, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c.isalpha() or c == "_" or (c == "." and not text[i + 1:i + 2].isdigit()):
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] in "._"):
                j += 1
            tokens.append(Token("name", text[i:j], i, j))
            i = j
        elif c.isdigit() or c == ".":
            j = _scan_number(text, i)
            tokens.append(Token("number", text[i:j], i, j))
            i = j
        elif c in "'\"`":
            j = text.find(c, i + 1)
            while j > 0 and text[j - 1] == "\\":
                j = text.find(c, j + 1)
            if j < 0:
                raise formula_error(text, i, f"Could not parse formula: the quote {c} is never closed.")
            tokens.append(Token("name" if c == "`" else "string", text[i:j + 1], i, j + 1))
            i = j + 1
        elif c == "%":
            j = text.find("%", i + 1)
            if j < 0:
                raise formula_error(text, i, "Could not parse formula: '%' starts an operator "
                                    "such as %in% that is never closed.")
            tokens.append(Token("op", text[i:j + 1], i, j + 1))
            i = j + 1
        elif text[i:i + 2] in _OPS:
            tokens.append(Token("op", text[i:i + 2], i, i + 2))
            i += 2
        elif c in _SINGLE:
            tokens.append(Token("op", c, i, i + 1))
            i += 1
        else:
            raise formula_error(text, i, f"Could not parse formula: unexpected character {c!r}.")
    return tokens


def _scan_number(text: str, i: int) -> int:
    j, n = i, len(text)
    while j < n and (text[j].isdigit() or text[j] == "."):
        j += 1
    sign = text[j + 1:j + 2] in ("+", "-")
    if j < n and text[j] in "eE" and text[j + 1 + sign:j + 2 + sign].isdigit():
        j += 2
        while j < n and text[j].isdigit():
            j += 1
    if j < n and text[j] == "L":  # R's integer suffix
        j += 1
    return j


# --------------------------------------------------------------------------- parsed pieces

@dataclass
class Expr:
    """A piece of the formula handed to formulaic, in Python spelling.

    ``python``: the text for formulaic; ``variables``: (name, position) of each
    bare name (a data column, or a name in the environment); ``functions``:
    (name, position) of each called name; ``start``: position in the formula.
    """

    python: str
    variables: list[tuple[str, int]]
    functions: list[tuple[str, int]]
    start: int


@dataclass
class PosCall:
    """``pos(x, y, ...)`` on the left of a bar: coordinate columns, replaced by ``placeholder``."""

    columns: tuple[str, ...]
    placeholder: str
    start: int


@dataclass
class BarTerm:
    """One random-effect term after expanding its grouping expression.

    ``lhs``: the left side of the bar; ``group``: the grouping variables of this
    expansion (``("recipe", "replicate")`` for ``recipe:replicate``);
    ``structure``: covariance structure name; ``args``: extra arguments of the
    wrapper as written (``{"d": 2}``, ``{"matrix": "M"}``); ``pos``: pos() calls
    on the left side; ``text``: the whole term as written; ``start``: its position.
    """

    lhs: Expr
    group: tuple[str, ...]
    group_start: int
    structure: str
    args: dict
    pos: list[PosCall]
    text: str
    start: int


@dataclass
class ParsedFormula:
    """A formula split into its parts (positions refer to ``text``)."""

    text: str
    response: list[Expr] | None          # one expression, or two for cbind(s, f)
    response_is_cbind: bool
    response_text: str | None
    fixed: Expr
    bars: list[BarTerm] = field(default_factory=list)
    offsets: list[Expr] = field(default_factory=list)


# --------------------------------------------------------------------------- parser

class _Parser:
    """Token-level helpers over one formula string."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.close = self._match()
        self.in_call = self._call_depths()

    def error(self, pos: int | None, message: str) -> FormulaError:
        return formula_error(self.text, pos, f"Could not parse formula: {message}")

    def pos_of(self, i: int) -> int:
        return self.tokens[i].start if i < len(self.tokens) else len(self.text)

    def _match(self) -> dict[int, int]:
        stack, close = [], {}
        for i, t in enumerate(self.tokens):
            if t.kind == "op" and t.text in _OPEN:
                stack.append(i)
            elif t.kind == "op" and t.text in ")]}":
                if not stack:
                    raise self.error(t.start, f"the closing {t.text!r} has no opening bracket.")
                j = stack.pop()
                if _OPEN[self.tokens[j].text] != t.text:
                    opening = self.tokens[j]
                    raise self.error(t.start, f"{t.text!r} closes the {opening.text!r} at position {opening.start}.")
                close[j] = i
        if stack:
            raise self.error(self.tokens[stack[-1]].start, f"the {self.tokens[stack[-1]].text!r} is never closed.")
        return close

    def _call_depths(self) -> list[bool]:
        """For each token: is it inside the parentheses of a function call?"""
        flags, stack = [], []
        for i, t in enumerate(self.tokens):
            if t.kind == "op" and t.text in ")]}":
                stack.pop()
            flags.append(any(stack))
            if t.kind == "op" and t.text in _OPEN:
                stack.append(t.text == "(" and i > 0 and self.tokens[i - 1].kind == "name")
        return flags

    def top(self, a: int, b: int):
        """Indices in [a, b) at bracket depth 0 relative to a."""
        i = a
        while i < b:
            yield i
            t = self.tokens[i]
            i = self.close[i] + 1 if t.kind == "op" and t.text in _OPEN else i + 1

    def split(self, a: int, b: int, seps: tuple[str, ...]) -> list[tuple[int, int, int | None]]:
        """Split [a, b) at depth-0 separators: (start, end, index of the separator before)."""
        parts, start, sep = [], a, None
        for i in self.top(a, b):
            t = self.tokens[i]
            if t.kind == "op" and t.text in seps:
                parts.append((start, i, sep))
                start, sep = i + 1, i
        parts.append((start, b, sep))
        return parts

    def is_op(self, i: int, *texts: str) -> bool:
        return i < len(self.tokens) and self.tokens[i].kind == "op" and self.tokens[i].text in texts

    def is_group(self, a: int, b: int) -> bool:
        return b - a >= 2 and self.is_op(a, "(") and self.close[a] == b - 1

    def is_call(self, a: int, b: int) -> bool:
        return (b - a >= 3 and self.tokens[a].kind == "name" and self.is_op(a + 1, "(")
                and self.close[a + 1] == b - 1)

    def has_bar(self, a: int, b: int) -> bool:
        return any(self.is_op(i, "|", "||") for i in range(a, b))

    def source(self, a: int, b: int) -> str:
        return self.text[self.tokens[a].start:self.tokens[b - 1].end] if b > a else ""

    def expr(self, a: int, b: int, *, power_everywhere: bool = False,
             subs: dict[int, str] | None = None, skip: set[int] | None = None) -> Expr:
        """Render [a, b) for formulaic: R's ``^`` -> ``**`` where it is arithmetic."""
        subs, skip = subs or {}, skip or set()
        out, variables, functions = [], [], []
        prev_end = self.tokens[a].start if b > a else 0
        i = a
        while i < b:
            t = self.tokens[i]
            out.append(self.text[prev_end:t.start])
            prev_end = t.end
            if i in subs:
                out.append(subs[i])
                if i in skip:  # a replaced call: jump over its arguments
                    i = self.close[i + 1]
                    prev_end = self.tokens[i].end
                i += 1
                continue
            text = t.text
            if t.kind == "op" and t.text == "^" and (power_everywhere or self.in_call[i]):
                text = "**"
            elif t.kind == "name":
                nxt = self.tokens[i + 1] if i + 1 < len(self.tokens) else None
                called = nxt is not None and nxt.kind == "op" and nxt.text == "("
                keyword = (nxt is not None and nxt.kind == "op" and nxt.text == "="
                           and self.in_call[i])
                if called:
                    functions.append((t.name, t.start))
                elif not keyword and not (i > a and self.is_op(i - 1, "$", "@")):
                    variables.append((t.name, t.start))
            out.append(text)
            i += 1
        return Expr("".join(out).strip(), variables, functions, self.pos_of(a))


def parse_formula(text: str, *, role: str = "formula") -> ParsedFormula:
    """Parse ``text``; ``role`` is "formula" (two-sided), "ziformula" or "dispformula".

    Raises :class:`FormulaError` with the formula and a caret at the problem.
    """
    if not isinstance(text, str):
        raise FormulaError(f"{role} must be a string such as 'y ~ x + (1 | g)', got {type(text).__name__}.")
    p = _Parser(text)
    n = len(p.tokens)
    tildes = [i for i in p.top(0, n) if p.is_op(i, "~")]
    if len(tildes) > 1:
        raise p.error(p.pos_of(tildes[1]), "more than one '~'.")
    if not tildes:
        if role == "formula":
            raise p.error(0, "no '~': write the response on the left, e.g. 'y ~ x + (1 | g)'.")
        lhs, rhs = (0, 0), (0, n)
    else:
        lhs, rhs = (0, tildes[0]), (tildes[0] + 1, n)
    if rhs[0] >= rhs[1]:
        raise p.error(len(text), "nothing after '~' (use '~ 1' for an intercept only).")
    if role == "formula" and lhs[0] >= lhs[1]:
        raise p.error(0, "the formula has no response: write it as 'y ~ ...'.")
    if role != "formula" and lhs[0] < lhs[1]:
        raise p.error(0, f"{role} must be one-sided, such as '~ x'; remove the left-hand side.")

    response, is_cbind, response_text = None, False, None
    if lhs[0] < lhs[1]:
        response, is_cbind = _parse_response(p, *lhs)
        response_text = p.source(*lhs)

    for i in p.top(*rhs):
        if p.is_op(i, "|", "||"):
            raise p.error(p.pos_of(i), "random-effect terms must be in parentheses, e.g. '(1 | g)'.")

    fixed_parts, bars, offsets = [], [], []
    for a, b, sep in p.split(*rhs, seps=("+", "-")):
        sign = p.tokens[sep].text if sep is not None else "+"
        if a >= b:
            if sep is None:
                continue  # before a leading sign: the sign belongs to the next term
            raise p.error(p.pos_of(a), "a term is missing here.")
        _classify(p, a, b, sign, fixed_parts, bars, offsets)
    fixed = _join_fixed(p, fixed_parts, rhs[0])
    return ParsedFormula(text, response, is_cbind, response_text, fixed, bars, offsets)


def _parse_response(p: _Parser, a: int, b: int) -> tuple[list[Expr], bool]:
    if p.is_call(a, b) and p.tokens[a].name == "cbind":
        args = [(s, e) for s, e, _ in p.split(a + 2, b - 1, seps=(",",))]
        if len(args) != 2 or any(s >= e for s, e in args):
            got = len([1 for s, e in args if s < e])
            raise p.error(p.pos_of(a), f"cbind() takes exactly two arguments, (successes, failures); got {got}.")
        return [p.expr(s, e, power_everywhere=True) for s, e in args], True
    return [p.expr(a, b, power_everywhere=True)], False


def _classify(p: _Parser, a: int, b: int, sign: str, fixed_parts, bars, offsets) -> None:
    """Sort the term [a, b) into fixed part, bar terms or offsets."""
    if not p.has_bar(a, b):
        if p.is_call(a, b) and p.tokens[a].name == "offset":
            if sign == "-":
                raise p.error(p.pos_of(a), "an offset cannot be subtracted; write offset(-x).")
            args = p.split(a + 2, b - 1, seps=(",",))
            if len(args) != 1 or args[0][0] >= args[0][1]:
                raise p.error(p.pos_of(a), "offset() takes exactly one expression.")
            offsets.append(p.expr(args[0][0], args[0][1], power_everywhere=True))
        else:
            fixed_parts.append((sign, a, b))
        return
    if sign == "-":
        raise p.error(p.pos_of(a), "a random-effect term cannot be subtracted.")
    if p.is_group(a, b):
        inner = (a + 1, b - 1)
        if any(p.is_op(i, "|", "||") for i in p.top(*inner)):
            bars.extend(_bar(p, *inner, structure=None, args={}, outer=(a, b)))
            return
        for s, e, sep in p.split(*inner, seps=("+", "-")):
            if s >= e:
                raise p.error(p.pos_of(s), "a term is missing here.")
            if not p.has_bar(s, e):
                raise p.error(p.pos_of(s), "fixed effects cannot share parentheses with random-effect terms; "
                              "move this term out.")
            _classify(p, s, e, p.tokens[sep].text if sep is not None else "+", fixed_parts, bars, offsets)
        return
    if p.is_call(a, b):
        name = p.tokens[a].name
        argspans = [(s, e) for s, e, _ in p.split(a + 2, b - 1, seps=(",",))]
        s, e = argspans[0]
        while p.is_group(s, e):
            s, e = s + 1, e - 1
        if s < e and any(p.is_op(i, "|", "||") for i in p.top(s, e)):
            if name not in STRUCTURES:
                raise p.error(p.pos_of(a), f"unknown covariance structure {name!r}.{suggest(name, STRUCTURES)} "
                              f"Known structures: {', '.join(STRUCTURES)}.")
            args = _wrapper_args(p, name, argspans[1:])
            bars.extend(_bar(p, s, e, structure=name, args=args, outer=(a, b)))
            return
    bar = next(i for i in range(a, b) if p.is_op(i, "|", "||"))
    raise p.error(p.pos_of(bar), "a random-effect term must stand alone in the sum, written '(lhs | group)' "
                  "or 'structure(lhs | group)', e.g. '+ (1 | g)' or '+ ar1(time + 0 | g)'.")


def _wrapper_args(p: _Parser, name: str, spans) -> dict:
    """Extra arguments of a structure wrapper: ``d = 2``, positional values, names."""
    positional = {"rr": "d", "propto": "matrix", "equalto": "matrix"}
    args = {}
    for s, e in spans:
        if s >= e:
            raise p.error(p.pos_of(s), "empty argument.")
        if e - s >= 3 and p.tokens[s].kind == "name" and p.is_op(s + 1, "="):
            key, vs = p.tokens[s].name, s + 2
        elif name in positional and positional[name] not in args:
            key, vs = positional[name], s
        else:
            raise p.error(p.pos_of(s), f"{name}() takes no further positional argument here.")
        if key == "n" and name == "rr":
            key = "d"  # old glmmTMB spelling rr(x | g, n = 2)
        if e - vs != 1 and not (e - vs == 2 and p.is_op(vs, "-")):
            raise p.error(p.pos_of(vs), f"argument {key!r} of {name}() must be a number or a name.")
        t = p.tokens[e - 1]
        if t.kind == "number":
            v = float(t.text.rstrip("L"))
            v = int(v) if v.is_integer() else v
            args[key] = -v if e - vs == 2 else v
        elif t.kind in ("name", "string"):
            args[key] = t.name if t.kind == "name" else t.text[1:-1]
        else:
            raise p.error(t.start, f"argument {key!r} of {name}() must be a number or a name.")
    return args


def _bar(p: _Parser, a: int, b: int, *, structure, args, outer) -> list[BarTerm]:
    """(lhs | g) on tokens [a, b): one BarTerm per expanded grouping term."""
    bar = next(i for i in p.top(a, b) if p.is_op(i, "|", "||"))
    if any(p.is_op(i, "|", "||") for i in p.top(bar + 1, b)):
        raise p.error(p.pos_of(bar), "more than one '|' in one random-effect term.")
    if p.tokens[bar].text == "||":
        if structure is not None:
            raise p.error(p.pos_of(bar), f"'||' cannot be combined with {structure}(); write {structure}(lhs | g).")
        structure = "diag"
    structure = structure or "us"
    if bar == a:
        raise p.error(p.pos_of(bar), "nothing before '|': write '(1 | g)' for a random intercept.")
    if bar + 1 >= b:
        raise p.error(p.pos_of(bar + 1), "no grouping factor after '|'.")
    subs, skip, pos = {}, set(), []
    for i in range(a, bar):
        if p.tokens[i].kind == "name" and p.tokens[i].name == "pos" and p.is_op(i + 1, "("):
            cols = []
            for s, e, _ in p.split(i + 2, p.close[i + 1], seps=(",",)):
                if e - s != 1 or p.tokens[s].kind != "name":
                    raise p.error(p.pos_of(s), "pos() takes the names of numeric coordinate columns, e.g. pos(x, y).")
                cols.append(p.tokens[s].name)
            ph = f"_tmbx_pos{len(pos)}"
            subs[i], pos = ph, pos + [PosCall(tuple(cols), ph, p.pos_of(i))]
            skip.add(i)
    lhs = p.expr(a, bar, subs=subs, skip=skip)
    groups = _GroupParser(p, bar + 1, b).parse()
    text = p.source(*outer)
    return [BarTerm(lhs, g, p.pos_of(bar + 1), structure, dict(args), pos, text, p.pos_of(outer[0]))
            for g in groups]


class _GroupParser:
    """Grouping expressions: ``a``, ``a:b``, ``a/b``, ``a*b``, ``a + b``, parentheses.

    Each result is a tuple of variable names (one random-effect term), in R's
    ``terms()`` order: by number of variables, then as written.
    """

    def __init__(self, p: _Parser, a: int, b: int):
        self.p, self.i, self.b = p, a, b
        self.nested = False

    def parse(self) -> list[tuple[str, ...]]:
        terms = self.sum()
        if self.i < self.b:
            raise self.p.error(self.p.pos_of(self.i), "unexpected text in the grouping factor "
                               "(allowed: names joined by ':', '/', '*', '+').")
        unique = list(dict.fromkeys(terms))
        if self.nested:
            # lme4's expandSlash (and glmmTMB's): a/b -> b:a, a (innermost first)
            return unique
        return sorted(unique, key=len)

    def peek(self, *ops: str) -> bool:
        return self.i < self.b and self.p.is_op(self.i, *ops)

    def sum(self):
        terms = self.product()
        while self.peek("+"):
            self.i += 1
            terms = terms + self.product()
        return terms

    def product(self):
        terms = self.interaction()
        while self.peek("*", "/"):
            op = self.p.tokens[self.i].text
            self.i += 1
            right = self.interaction()
            if op == "*":
                terms = terms + right + [_join(x, y) for x in terms for y in right]
            else:
                # a/b is (1|b:a) + (1|a), named and ordered as lme4's expandSlash
                self.nested = True
                inner = max(terms, key=len)
                terms = [_join(y, inner) for y in right] + terms
        return terms

    def interaction(self):
        terms = self.atom()
        while self.peek(":"):
            self.i += 1
            right = self.atom()
            terms = [_join(x, y) for x in terms for y in right]
        return terms

    def atom(self):
        p = self.p
        if self.i >= self.b:
            raise p.error(p.pos_of(self.i), "a grouping variable is missing here.")
        t = p.tokens[self.i]
        if p.is_op(self.i, "("):
            end = p.close[self.i]
            inner = _GroupParser(p, self.i + 1, end)
            terms = inner.sum()
            if inner.i < end:
                raise p.error(p.pos_of(inner.i), "unexpected text in the grouping factor.")
            self.i = end + 1
            return terms
        if t.kind != "name" or p.is_op(self.i + 1, "("):
            raise p.error(t.start, "the grouping factor must be a column name (or names joined by ':', '/', '*'); "
                          "compute other groupings as a column first.")
        self.i += 1
        return [(t.name,)]


def _join(x: tuple[str, ...], y: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(x + y))


def _join_fixed(p: _Parser, parts, rhs_start: int) -> Expr:
    """The fixed-effect terms, signs kept, as one formulaic expression ("1" if none)."""
    if not parts:
        return Expr("1", [], [], p.pos_of(rhs_start))
    pieces, variables, functions = [], [], []
    for k, (sign, a, b) in enumerate(parts):
        e = p.expr(a, b)
        variables += e.variables
        functions += e.functions
        if k == 0:
            pieces.append(("-" if sign == "-" else "") + e.python)
        else:
            pieces.append(f" {sign} {e.python}")
    return Expr("".join(pieces), variables, functions, p.pos_of(parts[0][1]))
