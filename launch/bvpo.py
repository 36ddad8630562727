"""BVPO training (a TRL DPOTrainer mixing a trace and an empty-trace DPO loss):

    accelerate launch [--config_file configs/accelerate/zero2.yaml] launch/bvpo.py \
        --config configs/bvpo/r1-distill-qwen-1.5b.yaml --pairs outputs/bvpo_data/r1-1.5b/pairs.jsonl

With no model it trains the arith dual-mode tiny policy (`configs/bvpo/arith.yaml`). `--bvpo_alpha`
takes a number or `auto`. Writes the model, `recipe.json` and `metrics.json` to `--output_dir`;
`--resume_from_checkpoint auto` continues from the newest checkpoint there. The recipe is
`treetune.trainers.bvpo.config`, the trainer `treetune.trainers.bvpo.trainer`; every TRL DPOConfig /
ModelConfig field is a flag (`--help`).
"""

from treetune.trainers.bvpo.trainer import main

if __name__ == "__main__":
    main()
