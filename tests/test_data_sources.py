"""Problem sources on the real files, field mappings, and errors that name file, line and field."""

from __future__ import annotations

import json
import logging

import pytest
from treetune.data import DataError, PromptTemplate, load_problems, split_steps


def test_gsm8k_local_files(shared_data):
    train = load_problems("gsm8k", "train", path=shared_data / "gsm8k" / "train.jsonl")
    test = load_problems("gsm8k", "test", path=shared_data / "gsm8k" / "test.jsonl", limit=10)
    assert len(train) == 7473 and len(test) == 10
    first = test[0]
    assert first.answer == "18" and first.solution.endswith("#### 18") and first.source == "gsm8k"
    assert len({p.id for p in train}) == len(train)


def test_math500_local_file_keeps_subject_and_level(shared_data):
    problems = load_problems("math500", path=shared_data / "math500" / "test.jsonl")
    assert len(problems) == 500
    first = problems[0]
    assert first.id == "test/precalculus/807.json"
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.extra == {"level": 2, "subject": "Precalculus"}
    assert {p.extra["level"] for p in problems} == {1, 2, 3, 4, 5}


def test_any_json_file_through_a_field_mapping(shared_data):
    # ProcessBench: a JSON array with `problem` and `final_answer_correct`; no gold answer, so we
    # map `id` and `problem`, and take the answer field from `label` just to exercise the mapping.
    problems = load_problems("jsonl", path=shared_data / "processbench" / "gsm8k.json",
                             fields={"question": "problem", "answer": "label"}, limit=5)
    assert len(problems) == 5 and problems[0].id.startswith("gsm8k-")
    assert "steps" in problems[0].extra


def test_answer_taken_from_the_solution(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"q": "1+1?", "sol": "so \\boxed{2}"}, {"q": "2+2?", "sol": "so \\boxed{4}"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    problems = load_problems("jsonl", path=path, fields={"question": "q", "solution": "sol"}, answer_from="boxed")
    assert [p.answer for p in problems] == ["2", "4"]


def _write(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    path = _write(tmp_path, ['{"question": "a", "answer": "#### 1"}', '{"question": "b", "answer": '])
    with pytest.raises(DataError) as err:
        load_problems("gsm8k", path=path)
    assert err.value.line == 2 and str(path) in str(err.value) and ":2:" in str(err.value)


def test_missing_field_names_the_field(tmp_path):
    path = _write(tmp_path, ['{"question": "a", "answer": "#### 1"}', '', '{"question": "b"}'])
    with pytest.raises(DataError) as err:
        load_problems("gsm8k", path=path)
    assert (err.value.line, err.value.field) == (3, "answer")
    assert "field 'answer': missing" in str(err.value)


def test_gsm8k_answer_without_marker_is_an_error(tmp_path):
    path = _write(tmp_path, ['{"question": "a", "answer": "just text"}'])
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'answer'"):
        load_problems("gsm8k", path=path)


def test_skipping_bad_rows_reports_the_count(tmp_path, caplog):
    path = _write(tmp_path, [
        '{"question": "a", "answer": "#### 1"}',
        '{"question": "b"}',
        '{"answer": "#### 3"}',
        '{"question": "d", "answer": "#### 4"}',
    ])
    with caplog.at_level(logging.WARNING):
        problems = load_problems("gsm8k", path=path, skip_bad=True)
    assert [p.answer for p in problems] == ["1", "4"]
    assert "skipped 2 bad row(s)" in caplog.text and "bad.jsonl:2" in caplog.text and "bad.jsonl:3" in caplog.text


def test_unknown_source_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown problem source"):
        load_problems("nope")
    with pytest.raises(DataError, match="file not found"):
        load_problems("gsm8k", path=tmp_path / "absent.jsonl")


def test_prompt_templates():
    plain = PromptTemplate()
    assert plain.render("What is 2+2?") == "What is 2+2?\nPlease reason step by step, and put your final answer within \\boxed{}.\n"
    assert PromptTemplate(style="bare").render("Q?") == "Q?\n"
    shots = PromptTemplate(style="bare", few_shot=[("1+1?", "\\boxed{2}")])
    assert shots.render("2+2?") == "1+1?\n\\boxed{2}\n\n2+2?\n"
    with pytest.raises(ValueError, match="needs the model.s tokenizer"):
        PromptTemplate(style="chat").render("Q?")
    with pytest.raises(ValueError, match="unknown prompt style"):
        PromptTemplate(style="fancy")


def test_chat_template_puts_the_instruction_in_the_system_turn():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    text = PromptTemplate(style="chat", instruction="Think.").render("Q?", tokenizer)
    assert text == "<system>Think.<user>Q?<assistant>"


def test_step_splitting():
    assert split_steps("a\n\nb\n\n\nc") == ["a", "b", "c"]
    assert split_steps("a\nb\n\nc", "line") == ["a", "b", "c"]
    assert split_steps("Intro\nStep 1: x\nmore\nStep 2: y", "step_k") == ["Intro", "Step 1: x\nmore", "Step 2: y"]
    assert split_steps("a ки b ки", "regex", pattern=r"\s*ки\s*") == ["a", "b"]
    with pytest.raises(ValueError):
        split_steps("a", "regex")


def test_hub_rows_convert(shared_data, monkeypatch):
    # No network here: the hub loader is pointed at the same files through `datasets`, so the
    # rows arrive exactly as `datasets.load_dataset` yields them from the hub.
    import datasets
    from treetune.data import sources

    files = {"openai/gsm8k": shared_data / "gsm8k" / "test.jsonl", sources.MATH500_HUB: shared_data / "math500" / "test.jsonl"}
    monkeypatch.setattr(sources, "_from_hub", lambda name, config, split: datasets.load_dataset(
        "json", data_files=str(files[name]), split="train"))
    gsm8k = load_problems("gsm8k", "test", limit=5)
    assert [p.answer for p in gsm8k][:2] == ["18", "3"]
    math500 = load_problems("math500", limit=3)
    assert math500[0].extra["subject"] == "Precalculus"


def test_full_math_release_row_layout():
    from treetune.data.sources import math_row

    row = {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "level": "Level 3", "type": "Algebra"}
    problem = math_row(row, 4, "train-algebra")
    assert (problem.answer, problem.extra, problem.id) == ("2", {"level": 3, "subject": "Algebra"}, "math-train-algebra-4")
