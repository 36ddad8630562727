"""A rollout run: problems in, trees on disk out, resumable, with a summary; and the recipe parts
every job that samples shares (`EngineArgs`, `SamplingArgs`; problems come from `ProblemArgs`,
the scorer from `ScorerArgs`).

Problems go to the sampler in batches; each tree is scored (when a scorer is given) and written
the moment it is finished, so a killed run restarted on the same output folder skips every
problem whose tree is already on disk and repairs a half-written shard (see `tree_io`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from treetune.data import Problem, ProblemArgs, PromptTemplate
from treetune.data.arith import tiny_policy
from treetune.data.prompts import STYLES, require_chat_template
from treetune.data.steps import step_separator
from treetune.rollouts.engines import HFEngine, VLLMEngine
from treetune.rollouts.engines.server_pool import VLLMServerPool
from treetune.rollouts.flat import FlatSampler, FlatSettings
from treetune.rollouts.mcts import MCTSSampler, MCTSSettings
from treetune.rollouts.scoring import AGGREGATIONS, ScorerArgs, next_part_checks
from treetune.rollouts.step_search import BeamSearchSampler, BeamSettings, DVTSSampler, DVTSSettings
from treetune.rollouts.tree import ReasoningTree
from treetune.rollouts.tree_io import TreeWriter, read_trees
from treetune.rollouts.treepo import TreePOSampler, TreePOSettings

log = logging.getLogger(__name__)

ENGINES = ("vllm", "servers", "hf")


def redefault(part: type, name: str, value):
    """The field `name` of the recipe part `part` with another default and the same help, for a
    job whose default differs: `temperature: float = redefault(SamplingArgs, "temperature", 0.8)`."""
    by_name = {f.name: f for f in fields(part)}
    if name not in by_name:
        raise AttributeError(f"{part.__name__} has no field {name!r}")
    return field(default=value, metadata=dict(by_name[name].metadata))


@dataclass
class EngineArgs:
    """The policy and the engine that samples it."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "The policy: a local checkpoint or a hub name; empty: the arith tiny policy (built on first use)."})
    engine: str = field(default="vllm", metadata={
        "help": "vllm (in-process vLLM, prefix caching on), servers (a pool of `vllm serve` URLs, --server_urls) "
                "or hf (transformers.generate, where vLLM is not installed)."})
    server_urls: str | None = field(default=None, metadata={
        "help": "Comma-separated base URLs of `vllm serve` servers, for --engine servers."})
    kv_cache_gb: float | None = field(default=None, metadata={
        "help": "KV-cache size in GB of the in-process vLLM engine; empty: 1 GB on a CPU ($TREETUNE_KV_CACHE_GB), "
                "vLLM's share of GPU memory on a GPU."})
    prompt_style: str | None = field(default=None, metadata={
        "help": f"How a question becomes a prompt: {', '.join(STYLES)}; empty: bare for the arith tiny policy, "
                "chat when the tokenizer has a chat template, else plain."})

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"field 'engine': unknown engine {self.engine!r}; expected one of {', '.join(ENGINES)}")
        if self.prompt_style is not None and self.prompt_style not in STYLES:
            raise ValueError(f"field 'prompt_style': unknown style {self.prompt_style!r}; expected one of "
                             f"{', '.join(STYLES)}")
        next_part_checks(EngineArgs, self)

    def make_engine(self, model: str | None = None, seed: int = 0):
        """The engine serving `model` (default: `model_name_or_path`, else the arith tiny policy)."""
        model = model or self.model_name_or_path or tiny_policy()
        if self.engine == "servers":
            if not self.server_urls:
                raise ValueError("engine 'servers' needs --server_urls http://host:port[,http://host2:port]")
            return VLLMServerPool([u.strip() for u in self.server_urls.split(",") if u.strip()], model=model)
        if self.engine == "hf":
            return HFEngine(model)
        return VLLMEngine(model, seed=seed, kv_cache_gb=self.kv_cache_gb)

    def prompt_template(self, tokenizer) -> PromptTemplate:
        """The prompt template `prompt_style` asks for, or the default for this policy and tokenizer; a
        chat style on a tokenizer without a chat template fails here, before any sampling."""
        style = default_prompt_style(self.prompt_style, bool(self.model_name_or_path), tokenizer)
        if style == "chat":
            require_chat_template(tokenizer)
        return PromptTemplate(style=style)


@dataclass
class SamplingArgs:
    """How the policy samples."""

    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: the smallest token set of this much mass."})
    max_tokens: int = field(default=256, metadata={"help": "At most this many generated tokens per solution."})
    seed: int = field(default=0, metadata={
        "help": "Sampling seed: every request's seed derives from it, the problem and the node, so a resumed run "
                "samples what the first would have."})


