"""Q-Tuning SFT (TRL SFTTrainer, dynamic sample + token pruning):
`accelerate launch launch/qtuning_sft.py --config configs/qtuning_sft/smollm2-1.7b.yaml`.

All logic lives in `treetune.trainers.qtuning.trainer`; the data fields are the SFT recipe's
(`treetune.trainers.sft.trainer.SFTScriptArguments`); see every field with `--help`.
"""

from treetune.trainers.qtuning.trainer import main

if __name__ == "__main__":
    main()
