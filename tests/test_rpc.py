"""RPC and weighted majority: the Weibull mixture fit on synthetic draws, pruning and perplexity
consistency against hand-computed cases, and the selectors by name through a best-of-N evaluation."""

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
from treetune.rewards.selection.selectors import Candidate, get_selector


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
    # The MLE is at least as likely as the truth on the same draws.
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
                       selectors="majority,pc,rpc,rpc_mean,weighted:verifier", subsamples=2)
    with Grader() as grader:
        metrics = evaluate_trees(args, problems, grader)
    at4 = {name: cells["4"]["accuracy"] for name, cells in metrics["selectors"].items()}
    # weighted: 0.9 > 3 x 0.2; rpc_mean: the wrong copies are pruned, or would add 3 x 0.30 < 0.95
    assert at4 == {"majority": 0.0, "pc": 1.0, "rpc": 1.0, "rpc_mean": 1.0, "weighted:verifier": 1.0}
