"""The MLP's GELU inside its matmuls: cuBLASLt's GELU epilogues, called through ctypes.

Compiled PyTorch runs GELU (tanh approximation) as separate kernels around cuBLAS's matmuls: the forward
reads the fc product back and writes the activation; the backward writes the gradient of the activation
and reads it back with the fc product. cuBLASLt can do both in its matmuls' epilogues:

- `linear_gelu(x, w)`: pre = x @ w.T and h = gelu(pre) from one matmul (epilogue GELU_AUX: h is the
  output, pre the auxiliary one kept for the backward);
- `linear_dgelu(g, w, pre)`: (g @ w) * gelu'(pre) from one matmul (epilogue DGELU).

Both are torch custom ops, opaque to torch.compile and safe under CUDA graphs; their CPU kernels are the
same math in plain PyTorch. cuBLASLt's GELU is the tanh approximation, so this serves `mlp=gelu_tanh`.
Row-major (N, F) = (N, C) @ (C, F) is column-major (F, N) = (F, C) @ (C, N): each call below is written
in cuBLASLt's column-major terms with m = F, n = N, k = C.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

import torch
import torch.nn.functional as F

# cublasLt.h and library_types.h
_COMPUTE_32F, _R_32F = 68, 0
_DATA_TYPE = {torch.bfloat16: 14, torch.float16: 2}
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE = 3, 4, 7
_DESC_AUX_POINTER, _DESC_AUX_LD = 11, 12
_EPILOGUE_GELU_AUX, _EPILOGUE_DGELU = 160, 192
_PREF_MAX_WORKSPACE_BYTES = 1
_WORKSPACE_BYTES = 32 << 20


class _HeuristicResult(ctypes.Structure):
    _fields_ = [
        ("algo", ctypes.c_uint64 * 8),
        ("workspace_size", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves_count", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


def supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether these operands can take the cuBLASLt path: CUDA, bf16 or fp16 alike, dimensions multiples of 8."""
    return (
        x.is_cuda
        and x.dtype in _DATA_TYPE
        and all(w.dtype == x.dtype and w.size(0) % 8 == 0 and w.size(1) % 8 == 0 for w in weights)
    )


@functools.cache
def _library() -> ctypes.CDLL:
    """The libcublasLt torch itself loaded (with its cuBLAS handle), or the first one beside torch's packages."""
    torch.cuda.current_blas_handle()
    with open("/proc/self/maps") as maps:
        paths = [line.split()[-1] for line in maps if "libcublasLt.so" in line]
    if not paths:
        site = os.path.dirname(os.path.dirname(torch.__file__))
        paths = sorted(glob.glob(os.path.join(site, "nvidia", "**", "libcublasLt.so*"), recursive=True))
    if not paths:
        raise RuntimeError("libcublasLt not found: the cuBLASLt GELU needs a CUDA build of torch")
    lib = ctypes.CDLL(paths[0])
    p, i, u64, i64, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
    signatures = {
        "cublasLtCreate": [p],
        "cublasLtMatmulDescCreate": [p, i, i],
        "cublasLtMatmulDescSetAttribute": [p, i, p, size],
        "cublasLtMatrixLayoutCreate": [p, i, u64, u64, i64],
        "cublasLtMatmulPreferenceCreate": [p],
        "cublasLtMatmulPreferenceSetAttribute": [p, i, p, size],
        "cublasLtMatmulAlgoGetHeuristic": [p, p, p, p, p, p, p, i, p, p],
        "cublasLtMatmul": [p, p, p, p, p, p, p, p, p, p, p, p, p, p, size, p],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, ctypes.c_int
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(
            f"cuBLASLt {what} failed with status {status}; fast.fused_mlp=false runs the GELU on its own"
        )


def _operand(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and 256-byte aligned, as the heuristic's algorithms assume (a fresh allocation is)."""
    t = t.contiguous()
    return t if t.data_ptr() % 256 == 0 else t.clone()


@functools.cache
def _handle(device: int) -> ctypes.c_void_p:
    handle = ctypes.c_void_p()
    _check(_library().cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
    return handle


def _set(setter, obj, attribute: int, value) -> None:
    _check(setter(obj, attribute, ctypes.byref(value), ctypes.sizeof(value)), f"attribute {attribute}")


def _layout(dtype: int, rows: int, cols: int) -> ctypes.c_void_p:
    """A column-major rows x cols matrix with leading dimension rows."""
    layout = ctypes.c_void_p()
    _check(_library().cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows, cols, rows), "layout")
    return layout


@functools.cache
def _plan(device: int, dtype: torch.dtype, m: int, n: int, k: int, transa: int, epilogue: int):
    """Descriptors and the heuristic's first algorithm for D (m, n) = op(A) (m, k) @ B (k, n) with an epilogue
    whose auxiliary matrix has D's layout. Cached per shape; only the auxiliary pointer changes per call."""
    lib = _library()
    data_type = _DATA_TYPE[dtype]
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _R_32F), "matmul descriptor")
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_TRANSA, ctypes.c_int32(transa))
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_AUX_LD, ctypes.c_int64(m))
    a = _layout(data_type, k, m) if transa == _OP_T else _layout(data_type, m, k)
    b, d = _layout(data_type, k, n), _layout(data_type, m, n)
    preference = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(preference)), "preference")
    _set(
        lib.cublasLtMatmulPreferenceSetAttribute,
        preference,
        _PREF_MAX_WORKSPACE_BYTES,
        ctypes.c_uint64(_WORKSPACE_BYTES),
    )
    result, count = _HeuristicResult(), ctypes.c_int(0)
    status = lib.cublasLtMatmulAlgoGetHeuristic(
        _handle(device), desc, a, b, d, d, preference, 1, ctypes.byref(result), ctypes.byref(count)
    )
    _check(status if count.value else -1, f"heuristic for epilogue {epilogue} at m={m} n={n} k={k}")
    return desc, a, b, d, result


