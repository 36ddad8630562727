"""Train a discriminative PRM: `accelerate launch launch/train_prm.py --config configs/train_prm/arith.yaml`.

All logic lives in `treetune.trainers.prm.train`; see its fields with `--help`.
"""

from treetune.trainers.prm.train import main

if __name__ == "__main__":
    main()
