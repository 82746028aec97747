from callbacks.loss_weight_balancer import LossWeightBalancer

__all__ = ["LossWeightBalancer"]
