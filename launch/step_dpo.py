"""Step-DPO training (a TRL DPOTrainer on step pairs):

    accelerate launch [--config_file configs/accelerate/zero3.yaml] launch/step_dpo.py \
        --config configs/step_dpo/qwen2-7b.yaml --model_name_or_path Qwen/Qwen2-7B-Instruct --pairs xinlai/Math-Step-DPO-10K

With no model it trains the arith tiny policy (`configs/step_dpo/arith.yaml`). All logic lives in
`treetune.trainers.step_dpo.trainer`; every TRL DPOConfig / ModelConfig field is a flag (`--help`).
"""

from treetune.trainers.step_dpo.trainer import main

if __name__ == "__main__":
    main()
