"""ThinkPRM (arXiv 2504.16828): a generative verifier that writes a verification chain critiquing
each step, then answers "Is the solution correct?"; its score is P(Yes) / (P(Yes) + P(No)).

- Prompt: the paper's verification prompt (problem, the solution as `Step i:` lines, the
  instruction to critique each step), then `<think>` and "Let's verify step by step:".
- Chain: one `Step i: <critique> The step is \\boxed{correct|incorrect}` a step; the verifier may
  stop at the first incorrect step. Per-step labels are the boxed words in order, steps left
  without one count as incorrect (the paper's padding with 0).
- Decision: after the chain, `</think>` and "Is the solution correct?" are forced and the two
  candidates' next-token log-probs are read from the engine (`SamplingSettings.top_logprobs`).
- K parallel chains (sampled at temperature T) are averaged; a stop at `Step {n+1}:` keeps the
  verifier from critiquing steps that do not exist yet (a search scores partial solutions).

Choices where the paper's code is loose or inconsistent (rewards_eval.md section 2):
- Training targets end "**Is the solution correct?** Yes" while inference forces
  "\\nIs the solution correct? " and compares "yes"/"no"; here the same text is used in both
  ("\\nIs the solution correct?" then " Yes" / " No"), and the two candidate tokens are found by
  tokenizing both full answers and taking the first token where they differ, so the score reads
  exactly the tokens the verifier was trained to write, whatever the tokenizer.
- A solution's step scores: steps before the last get the mean parsed label over the K chains,
  the last step gets the mean P(Yes) (the prefix score the paper uses for search and best-of-N),
  so "last" aggregation is the paper's solution score and a first-error threshold still reads the
  chain's per-step verdicts (`step_readout="labels"` uses the parsed labels for every step).
- With no chat template (the arith verifier) the prompt is the user text, a newline and `<think>`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from treetune.rollouts.engines import GenerationRequest, SamplingSettings, VLLMEngine

INSTRUCTION = ("Review and critique each step in the proposed solution to determine whether each step is correct. "
               "If the solution is incomplete, only verify the provided steps.")
OPENING = "Let's verify step by step:"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DECISION = "\nIs the solution correct?"
YES, NO = " Yes", " No"
_LABEL = re.compile(r"\\boxed\{\s*(correct|incorrect)\s*\}")
_STEP_PREFIX = re.compile(r"^\s*(?:#+\s*)?step\s*\d+\s*[:.]\s*", re.IGNORECASE)


def solution_lines(steps: Sequence[str]) -> str:
    """The solution as `Step i: ...` lines; a step's own "Step k:" / "## Step k:" prefix is dropped first."""
    return "\n".join(f"Step {i}: {_STEP_PREFIX.sub('', s.strip(), count=1)}" for i, s in enumerate(steps, 1))


PROMPT_STYLES = ("paper", "compact")


def user_text(problem: str, steps: Sequence[str], style: str = "paper") -> str:
    """The paper's verification request (utils/helper.py `format_verification_cot_for_thinkprm`);
    `compact` keeps its sections but drops the two fixed sentences, for a tiny verifier whose
    tokenizer spells unknown words a character at a time (same information, 250 fewer tokens)."""
    if style == "compact":
        return f"[Math Problem]\n{problem}\n[Solution]\n{solution_lines(steps)}"
    if style != "paper":
        raise ValueError(f"unknown ThinkPRM prompt style {style!r}; expected one of {', '.join(PROMPT_STYLES)}")
    return ("You are given a math problem and a proposed step-by-step solution:\n\n"
            f"[Math Problem]\n\n{problem}\n\n[Solution]\n\n{solution_lines(steps)}\n\n{INSTRUCTION}")


def render_prompt(problem: str, steps: Sequence[str], tokenizer=None, chat: bool = False, style: str = "paper") -> str:
    """The text the verifier continues with its chain: the request, then `<think>` and the opening line."""
    if chat:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True needs a tokenizer with a chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text(problem, steps, style)}],
                                             tokenize=False, add_generation_prompt=True)
        # R1-distill templates open the assistant turn with <think> themselves
        return text + ("" if text.rstrip().endswith(THINK_OPEN) else THINK_OPEN) + "\n" + OPENING
    return f"{user_text(problem, steps, style)}\n{THINK_OPEN}\n{OPENING}"


