"""Mamba-1 token mixer (as ``transformers.models.mamba.MambaMixer``) with a fast pure-PyTorch selective scan.

The mixer computes, for an input ``x`` of shape (B, L, C), with ``d_inner = 2C``:

    u, z  = in_proj(x)                         (no bias), split along channels
    u     = SiLU(causal depthwise conv1d(u))   (kernel 4, left padding 3, with bias)
    dt, Bm, Cm = x_proj(u)                     (no bias), split [dt_rank, d_state, d_state]
    delta = softplus(dt_proj(dt))              (Linear with bias)
    h_t   = exp(delta_t A) h_{t-1} + delta_t Bm_t u_t,   A = -exp(A_log)    (fp32)
    y_t   = Cm_t . h_t + D u_t
    out   = out_proj(y * SiLU(z))              (no bias)

Parameter names (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``) are those of
transformers' ``MambaMixer``, so published DynamicVis weights load unchanged.

Three interchangeable implementations of the recurrence, chosen per module through ``scan_impl``:

``"torch"`` (default)
    :func:`selective_scan_chunked`: a two-level chunked scan. The sequence is cut into chunks of ``chunk``
    steps; the recurrence runs *inside* every chunk at once (``chunk`` vectorised steps over all chunks), then
    a short pass over the chunk boundaries carries each chunk's end state into the next chunk, and a single
    fused multiply-add adds ``(prod of decays since chunk start) * carry-in`` to every state. Only products of
    decays in (0, 1] and sums appear (no division by cumulative products, no log/exp rescaling), so the result
    equals the sequential recurrence up to fp32 rounding for any ``A``/``dt`` magnitude. Python-level steps per
    call: ``chunk + L/chunk`` instead of ``L``.
``"sequential"``
    :func:`selective_scan_sequential`: the plain step-by-step recurrence, the reference for tests/benchmarks.
``"cuda"``
    mamba_ssm's fused ``selective_scan_fn`` (plus causal_conv1d's ``causal_conv1d_fn`` when installed). Used only
    when explicitly resolved to (see :func:`resolve_scan_impl`): ``mamba_ssm`` importable *and* tensors on CUDA.
    The kernel applies the dt_proj bias and the softplus itself, as in transformers' ``cuda_kernels_forward``.
    This path is not exercised by the CPU test suite.

All scans run in fp32 whatever the module dtype; the output is cast back to the input dtype before ``out_proj``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterError

SCAN_CHOICES = ("auto", "torch", "sequential", "cuda")
SCAN_IMPLS = ("torch", "sequential", "cuda")
DEFAULT_CHUNK = 16  # best or near-best at all four DynamicVis-B stage sizes in benchmarks/results/mamba_scan.json
DEFAULT_BLOCK_BYTES = 4 << 20  # per-block state tensor size of the chunked scan


# --- optional CUDA kernels ---------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cuda_kernels() -> tuple[Callable | None, Callable | None]:
    """``(selective_scan_fn, causal_conv1d_fn)`` from mamba_ssm / causal_conv1d, ``None`` where not importable."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a broken CUDA extension raising at import
        selective_scan_fn = None
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        causal_conv1d_fn = None
    return selective_scan_fn, causal_conv1d_fn


def resolve_scan_impl(requested: str, device: torch.device | str, *, knob: str = "scan") -> str:
    """Turn a requested scan (auto|torch|sequential|cuda) into the implementation that will run.

    ``auto`` picks ``cuda`` only when mamba_ssm is importable and the device is CUDA, ``torch`` otherwise.
    An explicit ``cuda`` that cannot run raises instead of silently falling back.
    """
    requested = str(requested).lower()
    device = torch.device(device)
    if requested not in SCAN_CHOICES:
        raise AdapterError(f"{knob}={requested!r} is not a selective-scan implementation; use one of "
                           f"{', '.join(SCAN_CHOICES)}")
    have_kernel = cuda_kernels()[0] is not None
    if requested == "auto":
        return "cuda" if (device.type == "cuda" and have_kernel) else "torch"
    if requested == "cuda":
        if device.type != "cuda":
            raise AdapterError(f"{knob}=cuda needs the model on a CUDA device (got {device}); use auto or torch")
        if not have_kernel:
            raise AdapterError(f"{knob}=cuda needs the mamba_ssm package (selective_scan_fn), which is not "
                               "importable; install mamba-ssm for this CUDA/torch build, or use auto or torch")
    return requested


