"""Supervised fine-tuning (TRL SFTTrainer): `accelerate launch launch/sft.py --config configs/arith/policy.yaml`.

All logic lives in `treetune.trainers.sft`; see its recipe fields with `--help`.
"""

from treetune.trainers.sft import main

if __name__ == "__main__":
    main()
