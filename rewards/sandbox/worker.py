"""The worker side of `treetune.rewards.sandbox.pool`: read a batch of calls a line, answer a line a call.

Started as `python -m treetune.rewards.sandbox.worker MEMORY_MB`. It caps its own address space
first, then serves calls to functions named "module:function" until stdin closes.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import traceback


def _load(name: str, cache: dict):
    if name not in cache:
        module, _, function = name.partition(":")
        if not module.startswith("treetune."):
            raise PermissionError(f"only treetune functions may run in the sandbox, not {name!r}")
        cache[name] = getattr(importlib.import_module(module), function)
    return cache[name]


def _serve(fn: str, args: list, cache: dict) -> dict:
    try:
        return {"ok": True, "value": _load(fn, cache)(*args)}
    except MemoryError:
        return {"ok": False, "error": "out of memory"}
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the caller
        return {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                "trace": traceback.format_exc(limit=3)[-2000:]}


def main() -> None:
    memory_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.set_int_max_str_digits(100_000)
    cache: dict = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("load"):  # import the function's module now, outside any call's time bound
            try:
                function = _load(request["fn"], cache)
                warmup = getattr(function, "sandbox_warmup", None)  # a sample call that pulls in lazy imports
                if warmup is not None:
                    function(*warmup)
                sys.stdout.write(json.dumps({"ok": True}) + "\n")
            except BaseException as err:  # noqa: BLE001
                sys.stdout.write(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}) + "\n")
            sys.stdout.flush()
            continue
        for args in request["batch"]:
            sys.stdout.write(json.dumps(_serve(request["fn"], args, cache)) + "\n")
            sys.stdout.flush()  # one answer a line, as soon as it is known: the caller times each one



# -- GroundedPRM's tool: exact arithmetic on one equation (see treetune.rewards.scorers.tool) -------
#
# sympy's own parser (`parse_expr`) turns text into Python code and runs it with `eval`, so it is
# not used on model-written text even here. The expression is parsed by Python's `ast` (which
# only parses), every node is checked against a short whitelist, and the value is built from
# exact sympy numbers, refusing any power whose result would be huge before computing it.

EQUATION_MAX_CHARS = 400  # per side
EQUATION_MAX_LITERAL_DIGITS = 60
EQUATION_MAX_RESULT_DIGITS = 2000
_EQUATION_ALPHABET = set("0123456789.+-*/() \tsqrt")


class Refused(ValueError):
    """The expression is outside what the tool evaluates (not a verdict on the step)."""


def _digits(value) -> float:
    """About how many decimal digits the numerator or denominator of a sympy number has."""
    import math

    p, q = value.as_numer_denom()
    if not (p.is_Integer and q.is_Integer):
        return 0.0  # an algebraic number such as sqrt(2): its size is bounded by the inputs
    return max(math.log10(abs(int(p)) + 1), math.log10(abs(int(q)) + 1))


def _power(base, exponent, max_digits: int):
    import sympy

    if not exponent.is_Rational:
        raise Refused("refused: irrational exponent")
    if abs(exponent.p) > 10_000 or exponent.q > 12:
        raise Refused(f"refused: exponent {exponent} is too large")
    if not base.is_Rational and abs(exponent) > 64:
        raise Refused("refused: a large power of a radical")
    if _digits(base) * abs(float(exponent)) > max_digits:
        raise Refused(f"refused: the power would have more than {max_digits} digits")
    if base == 0 and exponent < 0:
        raise Refused("refused: division by zero")
    return sympy.Pow(base, exponent)


def _exact_value(text: str, max_digits: int):
    """The exact sympy value of an arithmetic expression in digits, + - * / ** ( ) and sqrt()."""
    import ast

    import sympy

    if not isinstance(text, str):
        raise Refused("refused: not a string")
    if len(text) > EQUATION_MAX_CHARS:
        raise Refused(f"refused: expression longer than {EQUATION_MAX_CHARS} characters")
    if "__" in text or not set(text) <= _EQUATION_ALPHABET:
        raise Refused("refused: characters outside digits, operators, parentheses and sqrt")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as err:
        raise Refused(f"refused: not an arithmetic expression ({type(err).__name__})") from None

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            literal = ast.get_source_segment(text.strip(), node) or ""
            if not literal or not set(literal) <= set("0123456789."):
                raise Refused(f"refused: literal {literal!r}")
            if len(literal) > EQUATION_MAX_LITERAL_DIGITS:
                raise Refused("refused: number literal too long")
            return sympy.Rational(literal)  # exact: 0.1 is 1/10, not a binary float
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow):
                value = _power(left, right, max_digits)
            elif isinstance(node.op, ast.Div):
                if right == 0:
                    raise Refused("refused: division by zero")
                value = left / right
            else:
                value = left + right if isinstance(node.op, ast.Add) else left - right if isinstance(node.op, ast.Sub) else left * right
            if _digits(value) > max_digits:
                raise Refused(f"refused: an intermediate result has more than {max_digits} digits")
            return value
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt"
                and len(node.args) == 1 and not node.keywords):
            return sympy.sqrt(walk(node.args[0]))
        raise Refused(f"refused: {type(node).__name__} is not allowed")

    return walk(tree)


def _decimals(text: str) -> int:
    """Decimal places of a plain decimal literal ("3.33" -> 2); 0 for anything else."""
    text = text.strip()
    if text.count(".") == 1 and text.replace(".", "", 1).lstrip("-").isdigit():
        return len(text.split(".")[1])
    return 0


def _equal(left, right, claim_text: str) -> bool:
    """Whether `left` equals the claimed `right`. A claim written with d decimals may be `left`
    rounded to d places (half up) or cut off after them; any other claim must be exact."""
    import sympy

    difference = left - right  # sympy simplifies numbers as it builds them: sqrt(8) - 2*sqrt(2) is 0
    if difference == 0:
        return True
    places = _decimals(claim_text)
    if places:
        scale = sympy.Integer(10) ** places
        claimed = right * scale
        shifted = sympy.N(left * scale, 60)
        return bool(claimed.is_Integer and claimed in (sympy.floor(shifted + sympy.Rational(1, 2)), sympy.Integer(int(shifted))))
    size = max(abs(sympy.N(left, 40)), abs(sympy.N(right, 40)), 1)
    return bool(abs(sympy.N(difference, 40)) <= size * sympy.Float("1e-25", 40))  # exact, up to noise on radicals


def _show(value) -> str:
    """A value as a person writes it: 24, 0.25, 3.3333333 (8 significant digits when not exact)."""
    import sympy

    if value.is_Integer:
        return str(int(value))
    if value.is_Rational and 10 ** 12 % value.q == 0:  # a terminating decimal: write it exactly
        return format(sympy.N(value, 60), "f").rstrip("0").rstrip(".")
    shown = str(sympy.N(value, 8))
    return shown.rstrip("0").rstrip(".") if "." in shown and "e" not in shown else shown


def _running_claim(side: str) -> str | None:
    """The number a side starts with when an operator follows it ("1.50 + 3.00" -> "1.50")."""
    import re

    found = re.match(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*[-+*/]", side)
    return found.group(1) if found else None


def check_equation(sides: list[str], max_digits: int = EQUATION_MAX_RESULT_DIGITS) -> dict:
    """Evaluate every side of a chain `a = b = c` exactly; `equal[i]` says whether side i equals
    side i+1 (the later side is the claim), or, for a later side that starts a running total
    (`a = b + c = d`), its first number. Raises `Refused` for what it will not evaluate."""
    if not isinstance(sides, list) or not 2 <= len(sides) <= 16:
        raise Refused("refused: an equation has 2 to 16 sides")
    values = [_exact_value(side, max_digits) for side in sides]
    equal = []
    for i in range(len(values) - 1):
        ok = _equal(values[i], values[i + 1], sides[i + 1])
        carried = _running_claim(sides[i + 1])
        if not ok and carried:  # a running total, "3/2 = 1.50 + 3.00 = 4.50": the claim is 1.50
            ok = _equal(values[i], _exact_value(carried, max_digits), carried)
        equal.append(ok)
    return {"values": [_show(v) for v in values], "equal": equal}


if __name__ == "__main__":
    main()
