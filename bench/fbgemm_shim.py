"""Pure-torch stand-ins for the three torch.ops.fbgemm operators the research HSTU calls.

fbgemm-gpu-cpu 1.9.0 (PyPI) does not load against torch 2.13 (fbgemm_gpu_py.so: undefined symbol), so
these are registered under the same names and schemas, with fbgemm's semantics:

- asynchronous_complete_cumsum(t) = [0, cumsum(t)]                    (B+1,)
- jagged_to_padded_dense(values [T, ...], [offsets], [n], pad) -> [B, n, ...]: row b holds
  values[offsets[b] : offsets[b+1]] (truncated to n), then `pad`
- dense_to_jagged(dense [B, N, ...], [offsets]) -> (values [T, ...], [offsets]): the first
  offsets[b+1]-offsets[b] rows of each dense[b], concatenated

Registered as CompositeImplicitAutograd so autograd flows through them (needed for the training steps).
"""

import torch

_lib = torch.library.Library("fbgemm", "DEF")
_lib.define("asynchronous_complete_cumsum(Tensor t_in) -> Tensor")
_lib.define("jagged_to_padded_dense(Tensor values, Tensor[] offsets, SymInt[] max_lengths, "
            "float padding_value=0) -> Tensor")
_lib.define("dense_to_jagged(Tensor dense, Tensor[] x_offsets, SymInt? total_L=None) -> (Tensor, Tensor[])")


def asynchronous_complete_cumsum(t_in):
    return torch.cat([torch.zeros(1, dtype=t_in.dtype, device=t_in.device), torch.cumsum(t_in, 0).to(t_in.dtype)])


def jagged_to_padded_dense(values, offsets, max_lengths, padding_value=0.0):
    assert len(offsets) == 1 and len(max_lengths) == 1
    off = offsets[0].long()
    n = int(max_lengths[0])
    b = off.numel() - 1
    lengths = off[1:] - off[:-1]
    idx = torch.arange(n, device=values.device)
    mask = idx.unsqueeze(0) < lengths.unsqueeze(1)  # [B, n]
    src = (off[:-1].unsqueeze(1) + idx.unsqueeze(0)).clamp(max=max(values.size(0) - 1, 0))
    out = values[src.reshape(-1)].reshape((b, n) + tuple(values.shape[1:]))
    m = mask.reshape((b, n) + (1,) * (values.dim() - 1))
    return torch.where(m, out, torch.full_like(out, padding_value))


def dense_to_jagged(dense, x_offsets, total_L=None):
    assert len(x_offsets) == 1
    off = x_offsets[0].long()
    lengths = off[1:] - off[:-1]
    n = dense.size(1)
    mask = torch.arange(n, device=dense.device).unsqueeze(0) < lengths.unsqueeze(1)
    return dense[mask], [x_offsets[0]]


for _name, _fn in (("asynchronous_complete_cumsum", asynchronous_complete_cumsum),
                   ("jagged_to_padded_dense", jagged_to_padded_dense),
                   ("dense_to_jagged", dense_to_jagged)):
    _lib.impl(_name, _fn, "CompositeImplicitAutograd")