def chain_step(index: int, critique: str, correct: bool) -> str:
    """One step of a verification chain in the trained format."""
    return f"\nStep {index}: {critique.strip()} The step is \\boxed{{{'correct' if correct else 'incorrect'}}}"


def decision_suffix(chain: str) -> str:
    """What follows the chain before the Yes/No answer: the chain closed, then the forced question."""
    return f"{chain.rstrip()}\n{THINK_CLOSE}{DECISION}"


def training_completion(chain: str, correct: bool) -> str:
    """A training target: the chain, `</think>`, the question and its answer."""
    return decision_suffix(chain) + (YES if correct else NO)


def parse_step_labels(chain: str, num_steps: int) -> list[int]:
    """Per-step hard labels (1 correct, 0 incorrect) from the chain's boxed verdicts in order;
    steps without a verdict (the chain stopped early) count as incorrect."""
    found = [1 if m.group(1) == "correct" else 0 for m in _LABEL.finditer(chain)][:num_steps]
    return found + [0] * (num_steps - len(found))


def chain_complete(chain: str, num_steps: int) -> bool:
    """True when the chain gives a verdict for every step up to its first incorrect one (or all steps)."""
    found = [m.group(1) == "correct" for m in _LABEL.finditer(chain)]
    if len(found) >= num_steps:
        return True
    return bool(found) and not found[-1]


def decision_tokens(tokenizer, context: str) -> tuple[list[int], int, int]:
    """(prompt ids up to the decision, id of the token that starts " Yes", id that starts " No"):
    the first position where the two full answers' tokenizations differ."""
    yes = tokenizer(context + YES, add_special_tokens=False)["input_ids"]
    no = tokenizer(context + NO, add_special_tokens=False)["input_ids"]
    shared = 0
    while shared < min(len(yes), len(no)) and yes[shared] == no[shared]:
        shared += 1
    if shared >= min(len(yes), len(no)):
        raise ValueError(f"the tokenizer does not tell {YES!r} from {NO!r} after the decision question")
    return yes[:shared], yes[shared], no[shared]


def yes_probability(top: dict[int, float] | None, yes_id: int, no_id: int) -> float:
    """P(yes) / (P(yes) + P(no)) from one position's top log-probs; a candidate outside the top k
    counts as probability 0, and a position where neither appears scores 0 (an invalid answer
    counts as a rejection, as the paper's code does on failure)."""
    if not top:
        return 0.0
    ly, ln = top.get(yes_id), top.get(no_id)
    if ly is None and ln is None:
        return 0.0
    if ln is None:
        return 1.0
    if ly is None:
        return 0.0
    m = max(ly, ln)
    return math.exp(ly - m) / (math.exp(ly - m) + math.exp(ln - m))


@dataclass
class Verification:
    """What the verifier said about one solution: K chains, their per-step labels and P(yes)."""

    chains: list[str]
    labels: list[list[int]]
    yes: list[float]

    def step_scores(self, readout: str = "hybrid") -> list[float]:
        n = len(self.labels[0]) if self.labels else 0
        mean_labels = [sum(chain[i] for chain in self.labels) / len(self.labels) for i in range(n)]
        if readout == "labels" or n == 0:
            return mean_labels
        if readout != "hybrid":
            raise ValueError(f"unknown step readout {readout!r}; expected hybrid or labels")
        return mean_labels[:-1] + [sum(self.yes) / len(self.yes)]


SETTINGS_FILE = "think_prm.json"


def saved_format(model: str, hops: int = 3) -> dict:
    """The verification format a checkpoint was trained on (`prompt_style`, `chat`), from its
    think_prm.json, else from that of the model it was fine-tuned from (launch/sft.py's
    recipe.json names it); {} when none is found."""
    import json
    from pathlib import Path

    folder = Path(model)
    for _ in range(hops):
        if (folder / SETTINGS_FILE).exists():
            return json.loads((folder / SETTINGS_FILE).read_text())
        recipe = folder / "recipe.json"
        if not recipe.exists():
            return {}
        resolved = json.loads(recipe.read_text())  # flat; checkpoints of earlier releases nest it under "script"
        parent = resolved.get("model_name_or_path") or resolved.get("script", {}).get("model_name_or_path")
        if not parent or not Path(parent).exists():
            return {}
        folder = Path(parent)
    return {}


