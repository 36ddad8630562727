"""Supervised fine-tuning (TRL SFTTrainer): `accelerate launch launch/sft.py --config configs/sft/arith.yaml`.

All logic lives in `treetune.trainers.sft.trainer`; see its recipe fields with `--help`.
"""

from treetune.trainers.sft.trainer import main

if __name__ == "__main__":
    main()
