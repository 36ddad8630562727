"""treetune.data: problems, their sources, prompt templates, step splitting and the arith task."""

from .answers import extract_answer, gsm8k_answer, last_boxed
from .problem import Problem
from .prompts import DEFAULT_INSTRUCTION, PromptTemplate
from .records import DataError, SkipReport
from .sources import load_problems
from .steps import split_steps

__all__ = [
    "DEFAULT_INSTRUCTION", "DataError", "Problem", "PromptTemplate", "SkipReport", "extract_answer",
    "gsm8k_answer", "last_boxed", "load_problems", "split_steps",
]
