"""AdamW with linear warm-up then cosine decay, and clipping by the global gradient norm."""

from __future__ import annotations

import math

import torch

from specforge_mcore.config import OptimConfig


def build_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only; norms keep their scale.
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of cfg.lr at a step: linear warm-up, then cosine down to min_lr_ratio."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(1.0, progress)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm over all gradients. Gradients are identical on every rank after the all-reduce, so the
    local norm is already the global one."""
    grads = [p.grad.float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def clip_(params: list[torch.nn.Parameter], norm: torch.Tensor, max_norm: float) -> None:
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (float(norm) + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
