from treetune.data.answers import extract_answer, gsm8k_answer, last_boxed


def test_last_boxed_takes_the_last_balanced_box():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{2} and an unclosed \boxed{3") == "2"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"so $\boxed 5$.") == "5"
    assert last_boxed("no box here") is None


def test_gsm8k_marker_strips_separators():
    assert gsm8k_answer("work\n#### 1,234") == "1234"
    assert gsm8k_answer("#### $5.") == "5"
    assert gsm8k_answer("none") is None


def test_extract_answer_order_and_fallbacks():
    assert extract_answer("The answer is 42.") == "42"
    assert extract_answer("The answer is \\boxed{42}.") == "42"
    assert extract_answer("blah\n#### 7") == "7"
    assert extract_answer("") is None
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert extract_answer("nothing to see") is None
