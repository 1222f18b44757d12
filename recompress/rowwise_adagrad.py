"""FBGEMM's exact row-wise Adagrad for embedding tables: one accumulator per row instead of one per value.

For every row ``i`` of a step's gradient (``g_i``: the sum over that step's lookups of the row, ``d`` values), as
FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` (``fbgemm_gpu/codegen/genscript/optimizers.py``, ``rowwise_adagrad``,
without weight decay), the optimizer TorchRec trains DLRM tables with:

    m_i += mean(g_i ** 2)
    w_i -= lr * g_i / (sqrt(m_i) + eps)

Rows the step did not look up are not touched. Its state is 4 bytes per row, where SparseAdam's is two
tensors of the table's size, allocated whole at the first step: fine-tuning a table of billions of rows
then costs the rows it updates, not three copies of the table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

EPS = 1e-8  # FBGEMM's default


class RowwiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad over parameters whose dimension 0 indexes rows; sparse (row) or dense gradients."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-2, eps: float = EPS) -> None:
        if not lr > 0 or not eps > 0:  # eps 0: a looked-up row with a zero gradient would become 0 * inf = NaN
            raise ValueError(f"row-wise Adagrad needs lr > 0 and eps > 0, not lr={lr}, eps={eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group["lr"], group["eps"])
        return loss

    def _update(self, p: Tensor, grad: Tensor, lr: float, eps: float) -> None:
        state = self.state[p]
        if not state:
            state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        total = state["sum"]
        if grad.is_sparse:
            grad = grad.coalesce()  # one gradient per row: the lookups of a row summed
            rows, values = grad.indices()[0], grad.values()
        else:  # the rows with a gradient (a row with none is left as it is either way), so that untouched
            rows = grad.reshape(len(grad), -1).ne(0).any(1).nonzero().squeeze(1)  # pages of a mapped table stay unwritten
            values = grad[rows]
        if not len(rows):  # nothing looked up (every bag empty): nothing to do
            return
        total.index_add_(0, rows, values.float().pow(2).reshape(len(values), -1).mean(1))
        scale = (-lr / (total[rows].sqrt() + eps)).view(-1, *[1] * (p.dim() - 1))
        p.index_add_(0, rows, (values * scale).to(p.dtype))
