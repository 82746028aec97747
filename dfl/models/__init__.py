from dfl.models.adaptive_bn import AdaptiveBatchNorm, BatchNorm
from dfl.models.context_aggregation import ContextAggregationNet
from dfl.models.loss_network import LossNetwork

__all__ = ["AdaptiveBatchNorm", "BatchNorm", "ContextAggregationNet", "LossNetwork"]
