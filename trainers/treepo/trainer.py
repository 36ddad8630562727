"""Online RL on reasoning trees: TRL's `GRPOTrainer` whose rollouts are treetune trees (TreePO,
arXiv 2508.17445; GRPO with `--sampler flat --advantage grpo`).

What TRL keeps doing: batching (`RepeatSampler`, generation windows), rewards, the loss (dapo
token-mean with asymmetric clipping by default, KL with `beta`), vLLM importance-sampling
correction against the sampled log-probs, logging, checkpoints and resume, DDP / DeepSpeed.
What changes:
- generation: `rollout_func` grows one tree of exactly G finished leaves per prompt group with
  treetune's samplers, on treetune's engine (`trainers.treepo.rollout`);
- weight sync: TRL's hook calls `sync_weights()` before a generation whenever the optimizer step
  moved: treetune's `EngineWeightSync` into treetune's engine, or, with `--use_vllm true` (GPUs),
  TRL's own colocate / server sync into TRL's vLLM, which the tree sampler then samples from
  (`trainers.treepo.sync`);
- advantages (`--advantage`): `grpo` leaves TRL's group baseline; `subgroup` is TreePO's
  estimator (reward minus the mean reward of the leaves sharing each ancestor, averaged over
  depths, then whitened over the whole batch on all ranks, by token as TreePO's masked whitening);
  `segment` gives each token V(its node) - V(parent node), a (B, T) advantage TRL's loss takes
  as it is. `--mask_zero_variance_trees` leaves trees whose leaves all scored the same out of the
  loss and of its token count (TRL recomputes nothing after this point, so it is done here).

Choices where TreePO's code and this trainer differ, each deliberate: verl's token-mean is per
micro-batch, TRL's dapo loss normalises by the tokens of the whole generation batch; the rewards
are whatever reward functions are given (outcome by default), summed with their weights, before
the tree advantages; zero-variance trees are masked rather than resampled (DAPO's dynamic
sampling refills the batch; here it shrinks).
"""

from __future__ import annotations

import logging
import time

from treetune.rollouts.advantages import leaf_token_advantages, segment_advantages, tree_subgroup_advantages
from treetune.trainers.treepo.config import TreePOConfig
from treetune.trainers.treepo.rollout import PromptBook, Rollout, grow_groups, make_sampler, row_fields, step_seed
from treetune.trainers.treepo.sync import EngineWeightSync, TimedSync, trl_engine
from trl import GRPOTrainer

log = logging.getLogger(__name__)

REWARD_KEY = "reward"


def tree_rollout(prompts: list[str], trainer: "TreePOTrainer") -> dict:
    """TRL's `rollout_func`: delegates to the trainer, which holds the engine and the trees."""
    return trainer.grow(prompts)


