"""Q-Tuning SFT (Wang et al. 2025, arXiv:2509.23873): TRL's SFTTrainer pruning samples and tokens
of every mini-batch with the current model.

Before an optimizer step, each of its micro-batches (the paper's per-device mini-batch) gets one
gradient-free forward pass of the current model, which gives every sample's perplexity and mean
token entropy over its answer tokens (labels != -100); `qtuning_select` keeps the misconception
(high PPL, low entropy) and calibration (low PPL, high entropy) quadrants at the sample budget,
and in high-error kept samples masks all but the token budget out of the loss (labels -100).
Only the kept samples, right padding trimmed, go through forward and backward.

Choices where the paper is silent, each deliberate:
- Pruned tokens are masked out of the loss, not cut from the input, so the kept tokens keep
  their context (the paper does not say which it did).
- Selection runs in `get_batch_samples`, where the Trainer gathers the micro-batches of one
  optimizer step: no weight changes between them, so scoring them there is scoring them just
  before their own step, and the loss normaliser (`num_items_in_batch`) then counts the tokens
  that actually remain, across accumulation and, with `average_tokens_across_devices`, ranks.
- Scoring runs in eval mode (no dropout), so the scores are the model's, not a dropout draw.
- Under DDP or DeepSpeed each rank selects within its own micro-batch (quantiles over 8 samples
  with the paper's per-device batch 8); statistics are summed over ranks for logging. At
  sample_ratio 0.125 and per-device batch 8 that is one sample per rank per micro-batch.
- sample_ratio = token_ratio = 1 skips scoring: it is plain SFT with the same accounting, the
  full-data arm of a comparison. `pruning: random` is the paper's random baseline at the same
  budgets (random samples, random answer tokens of every kept sample, no scoring pass).

Logged every `logging_steps`: quadrant counts per optimizer step, kept-sample and kept-token
shares, top-ups, and running totals of backward-pass tokens (kept sequence tokens that went
through forward + backward), loss tokens, and scoring-pass tokens.
Run it as `accelerate launch launch/qtuning_sft.py --config configs/qtuning_sft/smollm2-1.7b.yaml`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from treetune.trainers.common import (
    load_policy,
    parse_recipe,
    peft_config,
    resume_point,
    run_metrics,
    setup_logging,
    train_and_save,
    write_metrics,
    write_recipe,
)
from treetune.trainers.qtuning.config import QTuningConfig
from treetune.trainers.qtuning.select import QUADRANT_NAMES, budget, select_samples, token_keep_mask
from treetune.trainers.sft.config import RENAMED, SFTScriptArguments
from treetune.trainers.sft.trainer import training_records
from trl import SFTTrainer

log = logging.getLogger(__name__)

# Per micro-batch statistics, summed over ranks (order of the gathered tensor).
STATS = ("samples", "kept_samples", "topped_up", *(QUADRANT_NAMES[q] for q in sorted(QUADRANT_NAMES)),
         "answer_tokens", "loss_tokens", "backward_tokens", "scoring_tokens")


def score_batch(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token NLL, per-token entropy, answer mask), shape (B, L-1), from a no-grad fused forward."""
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k != "use_cache"}, use_cache=False, fused_lm_head=True)
    mask = out.label_mask.bool()
    return (-out.log_probs).float() * mask, out.entropy.float() * mask, mask


def prune_batch(inputs: dict, nll: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, sample_ratio: float,
                token_ratio: float, smoothing: float = 0.5, iterations: int = 10) -> tuple[dict, dict[str, int], np.ndarray]:
    """(the kept samples of `inputs` with pruned tokens' labels set to -100, what was done, kept row indices)."""
    counts = mask.sum(1)
    has_answer = (counts > 0).cpu().numpy()
    denom = counts.clamp(min=1)
    ppl = torch.exp(nll.double().sum(1) / denom).cpu().numpy()
    ent = (entropy.double().sum(1) / denom).cpu().numpy()
    valid = np.flatnonzero(has_answer)
    stats = {name: 0 for name in STATS}
    stats["samples"] = int(len(has_answer))
    stats["answer_tokens"] = int(counts.sum())
    stats["scoring_tokens"] = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(mask.numel())
    if len(valid) == 0:  # nothing to learn from here: leave the batch as it is (its loss is zero)
        kept, prune = np.arange(len(has_answer)), np.zeros(len(has_answer), dtype=bool)
    else:
        selection = select_samples(ppl[valid], ent[valid], sample_ratio, iterations)
        kept, prune = valid[selection.kept], selection.prune_tokens
        stats["topped_up"] = selection.topped_up
        for name, value in selection.counts.items():
            stats[name] = value
    rows = torch.as_tensor(kept, device=nll.device)
    kept_nll, kept_mask = nll[rows].cpu().numpy(), mask[rows].cpu().numpy()
    drops = []
    for row, prune_row in enumerate(prune):
        if not prune_row or token_ratio >= 1.0:
            drops.append(np.zeros(0, dtype=np.int64))
            continue
        positions = np.flatnonzero(kept_mask[row])  # answer positions in shifted (next-token) coordinates
        drops.append(positions[~token_keep_mask(kept_nll[row, positions], token_ratio, smoothing)])
    return apply_pruning(inputs, kept, drops, stats)


