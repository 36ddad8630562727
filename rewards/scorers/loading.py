"""The step scorer that drives a step search (beam, DVTS, MCTS), chosen by name: the exact arith
checker, GroundedPRM's tool, the policy's own self-evaluation, or a trained PRM (a folder or hub
name, in any `--prm_format`: treetune, qwen, shepherd, thinkprm, grounded_gen)."""

from __future__ import annotations

from pathlib import Path

from treetune.rewards.scorers.arith_checker import ArithCheckerScorer
from treetune.rewards.scorers.discriminative import DiscriminativePRM
from treetune.rewards.scorers.released import load_prm
from treetune.rewards.scorers.tool import ToolStepScorer
from treetune.rollouts.mcts import SelfEvaluation

CHOICES = ("arith_checker", "tool", "self_eval", "<PRM folder or hub name>")


def make_search_scorer(spec: str | None, separator: str = "\n", prm_format: str = "treetune", engine=None):
    """A step scorer (or, for `self_eval`, a path value over `engine`) for `--scorer spec`; None for none."""
    if not spec:
        return None
    if spec == "arith_checker":

        return ArithCheckerScorer()
    if spec == "tool":  # GroundedPRM's tool: every equation of a step checked exactly in the sandbox

        return ToolStepScorer()
    if spec == "self_eval":
        if engine is None:
            raise ValueError("scorer 'self_eval' asks the policy itself, so it needs the engine")

        return SelfEvaluation(engine, engine.tokenizer)
    if not Path(spec).exists() and "/" not in spec:
        raise ValueError(f"unknown scorer {spec!r}; expected one of {', '.join(CHOICES)}")
    if prm_format == "treetune":

        return DiscriminativePRM(spec, separator=separator)

    return load_prm(spec, prm_format, separator=separator)
