"""lmtrain: train GPT language models from scratch with Lightning and Hydra.

Kept free of heavy imports: `python -m lmtrain.tokenizer` must start without torch.
"""

import os

__version__ = "0.1.0"

# Intel MKL, PyTorch's CPU BLAS, may order a product's floating-point operations differently from run to run
# (by array alignment and thread scheduling) unless its conditional numerical reproducibility mode is on and
# its thread count fixed. It reads these before its first call (the second before torch is imported), so
# that a CPU run and the same run resumed from a checkpoint match to the bit.
os.environ.setdefault("MKL_CBWR", "AUTO")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
