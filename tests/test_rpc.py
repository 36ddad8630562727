"""RPC and weighted majority: the Weibull mixture fit on synthetic draws, pruning and perplexity
consistency against hand-computed cases, the authors' RPC (`rpc_reference`) pinned on a sample set
worked out by hand and set against treetune's `rpc`, and the selectors by name through a best-of-N
evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import check_grad
from treetune.rewards.selection.rpc import (
    PAPER_START,
    WeibullMixture,
    _nll_and_grad,
    class_scores,
    consistency_weights,
    fit_weibull_mixture,
    prune_mask,
    rpc_scores,
    rpc_weights,
)
from treetune.rewards.evaluation.best_of_n import evaluate
from treetune.rewards.selection import rpc_reference
from treetune.rewards.selection.selectors import Candidate, get_selector, selection_credit


def weibull_pdf(x, k, lam):  # written out, independent of the module's log-space code
    return (k / lam) * (x / lam) ** (k - 1) * math.exp(-((x / lam) ** k))


def draws(rng, n, w, k1, lam1, k2, lam2):
    high = rng.random(n) < w
    return np.where(high, lam1 * rng.weibull(k1, n), lam2 * rng.weibull(k2, n))


@pytest.mark.parametrize("truth", [(0.6, 12.0, 0.9, 4.0, 0.45), (0.3, 20.0, 0.8, 6.0, 0.5)])
def test_weibull_fit_recovers_the_parameters(truth):
    w, k1, lam1, k2, lam2 = truth
    x = draws(np.random.default_rng(0), 4000, *truth)
    fit = fit_weibull_mixture(x)
    assert fit.w == pytest.approx(w, abs=0.04)
    assert fit.k1 == pytest.approx(k1, rel=0.15) and fit.lam1 == pytest.approx(lam1, rel=0.03)
    assert fit.k2 == pytest.approx(k2, rel=0.15) and fit.lam2 == pytest.approx(lam2, rel=0.05)
    # The fit (a local optimum: the likelihood itself is unbounded) is at least as likely as the truth.
    assert fit.log_likelihood(x) >= WeibullMixture(*truth).log_likelihood(x) - 1e-6
    # The high-mean component comes first whichever way the optimiser labelled them.
    swapped = fit_weibull_mixture(x, starts=[(1 - w, k2, lam2, k1, lam1)])
    assert swapped.lam1 == pytest.approx(fit.lam1, rel=1e-3) and swapped.w == pytest.approx(fit.w, abs=1e-3)


def test_negative_log_likelihood_gradient_is_exact():
    x = draws(np.random.default_rng(1), 64, 0.5, 10.0, 0.9, 3.0, 0.4)
    for params in (PAPER_START, (0.3, 2.0, 0.5, 5.0, 0.8), (0.7, 15.0, 0.92, 2.5, 0.35)):
        p = np.array(params)
        error = check_grad(lambda q: _nll_and_grad(q, x)[0], lambda q: _nll_and_grad(q, x)[1], p)
        assert error < 1e-3 * max(1.0, np.linalg.norm(_nll_and_grad(p, x)[1]))
    # the value is minus the sum of log mixture densities
    nll, _ = _nll_and_grad(np.array(PAPER_START), x)
    by_hand = -sum(math.log(0.5 * weibull_pdf(v, 1.0, 1.0) + 0.5 * weibull_pdf(v, 1.5, 2.0)) for v in x)
    assert nll == pytest.approx(by_hand, rel=1e-9)


def test_posterior_against_the_formula():
    mixture = WeibullMixture(0.4, 10.0, 0.9, 3.0, 0.4)
    for x in (0.3, 0.6, 0.7, 0.9):
        high, low = 0.4 * weibull_pdf(x, 10.0, 0.9), 0.6 * weibull_pdf(x, 3.0, 0.4)
        assert mixture.posterior_high([x])[0] == pytest.approx(high / (high + low), rel=1e-9)
    # relabelling keeps the density and puts the higher mean first
    flipped = WeibullMixture(0.6, 3.0, 0.4, 10.0, 0.9).high_first()
    assert (flipped.w, flipped.k1, flipped.lam1) == (pytest.approx(0.4), 10.0, 0.9)


def test_pruning_by_hand():
    mixture = WeibullMixture(0.5, 10.0, 0.9, 10.0, 0.3)  # a high cluster near 0.9, a low one near 0.3
    # mean 0.74: 0.3 is low and below the mean -> pruned; 0.7 is below the mean but the high
    # component explains it ((0.7/0.3)^10 kills the low density) -> kept; the 0.9s are kept.
    assert prune_mask([0.9, 0.9, 0.9, 0.7, 0.3], mixture) == [False, False, False, False, True]
    # The mean guard: 0.35 belongs to the low component but lies above the mean 0.3125 -> kept.
    assert prune_mask([0.35, 0.3, 0.3, 0.3], mixture) == [False, True, True, True]
    # Nothing below the mean, or a single path: nothing to prune (and no fit).
    assert prune_mask([0.5, 0.5, 0.5]) == [False] * 3
    assert prune_mask([0.2]) == [False] and prune_mask([]) == []


def test_pruning_with_its_own_fit_drops_the_low_cluster():
    rng = np.random.default_rng(2)
    high = list(0.9 + 0.02 * rng.standard_normal(6))
    low = list(0.3 + 0.02 * rng.standard_normal(10))
    mask = prune_mask(high + low)
    assert mask == [False] * 6 + [True] * 10


def test_perplexity_consistency_by_hand():
    classes = [0, 0, 1, 1, None, 2]
    texts = ["a", "a", "b", "c", "d", "e"]
    p = [0.5, 0.5, 0.4, 0.3, 0.9, 0.2]
    pruned = [False, False, False, True, False, False]
    weights = consistency_weights(p, texts, pruned)
    assert weights == [0.5, 0.0, 0.4, 0.0, 0.9, 0.2]  # the repeated "a" counts once; "c" is pruned
    assert class_scores(classes, weights) == pytest.approx({0: 0.5, 1: 0.4, 2: 0.2})  # no class for None
    # Without pruning "c" adds its 0.3 and class 1 overtakes class 0; without texts every path votes.
    assert class_scores(classes, consistency_weights(p, texts)) == pytest.approx({0: 0.5, 1: 0.7, 2: 0.2})
    assert class_scores(classes, consistency_weights(p, None, pruned)) == pytest.approx({0: 1.0, 1: 0.4, 2: 0.2})
    # A pruned first copy does not hide an unpruned later copy of the same text.
    assert consistency_weights([0.1, 0.1], ["x", "x"], [True, False]) == [0.0, 0.1]
    with pytest.raises(ValueError, match="one entry per path"):
        consistency_weights([0.1], ["x", "y"])


def test_joint_probabilities_do_not_underflow():
    # Paths of joint log-probability -2000 and -2001: exp() of either is 0.0 in floating point.
    votes = rpc_weights([-0.5, -0.5], ["u", "v"], [-2000.0, -2001.0], prune=False)
    assert votes == pytest.approx([1.0, math.exp(-1.0)])
    assert rpc_scores([0, 1], ["u", "v"], [-0.5, -0.5], [-2000.0, -2001.0], prune=False)[1] == pytest.approx(math.exp(-1))


def cand(cls, p, text=None, correct=False, tokens=10, **scores):
    """A candidate whose tokens each have probability p: mean log-prob log p, joint tokens * log p."""
    return Candidate(text=text if text is not None else f"path {cls} {p}", answer=None if cls is None else str(cls),
                     correct=correct, answer_class=cls, tokens=tokens, logprob_mean=None if p is None else math.log(p),
                     logprob_sum=None if p is None else tokens * math.log(p), scores=scores)


def test_rpc_selector_against_majority_and_pc():
    # Class 0: ten distinct one-token paths of p 0.3 (joint mass 3.0); class 1: three 20-token paths
    # of p ~0.9 per token (joint ~0.12 each). Majority and PC answer 0. RPC prunes class 0 (the low
    # component, all below the mean 0.44 of length-normalised p) and answers 1, as does rpc_mean.
    low = [cand(0, 0.3 + 0.005 * i, tokens=1) for i in range(-5, 5)]
    high = [cand(1, 0.9 + 0.005 * i, correct=True, tokens=20) for i in (-1, 0, 1)]
    cands = low + high
    assert cands[get_selector("majority")(cands)].answer_class == 0
    assert cands[get_selector("pc")(cands)].answer_class == 0
    assert cands[get_selector("rpc")(cands)].answer_class == 1
    assert cands[get_selector("rpc_mean")(cands)].answer_class == 1
    votes = rpc_weights([c.logprob_mean for c in cands], [c.text for c in cands], [c.logprob_sum for c in cands])
    assert votes[:10] == [0.0] * 10
    assert votes[10:] == pytest.approx([(0.895 / 0.905) ** 20, (0.9 / 0.905) ** 20, 1.0])  # relative to the top kept path
    # rpc_mean: each kept path votes its length-normalised p: class 1 gets 0.895 + 0.9 + 0.905.
    scores = rpc_scores([c.answer_class for c in cands], [c.text for c in cands], [c.logprob_mean for c in cands])
    assert scores == pytest.approx({0: 0.0, 1: 2.7})
    # Identical completions count once in PC: four copies of one text lose to two distinct paths.
    dup = [cand(0, 0.6, text="same") for _ in range(4)] + [cand(1, 0.58), cand(1, 0.57)]
    assert 0.6 ** 10 < 0.58 ** 10 + 0.57 ** 10 < 4 * 0.6 ** 10
    assert dup[get_selector("majority")(dup)].answer_class == 0
    assert dup[get_selector("pc")(dup)].answer_class == 1
    # No log-probs: no choice; paths without an answer never win.
    assert get_selector("rpc")([cand(0, None)]) is None
    assert get_selector("rpc")([cand(None, 0.9), cand(3, 0.1)]) == 1


def test_weighted_majority_by_hand():
    cands = [cand(0, 0.5, prm=[0.9, 0.2], verifier=0.1), cand(0, 0.5, prm=[0.9, 0.3], verifier=0.2),
             cand(1, 0.5, prm=[0.4, 0.6], verifier=0.9), cand(2, 0.5)]
    # class 0 against class 1 (class 2 has no PRM score: it adds 0):
    # last 0.2 + 0.3 = 0.5 < 0.6; min 0.5 > 0.4; product 0.18 + 0.27 = 0.45 > 0.24
    assert get_selector("weighted_prm_last")(cands) == 2
    assert get_selector("weighted:prm:min")(cands) == 0
    assert get_selector("weighted_prm_product")(cands) == 0
    assert get_selector("weighted:verifier")(cands) == 2  # scalar scores: 0.9 beats 0.1 + 0.2
    assert get_selector("weighted:nothing")(cands) is None  # a scorer that never ran cannot vote
    with pytest.raises(KeyError, match="unknown aggregation"):
        get_selector("weighted:prm:median")
    with pytest.raises(KeyError, match="wrong arguments"):
        get_selector("weighted:prm:min:extra")
    with pytest.raises(KeyError, match="unknown selector"):
        get_selector("nope:prm")


def test_selectors_by_name_in_a_best_of_n_run(tmp_path):
    # Hand-made trees: the gold solution once, likely; a wrong one three times, unlikely, word for
    # word. Majority answers wrong; PC counts the repeated text once and answers right, as does RPC
    # (which also needs the whole-path log-prob that best_of_n.candidates computes).
    from treetune.data.arith import arith_problems
    from treetune.launch.best_of_n import BestOfNArgs, evaluate_trees
    from treetune.rewards.grading import Grader
    from treetune.rollouts.tree import ReasoningTree
    from treetune.rollouts.tree_io import TreeWriter

    problems = arith_problems("test", 4)
    with TreeWriter(tmp_path / "given") as writer:
        for p in problems:
            tree = ReasoningTree(problem_id=p.id, prompt=p.question + "\n", prompt_ids=[1], answer=p.answer)
            wrong = p.solution.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{int(p.answer) + 1}}}")
            tree.add(0, p.solution, [1, 2], [-0.05, -0.05], "boxed", verifier=0.9)
            for _ in range(3):
                tree.add(0, wrong, [1, 2], [-1.2, -1.2], "boxed", verifier=0.2)
            writer.write(tree)
    args = BestOfNArgs(output_dir=str(tmp_path / "eval"), trees_path=str(tmp_path / "given"), limit=4,
                       selectors="majority,pc,rpc,rpc_mean,rpc_reference,weighted:verifier", subsamples=2)
    with Grader() as grader:
        metrics = evaluate_trees(args, problems, grader)
    at4 = {name: cells["4"]["accuracy"] for name, cells in metrics["selectors"].items()}
    # weighted: 0.9 > 3 x 0.2; rpc_mean: the wrong copies are pruned, or would add 3 x 0.30 < 0.95;
    # rpc_reference: the three copies count once (0.30 or, pruned, 0) against the gold's 0.95
    assert at4 == {"majority": 0.0, "pc": 1.0, "rpc": 1.0, "rpc_mean": 1.0, "rpc_reference": 1.0, "weighted:verifier": 1.0}


# --- the authors' RPC (rewards/selection/rpc_reference.py) ------------------------------------

# Eleven paths of one problem: (answer class, completion text, p = exp(mean log-prob)). Class 0 is
# right; its text "A" appears twice word for word. Classes 1 and 2 are wrong.
HAND_SET = [(0, "A", 0.92), (0, "A", 0.92), (0, "B", 0.84), (2, "H", 0.92), (2, "J", 0.84),
            (1, "C", 0.45), (1, "D", 0.40), (1, "E", 0.36), (1, "F", 0.33), (1, "G", 0.30), (1, "I", 0.27)]


def hand_candidates(tokens: dict[int, int] | None = None) -> list[Candidate]:
    tokens = tokens or {}
    return [Candidate(text=t, answer=str(c), correct=c == 0, answer_class=c, tokens=tokens.get(c, 1),
                      logprob_mean=math.log(p), logprob_sum=tokens.get(c, 1) * math.log(p)) for c, t, p in HAND_SET]


def test_rpc_reference_on_a_set_worked_out_by_hand():
    # By the authors' formulas (compute_rpc.py, wpc_evaluator):
    # 1. mean p = (3 x 0.92 + 2 x 0.84 + 0.45 + 0.40 + 0.36 + 0.33 + 0.30 + 0.27) / 11
    #           = (2.76 + 1.68 + 2.11) / 11 = 6.55 / 11 = 0.5955. The five high paths lie above it:
    #    they are kept whatever the fit says.
    # 2. The fit (one L-BFGS-B run from [0.5, 1, 1, 1.5, 2]) puts one component on each cluster. At
    #    the optimum w equals the mean responsibility of the high component; the responsibilities
    #    are 1 for the five high paths and ~0 for the six low ones, so w = 5/11 = 0.4545.
    #    It lands at k1 = 30.52, lam1 = 0.906, k2 = 6.344, lam2 = 0.3776.
    # 3. Membership of the closest low path, x = 0.45:
    #    log(w f1) = log(5/11) + log(30.52 / 0.906) + 29.52 log(0.45 / 0.906) - (0.45 / 0.906)^30.52
    #              = -0.788 + 3.517 - 20.66 - 0.000 = -17.93
    #    log((1-w) f2) = log(6/11) + log(6.344 / 0.3776) + 5.344 log(0.45 / 0.3776) - (0.45 / 0.3776)^6.344
    #              = -0.606 + 2.821 + 0.937 - 3.043 = 0.109
    #    P(high | 0.45) = 1 / (1 + exp(0.109 + 17.93)) = 1.47e-8 < P(low): pruned (and 0.45 < 0.5955).
    #    Lower x only lowers P(high) (k1 > k2), so all six low paths are pruned.
    # 4. Masses over distinct texts: class 0: A {0.92} + B {0.84} = 1.76 (the second "A" adds
    #    nothing); class 2: H {0.92} + J {0.84} = 1.76; class 1: 0. Without pruning class 1 would
    #    have 0.45 + 0.40 + 0.36 + 0.33 + 0.30 + 0.27 = 2.11 and win.
    # 5. Classes 0 and 2 tie at 1.76: each gets 1/2 of the credit; class 0 is right: credit 0.5.
    cands = hand_candidates()
    p = [math.exp(c.logprob_mean) for c in cands]
    fit = rpc_reference.fit(p)
    assert fit.w == pytest.approx(5 / 11, abs=1e-4)
    assert (fit.k1, fit.lam1, fit.k2, fit.lam2) == (pytest.approx(30.52, abs=0.01), pytest.approx(0.906, abs=1e-3),
                                                    pytest.approx(6.344, abs=1e-3), pytest.approx(0.3776, abs=1e-4))
    assert fit.high_membership([0.45])[0] == pytest.approx(1.47e-8, rel=0.02)
    assert rpc_reference.prune_mask(p) == [False] * 5 + [True] * 6
    choice = rpc_reference.choose([c.answer_class for c in cands], [c.text for c in cands], [c.logprob_mean for c in cands])
    assert choice.masses == pytest.approx({0: 1.76, 2: 1.76, 1: 0.0})
    assert choice.winners == [0, 2]
    assert choice.credit({0: True, 1: False, 2: False}) == 0.5
    select = get_selector("rpc_reference")
    assert select(cands) == 0  # the first path of the first tied class
    assert selection_credit(select, cands) == 0.5
    # unpruned, class 1 would win: the pruning decides this set
    assert rpc_reference.group_masses([c.answer_class for c in cands], [c.text for c in cands], p, [False] * 11)[1] \
        == pytest.approx(2.11)
    assert cands[get_selector("majority")(cands)].answer_class == 1


def test_shared_credit_reaches_the_best_of_n_figures():
    # One problem, the hand set at N = 11 (all paths): rpc_reference scores 0.5 (a tie of a right and
    # a wrong class); treetune's rpc with one-token paths votes the same masses but takes the first
    # of the tie, class 0: 1.0; majority picks class 1: 0.0.
    metrics = evaluate({"p": hand_candidates()}, ["rpc_reference", "rpc", "majority"], [11], subsamples=1)
    at11 = {name: cells["11"]["accuracy"] for name, cells in metrics["selectors"].items()}
    assert at11 == {"rpc_reference": 0.5, "rpc": 1.0, "majority": 0.0}
    assert metrics["selectors"]["rpc_reference"]["11"]["false_positive_rate"] == 0.5


def test_rpc_reference_votes_length_normalised_where_rpc_votes_joint():
    # Nothing below the mean (all p = 0.8): no pruning by either. Class 0: two distinct 3-token
    # paths; class 1: three distinct 30-token paths (wrong). The authors' votes: 2 x 0.8 = 1.6 <
    # 3 x 0.8 = 2.4 -> class 1. treetune's joint votes: 2 x 0.8^3 = 1.02 > 3 x 0.8^30 = 0.0037 -> class 0.
    cands = [Candidate(text=f"{c}-{i}", answer=str(c), correct=c == 0, answer_class=c, tokens=t,
                       logprob_mean=math.log(0.8), logprob_sum=t * math.log(0.8))
             for c, t, count in ((0, 3, 2), (1, 30, 3)) for i in range(count)]
    assert cands[get_selector("rpc_reference")(cands)].answer_class == 1
    assert cands[get_selector("rpc")(cands)].answer_class == 0
    assert rpc_reference.prune_mask([0.8] * 5) == [False] * 5


def test_rpc_reference_single_start_prunes_less_than_rpc():
    # One unimodal cluster of p. From the authors' single start the fit runs to the bounds: w = 0.8
    # and the low component's scale lam2 = 0.01, far below every path, so nothing is pruned.
    # treetune's second start (one component per half of the sorted sample) is likelier and puts a
    # component on the lower values: 0.76 and 0.64 are pruned. With one-token paths (joint p = p)
    # only the pruning differs: class 1 = 0.84 + 0.85 + 0.88 + 0.76 + 0.64 = 3.97 beats class 0 =
    # 0.91 + 0.90 + 0.93 = 2.74 unpruned (reference), but falls to 2.57 once pruned (rpc).
    p = [0.91, 0.84, 0.85, 0.90, 0.76, 0.88, 0.93, 0.64]
    classes = [0, 1, 1, 0, 1, 1, 0, 1]
    fit = rpc_reference.fit(p)
    assert fit.w == pytest.approx(0.8) and fit.lam2 == pytest.approx(0.01)
    assert rpc_reference.prune_mask(p) == [False] * 8
    assert prune_mask(p) == [False, False, False, False, True, False, False, True]
    two_start = fit_weibull_mixture(p)
    assert two_start.log_likelihood(p) > WeibullMixture(fit.w, fit.k1, fit.lam1, fit.k2, fit.lam2).log_likelihood(p)
    cands = [Candidate(text=f"t{i}", answer=str(c), correct=c == 0, answer_class=c, tokens=1,
                       logprob_mean=math.log(x), logprob_sum=math.log(x)) for i, (c, x) in enumerate(zip(classes, p))]
    assert cands[get_selector("rpc_reference")(cands)].answer_class == 1
    assert cands[get_selector("rpc")(cands)].answer_class == 0


def test_rpc_reference_counts_texts_and_no_answer_paths_as_the_code_does():
    # The code keeps a set of p per text: one text seen with two different p counts both, where
    # treetune's distinct-text rule counts its first copy only.
    assert rpc_reference.group_masses([0, 0, 0], ["a", "a", "a"], [0.5, 0.5, 0.25], [False] * 3) == {0: 0.75}
    assert consistency_weights([0.5, 0.5, 0.25], ["a", "a", "a"]) == [0.5, 0.0, 0.0]
    # A pruned path adds nothing but its group still exists (mass 0).
    assert rpc_reference.group_masses([0, 1], ["a", "b"], [0.5, 0.25], [False, True]) == {0: 0.5, 1: 0.0}
    # Paths without an answer form a group that can win (the code's "[Invalid]" predictions are
    # string-equal): two distinct answerless paths at 0.9 outweigh one answer at 0.2, and the
    # credit is 0. treetune's rpc never answers with them.
    cands = [Candidate(text=f"no answer {i}", answer=None, correct=False, answer_class=None, logprob_mean=math.log(0.9),
                       logprob_sum=math.log(0.9)) for i in range(2)]
    cands.append(Candidate(text="x", answer="3", correct=True, answer_class=0, logprob_mean=math.log(0.2),
                           logprob_sum=math.log(0.2)))
    assert get_selector("rpc_reference")(cands) == 0
    assert selection_credit(get_selector("rpc_reference"), cands) == 0.0
    assert get_selector("rpc")(cands) == 2
    # no log-probs: no choice and no credit
    bare = [Candidate(text="y", answer="1", correct=True, answer_class=0)]
    assert get_selector("rpc_reference")(bare) is None and selection_credit(get_selector("rpc_reference"), bare) == 0.0
