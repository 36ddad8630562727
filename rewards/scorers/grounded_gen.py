"""The generative GroundedPRM as a step scorer: a model fine-tuned on the rationale records of
`treetune.rewards.labels.grounded.rationale_records` (launch/grounded_prm_data.py, then launch/sft.py
`--source records`) reads a solution one step per user turn, writes each step's rationale
(<verify> ... </verify> <judge> ... </judge> <output> ... \\boxed{), and the step's score is
P(+) / (P(+) + P(-)) for the token after `\\boxed{`.

Steps are fed turn by turn, as GroundedPRM's ProcessBench evaluation does; the rationale written
for a step stays in the conversation, closed with the more likely verdict, before the next step's
turn. The GroundedPRM code's search scorer reads "Right"/"Wrong" from the top-10 log-probs instead;
the records here end in `\\boxed{+}` / `\\boxed{-}` (their `<output>` line), so that is what is read.
A verdict token that neither candidate leads at position means the model left the format: the
step scores 0.5 (the GroundedPRM code's default).
"""

from __future__ import annotations

from collections.abc import Sequence

from treetune.rewards.scorers.think_prm import yes_probability
from treetune.rollouts.engines import GenerationRequest, SamplingSettings, VLLMEngine

BOXED = "\\boxed{"
# the format the PRM is trained on (`treetune.rewards.labels.grounded` writes its records in it)
SYSTEM_PROMPT = (
    "You check a solution to a math problem one step at a time. For each step, first write inside "
    "<verify> </verify> the calculation the step makes and what it really evaluates to, then inside "
    "<judge> </judge> reason about whether the step is right and end with [Right] or [Wrong], then "
    "give the verdict as <output>\\boxed{+}</output> for a right step or <output>\\boxed{-}</output> "
    "for a wrong one."
)


def render_plain(messages: Sequence[dict[str, str]]) -> str:
    """A chat as plain text for models without a chat template; ends ready for the next assistant turn."""
    head = [m["content"] for m in messages if m["role"] == "system"]
    turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages if m["role"] != "system"]
    return "\n\n".join(head + turns) + "\n\nAssistant: "


def user_turn(question: str, index: int, step: str) -> str:
    """Step `index` (from 0) as its user turn, as `labels.grounded.conversation` writes it."""
    text = f"Step {index + 1}: {step}"
    return f"Problem: {question}\n\n{text}" if index == 0 else text


def render(messages: Sequence[dict[str, str]], tokenizer) -> str:
    """The prompt for the next assistant turn, as `treetune.rewards.labels.grounded.rationale_records` renders it."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return render_plain(messages)


def verdict_tokens(tokenizer, context: str) -> tuple[list[int], int, int]:
    """(ids of `context`, the first token of "+}" after it, of "-}"), where the two part."""
    plus = tokenizer(context + "+}", add_special_tokens=False)["input_ids"]
    minus = tokenizer(context + "-}", add_special_tokens=False)["input_ids"]
    shared = 0
    while shared < min(len(plus), len(minus)) and plus[shared] == minus[shared]:
        shared += 1
    if shared >= min(len(plus), len(minus)):
        raise ValueError("the tokenizer does not tell '+' from '-' after \\boxed{")
    return plus[:shared], plus[shared], minus[shared]


class GroundedGenPRM:
    """Generative GroundedPRM over an engine (vLLM by default): pass a model path or an engine."""

    name = "grounded_gen_prm"

    def __init__(self, model: str | None = None, engine=None, tokenizer=None, temperature: float = 0.0,
                 max_rationale_tokens: int = 256, top_logprobs: int = 20, seed: int = 0, neutral: float = 0.5,
                 name: str | None = None, max_model_len: int | None = None):
        if engine is None:
            if model is None:
                raise ValueError("GroundedGenPRM needs a model path or an engine")

            engine = VLLMEngine(model, max_model_len=max_model_len)
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        self.temperature, self.max_rationale_tokens = temperature, max_rationale_tokens
        self.top_logprobs, self.seed, self.neutral = top_logprobs, seed, neutral
        self.name = name or self.name

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def score(self, problems: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[list[float]]:

        chats = [[{"role": "system", "content": SYSTEM_PROMPT}] for _ in solutions]
        out: list[list[float]] = [[] for _ in solutions]
        for i in range(max((len(s) for s in solutions), default=0)):
            live = [j for j, steps in enumerate(solutions) if i < len(steps)]
            for j in live:
                chats[j].append({"role": "user", "content": user_turn(problems[j], i, solutions[j][i])})
            prompts = [render(chats[j], self.tokenizer) for j in live]
            # the rationale, up to where the verdict goes
            sampling = SamplingSettings(n=1, temperature=self.temperature, max_tokens=self.max_rationale_tokens,
                                        stop=(BOXED,), include_stop=True, logprobs=False, seed=self.seed)
            written = self.engine.generate([GenerationRequest(self._ids(p), sampling, group=f"grounded-{j}")
                                            for p, j in zip(prompts, live)])
            rationales, requests, candidates = [], [], []
            for p, j, result in zip(prompts, live, written):
                text = result.completions[0].text
                if not text.endswith(BOXED):  # the model skipped or lost the verdict line: ask for it
                    text = text.rstrip() + ("\n" if text.strip() else "") + "<output>\nSo this step is: " + BOXED
                ids, plus_id, minus_id = verdict_tokens(self.tokenizer, p + text)
                rationales.append(text)
                candidates.append((plus_id, minus_id))
                requests.append(GenerationRequest(ids, SamplingSettings(n=1, temperature=1.0, max_tokens=1, logprobs=False,
                                                                        top_logprobs=self.top_logprobs, seed=self.seed),
                                                  group=f"grounded-{j}"))
            verdicts = self.engine.generate(requests)
            for j, text, result, (plus_id, minus_id) in zip(live, rationales, verdicts, candidates):
                top = result.completions[0].top_logprobs
                top = top[0] if top else None
                p_plus = (yes_probability(top, plus_id, minus_id)
                          if top and (plus_id in top or minus_id in top) else self.neutral)
                out[j].append(p_plus)
                chats[j].append({"role": "assistant",
                                 "content": f"{text}{'+' if p_plus >= 0.5 else '-'}}}\n</output>"})
        return out

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
