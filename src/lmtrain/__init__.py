"""lmtrain: train GPT language models from scratch with Lightning and Hydra.

Kept free of heavy imports: `python -m lmtrain.tokenizer` must start without torch.
"""

__version__ = "0.1.0"
