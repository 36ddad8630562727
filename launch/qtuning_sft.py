"""Q-Tuning SFT (TRL SFTTrainer, dynamic sample + token pruning):
`accelerate launch launch/qtuning_sft.py --config configs/qtuning_sft/smollm2-1.7b.yaml`.

With no `--model_name_or_path` it fine-tunes the arith tiny policy. Writes the model,
`recipe.json` and `metrics.json` to `--output_dir`; `--resume_from_checkpoint auto` continues from
the newest checkpoint there. The data fields are the SFT recipe's
(`treetune.trainers.sft.config`), the budgets `treetune.trainers.qtuning.config`; see every field
with `--help`. The trainer is `treetune.trainers.qtuning.trainer`.
"""

from treetune.trainers.qtuning.trainer import main

if __name__ == "__main__":
    main()