def random_prune_batch(inputs: dict, sample_ratio: float, token_ratio: float,
                       rng: np.random.Generator) -> tuple[dict, dict[str, int], np.ndarray]:
    """The paper's random baseline at the same budgets: uniformly random samples, and uniformly random
    answer tokens of every kept sample; no scoring pass."""
    mask = (inputs["labels"][:, 1:] != -100).cpu().numpy()
    stats = {name: 0 for name in STATS}
    stats["samples"], stats["answer_tokens"] = int(mask.shape[0]), int(mask.sum())
    valid = np.flatnonzero(mask.any(1))
    if len(valid) == 0:
        kept = np.arange(mask.shape[0])
    else:
        kept = np.sort(rng.choice(valid, size=budget(len(valid), sample_ratio), replace=False))
    drops = []
    for row in kept:
        positions = np.flatnonzero(mask[row])
        keep = budget(len(positions), token_ratio) if len(positions) else 0
        drops.append(np.sort(rng.permutation(positions)[keep:]))
    return apply_pruning(inputs, kept, drops, stats)


def apply_pruning(inputs: dict, kept: np.ndarray, drops: list[np.ndarray],
                  stats: dict[str, int]) -> tuple[dict, dict[str, int], np.ndarray]:
    """Rows `kept` of the batch, with labels -100 at each kept row's `drops` (next-token positions)."""
    batch_size = inputs["labels"].shape[0]
    index = torch.as_tensor(kept, device=inputs["labels"].device)
    labels = inputs["labels"][index].clone()
    for row, drop in enumerate(drops):
        if len(drop):
            labels[row, torch.as_tensor(drop + 1, device=labels.device)] = -100  # position j predicts labels[j + 1]
    pruned = {k: (v[index] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch_size else v)
              for k, v in inputs.items()}
    pruned["labels"] = labels
    pruned = trim_right_padding(pruned)
    stats["kept_samples"] = int(len(kept))
    stats["loss_tokens"] = int((pruned["labels"][:, 1:] != -100).sum())
    stats["backward_tokens"] = int(pruned["attention_mask"].sum()) if "attention_mask" in pruned else int(pruned["labels"].numel())
    return pruned, stats, kept


def trim_right_padding(inputs: dict) -> dict:
    """Drop trailing columns that are padding in every row (the kept rows may be shorter than the batch)."""
    attention = inputs.get("attention_mask")
    if attention is None or attention.dim() != 2:
        return inputs
    used = attention.any(0).nonzero()
    if len(used) == 0:
        return inputs
    width, length = int(used.max()) + 1, attention.shape[1]
    if width == length or not bool(attention[:, :width].any(0).all()):  # not right-padded: leave it
        return inputs
    return {k: (v[:, :width] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == length else v)
            for k, v in inputs.items()}


