"""Online RL on reasoning trees: TreePO, and GRPO with `--sampler flat --advantage grpo`:

    accelerate launch [--config_file configs/accelerate/zero3.yaml] launch/treepo.py \
        --config configs/treepo/qwen2.5-7b.yaml --model_name_or_path Qwen/Qwen2.5-7B

With no model it trains the arith tiny policy (`configs/treepo/arith.yaml`; GRPO:
`configs/treepo/grpo_arith.yaml`). The rollout engine receives the trainer's weights before every
generation. Writes the model, `recipe.json`, `metrics.json` and `training.png` to `--output_dir`;
`--resume_from_checkpoint auto` continues from the newest checkpoint there, regrowing the same
trees. The job is `treetune.trainers.treepo.loop`, the trainer `treetune.trainers.treepo.trainer`;
every TRL GRPOConfig / ModelConfig field is a flag (`--help`).
"""

from treetune.trainers.treepo.loop import main

if __name__ == "__main__":
    main()
