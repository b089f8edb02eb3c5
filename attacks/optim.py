"""Adam, the one optimizer the attacks step by hand (Kingma & Ba, "Adam: A Method for Stochastic Optimization",
ICLR 2015).

:class:`Adam` is a rule, not a holder of state: the moments live with the caller (in a work set they are one more
per-sample field, compacted with the rest), and the step count is a number (one count for the whole tensor) or a
per-sample tensor (each sample's own count, for work sets whose samples start at different times).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attacks.norms import per_sample

#: Adam's moment estimates ``(m, v)``: the running means of the gradient and of its square.
Moments = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Adam:
    """Adam with learning rate ``lr``, decay rates ``betas`` and ``eps`` added to the denominator."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @staticmethod
    def moments(like: Tensor) -> Moments:
        """Zero moments for parameters shaped like ``like``."""
        return torch.zeros_like(like), torch.zeros_like(like)

    def step(self, moments: Moments, grad: Tensor, t: int | Tensor) -> tuple[Tensor, Moments]:
        """The ``t``-th step (from 1) for gradient ``grad``: returns the bias-corrected move
        ``lr * m_hat / (sqrt(v_hat) + eps)`` and the updated moments. Subtract the move to minimize, add it to
        maximize. ``t`` is one count, or a per-sample ``(N,)`` tensor of counts for a ``grad`` of ``N`` rows (the
        bias corrections are then computed in double and cast to ``grad``'s dtype)."""
        b1, b2 = self.betas
        m = b1 * moments[0] + (1 - b1) * grad
        v = b2 * moments[1] + (1 - b2) * grad * grad
        if isinstance(t, Tensor):
            t = t.double()
            m_hat, v_hat = m / per_sample(1 - b1 ** t, grad), v / per_sample(1 - b2 ** t, grad)
        else:
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        return self.lr * m_hat / (v_hat.sqrt() + self.eps), (m, v)
