"""The Mamba mixer and its selective scans: parity with transformers' MambaMixer and with the plain recurrence."""

from __future__ import annotations

import importlib
import importlib.machinery
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from adapters.base import AdapterError
from adapters.checkpoints import randomize_parameters
from adapters import mamba as M


def import_hf_mamba():
    """transformers' MambaConfig / MambaMixer.

    transformers imports torchaudio at import time when it is installed; if the installed torchaudio build cannot
    load (a CUDA-version mismatch with torch raises RuntimeError), a stub is put in its place so that the Mamba
    module (which never uses audio) can be imported.
    """
    try:
        import torchaudio  # noqa: F401
    except Exception:
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer
    return MambaConfig, HFMambaMixer


def hf_mixer_like(mixer: M.MambaMixer):
    """A transformers MambaMixer with the DynamicVis config and ``mixer``'s weights, on its slow (torch) path."""
    MambaConfig, HFMambaMixer = import_hf_mamba()
    cfg = MambaConfig(hidden_size=mixer.d_model, state_size=16, intermediate_size=mixer.d_inner, conv_kernel=4,
                      time_step_rank=math.ceil(mixer.d_model / 16), use_conv_bias=True, hidden_act="silu",
                      use_bias=False, use_mambapy=False, use_associative_scan=False, num_hidden_layers=1)
    ref = HFMambaMixer(cfg, layer_idx=0)
    ref.load_state_dict(mixer.state_dict(), strict=True)
    return ref.eval()


def scan_inputs(bt=2, di=48, length=2176, n=16, seed=0, dt_scale=1.0, a_log=None):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(bt, di, length, generator=g)
    delta = F.softplus(torch.randn(bt, di, length, generator=g) - 1.0) * dt_scale
    if a_log is None:  # S4D-real init as in the published mixers (|A| = 1..16) plus noise
        a_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(di, n) + 0.1 * torch.randn(di, n, generator=g)
    A = -torch.exp(a_log)
    B = torch.randn(bt, n, length, generator=g)
    C = torch.randn(bt, n, length, generator=g)
    D = torch.randn(di, generator=g)
    z = torch.randn(bt, di, length, generator=g)
    return u, delta, A, B, C, D, z


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("chunk", [32, 48, 1, 4096])
def test_chunked_scan_matches_sequential_at_stage1_length(chunk):
    """L = 2176 is the DynamicVis-B stage-1 sequence (128 global + 2048 selected tokens)."""
    args = scan_inputs()
    ref = M.selective_scan_sequential(*args)
    out = M.selective_scan_chunked(*args, chunk=chunk)
    assert out.shape == ref.shape == (2, 48, 2176)
    assert torch.isfinite(out).all()
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 2e-6 * scale
    assert rel_err(out, ref) < 1e-6


def test_chunked_scan_channel_blocks_and_padding():
    """Small channel blocks (many blocks) and a length that is not a multiple of the chunk give the same result."""
    args = scan_inputs(di=20, length=301)
    ref = M.selective_scan_sequential(*args)
    out = M.selective_scan_chunked(*args, chunk=16, block_bytes=1)  # one channel per block
    assert rel_err(out, ref) < 1e-6


def test_chunked_scan_is_stable_under_strong_decay():
    """Cumulative decays underflow to 0 inside a chunk (|A| dt ~ 50 per step): no inf/nan, same result."""
    args = scan_inputs(length=700, dt_scale=20.0, a_log=torch.full((48, 16), math.log(16.0)))
    ref = M.selective_scan_sequential(*args)
    out = M.selective_scan_chunked(*args, chunk=64)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-6


def test_chunked_scan_detects_a_wrong_recurrence():
    """The comparison can fail: dropping the carry between chunks is caught."""
    u, delta, A, B, C, D, z = scan_inputs(length=256)
    ref = M.selective_scan_sequential(u, delta * 0.01, A * 0.01, B, C, D, z)
    broken = torch.cat([M.selective_scan_chunked(u[..., i:i + 64], delta[..., i:i + 64] * 0.01, A * 0.01,
                                                 B[..., i:i + 64], C[..., i:i + 64], D, z[..., i:i + 64])
                        for i in range(0, 256, 64)], dim=-1)
    assert rel_err(broken, ref) > 1e-2


