"""ThinkPRM training data: sample solutions with a policy, label their steps (on arith: the exact
checker), get verification chains (a checker-filled template on arith, or sampled from a verifier),
keep chains whose every verdict matches the gold labels, balance, and write SFT records.

    python launch/think_prm_data.py --config configs/think_prm_data/arith.yaml
    accelerate launch launch/sft.py --config configs/sft/arith_think_prm.yaml

A later round samples its chains from the verifier just trained:
    python launch/think_prm_data.py --config configs/think_prm_data/arith.yaml --chain_source verifier \
        --verifier_path outputs/think_prm/round1 --output_dir outputs/think_prm_data/round2
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from treetune.data import PromptTemplate, load_problems
from treetune.data.arith import tiny_policy
from treetune.data.steps import split_steps
from treetune.rewards.labels.think_prm import (
    VerificationExample,
    arith_example,
    arith_template_chain,
    filter_chains,
    to_records,
    widen_context,
    write_records,
)
from treetune.rewards.scorers.think_prm import ThinkPRM
from treetune.rollouts.engines import VLLMEngine
from treetune.rollouts.flat import FlatSampler, FlatSettings
from treetune.rollouts.run import new_tree


@dataclass
class ThinkPRMDataArgs:
    output_dir: str = "outputs/think_prm_data"
    model_name_or_path: str | None = None  # the policy whose solutions are verified; empty: the arith tiny policy
    source: str = "arith"
    split: str = "train"
    limit: int = 1000
    offset: int = 0  # skip the first problems (a later round takes fresh ones)
    samples: int = 4  # solutions per problem
    max_tokens: int = 128
    temperature: float = 1.0
    seed: int = 0
    chain_source: str = "template"  # template (arith checker) | verifier (a ThinkPRM checkpoint)
    verifier_path: str | None = None
    verifier_chains: int = 4  # chains sampled per solution (the paper: 4 at T = 0.1)
    verifier_temperature: float = 0.6
    max_chain_tokens: int = 600
    balance: bool = True
    prompt_style: str = "paper"  # paper | compact (rewards/think_prm.py user_text)
    num_records: int | None = None  # keep at most this many records (half right, half wrong solutions)
    init_positions: int = 1024  # also write a copy of the policy with this context, the verifier's start (0: skip)


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    (args,) = TrlParser((ThinkPRMDataArgs,)).parse_args_and_config(argv)
    if args.source != "arith":
        raise ValueError("gold process labels come from the arith checker: source must be arith "
                         "(for other data, build VerificationExamples from labelled steps, e.g. PRM800K)")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = args.model_name_or_path
    if not policy:

        policy = tiny_policy()
    problems = load_problems(args.source, args.split, limit=args.offset + args.limit)[args.offset:]
    by_id = {p.id: p for p in problems}
    with VLLMEngine(policy) as engine:
        trees = [new_tree(p, PromptTemplate(style="bare"), engine.tokenizer) for p in problems]
        trees = list(FlatSampler(FlatSettings(n=args.samples, max_tokens=args.max_tokens, temperature=args.temperature,
                                              seed=args.seed)).grow(engine, trees))
        tokenizer = engine.tokenizer
    examples: list[VerificationExample] = []
    for tree in trees:
        seen = set()
        for _, text in tree.iter_trajectories():
            steps = split_steps(text, "line")
            if not steps or tuple(steps) in seen:
                continue
            seen.add(tuple(steps))
            example = arith_example(by_id[tree.problem_id], steps)
            if example is not None:
                examples.append(example)
    if args.chain_source == "template":
        for e in examples:
            e.chain = arith_template_chain(by_id[e.problem_id], e.steps)
        candidates = examples
    elif args.chain_source == "verifier":
        if not args.verifier_path:
            raise ValueError("chain_source 'verifier' needs --verifier_path")

        verifier = ThinkPRM(args.verifier_path, chains=args.verifier_chains, temperature=args.verifier_temperature,
                            max_chain_tokens=args.max_chain_tokens, seed=args.seed, prompt_style=args.prompt_style)
        try:
            verified = verifier.verify([e.question for e in examples], [e.steps for e in examples], progress=True)
        finally:
            verifier.close()
        candidates = []
        for e, v in zip(examples, verified):
            for chain in dict.fromkeys(v.chains):  # identical chains once
                candidates.append(VerificationExample(e.problem_id, e.question, e.steps, e.first_error, chain))
    else:
        raise ValueError(f"unknown chain_source {args.chain_source!r}; expected template or verifier")
    kept, report = filter_chains(candidates, tokenizer, args.max_chain_tokens, seed=args.seed, balanced=args.balance)
    if args.num_records is not None and len(kept) > args.num_records:
        right, wrong = [e for e in kept if e.correct], [e for e in kept if not e.correct]
        kept = right[:args.num_records // 2] + wrong[:args.num_records - args.num_records // 2]
    records = to_records(kept, tokenizer, style=args.prompt_style)
    write_records(records, out / "records.jsonl")
    lengths = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in records]
    metrics = {"solutions": len(examples), "correct_solutions": sum(e.correct for e in examples),
               "filter": asdict(report), "records": len(records),
               "record_tokens_max": max(lengths, default=0), "record_tokens_mean": sum(lengths) / max(1, len(lengths))}
    if args.init_positions:
        init = widen_context(policy, out / "init", args.init_positions)
        # the format travels with the verifier: ThinkPRM reads it back (think_prm.saved_format)
        (init / "think_prm.json").write_text(json.dumps({"prompt_style": args.prompt_style, "chat": False}))
        metrics["init_model"] = str(init)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
