"""BVPO (Zhu et al. 2025, arXiv:2510.05095): DPO that mixes a trace estimator and an empty-trace estimator.

Every batch holds a batch of trace pairs (responses generated with the reasoning trace) and a batch
of empty-trace pairs (the prompt ends in an empty think block, the responses are answers only);
the loss is  L = a * L_trace + (1 - a) * L_empty,  each term TRL's DPO loss (sigmoid by default) on
its own batch, so the reference log-probs of empty pairs are also taken with the empty-think prompt.
`bvpo_alpha` is a number (0.5 in all of the paper's experiments) or `auto`: the closed-form
MSE-optimal a*, re-estimated during training from the two losses' gradients over the last steps
(`treetune.trainers.bvpo.alpha`), and logged as `bvpo/alpha` either way.

Batches: each trace pair is matched with an empty pair of the same problem when there is one, else
with an unused empty pair (cycled, seeded), so one epoch is one pass over the trace pairs and
`bvpo_alpha 1` is plain DPO on the trace pairs over exactly the same batches (the empty forward is
then skipped). Responses end in EOS (they are whole responses); a prompt longer than
`max_prompt_length` loses its start, a sequence longer than `max_length` its end (TRL's keep_start).
`auto` needs the full gradient on every rank: DDP and ZeRO-1/2 work, ZeRO-3 is refused. Its window
of gradients is not saved in checkpoints: a resumed run uses 0.5 again until `bvpo_alpha_min_samples`
new measurements are in.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path

from treetune.data import PromptTemplate
from treetune.data.arith import dual_mode_policy
from treetune.data.bvpo_pairs import load_bvpo_pairs, mode_prompt
from treetune.rollouts.run import default_prompt_style
from treetune.trainers.bvpo.alpha import AlphaEstimator, GradientSketch
from treetune.trainers.bvpo.config import BVPOConfig, BVPOScriptArguments, parse_alpha
from treetune.trainers.common import (
    load_policy,
    parse_recipe,
    peft_config,
    run_metrics,
    setup_logging,
    train_and_save,
    write_metrics,
    write_recipe,
)
from trl import DPOTrainer

log = logging.getLogger(__name__)
EMPTY_COLUMNS = ("empty_prompt_ids", "empty_chosen_ids", "empty_rejected_ids")


def tokenize_pair(prompt: str, chosen: str, rejected: str, tokenizer, max_prompt_length: int | None,
                  add_special_tokens: bool = True) -> tuple[dict, bool]:
    """Token ids of one whole-response pair (EOS appended to both) and whether the prompt was cut."""
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chosen_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"] + eos
    rejected_ids = tokenizer(rejected, add_special_tokens=False)["input_ids"] + eos
    cut = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    if cut:
        prompt_ids = prompt_ids[-max_prompt_length:]
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}, cut


def match_pairs(trace, empty, seed: int = 0) -> tuple[list[tuple[int, int | None]], dict]:
    """(trace index, empty index) for every trace pair: same problem first, then unused empty pairs, cycled."""
    if not empty:
        return [(i, None) for i in range(len(trace))], {"matched_same_problem": 0, "empty_pairs_unused": 0}
    by_problem: dict[str, list[int]] = defaultdict(list)
    for j, pair in enumerate(empty):
        by_problem[pair.problem_id or pair.prompt].append(j)
    used, out, waiting = set(), [], []
    for i, pair in enumerate(trace):
        candidates = by_problem.get(pair.problem_id or pair.prompt, [])
        j = next((c for c in candidates if c not in used), None)
        if j is None:
            waiting.append(i)
        else:
            used.add(j)
            out.append((i, j))
    same = len(out)
    rest = [j for j in range(len(empty)) if j not in used]
    random.Random(seed).shuffle(rest)
    pool = rest or list(range(len(empty)))
    for k, i in enumerate(waiting):
        out.append((i, pool[k % len(pool)]))
    out.sort()
    unused = len(set(range(len(empty))) - {j for _, j in out})
    return out, {"matched_same_problem": same, "empty_pairs_unused": unused}


def build_bvpo_dataset(trace, empty, tokenizer, style: str, max_length: int | None, max_prompt_length: int | None,
                       block: str | None = None, seed: int = 0):
    """A `datasets.Dataset` whose rows hold one trace pair and (unless there are none) one empty pair, and a report."""
    from datasets import Dataset


    if not trace:
        raise ValueError("BVPO needs trace pairs (responses generated with the reasoning trace)")
    template = PromptTemplate(style=style)
    special = style != "chat"  # chat templates carry their own special tokens
    cache: dict[tuple[str, int], tuple[dict, bool]] = {}

    def tokens(pair, index):
        key = (pair.mode, index)
        if key not in cache:
            prompt = mode_prompt(pair.prompt, pair.mode, template, tokenizer, block)
            cache[key] = tokenize_pair(prompt, pair.chosen, pair.rejected, tokenizer, max_prompt_length, special)
        return cache[key]

    matches, report = match_pairs(trace, empty, seed)
    rows, cut, too_long = [], 0, 0
    for i, j in matches:
        row, was_cut = tokens(trace[i], i)
        row = dict(row)
        cut += was_cut
        length = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        if j is not None:
            other, _ = tokens(empty[j], j)
            row.update({f"empty_{k}": v for k, v in other.items()})
            length = max(length, len(other["prompt_ids"]) + max(len(other["chosen_ids"]), len(other["rejected_ids"])))
        too_long += max_length is not None and length > max_length
        row["length"] = length
        rows.append(row)
    cut += sum(c for (mode, _), (_, c) in cache.items() if mode == "empty")
    report.update(trace_pairs=len(trace), empty_pairs=len(empty), rows=len(rows), prompt_truncated=cut,
                  response_truncated_rows=too_long)
    return Dataset.from_list(rows), report


class BVPOCollator:
    """Pads the trace pairs and the empty pairs of a batch separately (TRL's preference collator each)."""

    def __init__(self, pad_token_id: int, max_length: int | None, pad_to_multiple_of: int | None = None):
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        self.inner = DataCollatorForPreference(pad_token_id=pad_token_id, max_length=max_length,
                                               truncation_mode="keep_start", pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples: list[dict]) -> dict:
        batch = {"trace": self.inner([{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in examples])}
        if examples and examples[0].get("empty_prompt_ids") is not None:
            batch["empty"] = self.inner([{k: e[f"empty_{k}"] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                         for e in examples])
        return batch


class BVPOTrainer(DPOTrainer):
    """`DPOTrainer` whose loss mixes the DPO losses of a trace batch and an empty-trace batch; every TRL
    and transformers option (LoRA, DeepSpeed, gradient checkpointing, report_to, resume) is unchanged."""

    def __init__(self, *args, **kwargs):
        config: BVPOConfig = kwargs.get("args")
        if config.precompute_ref_log_probs:
            raise ValueError("BVPOTrainer computes reference log-probs on the fly; set precompute_ref_log_probs false")
        tokenizer = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and tokenizer is not None:
            kwargs["data_collator"] = BVPOCollator(tokenizer.pad_token_id, config.max_length, config.pad_to_multiple_of)
        super().__init__(*args, **kwargs)
        self.fixed_alpha = parse_alpha(config.bvpo_alpha)
        self.alpha_estimator = AlphaEstimator(config.bvpo_alpha_window, config.bvpo_alpha_min_samples)
        self._sketch: GradientSketch | None = None
        self._micro_batches = 0
        if self.fixed_alpha is None and self.is_deepspeed_enabled:
            stage = self.accelerator.state.deepspeed_plugin.zero_stage
            if stage == 3:
                raise ValueError("bvpo_alpha auto needs whole gradients on every rank; use DDP or ZeRO-1/2, or a fixed alpha")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" not in dataset.column_names:
            raise ValueError(f"{dataset_name}: BVPOTrainer takes rows from build_bvpo_dataset")
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [c for c in (*EMPTY_COLUMNS, "length") if c not in self._signature_columns]
        self._signature_columns = list(self._signature_columns) + extra

    def estimator_loss(self, model, batch: dict, name: str):
        """TRL's DPO loss on one estimator's batch; its metrics are filed under `name/`."""
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        before = {k: len(v) for k, v in metrics.items()}
        loss = super()._compute_loss(model, batch, False)
        for key in [k for k in metrics if "/" not in k or k.split("/")[0] not in ("trace", "empty", "bvpo")]:
            new = metrics[key][before.get(key, 0):]
            del metrics[key][before.get(key, 0):]
            if not metrics[key]:
                del metrics[key]  # an empty list would break DPOTrainer.log's averaging
            metrics[f"{name}/{key}"].extend(new)
        metrics[f"{name}/loss"].append(float(loss.detach()))
        return loss

    def estimator_gradients(self, model, loss_t, loss_e):
        """Sketched gradients of the two losses (two extra backward passes; the graph is kept)."""
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        if self._sketch is None:
            dim = self.args.bvpo_sketch_dim or None
            self._sketch = GradientSketch(params, dim, seed=self.args.seed)
        grads_t = torch.autograd.grad(loss_t, params, retain_graph=True, allow_unused=True)
        grads_e = torch.autograd.grad(loss_e, params, retain_graph=True, allow_unused=True)
        g_t, g_e = self._sketch(grads_t, params), self._sketch(grads_e, params)
        if self.accelerator.num_processes > 1:  # one alpha for all ranks: the mean over ranks' batches
            g_t, g_e = self.accelerator.reduce(g_t, "mean"), self.accelerator.reduce(g_e, "mean")
        return g_t, g_e

    def per_batch_gradients(self, num_batches: int, sketch_dim: int | None = None):
        """(G_t, G_e): the two estimators' gradients (rows, sketched or whole) on the first `num_batches`
        training batches at the current weights, without a step; for measuring their statistics."""
        import torch

        model = self.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        sketch = GradientSketch(params, sketch_dim, seed=self.args.seed)
        rows_t, rows_e = [], []
        for index, batch in enumerate(self.get_train_dataloader()):
            if index >= num_batches:
                break
            if "empty" not in batch:
                raise ValueError("per_batch_gradients needs empty-trace pairs in the batches")
            batch = self._prepare_inputs(batch)
            loss_t = self.estimator_loss(model, batch["trace"], "trace")
            loss_e = self.estimator_loss(model, batch["empty"], "empty")
            grads_t = torch.autograd.grad(loss_t, params, retain_graph=True, allow_unused=True)
            grads_e = torch.autograd.grad(loss_e, params, allow_unused=True)
            rows_t.append(sketch(grads_t, params).cpu())
            rows_e.append(sketch(grads_e, params).cpu())
        self._metrics["train"].clear()
        return torch.stack(rows_t), torch.stack(rows_e)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch

        mode = "train" if self.model.training else "eval"
        loss_t = self.estimator_loss(model, inputs["trace"], "trace")
        alpha = self.fixed_alpha
        if "empty" not in inputs or alpha == 1.0:
            if "empty" not in inputs and alpha not in (None, 1.0):
                raise ValueError("no empty-trace pairs in the batch: give empty pairs, or set bvpo_alpha 1 for trace-only DPO")
            loss, alpha = loss_t, 1.0
        else:
            loss_e = self.estimator_loss(model, inputs["empty"], "empty")
            if alpha is None:
                if self.model.training and torch.is_grad_enabled():
                    if self._micro_batches % max(1, self.args.bvpo_alpha_every) == 0:
                        self.alpha_estimator.update(*self.estimator_gradients(model, loss_t, loss_e))
                        for key, value in self.alpha_estimator.stats.items():
                            self._metrics[mode][f"bvpo/{key}"].append(float(value))
                    self._micro_batches += 1
                alpha = self.alpha_estimator.alpha
            loss = alpha * loss_t + (1 - alpha) * loss_e
        self._metrics[mode]["bvpo/alpha"].append(float(alpha))
        if return_outputs:
            return loss, {}
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation reports the mixed loss only (two batches have no single logits tensor)."""
        import torch

        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def split_by_mode(script_args: BVPOScriptArguments) -> tuple[list, list, list[str]]:
    """(trace pairs, empty pairs, skip messages) from `pairs`, or from `trace_pairs` and `empty_pairs`."""

    if not (script_args.pairs or script_args.trace_pairs):
        raise ValueError("--pairs (a pair file with a mode per row) or --trace_pairs [--empty_pairs] is required")
    loaded, skipped = [], []
    sources = ([(script_args.pairs, None)] if script_args.pairs else []) + \
        [(s, m) for s, m in ((script_args.trace_pairs, "trace"), (script_args.empty_pairs, "empty")) if s]
    for source, mode in sources:
        pairs, report = load_bvpo_pairs(source, script_args.pairs_split, mode=mode, skip_bad=script_args.skip_bad_rows)
        if len(report):
            log.warning(report.summary())
        loaded += pairs
        skipped += [str(e) for e in report.skipped]
    trace = [p for p in loaded if p.mode == "trace"][: script_args.num_pairs]
    empty = [p for p in loaded if p.mode == "empty"]
    return trace, empty, skipped


def run_bvpo(script_args: BVPOScriptArguments, config: BVPOConfig, model_args) -> Path:
    """Train on the pairs, save the final model (vLLM-loadable), `recipe.json` and `metrics.json` to output_dir."""
    from transformers import set_seed

    set_seed(config.seed)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trace, empty, skipped = split_by_mode(script_args)
    given = bool(model_args.model_name_or_path)
    # the arith default: the tiny policy taught both modes
    path, tokenizer, model = load_policy(model_args, default=dual_mode_policy)
    style = default_prompt_style(script_args.prompt_style, given, tokenizer)
    dataset, data_report = build_bvpo_dataset(trace, empty, tokenizer, style, config.max_length, config.max_prompt_length,
                                              script_args.think_block, config.seed)
    log.info("BVPO data: %s", data_report)
    write_recipe(out, script_args, model_args, config)
    trainer = BVPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config(model_args))
    result, checkpoint = train_and_save(trainer, out, tokenizer, config.resume_from_checkpoint)
    if trainer.accelerator.is_main_process:
        history = trainer.state.log_history
        metrics = dict(run_metrics(trainer, result, checkpoint), policy=path, prompt_style=style,
                       bvpo_alpha=config.bvpo_alpha, skipped_rows=len(skipped), skipped=skipped[:20], **data_report,
                       alpha_history=[h["bvpo/alpha"] for h in history if "bvpo/alpha" in h],
                       trace_loss_history=[h["trace/loss"] for h in history if "trace/loss" in h],
                       empty_loss_history=[h["empty/loss"] for h in history if "empty/loss" in h])
        write_metrics(out, metrics)
    return out


def main(argv: list[str] | None = None) -> Path:
    from trl import ModelConfig

    setup_logging()
    script_args, config, model_args = parse_recipe((BVPOScriptArguments, BVPOConfig, ModelConfig), argv)
    return run_bvpo(script_args, config, model_args)


if __name__ == "__main__":
    main()
