"""Prompt templates: plain text or the model's chat template, the usual step-by-step instruction,
optional few-shot examples.

`PromptTemplate.render(question)` gives the text a policy continues; `render_ids` tokenizes it.
The instruction is the one Qwen2.5-Math and most open reasoning evaluations use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
STYLES = ("plain", "chat", "bare")


def require_chat_template(tokenizer) -> None:
    """Raise a ValueError naming the tokenizer and what to pass instead when it has no chat template
    (a base model's tokenizer, or a checkpoint saved without `chat_template.jinja`)."""
    if tokenizer is None:
        raise ValueError("the 'chat' prompt style needs the model's tokenizer to render its chat template")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"--prompt_style chat: the tokenizer of {name} has no chat template (no `chat_template` in "
                         "its tokenizer_config.json and no chat_template.jinja); pass --prompt_style plain (the "
                         "question and instruction as text) or bare, or a model whose tokenizer has a chat template")


@dataclass
class PromptTemplate:
    """How a question becomes a prompt.

    - `plain`: "{question}\\n{instruction}\\n" then the answer follows; few-shot examples precede it
      as question / instruction / solution blocks separated by blank lines.
    - `chat`: the tokenizer's chat template, the instruction as the system message (Qwen2.5-Math
      style), few-shot examples as earlier user/assistant turns.
    - `bare`: "{question}\\n" alone; for models trained without an instruction (the arith policy).
    """

    style: str = "plain"
    instruction: str = DEFAULT_INSTRUCTION
    few_shot: Sequence[tuple[str, str]] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown prompt style {self.style!r}; expected one of {', '.join(STYLES)}")

    def _plain_block(self, question: str) -> str:
        if self.style == "bare" or not self.instruction:
            return f"{question}\n"
        return f"{question}\n{self.instruction}\n"

    def render(self, question: str, tokenizer=None) -> str:
        """The prompt text for `question` (the chat style needs the tokenizer)."""
        if self.style == "chat":
            require_chat_template(tokenizer)
            messages = [{"role": "system", "content": self.instruction}] if self.instruction else []
            for example_q, example_a in self.few_shot:
                messages += [{"role": "user", "content": example_q}, {"role": "assistant", "content": example_a}]
            messages.append({"role": "user", "content": question})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        shots = "".join(f"{self._plain_block(q)}{a}\n\n" for q, a in self.few_shot)
        return shots + self._plain_block(question)

    def render_ids(self, question: str, tokenizer) -> list[int]:
        """Token ids of the prompt. Chat templates carry their own special tokens, so none are added."""
        text = self.render(question, tokenizer)
        return tokenizer(text, add_special_tokens=self.style != "chat")["input_ids"]
