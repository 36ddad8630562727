"""The `arith` proving ground: multi-step arithmetic word problems (`problems`), their exact step
checker (`checker`), and the tiny policies trained on them (`policies`)."""

from treetune.data.arith.checker import ERROR_KINDS, check_solution, error_kind_counts, first_error_kind, problem_ops
from treetune.data.arith.policies import (
                                          build_cached,
                                          cache_root,
                                          dual_mode_policy,
                                          dual_mode_records,
                                          policy_build,
                                          policy_key,
                                          tiny_policy,
)
from treetune.data.arith.problems import (
                                          DEFAULT_SIZES,
                                          EQUATION,
                                          GENERATOR_VERSION,
                                          SPLITS,
                                          ArithSpec,
                                          apply_op,
                                          arith_problems,
                                          gold_solution,
                                          make_problem,
                                          split_of,
)

__all__ = [
    "DEFAULT_SIZES", "EQUATION", "ERROR_KINDS", "GENERATOR_VERSION", "SPLITS", "ArithSpec", "apply_op", "arith_problems", "build_cached",
    "cache_root", "check_solution", "dual_mode_policy", "dual_mode_records", "error_kind_counts",
    "first_error_kind", "gold_solution", "make_problem", "policy_build", "policy_key", "problem_ops", "split_of", "tiny_policy",
]
