"""GroundedPRM's tool: find the checkable equations of a reasoning step and check them exactly.

A step's equations are GSM8K calculator annotations (`<<48/2=24>>`) when it has any, else the
equalities written in its prose (`7+5=12`, `$1,200 x 3 = $3,600`, `\\frac{3}{4} \\cdot 8 = 6`,
`20% of ...` as `(20/100)`, unit words after numbers dropped). A step that states a final
answer (`\\boxed{}`, `#### N`, "The answer is") and computes nothing else is checked against the
result of the step just before it. Optionally (`grounding=True`) every operand must also appear in
the problem or an earlier step, which catches numbers copied wrongly (on arith, where every
operand is given; GSM8K's gold solutions use unstated constants such as 60 or 100, so it is off
by default).

The arithmetic itself runs in sandboxed worker processes (`SandboxPool` +
`sandbox_worker.check_equation`) with a time and memory limit: nothing model-written is ever
`eval`-ed here. Verdict per step: "correct" (every check passed), "incorrect" (one failed) or
"unverifiable" (nothing to check, or the tool refused what there was).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from treetune.data.answers import answer_is, gsm8k_answer, last_boxed
from treetune.rewards.sandbox.pool import SandboxPool

CHECK_FN = "treetune.rewards.sandbox.worker:check_equation"
MAX_STEP_CHARS = 20_000  # a longer "step" is not read at all
MAX_SIDE_CHARS = 400  # the worker's own cap; longer sides are refused before they are sent
MAX_EQUATIONS_PER_STEP = 32
VERDICTS = ("correct", "incorrect", "unverifiable")
SIGN = {"correct": 1, "incorrect": -1, "unverifiable": 0}

_ANNOTATION = re.compile(r"<<([^<>]{1,1000}?)>>")
_REPLACE = (
    ("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("\\left", ""), ("\\right", ""), ("\\!", ""),
    ("\\,", ""), ("\\;", " "), ("\\%", "%"), ("\\$", " "), ("$", " "), ("×", "*"), ("⋅", "*"), ("·", "*"),
    ("÷", "/"), ("−", "-"), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
)
_WORD_OPS = ((re.compile(r"\btimes\b(?=\s*[\d(])"), "*"), (re.compile(r"\bplus\b"), "+"),
             (re.compile(r"\bminus\b"), "-"), (re.compile(r"\bdivided by\b"), "/"), (re.compile(r"\bequals\b"), "="))
_FRAC = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_SQRT = re.compile(r"\\sqrt\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TIMES_X = re.compile(r"(?<=[\d)])\s*[xX]\s*(?=[\d(])")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")
_LINKING = r"(?:and|or|so|then|thus|hence|is|are|was|were|if|but|since|because|which|that|with|of|to|by|for|per|sqrt)"
_UNIT = rf"\s*\b(?!{_LINKING}\b)[A-Za-z]{{2,}}\b"
_UNITS_BEFORE_OP = re.compile(rf"(?<=\d){_UNIT}(?=\s*[-+*/])")  # "12 pages + 24 pages"
# before "=" only at the end of a computation: "... + 24 pages = 36", not "Drop 8 degrees = 2 - 8"
_UNITS_BEFORE_EQ = re.compile(rf"([-+*/]\s*\(?\s*\d+(?:\.\d+)?\s*\)?){_UNIT}(?=\s*=)")
_VULGAR = {"½": "1/2", "¼": "1/4", "¾": "3/4", "⅓": "1/3", "⅔": "2/3", "⅕": "1/5", "⅖": "2/5", "⅗": "3/5",
           "⅘": "4/5", "⅙": "1/6", "⅚": "5/6", "⅛": "1/8", "⅜": "3/8", "⅝": "5/8", "⅞": "7/8"}
_VULGAR_RE = re.compile(rf"(\d*)\s*([{''.join(_VULGAR)}])")  # "1½" is 1 + 1/2
_EN_DASH = re.compile(r"(?<=[\d\s)])[–—](?=[\s\d(])")
_LIST_MARKER = re.compile(r"^\s*(?:step\s*\d+\s*[:.)]|\d+\s*[.)](?=\s))\s*", re.IGNORECASE)
_RUN = re.compile(r"(?:sqrt|[0-9.+\-*/()=\s])+")
_SIDE_CHARS = re.compile(r"(?:sqrt|[0-9.+\-*/()\s])+")
_PERCENT_FORM = re.compile(r"^\((\d+(?:\.\d+)?)/100\)$")
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
_JUXTAPOSED = re.compile(r"[\d.)]\s+[\d(.]|\)\s*[\d(]|\d\s*\(")


@dataclass
class Equation:
    sides: list[str]  # normalised expressions, as sent to the tool; the later side of a pair is the claim
    source: str  # "annotation", "prose" or "answer"

    @property
    def text(self) -> str:
        return " = ".join(self.sides)


@dataclass
class EquationCheck:
    equation: Equation
    ok: bool | None  # None: the tool could not or would not evaluate it
    values: list[str] | None = None  # each side's exact value, as the tool computed it
    note: str = ""  # why it failed or was refused


@dataclass
class StepCheck:
    verdict: str
    checks: list[EquationCheck] = field(default_factory=list)

    @property
    def sign(self) -> int:
        """+1 correct, -1 incorrect, 0 unverifiable."""
        return SIGN[self.verdict]

    def to_dict(self) -> dict:
        return asdict(self)


# -- finding equations ---------------------------------------------------------------------------

def normalize_math(text: str) -> str:
    """Prose and LaTeX arithmetic as plain operators: `$1,200 x 3` -> ` 1200*3`, `\\frac{1}{2}` ->
    `((1)/(2))`, `20%` -> `(20/100)`, `2^{3}` -> `2**(3)`, unit words before an operator dropped."""
    for old, new in _REPLACE:
        text = text.replace(old, new)
    text = _VULGAR_RE.sub(lambda m: f"({m.group(1)}+{_VULGAR[m.group(2)]})" if m.group(1) else f"({_VULGAR[m.group(2)]})", text)
    for _ in range(4):  # nested fractions and roots, innermost first
        text = _FRAC.sub(r"((\1)/(\2))", _SQRT.sub(r"sqrt(\1)", text))
    text = _THOUSANDS.sub("", text)
    for pattern, op in _WORD_OPS:
        text = pattern.sub(op, text)
    text = _TIMES_X.sub("*", text)
    text = _PERCENT.sub(r"(\1/100)", text)
    text = _UNITS_BEFORE_EQ.sub(r"\1", _UNITS_BEFORE_OP.sub("", _EN_DASH.sub("-", text)))
    return text.replace("^", "**").replace("{", "(").replace("}", ")")


def _valid_side(side: str) -> bool:
    """A side worth sending: short, only digits, operators, parentheses and sqrt (so no names,
    attributes or dunders can reach even the sandbox), balanced, not cut off by prose."""
    side = side.strip()
    return (bool(side) and len(side) <= MAX_SIDE_CHARS and bool(_SIDE_CHARS.fullmatch(side))
            and any(c.isdigit() for c in side)
            and side.count("(") == side.count(")") and side[0] not in "*/" and side[-1] not in "+-*/."
            and not _JUXTAPOSED.search(side) and "***" not in side)


def _computes(side: str) -> bool:
    """Whether a side is a computation rather than a bare (possibly negative) number."""
    return bool(re.search(r"[+*/]|sqrt|(?<=[\d)\s])-", side.strip()))


def _chains(text: str) -> list[Equation]:
    """The `a op b = c [= d]` chains of one normalised step, skipping sides a variable cuts into."""
    out = []
    for run in _RUN.finditer(text):
        if "=" not in run.group():
            continue
        before = text[run.start() - 1] if run.start() > 0 else ""
        after = text[run.end()] if run.end() < len(text) else ""
        sides = run.group().split("=")
        first = sides[0].strip()
        if before and (before.isalnum() or before in ")]}_") and (first[:1] in "+-*/" or not run.group()[:1].isspace()):
            sides[0] = ""  # "x + 5 = 12": the left side is cut by a variable
        if after and after.isalnum() and not run.group()[-1:].isspace():
            sides[-1] = ""  # "= 3x": the right side is cut by a variable
        sides[-1] = re.sub(r"\.\s*$", "", sides[-1]) if re.search(r"\d\.\s*$", sides[-1]) else sides[-1]
        if first[:1] in ("+", "*", "/"):
            sides[0] = ""
        chain: list[str] = []
        for side in sides + [""]:  # the sentinel closes the last chain
            if _valid_side(side):
                chain.append(side.strip())
                continue
            if len(chain) >= 2 and any(_computes(s) for s in chain):
                out.append(Equation(chain, "prose"))
            chain = []
    return out


def extract_equations(step: str) -> list[Equation]:
    """The checkable equations of one step: its calculator annotations if it has any (the prose
    around them repeats them), else the equalities of its prose."""
    step = step[:MAX_STEP_CHARS]
    annotations = _ANNOTATION.findall(step)
    if annotations:
        out = []
        for inner in annotations:
            sides = [s.strip() for s in normalize_math(inner).split("=")]
            if len(sides) >= 2 and all(_valid_side(s) for s in sides):
                out.append(Equation(sides, "annotation"))
        return out[:MAX_EQUATIONS_PER_STEP]
    return _chains(normalize_math(_LIST_MARKER.sub("", step)))[:MAX_EQUATIONS_PER_STEP]


def final_answer(step: str) -> str | None:
    """The final answer a step states (`\\boxed{}`, `#### N`, "The answer is"), normalised, if it
    is a plain arithmetic expression; else None."""
    step = step[:MAX_STEP_CHARS]
    answer = last_boxed(step) or gsm8k_answer(step) or (answer_is(step) if "answer is" in step.lower() else None)
    if answer is None or "=" in answer:
        return None
    answer = normalize_math(answer).strip().rstrip(".").strip()
    return answer if _valid_side(answer) else None


def numbers_in(text: str) -> set[Fraction]:
    """Every number written in `text` (after normalisation), as exact fractions: what a later
    step may use as an operand under `grounding`."""
    return {Fraction(n) for n in _NUMBER.findall(normalize_math(text[:MAX_STEP_CHARS]))}


def operands(side: str) -> list[str]:
    """The number literals of one side of an equation."""
    return _NUMBER.findall(side)


# -- checking -----------------------------------------------------------------------------------

class StepTool:
    """Checks the steps of many solutions at once in a pool of sandboxed workers.

    `grounding`: also require every operand of a computation to appear in the problem or an
    earlier step (or in `constants`). `check_answers`: check a final-answer step against the last
    result computed before it.
    """

    def __init__(self, pool: SandboxPool | None = None, workers: int = 2, timeout: float = 2.0,
                 memory_mb: int = 1024, grounding: bool = False, check_answers: bool = True,
                 constants: Sequence[float | str] = ()):
        self._own_pool = pool is None
        self.pool = pool or SandboxPool(size=workers, timeout=timeout, memory_mb=memory_mb)
        self.timeout = timeout
        self.grounding = grounding
        self.check_answers = check_answers
        self.constants = {Fraction(str(c)) for c in constants}
        self._cache: dict[tuple[str, ...], tuple[bool | None, list[str] | None, str]] = {}
        self._warm = False

    def _warm_up(self) -> None:
        """Start every worker and import sympy there once, under a generous bound: the per-call
        `timeout` is meant for the arithmetic, not for a cold start on a busy machine."""
        if not self._warm:
            self.pool.map(CHECK_FN, [[["1+1", "2"]]] * self.pool.size, timeout=max(120.0, self.timeout), chunk_size=1)
            self._warm = True

    def evaluate(self, equations: Sequence[Equation], progress: bool = False) -> list[tuple[bool | None, list[str] | None, str]]:
        """(ok, values, note) per equation: ok is None when the tool refused or timed out."""
        keys = [tuple(e.sides) for e in equations]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            from tqdm.auto import tqdm

            self._warm_up()
            with tqdm(total=len(todo), desc="tool checks", unit="eq", disable=not progress) as bar:
                results = self.pool.map(CHECK_FN, [[list(k)] for k in todo], timeout=self.timeout, on_done=bar.update)
            for key, result in zip(todo, results):
                if result.ok:
                    ok = all(result.value["equal"])
                    self._cache[key] = (ok, result.value["values"], "" if ok else "the stated result differs from the computed one")
                else:
                    self._cache[key] = (None, None, (result.error or "refused").split(": ", 1)[-1])
            if len(self._cache) > 200_000:
                self._cache = {k: self._cache[k] for k in keys if k in self._cache}
        out = [self._cache[k] for k in keys]
        for key, (ok, _, note) in zip(keys, out):
            if ok is None and note.startswith(("timed out", "worker died")):
                self._cache.pop(key, None)  # may have been the machine's load, not the expression
        return out

    def check(self, questions: Sequence[str], solutions: Sequence[Sequence[str]], progress: bool = False) -> list[list[StepCheck]]:
        """For each (problem, steps), one `StepCheck` per step; all equations go to the workers in one batch."""
        plans: list[list[list[tuple[Equation, str]]]] = []  # per solution, per step: (equation, grounding note)
        flat: list[Equation] = []
        for question, steps in zip(questions, solutions):
            known = numbers_in(question) | self.constants
            last_claim: str | None = None
            plan = []
            for step in steps:
                equations = extract_equations(step)
                found = []
                for eq in equations:
                    missing = [n for n in operands(eq.sides[0]) if Fraction(n) not in known] if self.grounding else []
                    note = f"operand {missing[0]} appears neither in the problem nor in an earlier step" if missing else ""
                    found.append((eq, note))
                    known |= {Fraction(n) for side in eq.sides[1:] for n in operands(side)}
                if not equations and self.check_answers and last_claim is not None:
                    answer = final_answer(step)
                    if answer is not None:
                        found.append((Equation([last_claim, answer], "answer"), ""))
                # only the step just before an answer step says what it answers: "60%" answers 60
                last_claim = _PERCENT_FORM.sub(r"\1", equations[-1].sides[-1]) if equations else None
                known |= numbers_in(step)
                flat.extend(eq for eq, _ in found)
                plan.append(found)
            plans.append(plan)
        results = iter(self.evaluate(flat, progress))
        out = []
        for plan in plans:
            checks_per_step = []
            for found in plan:
                checks = []
                for eq, grounding_note in found:
                    ok, values, note = next(results)
                    if grounding_note:
                        ok, note = False, grounding_note
                    checks.append(EquationCheck(eq, ok, values, note))
                verdict = ("incorrect" if any(c.ok is False for c in checks)
                           else "correct" if any(c.ok for c in checks) else "unverifiable")
                checks_per_step.append(StepCheck(verdict, checks))
            out.append(checks_per_step)
        return out

    def close(self) -> None:
        if self._own_pool:
            self.pool.close()

    def __enter__(self) -> "StepTool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ToolStepScorer:
    """The tool as a `StepScorer`: 1 for a correct step, 0 for an incorrect one.

    An unverifiable step (no equation, or one the tool refused) scores `neutral` (0.5: the tool
    has no evidence either way), except after an incorrect step on the same path, where it scores
    0: a solution that has gone wrong stays wrong (the ProcessBench convention), so "last" and
    "min" aggregations still rank it below clean ones.
    """

    name = "tool"

    def __init__(self, tool: StepTool | None = None, neutral: float = 0.5, **tool_kwargs):
        self.tool = tool or StepTool(**tool_kwargs)
        self.neutral = neutral

    def score(self, problems: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[list[float]]:
        out = []
        for checks in self.tool.check(problems, solutions):
            scores, wrong = [], False
            for check in checks:
                wrong = wrong or check.verdict == "incorrect"
                scores.append(1.0 if check.verdict == "correct" else 0.0 if check.verdict == "incorrect"
                              else 0.0 if wrong else self.neutral)
            out.append(scores)
        return out

    def close(self) -> None:
        self.tool.close()