@dataclass
class ThinkPRMSettings:
    """How to verify: K chains at `temperature`, chain length limit, top-k for the decision read."""

    chains: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_chain_tokens: int = 1024
    top_logprobs: int = 20
    seed: int = 0
    chat: bool = False
    prompt_style: str = "paper"  # paper | compact (must be what the verifier was trained on)
    step_readout: str = "hybrid"  # hybrid (last step = P(yes)) | labels
    stop: Sequence[str] = field(default_factory=lambda: ("Is the solution correct?", THINK_CLOSE))


class ThinkPRM:
    """ThinkPRM as a step scorer over any engine (vLLM by default): pass a model path or an engine
    with its tokenizer."""

    name = "think_prm"

    def __init__(self, model: str | None = None, engine=None, tokenizer=None, settings: ThinkPRMSettings | None = None,
                 name: str | None = None, max_model_len: int | None = None, **settings_kwargs):
        if engine is None:
            if model is None:
                raise ValueError("ThinkPRM needs a model path or an engine")

            engine = VLLMEngine(model, max_model_len=max_model_len)
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        if settings is None and model is not None:
            # the checkpoint's own format unless the caller says otherwise
            settings_kwargs = {**{k: v for k, v in saved_format(model).items() if k in ("prompt_style", "chat")},
                               **settings_kwargs}
        self.settings = settings or ThinkPRMSettings(**settings_kwargs)
        self.name = name or self.name

    def verify(self, problems: Sequence[str], solutions: Sequence[Sequence[str]], progress: bool = False) -> list[Verification]:
        """K verification chains per solution, their parsed labels and the forced decision's P(yes)."""

        s = self.settings
        prompts = [render_prompt(q, steps, self.tokenizer, s.chat, s.prompt_style) for q, steps in zip(problems, solutions)]
        requests = []
        for i, (prompt, steps) in enumerate(zip(prompts, solutions)):
            sampling = SamplingSettings(n=s.chains, temperature=s.temperature, top_p=s.top_p if s.temperature > 0 else 1.0,
                                        max_tokens=s.max_chain_tokens, seed=s.seed + i, logprobs=False,
                                        stop=(*s.stop, f"Step {len(steps) + 1}:"))
            requests.append(GenerationRequest(self.tokenizer(prompt, add_special_tokens=False)["input_ids"], sampling,
                                              group=f"think_prm-{i}"))
        results = self.engine.generate(requests, progress=progress) if requests else []
        chains = [[c.text for c in r.completions] for r in results]
        decisions, candidates = [], []
        for i, (prompt, group) in enumerate(zip(prompts, chains)):
            for chain in group:
                ids, yes_id, no_id = decision_tokens(self.tokenizer, prompt + decision_suffix(chain))
                candidates.append((yes_id, no_id))
                # temperature 1, full top-p: the model's own next-token distribution
                decisions.append(GenerationRequest(ids, SamplingSettings(n=1, temperature=1.0, max_tokens=1, seed=s.seed,
                                                                         logprobs=False, top_logprobs=s.top_logprobs),
                                                   group=f"think_prm-{i}"))
        answers = self.engine.generate(decisions, progress=progress) if decisions else []
        yes = []
        for result, (yes_id, no_id) in zip(answers, candidates):
            c = result.completions[0]
            yes.append(yes_probability(c.top_logprobs[0] if c.top_logprobs else None, yes_id, no_id))
        out, at = [], 0
        for group, steps in zip(chains, solutions):
            out.append(Verification(group, [parse_step_labels(c, len(steps)) for c in group], yes[at:at + len(group)]))
            at += len(group)
        return out

    def score(self, problems: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[list[float]]:
        keep = [i for i, steps in enumerate(solutions) if steps]
        verified = self.verify([problems[i] for i in keep], [solutions[i] for i in keep])
        out: list[list[float]] = [[] for _ in solutions]
        for i, v in zip(keep, verified):
            out[i] = v.step_scores(self.settings.step_readout)
        return out

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
