"""A rollout run: problems in, trees on disk out, resumable, with a summary.

Problems go to the sampler in batches; each tree is scored (when a scorer is given) and written
the moment it is finished, so a killed run restarted on the same output folder skips every
problem whose tree is already on disk and repairs a half-written shard (see `tree_io`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from treetune.data import Problem, PromptTemplate
from treetune.rollouts.engines import HFEngine, VLLMEngine
from treetune.rollouts.engines.server_pool import VLLMServerPool
from treetune.rollouts.flat import FlatSampler, FlatSettings
from treetune.rollouts.mcts import MCTSSampler, MCTSSettings
from treetune.rollouts.step_search import BeamSearchSampler, BeamSettings, DVTSSampler, DVTSSettings
from treetune.rollouts.tree import ReasoningTree
from treetune.rollouts.tree_io import TreeWriter, read_trees
from treetune.rollouts.treepo import TreePOSampler, TreePOSettings

log = logging.getLogger(__name__)


@dataclass
class RolloutArgs:
    output_dir: str = "outputs/rollout"
    model_name_or_path: str | None = None  # empty: the arith tiny policy
    engine: str = "vllm"  # vllm | servers (with server_urls) | hf
    server_urls: str | None = None  # comma-separated `vllm serve` base URLs, for engine=servers
    source: str = "arith"
    split: str = "test"
    data_path: str | None = None
    limit: int | None = 200
    prompt_style: str | None = None  # empty: bare for the tiny policy, chat when the tokenizer has a template, else plain
    sampler: str = "treepo"  # treepo | flat | beam | dvts | mcts
    trajectories: int = 16  # finished trajectories per problem (flat: samples per problem)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256  # per trajectory
    seed: int = 0
    segment_tokens: int = 8
    max_depth: int = 16
    branch: int = 2
    init_divergence: int = 2
    init_divergence_max: int | None = None
    budget: str = "even"
    logprob_temperature: float = 2.0
    favour: str = "low"
    stop_on_boxed: bool = True
    fallback: bool = True
    fork: str = "fixed"  # treepo: fixed (fork b ways every segment) | coupled (fork where iid samples would diverge)
    coupled_top_k: int = 8  # treepo fork=coupled: top log-probs per position for the forking draw
    # step search (beam, dvts, mcts): a node is one step, cut at step_delimiter, at most step_tokens
    scorer: str | None = None  # the step scorer driving the search: arith_checker, self_eval, or a PRM folder
    prm_separator: str = "\n"
    step_delimiter: str = "\n"
    step_tokens: int = 64
    search_width: int = 4  # beam: survivors M; dvts: candidates per subtree M; mcts: candidates per expansion k
    aggregation: str = "last"  # step scores -> path value: last | min | product | mean
    mcts_iterations: int = 8  # simulations per search (per move with move_root)
    mcts_root_iterations: int | None = None
    c_puct: float = 1.0
    length_penalty: float = 1.25
    move_root: bool = True
    reuse_subtree: bool = True
    mcts_max_children: int = 0  # > search_width: progressive widening up to this many children per node
    terminal_value: str = "verifier"  # mcts finished nodes: verifier (gold answer, +1/-1) | scorer
    batch_problems: int = 64
    shard_size: int = 256
    grade: bool = True
    kv_cache_gb: float | None = None


def make_sampler(args: RolloutArgs, step_scorer=None, verifier=None):
    """The sampler `args.sampler` names; step search takes the injected scorer (and MCTS the verifier)."""
    if args.sampler in ("beam", "dvts", "mcts"):
        return _make_search_sampler(args, step_scorer, verifier)
    if args.sampler == "flat":
        return FlatSampler(FlatSettings(n=args.trajectories, temperature=args.temperature, top_p=args.top_p,
                                        max_tokens=args.max_tokens, seed=args.seed))
    if args.sampler == "treepo":
        return TreePOSampler(TreePOSettings(
            trajectories=args.trajectories, segment_tokens=args.segment_tokens, max_depth=args.max_depth,
            max_response_tokens=args.max_tokens, branch=args.branch, init_divergence=args.init_divergence,
            init_divergence_max=args.init_divergence_max, budget=args.budget,
            logprob_temperature=args.logprob_temperature, favour=args.favour, stop_on_boxed=args.stop_on_boxed,
            fallback=args.fallback, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            fork=args.fork, coupled_top_k=args.coupled_top_k))
    raise ValueError(f"unknown sampler {args.sampler!r}; expected treepo, flat, beam, dvts or mcts")


def _make_search_sampler(args: RolloutArgs, step_scorer, verifier):

    # a delimiter typed on a command line arrives as the characters backslash, n
    delimiter = args.step_delimiter.encode().decode("unicode_escape") if "\\" in args.step_delimiter else args.step_delimiter
    common = dict(step_delimiter=delimiter, step_tokens=args.step_tokens, max_depth=args.max_depth,
                  max_response_tokens=args.max_tokens, stop_on_boxed=args.stop_on_boxed, aggregation=args.aggregation,
                  temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.sampler == "beam":
        return BeamSearchSampler(BeamSettings(n=args.trajectories, width=args.search_width, **common), step_scorer)
    if args.sampler == "dvts":
        return DVTSSampler(DVTSSettings(n=args.trajectories, width=args.search_width, **common), step_scorer)
    return MCTSSampler(MCTSSettings(
        iterations=args.mcts_iterations, root_iterations=args.mcts_root_iterations, width=args.search_width,
        c_puct=args.c_puct, length_penalty=args.length_penalty, move_root=args.move_root,
        reuse_subtree=args.reuse_subtree, max_children=args.mcts_max_children, terminal_value=args.terminal_value,
        **common), step_scorer, verifier)


def make_engine(args: RolloutArgs, model: str):
    if args.engine == "vllm":

        return VLLMEngine(model, seed=args.seed, kv_cache_gb=args.kv_cache_gb)
    if args.engine == "servers":

        if not args.server_urls:
            raise ValueError("engine 'servers' needs --server_urls http://host:port[,http://host2:port]")
        return VLLMServerPool([u.strip() for u in args.server_urls.split(",") if u.strip()], model=model)
    if args.engine == "hf":

        return HFEngine(model)
    raise ValueError(f"unknown engine {args.engine!r}; expected vllm, servers or hf")


def default_prompt_style(requested: str | None, model_given: bool, tokenizer) -> str:
    """The asked-for style, else bare for the tiny policy, chat when the tokenizer has a template, else plain."""
    if requested:
        return requested
    if not model_given:
        return "bare"
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def new_tree(problem: Problem, template: PromptTemplate, tokenizer) -> ReasoningTree:
    prompt = template.render(problem.question, tokenizer)
    return ReasoningTree(problem_id=problem.id, prompt=prompt, prompt_ids=template.render_ids(problem.question, tokenizer),
                         answer=problem.answer, problem={"question": problem.question, "source": problem.source, **problem.extra})


def summarise(trees: Sequence[ReasoningTree], seconds: float | None = None) -> dict:
    """Counts over finished trees: trajectories, decoded tokens, outcome rates when scored."""
    leaves = [leaf for tree in trees for leaf in tree.leaves()]
    decoded = sum(tree.decoded_tokens() for tree in trees)
    summary = {
        "problems": len(trees),
        "trajectories": len(leaves),
        "decoded_tokens": decoded,
        "decoded_tokens_per_trajectory": decoded / max(1, len(leaves)),
        "trajectory_tokens_mean": sum(len(t.path_token_ids(l.id)) for t in trees for l in t.leaves()) / max(1, len(leaves)),
        "finish_reasons": {},
    }
    for leaf in leaves:
        summary["finish_reasons"][leaf.finish_reason] = summary["finish_reasons"].get(leaf.finish_reason, 0) + 1
    scored = [t for t in trees if t.leaves() and all("outcome" in l.scores for l in t.leaves())]
    if scored:
        summary["trajectory_accuracy"] = sum(l.scores["outcome"] for t in scored for l in t.leaves()) / sum(len(t.leaves()) for t in scored)
        summary["pass_at_all"] = sum(any(l.scores["outcome"] for l in t.leaves()) for t in scored) / len(scored)
    if seconds:
        summary["seconds"] = round(seconds, 2)
        summary["trajectories_per_second"] = len(leaves) / seconds
    return summary


def run_rollout(args: RolloutArgs, engine, tokenizer, problems: Sequence[Problem], template: PromptTemplate,
                score_tree: Callable[[list[ReasoningTree]], None] | None = None, progress: bool = True,
                step_scorer=None, verifier=None) -> dict:
    """Grow trees for `problems` not yet on disk in `args.output_dir/trees`; returns the summary.
    Step search (beam, dvts, mcts) takes the injected step scorer and, for MCTS, the verifier."""
    from tqdm.auto import tqdm

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    sampler = make_sampler(args, step_scorer, verifier)
    stats_before = engine.prefix_cache_stats() if hasattr(engine, "prefix_cache_stats") else None
    prompt_tokens_before = engine.counters.prompt_tokens
    started = time.time()
    with TreeWriter(out / "trees", shard_size=args.shard_size) as writer:
        todo = [p for p in problems if p.id not in writer.done]
        limit = getattr(engine, "max_model_len", None)
        if limit:
            too_long = [p.id for p in todo if len(template.render_ids(p.question, tokenizer)) >= limit]
            if too_long:
                log.warning("%d prompt(s) leave no room to generate within the model's %d-token context "
                            "(e.g. %s); their trajectories come back empty and grade wrong", len(too_long), limit, too_long[:3])
        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=f"{sampler.name} trees",
                   unit="tree", disable=not progress)
        for start in range(0, len(todo), args.batch_problems):
            batch = [new_tree(p, template, tokenizer) for p in todo[start:start + args.batch_problems]]
            for tree in sampler.grow(engine, batch):
                if score_tree is not None:
                    score_tree([tree])
                writer.write(tree)
                bar.update(1)
        bar.close()
    seconds = time.time() - started
    wanted, new = {p.id for p in problems}, {p.id for p in todo}
    trees = [t for t in read_trees(out / "trees") if t.problem_id in wanted]
    summary = summarise(trees)
    summary["new_trees"] = len(todo)
    summary["seconds_this_run"] = round(seconds, 2)
    summary["prompt_tokens_sent_this_run"] = engine.counters.prompt_tokens - prompt_tokens_before
    if todo:
        summary["new_trajectories_per_second"] = sum(len(t.leaves()) for t in trees if t.problem_id in new) / seconds
    stats_after = engine.prefix_cache_stats() if hasattr(engine, "prefix_cache_stats") else None
    if stats_before and stats_after and stats_after["queries"] > stats_before["queries"]:
        summary["prefix_cache_hit_rate"] = (stats_after["hits"] - stats_before["hits"]) / (stats_after["queries"] - stats_before["queries"])
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary
