import warnings

# TRL 1.16 warns on import that it was tested with vLLM <= 0.31; treetune pins vLLM 0.32 and its
# own weight sync (rollouts/engines/weights.py) is what runs against it, tested here.
warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
