"""The policy judging its own partial solution (MCTS-DPO's self-evaluation), as a path value and a
step scorer.

The judgement of a path is the share of `samples` short sampled answers to "Is the last step
correct?" whose first word is positive ("yes", "correct", "B", "true"). MCTS-DPO reads the
probability of the positive tokens directly; the engine protocol returns sampled tokens only, so
it is estimated by sampling, batched like any other request. The prompt carries no reference
solution (MCTS-DPO's code hints it with the gold one), so it can judge test problems too.

Called on paths it is a `PathValue` (one request per path: what a search needs); as a step scorer
step i's score is the judgement of the path cut after step i, all prefixes in one batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from treetune.rollouts.engines import Engine, GenerationRequest, SamplingSettings
from treetune.rollouts.stopping import request_seed

SELF_EVAL_TEMPLATE = "{question}\n{solution}\nIs the last step correct? Answer yes or no.\nAnswer:"


class SelfEvaluation:
    """Self-evaluation over an engine serving the policy (see the module doc)."""

    name = "self_eval"

    def __init__(self, engine: Engine, tokenizer=None, template: str = SELF_EVAL_TEMPLATE,
                 positive: Sequence[str] = ("yes", "correct", "b", "true"), samples: int = 8, max_tokens: int = 3,
                 temperature: float = 1.0, seed: int = 0):
        self.engine, self.template = engine, template
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        self.positive = {p.lower() for p in positive}
        self.samples, self.max_tokens, self.temperature, self.seed = samples, max_tokens, temperature, seed
        self.generated_tokens = 0

    def __call__(self, problems: Sequence[str], paths: Sequence[Sequence[str]]) -> list[float]:
        """The judgement of each path's last step, all paths in one engine call."""
        requests = []
        for i, (question, steps) in enumerate(zip(problems, paths)):
            text = self.template.format(question=question, solution="\n".join(steps))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            requests.append(GenerationRequest(ids, SamplingSettings(
                n=self.samples, temperature=self.temperature, max_tokens=self.max_tokens, logprobs=False,
                seed=request_seed(self.seed, question, i))))
        values = []
        for result in self.engine.generate(requests) if requests else []:
            words = [re.findall(r"[a-z]+", c.text.lower())[:1] for c in result.completions]
            self.generated_tokens += sum(len(c.token_ids) for c in result.completions)
            values.append(sum(1 for w in words if w and w[0] in self.positive) / max(1, len(words)))
        return values

    def score(self, problems: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[list[float]]:
        """One judgement per step: step i judged as the last step of the solution cut after it."""
        owners, questions, prefixes = [], [], []
        for j, (question, steps) in enumerate(zip(problems, solutions)):
            for i in range(len(steps)):
                owners.append(j)
                questions.append(question)
                prefixes.append(list(steps[: i + 1]))
        out: list[list[float]] = [[] for _ in solutions]
        for j, value in zip(owners, self(questions, prefixes)):
            out[j].append(value)
        return out