# --- selective scans ---------------------------------------------------------------------------
def _finish(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    if D is not None:
        y = y + u * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y


def selective_scan_sequential(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, D: torch.Tensor | None = None,
                              z: torch.Tensor | None = None) -> torch.Tensor:
    """Reference recurrence, one step at a time (slow: L Python iterations).

    u, delta, z: (Bt, Di, L) with ``delta`` the positive step (softplus already applied); A: (Di, N);
    B, C: (Bt, N, L); D: (Di,). Returns y (Bt, Di, L) in fp32.
    """
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    bt, di, length = u.shape
    h = u.new_zeros(bt, di, A.shape[1])
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, :, t, None] * A)
        h = dA * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    return _finish(torch.stack(ys, dim=-1), u, D, z)


def selective_scan_chunked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None, *,
                           chunk: int = DEFAULT_CHUNK, block_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """Two-level chunked selective scan; same arguments and result as :func:`selective_scan_sequential`.

    Channels are processed in blocks whose per-step state tensors take about ``block_bytes`` each, so the
    working set of every block stays cache-resident (and peak memory is bounded) whatever the batch size.
    """
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    bt, di, length = u.shape
    n = A.shape[1]
    T = max(1, min(int(chunk), length))
    nc = -(-length // T)
    pad = nc * T - length
    if pad:  # padded steps: delta = 0 -> decay 1, input 0; their outputs are dropped
        u_p, delta_p, B_p, C_p = (F.pad(t, (0, pad)) for t in (u, delta, B, C))
    else:
        u_p, delta_p, B_p, C_p = u, delta, B, C

    def time_major(t: torch.Tensor) -> torch.Tensor:  # (Bt, X, nc*T) -> (T, Bt, nc, X)
        return t.reshape(bt, t.shape[1], nc, T).permute(3, 0, 2, 1).contiguous()

    B_tm = time_major(B_p).unsqueeze(-2)                                    # (T, Bt, nc, 1, N)
    C_tm = time_major(C_p).unsqueeze(-1)                                    # (T, Bt, nc, N, 1)
    dt_tm, du_tm = time_major(delta_p), time_major(delta_p * u_p)           # (T, Bt, nc, Di)
    per_channel = bt * nc * T * n * 4
    step = max(1, min(di, int(block_bytes) // max(per_channel, 1)))
    y = torch.empty(T, bt, nc, di, dtype=torch.float32, device=u.device)
    for d0 in range(0, di, step):
        d1 = min(di, d0 + step)
        y[..., d0:d1] = _scan_block(dt_tm[..., d0:d1], du_tm[..., d0:d1], A[d0:d1], B_tm, C_tm)
    y = y.permute(1, 3, 2, 0).reshape(bt, di, nc * T)[:, :, :length]
    return _finish(y, u, D, z)


def _scan_block(dt_tm: torch.Tensor, du_tm: torch.Tensor, A: torch.Tensor, B_tm: torch.Tensor,
                C_tm: torch.Tensor) -> torch.Tensor:
    """One channel block, time-major ``(T, Bt, nc, d, N)``: step ``t`` of all chunks is one contiguous slice."""
    T, nc = dt_tm.shape[0], dt_tm.shape[2]
    decay = torch.mul(dt_tm.unsqueeze(-1), A).exp_()                      # exp(delta A), in (0, 1]
    h = du_tm.unsqueeze(-1) * B_tm                                          # delta B u
    # in-chunk recurrence from a zero state; ``decay[t]`` becomes the cumulative decay since chunk start
    for t in range(1, T):
        h[t].addcmul_(decay[t], h[t - 1])
        decay[t].mul_(decay[t - 1])
    if nc > 1:
        # carry the true state across chunk boundaries (nc - 1 small steps on (Bt, d, N) tensors)
        end, total = h[T - 1], decay[T - 1]                                 # (Bt, nc, d, N)
        carry = torch.empty_like(end[:, 1:])
        state = end[:, 0]
        for c in range(1, nc):
            carry[:, c - 1] = state
            if c < nc - 1:
                state = torch.addcmul(end[:, c], total[:, c], state)
        h[:, :, 1:].addcmul_(decay[:, :, 1:], carry.unsqueeze(0))
    return torch.matmul(h, C_tm).squeeze(-1)                                # (T, Bt, nc, d)


# --- modules -----------------------------------------------------------------------------------
class MambaRMSNorm(nn.Module):
    """RMSNorm computed in fp32 with a weight only (transformers' MambaRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MambaMixer(nn.Module):
    """Mamba-1 selective-SSM mixer, (B, L, C) -> (B, L, C); see the module docstring for the maths."""

    def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, scan_impl: str = "torch", chunk: int = DEFAULT_CHUNK):
        super().__init__()
        self.d_model = d_model
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.dt_rank = int(dt_rank if dt_rank is not None else math.ceil(d_model / 16))
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        # S4D-real initialisation (overwritten by checkpoints)
        a = torch.arange(1, d_state + 1, dtype=torch.float32).expand(self.d_inner, d_state)
        self.A_log = nn.Parameter(torch.log(a).contiguous())
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.set_scan(scan_impl, chunk)

    def set_scan(self, scan_impl: str, chunk: int | None = None) -> None:
        if scan_impl not in SCAN_IMPLS:
            raise AdapterError(f"scan implementation {scan_impl!r} is not one of {', '.join(SCAN_IMPLS)} "
                               "(resolve 'auto' with resolve_scan_impl first)")
        self.scan_impl = scan_impl
        if chunk is not None:
            if int(chunk) < 1:
                raise AdapterError(f"scan chunk must be a positive integer, got {chunk}")
            self.chunk = int(chunk)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
                f"scan={self.scan_impl}, chunk={self.chunk}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        length = x.shape[1]
        xz = self.in_proj(x).transpose(1, 2)                                 # (B, 2Di, L)
        if self.scan_impl == "cuda":
            return self._forward_cuda(xz, dtype)
        u, z = xz.chunk(2, dim=1)
        u = F.silu(self.conv1d(u)[..., :length])                             # (B, Di, L)
        dt, Bm, Cm = torch.split(self.x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt).float()).transpose(1, 2)         # (B, Di, L), fp32
        A = -torch.exp(self.A_log.float())
        args = (u, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2), self.D, z)
        # the scan runs in float32 whatever the autocast precision (as mamba_ssm's kernel does):
        # its cumulative products lose too much in 16 bit; a no-op for float32 inputs
        with torch.autocast(device_type=u.device.type, enabled=False):
            args = tuple(a.float() for a in args)
            if self.scan_impl == "sequential":
                y = selective_scan_sequential(*args)
            else:
                y = selective_scan_chunked(*args, chunk=self.chunk)
        return self.out_proj(y.transpose(1, 2).to(dtype))

    def _forward_cuda(self, xz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """mamba_ssm kernel path (CUDA only): fused conv+SiLU when causal_conv1d exists, fused scan."""
        selective_scan_fn, causal_conv1d_fn = cuda_kernels()
        if selective_scan_fn is None or not xz.is_cuda:
            raise AdapterError("scan_impl='cuda' needs mamba_ssm and CUDA tensors; resolve the scan with "
                               "resolve_scan_impl (RS_EMBED_DYNAMICVIS_SCAN=auto|torch)")
        length = xz.shape[-1]
        u, z = xz.chunk(2, dim=1)
        weight = self.conv1d.weight.squeeze(1)
        if causal_conv1d_fn is not None:
            u = causal_conv1d_fn(u.contiguous(), weight, self.conv1d.bias, activation="silu")
        else:
            u = F.silu(self.conv1d(u)[..., :length])
        dt, Bm, Cm = torch.split(self.x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj.weight @ dt.transpose(1, 2)                         # bias + softplus inside the kernel
        y = selective_scan_fn(u.contiguous(), dt.contiguous(), -torch.exp(self.A_log.float()),
                              Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous(), self.D.float(),
                              z=z.contiguous(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2).to(dtype))