@pytest.mark.parametrize("dim,length", [(96, 2176), (384, 300)])
def test_mixer_matches_transformers_slow_path(dim, length):
    """Same non-trivial weights, eval mode, transformers' sequential torch path (no mamba_ssm, no mambapy)."""
    mixer = randomize_parameters(M.MambaMixer(dim), seed=3, scale=0.1).eval()
    ref_mod = hf_mixer_like(mixer)
    x = torch.randn(2, length, dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_mod(x)
        scale = ref.abs().max().item()
        assert scale > 0.1  # the weights make the output non-trivial
        for impl in ("torch", "sequential"):
            mixer.set_scan(impl)
            out = mixer(x)
            assert out.shape == (2, length, dim)
            diff = (out - ref).abs().max().item()
            assert diff <= 1e-5 * max(1.0, scale), (impl, diff, scale)


def test_mixer_parity_detects_a_wrong_weight():
    mixer = randomize_parameters(M.MambaMixer(96), seed=3, scale=0.1).eval()
    ref_mod = hf_mixer_like(mixer)
    with torch.no_grad():
        mixer.D[5] += 0.5
        x = torch.randn(1, 200, 96)
        assert (mixer(x) - ref_mod(x)).abs().max().item() > 1e-3


def test_mixer_parameter_layout():
    mixer = M.MambaMixer(96)
    shapes = {k: tuple(v.shape) for k, v in mixer.state_dict().items()}
    assert shapes == {"A_log": (192, 16), "D": (192,), "conv1d.weight": (192, 1, 4), "conv1d.bias": (192,),
                      "in_proj.weight": (384, 96), "x_proj.weight": (38, 192), "dt_proj.weight": (192, 6),
                      "dt_proj.bias": (192,), "out_proj.weight": (96, 192)}


def test_mixer_in_bf16_scans_in_fp32():
    mixer = randomize_parameters(M.MambaMixer(96), seed=3, scale=0.1).eval()
    x = torch.randn(1, 300, 96)
    with torch.no_grad():
        ref = mixer(x)
        out = mixer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert rel_err(out.float(), ref) < 5e-2


def test_rmsnorm_is_fp32_weight_only():
    norm = M.MambaRMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(3, 8)
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(norm(x), expected, atol=1e-6)


def test_resolve_scan_impl(monkeypatch):
    monkeypatch.setattr(M, "cuda_kernels", lambda: (None, None))
    assert M.resolve_scan_impl("auto", "cpu") == "torch"
    assert M.resolve_scan_impl("auto", "cuda") == "torch"  # no mamba_ssm -> torch even on CUDA
    assert M.resolve_scan_impl("sequential", "cpu") == "sequential"
    with pytest.raises(AdapterError, match="RS_X_SCAN=cuda needs the model on a CUDA device"):
        M.resolve_scan_impl("cuda", "cpu", knob="RS_X_SCAN")
    with pytest.raises(AdapterError, match="mamba_ssm"):
        M.resolve_scan_impl("cuda", "cuda")
    with pytest.raises(AdapterError, match="not a selective-scan implementation"):
        M.resolve_scan_impl("fast", "cpu")
    monkeypatch.setattr(M, "cuda_kernels", lambda: (object(), None))
    assert M.resolve_scan_impl("auto", "cuda") == "cuda"
    assert M.resolve_scan_impl("auto", "cpu") == "torch"


def test_cuda_path_refuses_cpu_tensors():
    mixer = M.MambaMixer(16)
    mixer.set_scan("cuda")
    with pytest.raises(AdapterError, match="mamba_ssm and CUDA tensors"):
        mixer(torch.randn(1, 10, 16))
    with pytest.raises(AdapterError):
        mixer.set_scan("auto")
