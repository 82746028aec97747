from callbacks.best_checkpoint import BestCheckpoint
from callbacks.loss_weight_balancer import LossWeightBalancer
from callbacks.model_summary import ModelSummary
from callbacks.preemption import CheckpointOnSigterm
from callbacks.throughput import TrainingThroughput
from callbacks.wandb_media import WandbMediaLogger
from callbacks.weight_average import DenoiserWeightAverage

__all__ = ["BestCheckpoint", "CheckpointOnSigterm", "DenoiserWeightAverage", "LossWeightBalancer", "ModelSummary", "TrainingThroughput", "WandbMediaLogger"]
