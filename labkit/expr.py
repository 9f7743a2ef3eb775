"""The `expect.check` language: a tiny, safe expression over result names.

A check is parsed with ``ast.parse(mode="eval")`` and then walked by this module's
own interpreter; it is never handed to ``eval``/``compile``. Only these forms
exist:

- names and dotted names (``sender.bytes_accepted``, ``case.wall_s``), looked
  up in the mapping given to :meth:`Check.evaluate` and nowhere else;
- int and float constants;
- ``+ - * / // % **`` and unary minus, with parentheses;
- comparisons ``== != < <= > >=`` (chained too: ``0 < x <= 10``);
- ``and``, ``or``, ``not``.

The language has two sorts, numbers and conditions, checked at compile time: a
check as a whole, and every operand of ``and``/``or``/``not``, must be a
condition (a comparison or a combination of them), and comparisons and
arithmetic take numbers. So ``sender.bytes_accepted`` alone, which would pass
on any non-zero count, is rejected instead of silently meaning "!= 0".
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Union

from socklab.errors import UsageError

Value = Union[int, float, bool, None]

# Checks live in one line of YAML; anything longer is a mistake, and the cap
# keeps parsing and evaluation cheap whatever the input.
MAX_CHECK_CHARS = 1000
# The vetting and evaluation recurse once per level; a cap far above any real
# check keeps them clear of Python's recursion limit wherever they are called.
MAX_NESTING = 100
# An int ** int whose result would exceed this many bits is refused: Python would
# happily spend minutes and gigabytes on 10 ** 10 ** 10.
MAX_POWER_BITS = 4096

_ARITHMETIC: dict[type, tuple[str, Callable[[object, object], object]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
    ast.FloorDiv: ("//", operator.floordiv),
    ast.Mod: ("%", operator.mod),
    ast.Pow: ("**", operator.pow),
}
_COMPARISONS: dict[type, Callable[[object, object], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_OPERATOR_WORDS = {
    ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<",
    ast.RShift: ">>", ast.MatMult: "@", ast.Invert: "~", ast.UAdd: "unary +",
    ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not",
}
_NODE_WORDS = {
    ast.Call: "function calls",
    ast.Subscript: "subscripts ([...])",
    ast.Slice: "slices",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.NamedExpr: "assignments (:=)",
    ast.JoinedStr: "f-strings",
    ast.FormattedValue: "f-strings",
    ast.IfExp: "if/else expressions",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Set: "sets",
    ast.Dict: "dicts",
    ast.Starred: "starred expressions",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}
_ALLOWED_FORMS = (
    "use result names (e.g. sender.bytes_accepted), numbers, + - * / // % **, "
    "comparisons (== != < <= > >=), and, or, not and parentheses"
)


class ExpressionError(UsageError):
    """A check that is not in the expression language; the message says why."""


@dataclass(frozen=True)
class Evaluation:
    """The outcome of one check on one case.

    ``observed`` maps every name the check uses to the value it had (None when
    absent or null); ``error`` says why the check could not be decided (a name
    without a value, a division by zero), in which case ``passed`` is False.
    ``observed`` is read-only: use ``dict(evaluation.observed)`` to serialise it.
    """

    passed: bool
    observed: Mapping[str, Value]
    error: str | None = None


class _EvaluationFailed(Exception):
    """Raised inside evaluation; becomes Evaluation.error."""


@dataclass(frozen=True)
class Check:
    """A compiled check: its source text, the dotted names it reads, its tree."""

    text: str
    names: tuple[str, ...]
    _tree: ast.expr = field(repr=False, compare=False)

    def evaluate(self, values: Mapping[str, Value]) -> Evaluation:
        """Decide the check on ``values`` (result name -> number, None if null).

        Never raises for missing values or arithmetic faults: those become
        ``Evaluation.error`` with ``passed`` False. ``and``/``or`` short-circuit
        as in Python, so a name that is not needed may be missing.
        """
        observed = MappingProxyType({name: values.get(name) for name in self.names})
        try:
            passed = _evaluate(self._tree, values)
        except _EvaluationFailed as exc:
            return Evaluation(False, observed, str(exc))
        return Evaluation(bool(passed), observed, None)


def compile_check(text: str) -> Check:
    """Parse and vet ``text``; raise ExpressionError naming what is not allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("the check is empty: write a condition such as sender.bytes_accepted > 0")
    if len(text) > MAX_CHECK_CHARS:
        raise ExpressionError(f"the check is longer than {MAX_CHECK_CHARS} characters: split it into several expectations")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ExpressionError(f"{text!r} is not a valid expression ({exc.msg}): {_ALLOWED_FORMS}") from None
    except (RecursionError, MemoryError):
        raise ExpressionError(f"{text!r} is nested too deeply: simplify it") from None
    if _nesting(tree) > MAX_NESTING:
        raise ExpressionError(f"{text!r} is nested more than {MAX_NESTING} levels deep: simplify it")
    _reject_forbidden(tree, text)
    _vet_condition(tree, text)
    names: list[str] = []
    _collect_names(tree, names)
    return Check(text, tuple(dict.fromkeys(names)), tree)


