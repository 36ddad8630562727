"""Step-DPO training (a TRL DPOTrainer on step pairs):

    accelerate launch [--config_file configs/accelerate/zero3.yaml] launch/step_dpo.py \
        --config configs/step_dpo/qwen2-7b.yaml --model_name_or_path Qwen/Qwen2-7B-Instruct --pairs xinlai/Math-Step-DPO-10K

With no model it trains the arith tiny policy (`configs/step_dpo/arith.yaml`). Writes the model,
`recipe.json` and `metrics.json` to `--output_dir`; `--resume_from_checkpoint auto` continues from
the newest checkpoint there. The recipe is `treetune.trainers.step_dpo.config`, the trainer
`treetune.trainers.step_dpo.trainer`; every TRL DPOConfig / ModelConfig field is a flag (`--help`).
"""

from treetune.trainers.step_dpo.trainer import main

if __name__ == "__main__":
    main()