class TreePOTrainer(GRPOTrainer):
    """`GRPOTrainer` on treetune trees (see the module doc). `engine` is a treetune engine serving the
    starting policy (None with `use_vllm`: TRL's own vLLM, wrapped); `book` maps the dataset's prompt
    texts to their problems."""

    def __init__(self, *args, engine=None, book: PromptBook, shared_engine: bool = False, sync_dir: str | None = None,
                 **kwargs):
        config: TreePOConfig = kwargs["args"]
        if config.use_vllm and engine is not None:
            raise ValueError("give either a treetune engine or --use_vllm true (TRL's own vLLM), not both")
        if not config.use_vllm and engine is None:
            raise ValueError("TreePOTrainer needs a rollout engine: a treetune engine, or --use_vllm true")
        super().__init__(*args, rollout_func=tree_rollout, **kwargs)
        self.book = book
        if config.use_vllm:  # TRL built its vLLM and syncs it; the trees are sampled from the same vLLM
            self.engine = trl_engine(self)
            self.vllm_generation = TimedSync(self.vllm_generation)
        else:
            # TRL's own vLLM path, pointed at treetune's engine: its hook syncs the weights before every
            # generation at a new step, and its importance-sampling correction reads the engine's log-probs
            self.engine = engine
            self.vllm_generation = TimedSync(EngineWeightSync(self, engine, shared=shared_engine, folder=sync_dir))
            self.use_vllm = True
        self._last_loaded_step = -1
        self._rollout: Rollout | None = None
        self._rewards = None
        self.totals = {"decoded_tokens": 0, "row_tokens": 0, "rollout_seconds": 0.0, "reward_seconds": 0.0,
                       "trajectories": 0, "trees": 0, "masked_trees": 0, "generations": 0}

    # -- rollout ---------------------------------------------------------------------------
    def grow(self, prompts: list[str]) -> dict:
        train = self.model.training
        group = self.num_generations if train else self.num_generations_eval
        sampler = make_sampler(self.args, group, step_seed(self.args.seed, self.state.global_step), flat=not train)
        cache_before = self._cache_stats()
        sent_before = self.engine.counters.prompt_tokens
        tp_group, tp_size = self._tp_group()
        if tp_group is None:
            rollout = grow_groups(prompts, group, self.book, self.engine, sampler)
        else:  # colocated vLLM with tensor parallelism: its ranks must all grow the same trees
            import torch

            parts = [None] * tp_size
            torch.distributed.all_gather_object(parts, prompts, group=tp_group)
            everything = grow_groups([p for part in parts for p in part], group, self.book, self.engine, sampler)
            rollout = everything.share(torch.distributed.get_rank(group=tp_group), tp_size)
        if train:
            self._rollout = rollout
            self._log_rollout(rollout, cache_before, self.engine.counters.prompt_tokens - sent_before)
        return row_fields(rollout)

    def _tp_group(self):
        """(group, size) of TRL's colocated tensor-parallel vLLM ranks, or (None, 1)."""
        size = getattr(self.vllm_generation, "tensor_parallel_size", 1) if self.args.use_vllm else 1
        if self.args.vllm_mode != "colocate" or size <= 1:
            return None, 1
        return self.vllm_generation.tp_group, size

    def _cache_stats(self):
        stats = getattr(self.engine, "prefix_cache_stats", None)
        return stats() if stats is not None else None

    def _log_rollout(self, rollout: Rollout, cache_before, prompt_tokens_sent: int) -> None:
        import torch

        local = torch.tensor([rollout.decoded_tokens, rollout.row_tokens, len(rollout.rows), len(rollout.trees),
                              rollout.fallbacks, prompt_tokens_sent, rollout.seconds], dtype=torch.float64,
                             device=self.accelerator.device)
        total = self.accelerator.reduce(local, reduction="sum")
        decoded, row_tokens, rows, trees, fallbacks, sent, seconds = total.tolist()
        seconds /= self.accelerator.num_processes  # ranks grow their trees at the same time
        metrics = self._metrics["train"]
        metrics["rollout/decoded_tokens"].append(decoded)
        metrics["rollout/decoded_share_of_rows"].append(decoded / max(row_tokens, 1.0))
        metrics["rollout/prompt_tokens_sent"].append(sent)
        metrics["rollout/fallbacks_per_tree"].append(fallbacks / max(trees, 1.0))
        metrics["rollout/trajectories_per_second"].append(rows / max(seconds, 1e-9))
        metrics["time/rollout_seconds"].append(seconds)
        cache_after = self._cache_stats()
        if cache_before is not None and cache_after is not None:
            queries = cache_after["queries"] - cache_before["queries"]
            if queries > 0:
                metrics["rollout/prefix_cache_hit_rate"].append((cache_after["hits"] - cache_before["hits"]) / queries)
        self.totals["decoded_tokens"] += int(decoded)
        self.totals["row_tokens"] += int(row_tokens)
        self.totals["trajectories"] += int(rows)
        self.totals["trees"] += int(trees)
        self.totals["rollout_seconds"] += seconds
        self.totals["generations"] += 1

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """TRL's step log plus `time/training_seconds`: the step's time outside rollout, rewards and sync
        (TRL's `step_time` covers the whole step, generation included)."""
        metrics = self._metrics["train"]
        parts = ("step_time", "time/rollout_seconds", "time/reward_seconds", "time/sync_seconds")
        if self.model.training and all(metrics.get(k) for k in parts):
            step, *others = [sum(metrics[k]) / len(metrics[k]) for k in parts]
            metrics["time/training_seconds"] = [max(step - sum(others), 0.0)]
        super().log(logs, start_time)

    # -- rewards and advantages ---------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        start = time.perf_counter()
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        seconds = time.perf_counter() - start
        if self.model.training:
            self._rewards = rewards_per_func
            self._metrics["train"]["time/reward_seconds"].append(seconds)
            self.totals["reward_seconds"] += seconds
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        self._metrics["train"]["time/sync_seconds"].append(self.vllm_generation.last_seconds)
        rollout, rewards = self._rollout, self._rewards
        if rollout is None or rewards is None:
            raise RuntimeError("no rollout to read the tree advantages from")
        self._write_rewards(rollout, rewards)
        masked = self._zero_variance_rows(rollout) if self.args.mask_zero_variance_trees else [False] * len(rollout.rows)
        if self.args.advantage != "grpo":
            out["advantages"] = self._tree_advantages(rollout, out, masked)
        if any(masked):
            out = self._mask_rows(out, masked)
        self._rollout = self._rewards = None
        return out

    def _write_rewards(self, rollout: Rollout, rewards_per_func) -> None:
        """Each leaf's weighted reward (this rank's slice of the gathered rewards) into its scores."""
        import torch

        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = torch.nan_to_num((rewards_per_func * weights.unsqueeze(0)).nansum(dim=1), nan=0.0)
        start = self.accelerator.process_index * len(rollout.rows)
        local = rewards[start:start + len(rollout.rows)].tolist()
        for (index, leaf_id), value in zip(rollout.rows, local):
            rollout.trees[index].nodes[leaf_id].scores[REWARD_KEY] = value

    def _zero_variance_rows(self, rollout: Rollout) -> list[bool]:
        import torch

        flat = [len({leaf.scores[REWARD_KEY] for leaf in tree.leaves()}) == 1 for tree in rollout.trees]
        counts = torch.tensor([sum(flat), len(flat)], dtype=torch.float64, device=self.accelerator.device)
        masked, trees = self.accelerator.reduce(counts, reduction="sum").tolist()
        self._metrics["train"]["masked_tree_share"].append(masked / max(trees, 1.0))
        self.totals["masked_trees"] += int(masked)
        return [flat[index] for index, _ in rollout.rows]

    def _tree_advantages(self, rollout: Rollout, out: dict, masked: list[bool]):
        """(B,) subgroup or (B, T) segment advantages, whitened over the batch on all ranks."""
        import torch

        width = out["completion_ids"].shape[1]
        per_row: list[list[float]] = []
        if self.args.advantage == "subgroup":
            by_tree = [tree_subgroup_advantages(tree, REWARD_KEY) for tree in rollout.trees]
            for index, leaf_id in rollout.rows:
                per_row.append([by_tree[index][leaf_id]])
        else:
            by_tree = [segment_advantages(tree, REWARD_KEY) for tree in rollout.trees]
            for index, leaf_id in rollout.rows:
                per_row.append(leaf_token_advantages(rollout.trees[index], leaf_id, by_tree[index]))
        lengths = [len(rollout.trees[i].path_token_ids(leaf)) for i, leaf in rollout.rows]
        if self.args.whiten != "none":
            sums = torch.zeros(3, dtype=torch.float64, device=self.accelerator.device)
            for values, length, skip in zip(per_row, lengths, masked):
                if skip:
                    continue
                if len(values) == 1:  # one value a row: by token it counts once per token
                    weight = float(length) if self.args.whiten == "token" else 1.0
                    sums += torch.tensor([weight, weight * values[0], weight * values[0] ** 2], dtype=torch.float64,
                                         device=sums.device)
                else:
                    v = torch.tensor(values, dtype=torch.float64, device=sums.device)
                    if self.args.whiten == "trajectory":
                        v = v.mean().unsqueeze(0)
                    sums += torch.stack([torch.tensor(float(len(v)), dtype=torch.float64, device=sums.device),
                                         v.sum(), (v * v).sum()])
            total, first, second = self.accelerator.reduce(sums, reduction="sum").tolist()
            if total > 0:
                mean = first / total
                scale = 1.0 / (max(second / total - mean * mean, 0.0) + 1e-8) ** 0.5
                per_row = [[(x - mean) * scale for x in values] for values in per_row]
        per_row = [[0.0] * len(values) if skip else values for values, skip in zip(per_row, masked)]
        device = out["completion_ids"].device
        if self.args.advantage == "subgroup":
            advantages = torch.tensor([values[0] for values in per_row], dtype=torch.float32, device=device)
            logged = advantages
        else:
            advantages = torch.zeros((len(per_row), width), dtype=torch.float32, device=device)
            for row, values in enumerate(per_row):
                advantages[row, :len(values)] = torch.tensor(values[:width], dtype=torch.float32)
            logged = (advantages * out["completion_mask"]).sum(1) / out["completion_mask"].sum(1).clamp(min=1)
        # TRL logged its group-baseline values for this batch; the table shows the ones trained on
        gathered = self.accelerator.gather(logged).tolist()
        if len(self._logs["advantages"]) >= len(gathered):
            for i, value in enumerate(gathered):
                self._logs["advantages"][len(self._logs["advantages"]) - len(gathered) + i] = value
        return advantages

    def _mask_rows(self, out: dict, masked: list[bool]) -> dict:
        import torch

        keep = torch.tensor([0 if m else 1 for m in masked], dtype=out["completion_mask"].dtype,
                            device=out["completion_mask"].device).unsqueeze(1)
        tool_mask = out.get("tool_mask")
        tool_mask = (torch.ones_like(out["completion_mask"]) if tool_mask is None else tool_mask) * keep
        out["tool_mask"] = tool_mask
        out["num_items_in_batch"] = self.accelerator.gather((out["completion_mask"] * tool_mask).sum()).sum()
        return out


def totals_report(trainer: TreePOTrainer) -> dict:
    """Run totals for metrics.json: decoded tokens, rollout / reward / sync seconds, trees masked."""
    t = dict(trainer.totals)
    t["sync_seconds"] = trainer.vllm_generation.seconds
    t["syncs"] = trainer.vllm_generation.syncs
    t["decoded_share_of_rows"] = t["decoded_tokens"] / max(t["row_tokens"], 1)
    t["trajectories_per_rollout_second"] = t["trajectories"] / max(t["rollout_seconds"], 1e-9)
    return t
