"""Building BVPO pairs from a policy's own samples, in both modes (trace on, trace off).

For each prompt and each mode, `samples` responses are drawn with vLLM (the paper: 5 per prompt),
scored by any response scorer, and the best becomes `chosen`, the worst `rejected` (the paper ranks
with ArmoRM; here the default scorer is the gold answer via math-verify, or a reward model, or any
step scorer of `treetune.rewards.scorers` aggregated over the response's steps: `response_scorer`). A (prompt, mode) whose responses all score the
same gives no pair, and the reason is recorded. Progress is kept per (problem, mode) in
`status.jsonl`, so a killed run resumes without redoing or duplicating finished work.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from treetune.data import Problem, PromptTemplate
from treetune.data.bvpo_pairs import MODES, BVPOPair, mode_prompt
from treetune.data.steps import split_steps
from treetune.rewards.scorers import load_scorer
from treetune.rollouts.engines.base import GenerationRequest, SamplingSettings
from treetune.rollouts.run import SamplingArgs
from treetune.rollouts.scoring import StepScorer, aggregate

log = logging.getLogger(__name__)


RESPONSE_FORMATS = ("reward_model",)  # what a BVPO scorer reads besides the step scorers' formats


@dataclass
class PairSettings:
    """BVPO's pairs: the modes, samples per prompt and mode, the answer-only budget, the least gap."""

    modes: str = field(default="trace,empty", metadata={
        "help": "Comma-separated modes: trace (thinking on) and empty (an empty think block: answer only)."})
    samples: int = field(default=5, metadata={"help": "Responses per prompt and mode (the paper: 5, ranked by ArmoRM)."})
    empty_max_tokens: int | None = field(default=None, metadata={
        "help": "Token budget of answer-only (empty mode) responses; empty: --max_tokens."})
    min_gap: float = field(default=1e-6, metadata={"help": "Least score gap between chosen and rejected."})
    think_block: str | None = field(default=None, metadata={
        "help": "The empty think block; empty: the default of treetune.data.bvpo_pairs."})


def final_part(response: str) -> str:
    """The answer after the reasoning trace (the text after the last `</think>`), or the whole response."""
    return response.rsplit("</think>", 1)[-1] if "</think>" in response else response


