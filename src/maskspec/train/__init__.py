"""Training of the adapter (mask embeddings, gated LoRA, sampler head) and self-distillation of training data.

`maskspec distill` answers prompts with the base model; `maskspec train` fits the adapter on such chat records.
"""

from maskspec.train.data import DataError, Example, TrainBatch, load_chat_records, make_batch, tokenize_records
from maskspec.train.losses import LossWeights, compute_losses
from maskspec.train.config import TrainConfig, TrainError
from maskspec.train.evaluation import evaluate
from maskspec.train.trainer import TrainResult, train

__all__ = ["DataError", "Example", "LossWeights", "TrainBatch", "TrainConfig", "TrainError", "TrainResult",
           "compute_losses", "evaluate", "load_chat_records", "make_batch", "tokenize_records", "train"]
