"""Released PRM conventions (Qwen2.5-Math-PRM, Math-Shepherd) on tiny randomly initialised models
built in those formats: the layouts and read-out positions are under test, not the weights."""

from __future__ import annotations

import pytest
import torch
from treetune.rewards.scorers.released import QWEN_STEP_TOKEN, SHEPHERD_TAG, MathShepherdPRM, QwenMathPRM, load_prm

# Qwen's ChatML layout, as the released tokenizer's template renders system / user / assistant turns
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

QUESTION = "Mia has 7 pens and buys 15 more. How many pens does she have?"
SOLUTIONS = [["7+15=22", "The answer is \\boxed{22}"],
             ["7+15=21", "21-1=20", "The answer is \\boxed{20}"],
             ["The answer is \\boxed{22}"]]


def _tiny_qwen2(vocab_size: int, **extra):
    from transformers import Qwen2Config

    torch.manual_seed(0)
    return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)


@pytest.fixture(scope="module")
def qwen_prm_dir(tiny_policy_path, tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2ForTokenClassification

    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", QWEN_STEP_TOKEN]})
    tok.chat_template = CHATML
    model = Qwen2ForTokenClassification(_tiny_qwen2(len(tok), num_labels=2))
    out = tmp_path_factory.mktemp("qwen-prm")
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def shepherd_prm_dir(tiny_policy_path, tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    model = Qwen2ForCausalLM(_tiny_qwen2(len(tok)))
    out = tmp_path_factory.mktemp("shepherd-prm")
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return str(out)


def test_qwen_layout_puts_the_step_token_after_every_step(qwen_prm_dir):
    prm = QwenMathPRM(qwen_prm_dir)
    text = prm.render(QUESTION, SOLUTIONS[1])
    assert text.startswith("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                           "\\boxed{}.<|im_end|>\n<|im_start|>user\n" + QUESTION)
    assistant = text.split("<|im_start|>assistant\n", 1)[1]
    assert assistant == "7+15=21<extra_0>21-1=20<extra_0>The answer is \\boxed{20}<extra_0><|im_end|>\n"


def test_qwen_scores_are_class_one_at_each_step_token_and_batching_changes_nothing(qwen_prm_dir):
    prm = QwenMathPRM(qwen_prm_dir, batch_size=3)
    batched = prm.score([QUESTION] * 3, SOLUTIONS)
    assert [len(s) for s in batched] == [2, 3, 1]
    one_by_one = QwenMathPRM(qwen_prm_dir, batch_size=1).score([QUESTION] * 3, SOLUTIONS)
    for a, b in zip(batched, one_by_one):
        assert a == pytest.approx(b, abs=1e-5)
    # by hand: softmax of the head's two logits at the positions holding <extra_0>
    ids = prm.tokenizer(prm.render(QUESTION, SOLUTIONS[1]), add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = prm.model(input_ids=ids).logits[0]
    positions = (ids[0] == prm.tokenizer.convert_tokens_to_ids(QWEN_STEP_TOKEN)).nonzero().flatten()
    assert len(positions) == 3
    expected = torch.softmax(logits[positions], -1)[:, 1].tolist()
    assert batched[1] == pytest.approx(expected, abs=1e-5)
    assert all(0.0 <= v <= 1.0 for s in batched for v in s)


def test_qwen_refuses_a_tokenizer_without_the_step_token(shepherd_prm_dir):
    with pytest.raises(ValueError, match="extra_0"):
        QwenMathPRM(shepherd_prm_dir)


def test_shepherd_layout_and_tag_read_at_its_last_token(shepherd_prm_dir):
    prm = MathShepherdPRM(shepherd_prm_dir)
    text = prm.render(QUESTION, SOLUTIONS[0])
    assert text == QUESTION + " 7+15=22 ки\n\nThe answer is \\boxed{22} ки"
    enc = prm.tokenizer(text, return_offsets_mapping=True)
    positions = prm._tag_positions(text, enc["offset_mapping"])
    assert len(positions) == 2
    tag_tokens = prm.tokenizer(SHEPHERD_TAG, add_special_tokens=False)["input_ids"]
    # the byte-level tokenizer splits the Cyrillic tag over several tokens: the read-out is the last
    assert len(tag_tokens) > 1
    for p in positions:
        assert enc["input_ids"][p] == tag_tokens[-1]
        assert enc["input_ids"][p - len(tag_tokens) + 1:p + 1] == tag_tokens


def test_shepherd_scores_are_p_plus_against_minus(shepherd_prm_dir):
    prm = MathShepherdPRM(shepherd_prm_dir, batch_size=3)
    batched = prm.score([QUESTION] * 3, SOLUTIONS)
    assert [len(s) for s in batched] == [2, 3, 1]
    one_by_one = MathShepherdPRM(shepherd_prm_dir, batch_size=1).score([QUESTION] * 3, SOLUTIONS)
    for a, b in zip(batched, one_by_one):
        assert a == pytest.approx(b, abs=1e-5)
    text = prm.render(QUESTION, SOLUTIONS[1])
    enc = prm.tokenizer(text, return_offsets_mapping=True)
    positions = prm._tag_positions(text, enc["offset_mapping"])
    with torch.no_grad():
        logits = prm.model(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
    plus, minus = prm.candidate_ids
    assert prm.tokenizer.decode([plus]).strip() == "+" and prm.tokenizer.decode([minus]).strip() == "-"
    expected = torch.softmax(logits[positions][:, [plus, minus]], -1)[:, 0].tolist()
    assert batched[1] == pytest.approx(expected, abs=1e-5)


def test_shepherd_refuses_a_step_holding_the_tag(shepherd_prm_dir):
    with pytest.raises(ValueError, match="step tag"):
        MathShepherdPRM(shepherd_prm_dir).score([QUESTION], [["7+15=22 ки"]])


def test_truncated_steps_score_zero_and_formats_load_by_name(qwen_prm_dir, shepherd_prm_dir):
    full = QwenMathPRM(qwen_prm_dir)
    ids = full.tokenizer(full.render(QUESTION, SOLUTIONS[1]), add_special_tokens=False)["input_ids"]
    second_step_end = [i for i, t in enumerate(ids) if t == full.step_id][1]
    cut = load_prm(qwen_prm_dir, "qwen", max_length=second_step_end + 1)
    scores = cut.score([QUESTION], [SOLUTIONS[1]])[0]
    assert scores[:2] == pytest.approx(full.score([QUESTION], [SOLUTIONS[1]])[0][:2], abs=1e-5)
    assert len(scores) == 3 and scores[2] == 0.0
    assert isinstance(load_prm(shepherd_prm_dir, "shepherd"), MathShepherdPRM)
    with pytest.raises(ValueError, match="unknown PRM format"):
        load_prm(qwen_prm_dir, "orm")
