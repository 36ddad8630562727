"""MCTS-DPO: rounds of MCTS with the current policy (vLLM), step pairs from the trees, and
conservative DPO with per-pair label smoothing from the visit counts.

    python launch/mcts_dpo.py --config configs/mcts_dpo/arith.yaml
    python launch/mcts_dpo.py --config configs/mcts_dpo/arithmo2-mistral-7b.yaml --model_name_or_path <SFT model> \
        --accelerate_config configs/accelerate/zero3.yaml

A stopped run, restarted with the same --output_dir, resumes in the round it stopped in (and, with
`--resume_from_checkpoint auto`, a round's training from its newest checkpoint). The loop lives in
`treetune.trainers.mcts_dpo.loop` (its fields: `MCTSDPOArgs`), the training recipe in
`treetune.trainers.mcts_dpo.config`; every loop, DPOConfig and ModelConfig field is a flag (`--help`).
"""

from treetune.trainers.mcts_dpo.loop import main

if __name__ == "__main__":
    main()
