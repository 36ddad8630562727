"""Supervised fine-tuning (TRL SFTTrainer): `accelerate launch launch/sft.py --config configs/sft/arith.yaml`.

With no `--model_name_or_path` it builds the arith tiny model from scratch; with one it fine-tunes
it on the problems' gold solutions (`--source gsm8k --data_path ...`) or on prompt/completion
records (`--source records --data_path FILE`). Writes the model, `recipe.json` and `metrics.json`
to `--output_dir`; `--resume_from_checkpoint auto` continues from the newest checkpoint there.
The recipe is `treetune.trainers.sft.config` (every field with `--help`), the trainer
`treetune.trainers.sft.trainer`.
"""

from treetune.trainers.sft.trainer import main

if __name__ == "__main__":
    main()
