"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") for PyTorch, which has none:
the twin of `optax.lion` as `vit_jax.step` builds it (`--optimizer lion`)."""
import torch


class Lion(torch.optim.Optimizer):
    """params -= lr * (sign(b1 m + (1 - b1) grad) + weight_decay params); then m = b2 m + (1 - b2) grad."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                direction = torch.sign(m * b1 + p.grad * (1 - b1)) + group["weight_decay"] * p
                p.sub_(group["lr"] * direction)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