def _nesting(tree: ast.expr) -> int:
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _reject_forbidden(tree: ast.expr, text: str) -> None:
    # ast.walk is breadth-first, so the outermost offending construct is named
    # (`__import__('os')` reports the call, not the string inside it).
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if not isinstance(node.value, (ast.Name, ast.Attribute)):
                raise ExpressionError(
                    f"{text!r}: attribute access (.{node.attr}) is allowed only on names such as "
                    f"sender.bytes_accepted: {_ALLOWED_FORMS}")
            _check_name_part(node.attr, text)
        elif isinstance(node, ast.Name):
            _check_name_part(node.id, text)
        elif isinstance(node, ast.Constant):
            _check_constant(node.value, text)
        elif isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp)):
            ops = node.ops if isinstance(node, ast.Compare) else [node.op]
            for op in ops:
                if type(op) in _OPERATOR_WORDS:
                    raise ExpressionError(
                        f"{text!r}: the operator {_OPERATOR_WORDS[type(op)]} is not allowed: {_ALLOWED_FORMS}")
        elif not isinstance(node, (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)):
            what = _NODE_WORDS.get(type(node), type(node).__name__)
            raise ExpressionError(f"{text!r}: {what} are not allowed: {_ALLOWED_FORMS}")


def _check_name_part(part: str, text: str) -> None:
    if part.startswith("_"):
        raise ExpressionError(f"{text!r}: names starting with _ ({part}) are not allowed: {_ALLOWED_FORMS}")


def _check_constant(value: object, text: str) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return
    if isinstance(value, (str, bytes)):
        what = "text (strings)"
    elif isinstance(value, bool) or value is None:
        what = f"{value} (only numbers)"
    else:
        what = f"the constant {value!r}"
    raise ExpressionError(f"{text!r}: {what} is not allowed: {_ALLOWED_FORMS}")


def _is_condition(node: ast.expr) -> bool:
    return isinstance(node, (ast.Compare, ast.BoolOp)) or (
        isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not))


def _vet_condition(node: ast.expr, text: str) -> None:
    if not _is_condition(node):
        raise ExpressionError(
            f"{text!r}: {ast.unparse(node)} is a number, not a condition: compare it "
            f"(e.g. {ast.unparse(node)} > 0)")
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _vet_condition(value, text)
    elif isinstance(node, ast.UnaryOp):
        _vet_condition(node.operand, text)
    else:
        for operand in (node.left, *node.comparators):
            _vet_number(operand, text)


def _vet_number(node: ast.expr, text: str) -> None:
    if _is_condition(node):
        raise ExpressionError(
            f"{text!r}: the condition {ast.unparse(node)} is used as a number: "
            f"compare numbers, and join conditions with and/or")
    if isinstance(node, ast.BinOp):
        _vet_number(node.left, text)
        _vet_number(node.right, text)
    elif isinstance(node, ast.UnaryOp):
        _vet_number(node.operand, text)


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    assert isinstance(node, ast.Attribute)
    return f"{_dotted(node.value)}.{node.attr}"


def _collect_names(node: ast.expr, names: list[str]) -> None:
    # Source order (not ast.walk's breadth-first order) so `names` reads like the check.
    if isinstance(node, (ast.Name, ast.Attribute)):
        names.append(_dotted(node))
        return
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.expr):
            _collect_names(child, names)


def _evaluate(node: ast.expr, values: Mapping[str, Value]) -> object:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Name, ast.Attribute)):
        name = _dotted(node)
        if name not in values:
            raise _EvaluationFailed(f"{name} is not in this case's results")
        value = values[name]
        if value is None:
            raise _EvaluationFailed(f"{name} is null in this case's results (it does not apply)")
        return value
    if isinstance(node, ast.BoolOp):
        want = isinstance(node.op, ast.Or)
        for value in node.values:
            if bool(_evaluate(value, values)) is want:
                return want
        return not want
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, values)
        return (not operand) if isinstance(node.op, ast.Not) else -operand
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, values)
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator, values)
            if not _COMPARISONS[type(op)](left, right):
                return False
            left = right
        return True
    assert isinstance(node, ast.BinOp)
    left = _evaluate(node.left, values)
    right = _evaluate(node.right, values)
    symbol, function = _ARITHMETIC[type(node.op)]
    if symbol == "**":
        _guard_power(left, right)
    try:
        result = function(left, right)
    except ZeroDivisionError:
        raise _EvaluationFailed(f"{ast.unparse(node)} divides by zero") from None
    except OverflowError:
        raise _EvaluationFailed(f"{ast.unparse(node)} is too large to compute") from None
    if isinstance(result, complex):
        raise _EvaluationFailed(f"{ast.unparse(node)} has no real value")
    return result


def _guard_power(base: object, exponent: object) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * abs(base).bit_length() > MAX_POWER_BITS:
            raise _EvaluationFailed(f"{base} ** {exponent} is too large to compute")
