"""ThinkPRM training data: sample solutions with a policy, label their steps (on arith: the exact
checker), get verification chains (a checker-filled template on arith, or sampled from a verifier),
keep chains whose every verdict matches the gold labels, balance, and write SFT records.

    python launch/think_prm_data.py --config configs/think_prm_data/arith.yaml
    accelerate launch launch/sft.py --config configs/sft/arith_think_prm.yaml

A later round samples its chains from the verifier just trained:
    python launch/think_prm_data.py --config configs/think_prm_data/arith.yaml --chain_source verifier \
        --verifier_path outputs/think_prm/round1 --output_dir outputs/think_prm_data/round2

Writes to --output_dir: `records.jsonl` (prompt / completion records for `launch/sft.py
--source records`), `init/` (the policy with a widened context, the verifier's start),
`config.json` and `metrics.json`. The algorithm lives in `treetune.rewards.labels.think_prm`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from treetune.data import ProblemArgs, PromptTemplate, load_problems
from treetune.data.arith import tiny_policy
from treetune.rewards.labels.think_prm import (
    CHAIN_SOURCES,
    build_records,
    data_metrics,
    sample_examples,
    template_chains,
    verifier_chains,
    verifier_init,
    write_records,
)
from treetune.rewards.scorers.think_prm import ThinkPRM
from treetune.rollouts.engines import VLLMEngine
from treetune.rollouts.run import SamplingArgs, default_prompt_style, redefault
from treetune.trainers.common import parse_config, setup_logging


@dataclass
class ThinkPRMDataArgs(SamplingArgs, ProblemArgs):
    """The shared problem fields (arith only: the checker gives the gold labels) and sampling fields
    (of the solutions; the seed also seeds the verifier's chains and the balancing draw), plus
    ThinkPRM's own."""

    split: str = redefault(ProblemArgs, "split", "train")
    limit: int | None = redefault(ProblemArgs, "limit", 1000)
    max_tokens: int = redefault(SamplingArgs, "max_tokens", 128)
    output_dir: str = field(default="outputs/think_prm_data", metadata={"help": "Folder for records.jsonl, init/, "
                                                                               "config.json and metrics.json."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "The policy whose solutions are verified (and whose copy the verifier starts from); empty: the arith "
                "tiny policy."})
    offset: int = field(default=0, metadata={"help": "Skip the first this-many problems (a later round takes fresh ones)."})
    samples: int = field(default=4, metadata={"help": "Solutions sampled per problem."})
    chain_source: str = field(default="template", metadata={
        "help": "Where verification chains come from: template (written by the arith checker) or verifier (sampled "
                "from the ThinkPRM checkpoint at --verifier_path).", "choices": list(CHAIN_SOURCES)})
    verifier_path: str | None = field(default=None, metadata={"help": "The ThinkPRM checkpoint for chain_source verifier."})
    verifier_chains: int = field(default=4, metadata={"help": "Chains sampled per solution by the verifier (the paper: 4)."})
    verifier_temperature: float = field(default=0.6, metadata={"help": "Sampling temperature of the verifier's chains."})
    max_chain_tokens: int = field(default=600, metadata={
        "help": "Longest chain kept (tokens), and the verifier's generation limit."})
    balance: bool = field(default=True, metadata={
        "help": "Keep as many right as wrong solutions (the larger side subsampled)."})
    solution_prompt_style: str | None = field(default=None, metadata={
        "help": "How the policy is prompted for its solutions: bare, plain or chat; empty: bare for the arith tiny "
                "policy, chat when the model's tokenizer has a chat template, else plain (as every sampling job)."})
    prompt_style: str = field(default="paper", metadata={
        "help": "Verification prompt: paper or compact (treetune.rewards.scorers.think_prm.render_prompt).",
        "choices": ["paper", "compact"]})
    num_records: int | None = field(default=None, metadata={
        "help": "Keep at most this many records, half right and half wrong solutions; empty: all that pass."})
    init_positions: int = field(default=1024, metadata={
        "help": "Also write init/, a copy of the policy with this context length, the verifier's start (0: skip)."})


def run(args: ThinkPRMDataArgs, engine=None) -> dict:
    """Sample, label, get chains, filter and write the records; returns the metrics. `engine`: one
    already serving the policy, shared by a caller running several jobs (left open); else one is started."""
    if args.source != "arith":
        raise ValueError(f"source {args.source!r}: gold process labels come from the arith checker, so source must be "
                         "arith (for other data, build VerificationExamples from labelled steps, e.g. PRM800K)")
    if args.chain_source not in CHAIN_SOURCES:
        raise ValueError(f"unknown chain_source {args.chain_source!r}; expected template or verifier")
    if args.chain_source == "verifier" and not args.verifier_path:
        raise ValueError("chain_source 'verifier' needs --verifier_path")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = args.model_name_or_path or tiny_policy()
    limit = args.offset + args.limit if args.limit is not None else None
    problems = load_problems(args.source, args.split, path=args.data_path, limit=limit, seed=args.problem_seed)[args.offset:]
    owned = engine is None
    engine = VLLMEngine(policy) if owned else engine
    try:
        style = default_prompt_style(args.solution_prompt_style, bool(args.model_name_or_path), engine.tokenizer)
        examples = sample_examples(engine, problems, args.samples, args.max_tokens, args.temperature, args.seed,
                                   top_p=args.top_p, template=PromptTemplate(style=style))
        tokenizer = engine.tokenizer
    finally:
        if owned:
            engine.close()
    if args.chain_source == "template":
        candidates = template_chains(examples, problems)
    else:
        verifier = ThinkPRM(args.verifier_path, chains=args.verifier_chains, temperature=args.verifier_temperature,
                            max_chain_tokens=args.max_chain_tokens, seed=args.seed, prompt_style=args.prompt_style)
        try:
            candidates = verifier_chains(examples, verifier, progress=True)
        finally:
            verifier.close()
    records, report = build_records(candidates, tokenizer, args.max_chain_tokens, seed=args.seed, balanced=args.balance,
                                    num_records=args.num_records, style=args.prompt_style)
    write_records(records, out / "records.jsonl")
    metrics = data_metrics(examples, report, records, tokenizer)
    if args.init_positions:
        metrics["init_model"] = str(verifier_init(policy, out / "init", args.init_positions, args.prompt_style))
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_config((ThinkPRMDataArgs,), argv)
    metrics = run(args)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