class QTuningTrainer(SFTTrainer):
    """`SFTTrainer` with Q-Tuning's dynamic sample and token pruning; every TRL and transformers
    option (LoRA, DeepSpeed ZeRO-2/3, gradient checkpointing, report_to) is unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, QTuningConfig):
            raise TypeError("QTuningTrainer needs a QTuningConfig")
        self.qtuning_totals = {name: 0 for name in STATS}
        self._qtuning_window = {name: 0 for name in STATS}
        self._qtuning_logged_step = 0
        self._qtuning_rng = np.random.default_rng([self.args.seed, self.accelerator.process_index])

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # Restored before the loop starts: the Trainer restores its own RNG only after the first
        # resumed batch has been pruned, which would drop that batch from the totals.
        checkpoint = resume_point(self.args.output_dir, resume_from_checkpoint)
        if checkpoint:
            self._load_qtuning_state(checkpoint)
        return super().train(checkpoint, *args, **kwargs)

    def _save_rng_state(self, output_dir: str) -> None:
        # Called on every rank with each checkpoint: the running totals and the random baseline's
        # generator go with it, so a resumed run neither restarts its counts nor repeats its draws.
        super()._save_rng_state(output_dir)
        state = {"totals": self.qtuning_totals, "window": self._qtuning_window,
                 "logged_step": self._qtuning_logged_step, "rng": self._qtuning_rng.bit_generator.state}
        Path(output_dir, f"qtuning_state_{self.args.process_index}.json").write_text(json.dumps(state))

    def _load_qtuning_state(self, checkpoint: str) -> None:
        path = Path(checkpoint, f"qtuning_state_{self.args.process_index}.json")
        if not path.is_file():
            log.warning("%s not found: Q-Tuning's token totals restart from zero on this resume", path)
            return
        state = json.loads(path.read_text())
        self.qtuning_totals = {name: int(state["totals"].get(name, 0)) for name in STATS}
        self._qtuning_window = {name: int(state["window"].get(name, 0)) for name in STATS}
        self._qtuning_logged_step = int(state["logged_step"])
        self._qtuning_rng.bit_generator.state = state["rng"]

    @property
    def prunes(self) -> bool:
        return self.args.sample_ratio < 1.0 or self.args.token_ratio < 1.0

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        batch_samples = [self._qtune(batch) for batch in batch_samples]
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _qtune(self, batch: dict) -> dict:
        inputs = self._prepare_inputs(batch)
        if self.prunes and self.args.pruning == "random":
            inputs, stats, _ = random_prune_batch(inputs, self.args.sample_ratio, self.args.token_ratio, self._qtuning_rng)
        elif self.prunes:
            model = self.model_wrapped
            was_training = model.training
            model.eval()
            try:
                with self.compute_loss_context_manager():
                    nll, entropy, mask = score_batch(model, inputs)
            finally:
                model.train(was_training)
            args = self.args
            inputs, stats, _ = prune_batch(inputs, nll, entropy, mask, args.sample_ratio, args.token_ratio,
                                           args.token_smoothing, args.bisection_iterations)
        else:
            answer = inputs["labels"][:, 1:] != -100
            tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(inputs["labels"].numel())
            stats = {name: 0 for name in STATS}
            stats.update(samples=int(answer.shape[0]), kept_samples=int(answer.shape[0]), answer_tokens=int(answer.sum()),
                         loss_tokens=int(answer.sum()), backward_tokens=tokens)
        local = torch.tensor([stats[name] for name in STATS], dtype=torch.long, device=self.args.device)
        summed = self.accelerator.gather(local.unsqueeze(0)).sum(0).tolist() if self.accelerator.num_processes > 1 else local.tolist()
        for name, value in zip(STATS, summed):
            self.qtuning_totals[name] += value
            self._qtuning_window[name] += value
        return inputs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        window = self._qtuning_window
        if "loss" in logs and window["samples"]:
            steps = max(1, self.state.global_step - self._qtuning_logged_step)
            self._qtuning_logged_step = self.state.global_step
            if self.prunes and self.args.pruning == "qtuning":
                for q in sorted(QUADRANT_NAMES):
                    logs[f"qtuning/{QUADRANT_NAMES[q]}"] = round(window[QUADRANT_NAMES[q]] / steps, 2)
                logs["qtuning/topped_up"] = round(window["topped_up"] / steps, 2)
            logs["qtuning/kept_sample_share"] = round(window["kept_samples"] / window["samples"], 4)
            logs["qtuning/kept_token_share"] = round(window["loss_tokens"] / max(1, window["answer_tokens"]), 4)
            logs["qtuning/backward_tokens"] = self.qtuning_totals["backward_tokens"]
            logs["qtuning/scoring_tokens"] = self.qtuning_totals["scoring_tokens"]
            self._qtuning_window = {name: 0 for name in STATS}
        super().log(logs, start_time)


def run_qtuning(script_args: SFTScriptArguments, config: QTuningConfig, model_args) -> Path:
    """Fine-tune (the arith tiny policy when no model is named) with Q-Tuning; save the final model
    (vLLM-loadable: LoRA merged, ZeRO-3 weights gathered), `recipe.json` and `metrics.json` to output_dir."""
    from datasets import Dataset
    from transformers import set_seed

    set_seed(config.seed)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path, tokenizer, model = load_policy(model_args)
    records = training_records(script_args, tokenizer)
    write_recipe(out, script_args, model_args, config)
    trainer = QTuningTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer, peft_config=peft_config(model_args))
    result, checkpoint = train_and_save(trainer, out, tokenizer, config.resume_from_checkpoint)
    if trainer.accelerator.is_main_process:
        totals = trainer.qtuning_totals
        metrics = dict(run_metrics(trainer, result, checkpoint), num_records=len(records), policy=path,
                       sample_ratio=config.sample_ratio, token_ratio=config.token_ratio, totals=totals,
                       kept_sample_share=totals["kept_samples"] / max(1, totals["samples"]),
                       kept_token_share=totals["loss_tokens"] / max(1, totals["answer_tokens"]),
                       log_history=trainer.state.log_history)
        write_metrics(out, metrics)
    return out


def main(argv: list[str] | None = None) -> Path:
    from trl import ModelConfig

    setup_logging()
    script_args, config, model_args = parse_recipe((SFTScriptArguments, QTuningConfig, ModelConfig), argv, RENAMED)
    return run_qtuning(script_args, config, model_args)


if __name__ == "__main__":
    main()
