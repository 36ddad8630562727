"""Step scorers, one module each, and the one way to build any of them from a recipe:

    load_scorer("arith_checker")                           the exact arith step checker
    load_scorer("tool")                                    GroundedPRM's tool (sympy in a sandbox)
    load_scorer("self_eval", engine=policy)                the policy's own self-evaluation
    load_scorer("outputs/prm/model", step_mode="line")     a PRM trained by launch/train_prm.py
    load_scorer("Qwen/Qwen2.5-Math-PRM-7B", "qwen")        a released PRM, in its own convention

Every scorer implements `treetune.rollouts.scoring.StepScorer`; a job names one with the three
fields of `ScorerArgs` (`--scorer`, `--scorer_format`, `--step_mode`) and builds it with
`scorer_from_args`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from treetune.data.steps import step_separator
from treetune.rewards.scorers.arith_checker import ArithCheckerScorer
from treetune.rewards.scorers.discriminative import DiscriminativePRM
from treetune.rewards.scorers.grounded_gen import GroundedGenPRM
from treetune.rewards.scorers.released import MathShepherdPRM, QwenMathPRM
from treetune.rewards.scorers.self_eval import SelfEvaluation
from treetune.rewards.scorers.think_prm import ThinkPRM
from treetune.rewards.scorers.tool import ToolStepScorer
from treetune.rollouts.scoring import (
    AGGREGATIONS,
    NAMED_SCORERS,
    SCORER_FORMATS,
    STEP_MODES,
    PathValue,
    ScorerArgs,
    StepScorer,
    aggregate,
    score_tree_leaves,
)

__all__ = [
    "AGGREGATIONS",
    "NAMED_SCORERS",
    "RENAMED_FIELDS",
    "SCORER_FORMATS",
    "STEP_MODES",
    "ArithCheckerScorer",
    "DiscriminativePRM",
    "GroundedGenPRM",
    "MathShepherdPRM",
    "PathValue",
    "QwenMathPRM",
    "ScorerArgs",
    "SelfEvaluation",
    "StepScorer",
    "ThinkPRM",
    "ToolStepScorer",
    "aggregate",
    "close_scorer",
    "load_scorer",
    "score_tree_leaves",
    "scorer_from_args",
]

ACCEPTED = f"{', '.join(NAMED_SCORERS)}, or a PRM folder / hub name"
_PRM_CLASSES = {"treetune": DiscriminativePRM, "qwen": QwenMathPRM, "shepherd": MathShepherdPRM,
                "thinkprm": ThinkPRM, "grounded_gen": GroundedGenPRM}


def load_scorer(spec: str | None, format: str = "treetune", separator: str | None = None, engine=None,
                step_mode: str = "line", **kwargs) -> StepScorer | None:
    """The step scorer `spec` names; None for no spec.

    `spec` is arith_checker, tool, self_eval (which asks the policy, so it needs the policy's
    `engine`) or a PRM folder / hub name, read in `format` (treetune, qwen, shepherd, thinkprm,
    grounded_gen). A treetune PRM reads its label after each step's `separator`, by default the
    one `step_mode` fixes (`treetune.data.steps`). `kwargs` go to the scorer's constructor
    (batch_size, max_length, samples, ...).
    """
    if spec is None or not str(spec).strip():
        return None
    if format not in SCORER_FORMATS:
        raise ValueError(f"unknown scorer format {format!r}; expected one of {', '.join(SCORER_FORMATS)}")
    if spec == "arith_checker":
        return ArithCheckerScorer()
    if spec == "tool":
        return ToolStepScorer(**kwargs)
    if spec == "self_eval":
        if engine is None:
            raise ValueError("scorer 'self_eval' asks the policy itself, so it needs the policy's engine")
        return SelfEvaluation(engine, engine.tokenizer, **kwargs)
    local = Path(spec).expanduser()
    if not local.exists():
        if spec == "prm":
            raise ValueError(f"unknown scorer 'prm'; expected {ACCEPTED}: the PRM's folder itself goes in --scorer "
                             "(what was `--scorer prm --scorer_path PATH` is now `--scorer PATH`)")
        if "/" not in spec:
            raise ValueError(f"unknown scorer {spec!r}; expected {ACCEPTED} (formats: {', '.join(SCORER_FORMATS)})")
        if spec.startswith(("/", "./", "../", "~")):
            raise ValueError(f"scorer {spec!r}: no such PRM folder")
    if format == "treetune":
        return DiscriminativePRM(str(local) if local.exists() else spec,
                                 separator=separator if separator is not None else step_separator(step_mode), **kwargs)
    return _PRM_CLASSES[format](str(local) if local.exists() else spec, **kwargs)


def scorer_from_args(args: ScorerArgs, engine=None, **kwargs) -> StepScorer | None:
    """`load_scorer` for a recipe's `--scorer`, `--scorer_format` and `--step_mode`."""
    return load_scorer(args.scorer, args.scorer_format, engine=engine, step_mode=args.step_mode, **kwargs)


def close_scorer(scorer) -> None:
    """Release what a scorer holds (ThinkPRM's own vLLM engine, the tool's sandbox workers)."""
    close = getattr(scorer, "close", None)
    if close is not None:
        close()


def _separator_to_step_mode(value) -> tuple[str, str]:
    """An old PRM separator (typed on a command line as backslash-n, or a real newline in YAML) as the step mode fixing it."""
    text = str(value)
    if "\\" in text:
        text = text.encode().decode("unicode_escape")
    for mode in STEP_MODES:
        if step_separator(mode) == text:
            return "step_mode", mode
    raise ValueError(f"no step mode has the separator {value!r}; give --step_mode ({', '.join(STEP_MODES)})")


# Field names the scorer-taking jobs used before `ScorerArgs`, for `parse_config(renamed=...)`:
# old name -> new name, or -> a function of the old value giving (new name, new value).
RENAMED_FIELDS: Mapping[str, object] = {
    "prm_path": "scorer",
    "scorer_path": "scorer",
    "prm_format": "scorer_format",
    "prm_separator": _separator_to_step_mode,
    "separator": _separator_to_step_mode,
}