@dataclass
class SearchArgs:
    """Step search (beam, dvts, mcts): a node is one step, cut at the step delimiter, driven by the scorer."""

    step_delimiter: str | None = field(default=None, metadata={
        "help": "beam/dvts/mcts: a step ends at this text (typed as \\n on a command line); empty: the separator "
                "of --step_mode."})
    step_tokens: int = field(default=64, metadata={"help": "beam/dvts/mcts: at most this many tokens per step."})
    search_width: int = field(default=4, metadata={
        "help": "beam: survivors M per step; dvts: candidates per subtree M; mcts: candidates per expansion k."})
    aggregation: str = field(default="last", metadata={
        "help": f"Step scores -> path value while searching: {', '.join(AGGREGATIONS)}."})
    mcts_iterations: int = field(default=8, metadata={"help": "mcts: simulations per search (per move with move_root)."})
    mcts_root_iterations: int | None = field(default=None, metadata={
        "help": "mcts: simulations of the first search (MCTS-DPO: 4x); empty: mcts_iterations."})
    c_puct: float = field(default=1.0, metadata={"help": "mcts: the PUCT exploration constant."})
    length_penalty: float = field(default=1.25, metadata={
        "help": "mcts: lambda in the step prior exp(sum log p / len^lambda)."})
    move_root: bool = field(default=True, metadata={
        "help": "mcts: after each search move the root to its most-visited child (MCTS-DPO)."})
    reuse_subtree: bool = field(default=True, metadata={"help": "mcts: keep the new root's statistics when moving."})
    mcts_max_children: int = field(default=0, metadata={
        "help": "mcts: > search_width allows progressive widening up to this many children per node; 0: expand once."})
    terminal_value: str = field(default="verifier", metadata={
        "help": "mcts: finished nodes valued by the verifier (the gold answer, +1/-1: training data only) or by "
                "the scorer (test-time search)."})

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"field 'aggregation': unknown aggregation {self.aggregation!r}; expected one of "
                             f"{', '.join(AGGREGATIONS)}")
        if self.terminal_value not in ("verifier", "scorer"):
            raise ValueError(f"field 'terminal_value': expected verifier or scorer, not {self.terminal_value!r}")
        next_part_checks(SearchArgs, self)


@dataclass
class RolloutArgs(ScorerArgs, SearchArgs, SamplingArgs, EngineArgs, ProblemArgs):
    """A rollout: problems, engine, sampling, step search and its scorer, then the sampler's own fields."""

    output_dir: str = field(default="outputs/rollout", metadata={
        "help": "Where the trees (trees/trees-*.jsonl), config.json and metrics.json go; rerun on it to resume."})
    limit: int | None = redefault(ProblemArgs, "limit", 200)
    sampler: str = field(default="treepo", metadata={"help": "treepo | flat | beam | dvts | mcts."})
    trajectories: int = field(default=16, metadata={
        "help": "Finished trajectories per problem (TreePO's w; flat: samples per problem; beam/dvts: N)."})
    max_depth: int = field(default=16, metadata={"help": "treepo: segments per path; beam/dvts/mcts: steps per path."})
    stop_on_boxed: bool = field(default=True, metadata={"help": "End a path at its first finished \\boxed{} answer."})
    # TreePO
    segment_tokens: int = field(default=8, metadata={"help": "treepo: tokens per segment (a node), TreePO's l."})
    branch: int = field(default=2, metadata={"help": "treepo: children per live path per step, at most (b)."})
    init_divergence: int = field(default=2, metadata={"help": "treepo: children of the root."})
    init_divergence_max: int | None = field(default=None, metadata={
        "help": "treepo: draw the root's children uniformly from [init_divergence, this]; empty: exactly init_divergence."})
    budget: str = field(default="even", metadata={
        "help": "treepo: how the branching budget splits over live paths: even, or logprob (a softmax of their "
                "mean token log-probs)."})
    logprob_temperature: float = field(default=2.0, metadata={"help": "treepo budget=logprob: the softmax temperature."})
    favour: str = field(default="low", metadata={
        "help": "treepo budget=logprob: more branches to low- or high-probability paths (low | high)."})
    fallback: bool = field(default=True, metadata={
        "help": "treepo: when no path is alive but fewer than w finished, re-fork a finished path at a random "
                "segment boundary."})
    fork: str = field(default="fixed", metadata={
        "help": "treepo: fixed (fork b ways every segment) | coupled (fork where independent samples would "
                "diverge, so the leaves are iid)."})
    coupled_top_k: int = field(default=8, metadata={"help": "treepo fork=coupled: top log-probs read per position."})
    batch_problems: int = field(default=64, metadata={"help": "Problems grown together (one engine batch per step)."})
    shard_size: int = field(default=256, metadata={"help": "Trees per JSONL shard on disk."})
    grade: bool = field(default=True, metadata={"help": "Grade every finished trajectory against the gold answer."})

    @property
    def delimiter(self) -> str:
        """The step search's delimiter: `step_delimiter` (backslash escapes decoded), else the step mode's."""
        return search_delimiter(self.step_delimiter, self.step_mode)


def search_delimiter(step_delimiter: str | None, step_mode: str) -> str:
    """`step_delimiter` as typed (a command line's backslash-n decoded), or the separator of `step_mode`."""
    if not step_delimiter:
        return step_separator(step_mode)
    return step_delimiter.encode().decode("unicode_escape") if "\\" in step_delimiter else step_delimiter


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
    common = dict(step_delimiter=args.delimiter, step_tokens=args.step_tokens, max_depth=args.max_depth,
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


def make_engine(args: EngineArgs, model: str | None = None, seed: int | None = None):
    """`args.make_engine`, seeded by the recipe's sampling seed when it has one."""
    return args.make_engine(model, seed=seed if seed is not None else getattr(args, "seed", 0))


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