_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def _matmul_epilogue(
    a: torch.Tensor, transa: int, b: torch.Tensor, out: torch.Tensor, aux: torch.Tensor, epilogue: int
):
    """out (n, m) row-major = b (n, k) @ op(a) with the epilogue; aux (n, m) is written or read by it."""
    n, m = out.shape
    k = b.size(1)
    device = out.device.index
    desc, a_layout, b_layout, d_layout, result = _plan(device, out.dtype, m, n, k, transa, epilogue)
    lib = _library()
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
    workspace = torch.empty(_WORKSPACE_BYTES, device=out.device, dtype=torch.uint8)
    _check(
        lib.cublasLtMatmul(
            _handle(device),
            desc,
            ctypes.byref(_ONE),
            ctypes.c_void_p(a.data_ptr()),
            a_layout,
            ctypes.c_void_p(b.data_ptr()),
            b_layout,
            ctypes.byref(_ZERO),
            ctypes.c_void_p(out.data_ptr()),
            d_layout,
            ctypes.c_void_p(out.data_ptr()),
            d_layout,
            ctypes.byref(result.algo),
            ctypes.c_void_p(workspace.data_ptr()),
            ctypes.c_size_t(_WORKSPACE_BYTES),
            ctypes.c_void_p(torch.cuda.current_stream(out.device).cuda_stream),
        ),
        "matmul",
    )


@torch.library.custom_op("lmtrain::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gelu(x @ weight.T) and x @ weight.T (N, F) of x (N, C) and weight (F, C)."""
    pre = x @ weight.T
    return F.gelu(pre, approximate="tanh"), pre


@linear_gelu.register_kernel("cuda")
def _linear_gelu_cuda(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, pre = (x.new_empty((x.size(0), weight.size(0))) for _ in range(2))
    _matmul_epilogue(_operand(weight), _OP_T, _operand(x), h, pre, _EPILOGUE_GELU_AUX)
    return h, pre


@linear_gelu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty((x.size(0), weight.size(0))), x.new_empty((x.size(0), weight.size(0)))


@torch.library.custom_op("lmtrain::linear_dgelu", mutates_args=())
def linear_dgelu(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """(grad @ weight) * gelu'(pre) (N, F) of grad (N, C), weight (C, F) and pre (N, F)."""
    return torch.ops.aten.gelu_backward(grad @ weight, pre, approximate="tanh")


@linear_dgelu.register_kernel("cuda")
def _linear_dgelu_cuda(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(pre)
    _matmul_epilogue(_operand(weight), _OP_N, _operand(grad), out, _operand(pre), _EPILOGUE_DGELU)
    return out


@linear_dgelu.register_fake
def _(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(pre)


class _GeluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_fc, w_proj):
        # x (N, C), w_fc (F, C), w_proj (C, F): gelu(x @ w_fc.T) @ w_proj.T (N, C)
        h, pre = linear_gelu(x, w_fc)
        ctx.save_for_backward(x, w_fc, w_proj, h, pre)
        return h @ w_proj.T

    @staticmethod
    def backward(ctx, grad):
        x, w_fc, w_proj, h, pre = ctx.saved_tensors
        grad = grad.contiguous()
        grad_pre = linear_dgelu(grad, w_proj, pre)  # (N, F)
        return grad_pre @ w_fc, grad_pre.T @ x, grad.T @ h


def gelu_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ w_fc.T) @ w_proj.T for x (..., C), without bias; the GELU in the matmuls on a GPU."""
    shape = x.shape
    return _GeluMLP.apply(x.reshape(-1, shape[-1]), w_fc, w_proj).view(shape)
