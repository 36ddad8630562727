"""Train a discriminative PRM: `accelerate launch launch/train_prm.py --config configs/train_prm/arith.yaml`.

Trains on the stepwise records `launch/prm_labels.py` writes (`labels.jsonl`); with no
`--model_name_or_path` the backbone is the arith tiny policy. Writes the PRM, `recipe.json` and
`metrics.json` to `--output_dir`; `--resume_from_checkpoint auto` continues from the newest
checkpoint there. The recipe is `treetune.trainers.prm.config` (every field with `--help`), the
trainer `treetune.trainers.prm.trainer`.
"""

from treetune.trainers.prm.trainer import main

if __name__ == "__main__":
    main()
