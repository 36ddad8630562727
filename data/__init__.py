"""treetune.data: problems, their sources, prompt templates, step splitting and the arith task."""

from treetune.data.answers import extract_answer, gsm8k_answer, last_boxed
from treetune.data.problem import Problem
from treetune.data.prompts import DEFAULT_INSTRUCTION, PromptTemplate
from treetune.data.records import DataError, SkipReport
from treetune.data.sources import ProblemArgs, load_problems
from treetune.data.steps import split_steps

__all__ = [
    "DEFAULT_INSTRUCTION", "DataError", "Problem", "ProblemArgs", "PromptTemplate", "SkipReport", "extract_answer",
    "gsm8k_answer", "last_boxed", "load_problems", "split_steps",
]