class ResponseScorer(Protocol):
    name: str

    def score(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[float]:
        """One score per (problem, response), higher is better."""
        ...


class GoldAnswerScorer:
    """1 when the response's final answer equals the gold answer (math-verify), else 0."""

    name = "gold"

    def __init__(self, grader):
        self.grader = grader

    def score(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[float]:
        missing = [p.id for p in problems if not p.answer]
        if missing:
            raise ValueError(f"the gold scorer needs gold answers; {len(missing)} problem(s) have none, e.g. {missing[:3]}")
        verdicts = self.grader.grade_many([final_part(r) for r in responses], [p.answer for p in problems])
        return [float(v) for v in verdicts]


class StepVerifierScorer:
    """A step scorer (exact arith checker, a PRM, ...) over the response's answer part, its steps split
    by `step_mode`, aggregated to one score."""

    def __init__(self, step_scorer: StepScorer, aggregation: str = "min", step_mode: str = "line"):
        self.step_scorer, self.aggregation, self.step_mode = step_scorer, aggregation, step_mode
        self.name = getattr(step_scorer, "name", "step_verifier")

    def score(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[float]:
        steps = [split_steps(final_part(r), self.step_mode) for r in responses]
        scored = self.step_scorer.score([p.question for p in problems], steps)
        return [aggregate(s, self.aggregation) for s in scored]


class RewardModelScorer:
    """A sequence-classification reward model (ArmoRM-style): the first logit (or `.score`) of the
    conversation (question, response), rendered by its chat template when it has one."""

    name = "reward_model"

    def __init__(self, path: str, batch_size: int = 8, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype="auto").eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.batch_size = batch_size

    def _text(self, question: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": question},
                                                       {"role": "assistant", "content": response}], tokenize=False)
        return f"{question}\n{response}"

    def score(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[float]:
        import torch

        texts = [self._text(p.question, r) for p, r in zip(problems, responses)]
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                       truncation=True, add_special_tokens=False).to(self.device)
                result = self.model(**batch)
                values = getattr(result, "score", None)
                values = result.logits[:, 0] if values is None else values.reshape(len(batch["input_ids"]), -1)[:, 0]
                out += [float(v) for v in values.float().cpu()]
        return out


def response_scorer(spec: str, format: str = "treetune", grader=None, step_mode: str = "line",
                    aggregation: str = "min", engine=None) -> ResponseScorer:
    """The response scorer `spec` names: `gold` (the gold answer through `grader`), a sequence-
    classification reward model (`format="reward_model"`), or any step scorer `load_scorer` builds
    (arith_checker, tool, self_eval, a PRM in any format), aggregated over the response's steps."""
    if spec == "gold":
        if grader is None:
            raise ValueError("the gold scorer needs a Grader")
        return GoldAnswerScorer(grader)
    if not spec:
        raise ValueError("BVPO pairs need a scorer: gold, a reward model (--scorer_format reward_model) or a step scorer")
    if format == "reward_model":
        return RewardModelScorer(spec)
    return StepVerifierScorer(load_scorer(spec, format, engine=engine, step_mode=step_mode), aggregation, step_mode)


def pick_pair(scores: Sequence[float], texts: Sequence[str], min_gap: float) -> tuple[int, int] | str:
    """(best, worst) indices among the responses with text, or why there is no pair. A blank
    response (an immediate EOS) is no response: a pair file must be readable by `load_bvpo_pairs`,
    which refuses empty texts."""
    if not texts:
        return "no responses"
    usable = [i for i, text in enumerate(texts) if text.strip()]
    if len(usable) < 2:
        return "fewer than 2 responses with text"
    best = max(usable, key=lambda i: scores[i])
    worst = min(usable, key=lambda i: scores[i])
    if scores[best] - scores[worst] < min_gap or texts[best] == texts[worst]:
        return f"no spread (every response scored {scores[best]:g})"
    return best, worst


class BVPOProgress:
    """pairs.jsonl plus status.jsonl (one line per finished (problem, mode)); pairs without a status
    line come from a killed run and are dropped on reopening, so nothing is duplicated."""

    def __init__(self, out: Path):
        self.pairs_path, self.status_path = out / "pairs.jsonl", out / "status.jsonl"
        self.done: dict[tuple[str, str], dict] = {}
        if self.status_path.exists():
            for line in self.status_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line: that (problem, mode) is redone
                self.done[(row["problem_id"], row["mode"])] = row
        if self.pairs_path.exists():
            kept = [line for line in self.pairs_path.read_text().splitlines() if line.strip() and _key(line) in self.done]
            self.pairs_path.write_text("".join(f"{line}\n" for line in kept))
        self.status_path.write_text("".join(json.dumps(r) + "\n" for r in self.done.values()))

    def record(self, pairs: Sequence[BVPOPair], status: Sequence[dict]) -> None:
        with self.pairs_path.open("a", encoding="utf-8") as handle:
            handle.writelines(p.to_json() + "\n" for p in pairs)
        with self.status_path.open("a", encoding="utf-8") as handle:
            for row in status:
                self.done[(row["problem_id"], row["mode"])] = row
                handle.write(json.dumps(row) + "\n")


def _key(line: str) -> tuple[str, str] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row.get("problem_id"), row.get("mode")


def build_bvpo_pairs(out_dir: str | Path, engine, tokenizer, problems: Sequence[Problem], template: PromptTemplate,
                     scorer: ResponseScorer, settings: PairSettings, sampling: SamplingArgs,
                     batch_problems: int = 64) -> dict:
    """Sample, score and pair every (problem, mode), resumable in `out_dir` (pairs.jsonl,
    status.jsonl); returns the summary."""
    from tqdm.auto import tqdm

    modes = [m.strip() for m in settings.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"field 'modes': a comma list of {', '.join(MODES)}; got {settings.modes!r}")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problem ids must be unique: progress is kept per problem id")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = BVPOProgress(out)
    special = template.style != "chat"
    todo = [(index, p, mode) for index, p in enumerate(problems) for mode in modes if (p.id, mode) not in state.done]
    bar = tqdm(total=len(problems) * len(modes), initial=len(problems) * len(modes) - len(todo), desc="bvpo pairs",
               unit="prompt")
    step = batch_problems * len(modes)
    for start in range(0, len(todo), step):
        batch = todo[start:start + step]
        requests = []
        for index, problem, mode in batch:
            prompt = mode_prompt(problem.question, mode, template, tokenizer, settings.think_block)
            budget = sampling.max_tokens if mode == "trace" else (settings.empty_max_tokens or sampling.max_tokens)
            # the seed depends on the problem's place and the mode only, so a resumed run samples the same
            seed = sampling.seed + 7919 * (index + 1) + (0 if mode == "trace" else 104729)
            requests.append(GenerationRequest(tokenizer(prompt, add_special_tokens=special)["input_ids"],
                                              SamplingSettings(n=settings.samples, temperature=sampling.temperature,
                                                               top_p=sampling.top_p, max_tokens=budget, seed=seed,
                                                               logprobs=False),
                                              group=f"{problem.id}/{mode}"))
        results = engine.generate(requests, progress=False)
        flat_problems = [p for (_, p, _), r in zip(batch, results) for _ in r.completions]
        flat_texts = [c.text for r in results for c in r.completions]
        flat_scores = scorer.score(flat_problems, flat_texts) if flat_texts else []
        pairs, status, at = [], [], 0
        for (_, problem, mode), result in zip(batch, results):
            completions = result.completions
            scores, texts = flat_scores[at:at + len(completions)], [c.text for c in completions]
            at += len(completions)
            picked = pick_pair(scores, texts, settings.min_gap)
            row = {"problem_id": problem.id, "mode": mode, "samples": len(texts), "mean_score": sum(scores) / max(1, len(scores))}
            if isinstance(picked, str):
                status.append({**row, "pairs": 0, "status": picked})
                continue
            best, worst = picked
            pairs.append(BVPOPair(prompt=problem.question, chosen=texts[best], rejected=texts[worst], mode=mode,
                                  problem_id=problem.id, answer=problem.answer, chosen_score=scores[best],
                                  rejected_score=scores[worst],
                                  extra={"scorer": scorer.name, "chosen_finish": completions[best].finish_reason,
                                         "rejected_finish": completions[worst].finish_reason}))
            status.append({**row, "pairs": 1, "status": "pair"})
        state.record(pairs, status)
        bar.update(len(batch))
    bar.close()
    return summarise(state, problems, modes)


def summarise(state: BVPOProgress, problems: Sequence[Problem], modes: Sequence[str]) -> dict:
    """Pairs per mode, why the other prompts gave none, and the mean score per mode (the policy's accuracy
    in that mode when the scorer is the gold answer)."""
    ids = {p.id for p in problems}
    summary: dict = {"problems": len(problems), "pairs_file": str(state.pairs_path)}
    for mode in modes:
        rows = [r for (pid, m), r in state.done.items() if m == mode and pid in ids]
        why = Counter(r["status"] for r in rows if r["status"] != "pair")
        summary[mode] = {"pairs": sum(r["pairs"] for r in rows), "why_no_pairs": dict(why),
                         "mean_sample_score": sum(r["mean_score"] for r in rows) / max(1, len(rows))}
    return summary
