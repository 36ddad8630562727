"""Step scorers that follow released PRM checkpoints' own conventions, so a user can score with
them as they are: Qwen2.5-Math-PRM (`<extra_0>` after each step inside the chat template, P(class 1)
at each `<extra_0>`) and Math-Shepherd (` ки` after each step, P(`+`) against `-` at each tag).

The prompt layouts, the step token and the candidate tokens are interface facts of those
checkpoints and are matched exactly (sources in ../shared/research/rewards_eval.md 1.2 and 1.3).
`load_scorer(path, format="qwen" | "shepherd")` builds them.
"""

from __future__ import annotations

from collections.abc import Sequence

QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_STEP_TOKEN = "<extra_0>"
SHEPHERD_TAG = "ки"


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _pad_batch(rows: Sequence[list[int]], pad_id: int):
    """Right-padded input ids and attention mask: positions read later stay where they were."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _fill_missing(scores: list[list[float]], solutions: Sequence[Sequence[str]]) -> list[list[float]]:
    # a step cut off by max_length has no marker left to read: count it as wrong rather than drop it
    return [s + [0.0] * (len(steps) - len(s)) for s, steps in zip(scores, solutions)]


class QwenMathPRM:
    """Qwen2.5-Math-PRM: the solution's steps joined by `<extra_0>` (and one after the last) as the
    assistant turn of the chat template with the boxed-answer system prompt; a step's score is
    P(class 1) of the two-logit head at its `<extra_0>`.

    Positions are found by the token id (the mask), not by the model card's `p[p != 0]` trick,
    which miscounts when a probability underflows to exactly 0.
    """

    name = "qwen_math_prm"

    def __init__(self, path: str, batch_size: int = 8, device: str | None = None,
                 max_length: int | None = None, system_prompt: str = QWEN_SYSTEM, name: str | None = None):
        from transformers import AutoConfig, AutoModel, AutoModelForTokenClassification, AutoTokenizer

        self.batch_size, self.max_length, self.system_prompt = batch_size, max_length, system_prompt
        self.name = name or self.name
        self.device = _device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        step_ids = self.tokenizer.encode(QWEN_STEP_TOKEN, add_special_tokens=False)
        if len(step_ids) != 1:
            raise ValueError(f"{path}: the tokenizer does not know {QWEN_STEP_TOKEN!r} as one token "
                             f"(it encodes to {step_ids}); this is not a Qwen2.5-Math-PRM checkpoint")
        self.step_id = step_ids[0]
        architectures = AutoConfig.from_pretrained(path, trust_remote_code=True).architectures or []
        # the released checkpoint ships its own head class (trust_remote_code); a checkpoint saved
        # with transformers' token-classification head reads the same way
        if any(a.endswith("ForTokenClassification") for a in architectures):
            model = AutoModelForTokenClassification.from_pretrained(path)
        else:
            model = AutoModel.from_pretrained(path, trust_remote_code=True)
        self.model = model.to(self.device).eval()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def render(self, question: str, steps: Sequence[str]) -> str:
        """The exact text the checkpoint was trained on for one solution."""
        messages = [{"role": "system", "content": self.system_prompt},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": QWEN_STEP_TOKEN.join(steps) + QWEN_STEP_TOKEN}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def score(self, problems: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[list[float]]:
        import torch

        rows = [self.tokenizer(self.render(q, steps), add_special_tokens=False)["input_ids"]
                for q, steps in zip(problems, solutions)]
        if self.max_length is not None:
            rows = [r[:self.max_length] for r in rows]
        out: list[list[float]] = []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                ids, mask = _pad_batch(rows[start:start + self.batch_size], self.pad_id)
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))[0]
                probs = torch.softmax(logits.float(), dim=-1)[..., 1].cpu()
                at_step = (ids == self.step_id) & (mask == 1)
                out.extend(probs[i][at_step[i]].tolist() for i in range(len(ids)))
        return _fill_missing(out, solutions)


class MathShepherdPRM:
    """Math-Shepherd: a causal LM reading `"{question} {steps}"` with ` ки` after every step (steps
    joined by blank lines); a step's score is softmax over the logits of `+` and `-` at its tag,
    taking P(+).

    The candidate ids are those of `"+ -"` encoded without special tokens, as the released
    inference code takes them; a tokenizer that does not give two tokens there falls back to each
    token's own last id. The tag position is the last token covering the tag's last character, so
    a tag that a byte-level tokenizer splits into several tokens is still read at its end.
    Only the two candidate rows of the output embedding are applied, not the whole vocabulary.
    """

    name = "math_shepherd"

    def __init__(self, path: str, batch_size: int = 8, device: str | None = None,
                 max_length: int | None = None, good: str = "+", bad: str = "-", name: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.batch_size, self.max_length = batch_size, max_length
        self.name = name or self.name
        self.device = _device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{path}: Math-Shepherd scoring needs a fast tokenizer (character offsets)")
        self.candidate_ids = self._candidate_ids(good, bad)
        self.model = AutoModelForCausalLM.from_pretrained(path).to(self.device).eval()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _candidate_ids(self, good: str, bad: str) -> list[int]:
        pair = self.tokenizer.encode(f"{good} {bad}", add_special_tokens=False)
        if len(pair) == 2:
            return pair
        return [self.tokenizer.encode(good, add_special_tokens=False)[-1],
                self.tokenizer.encode(bad, add_special_tokens=False)[-1]]

    @staticmethod
    def render(question: str, steps: Sequence[str]) -> str:
        return f"{question} " + "\n\n".join(f"{step} {SHEPHERD_TAG}" for step in steps)

    def _tag_positions(self, text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
        ends, start = [], 0
        while (found := text.find(SHEPHERD_TAG, start)) != -1:
            ends.append(found + len(SHEPHERD_TAG))
            start = found + len(SHEPHERD_TAG)
        last_token_ending_at = {}
        for j, (a, b) in enumerate(offsets):
            if b > a:
                last_token_ending_at[b] = j
        return [last_token_ending_at[e] for e in ends if e in last_token_ending_at]

    def score(self, problems: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[list[float]]:
        import torch

        rows, positions = [], []
        for q, steps in zip(problems, solutions):
            for step in steps:
                if SHEPHERD_TAG in step:
                    raise ValueError(f"a step contains the step tag {SHEPHERD_TAG!r}: {step[:80]!r}")
            text = self.render(q, steps)
            enc = self.tokenizer(text, return_offsets_mapping=True)
            ids, pos = enc["input_ids"], self._tag_positions(text, enc["offset_mapping"])
            if self.max_length is not None:
                ids, pos = ids[:self.max_length], [p for p in pos if p < self.max_length]
            rows.append(ids)
            positions.append(pos)
        head = self.model.get_output_embeddings()
        rows_w = head.weight[self.candidate_ids]
        bias = head.bias[self.candidate_ids] if getattr(head, "bias", None) is not None else None
        out: list[list[float]] = []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                ids, mask = _pad_batch(rows[start:start + self.batch_size], self.pad_id)
                hidden = self.model.base_model(input_ids=ids.to(self.device),
                                               attention_mask=mask.to(self.device)).last_hidden_state
                for i, pos in enumerate(positions[start:start + self.batch_size]):
                    pair = hidden[i, pos] @ rows_w.T
                    if bias is not None:
                        pair = pair + bias
                    out.append(torch.softmax(pair.float(), dim=-1)[:, 0].cpu().tolist())
        return _fill_missing(out, solutions)
