"""A quantized frozen base: linear layers whose weights are stored in 8 or 4 bits (QLoRA's idea,
Dettmers et al. 2023: adapters train in full precision on top of a frozen, quantized base).

    int8   weight-only, symmetric, one scale per output row:      W ~= q * s_row,           q in [-127, 127]
    int4   weight-only, asymmetric, groups of 64 inputs per row:  W ~= q * s_g + lo_g,      q in [0, 15],
           two values packed per byte (4.5-5 bits per weight with the fp32 scale and offset of each group)
    nf4    CUDA only: bitsandbytes' 4-bit NormalFloat with double quantization (QLoRA sec. 3), its kernels

The CPU schemes use PyTorch's own kernels, no extra package. Measured on this project's CPUs
(bench/quant_kernels.py, README "Quantized bases"): fbgemm's int8 GEMM (`quantized::linear_dynamic`,
weights int8 per row, activations quantized per call) was 3-15x faster than fp32 on the model's layer
shapes, while every weight-only kernel tried (PyTorch's `_weight_int8pack_mm` / int4pack, torchao,
bitsandbytes' CPU backend, optimum-quanto, HQQ) was slower than fp32; so int8 runs on fbgemm, and
int4 (smaller, no fast kernel here) dequantizes one layer's weight and calls the fp32 GEMM. The full
base is never dequantized: at most one layer's weight exists in fp32 at a time (int4's forward, and
the backward of either for the gradient w.r.t. the input, which adapters below the layer need).

Weights are buffers (or fbgemm's packed form), never parameters: an optimizer cannot see them and `requires_grad` cannot be
switched on by accident; `weight` is a read-only dequantized view for code that reads a layer's
weight (DoRA's column norm, shapes), computed on demand.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch
from torch import nn
from torch.nn import functional as F

SCHEMES = ("none", "int8", "int4", "nf4")
INT4_GROUP = 64
FINGERPRINT_VALUES = 4096
# Devices whose kernels each scheme has here (the CPU schemes are plain PyTorch ops that run on CUDA too).
KERNEL_DEVICES = {"int8": ("cpu", "cuda"), "int4": ("cpu", "cuda"), "nf4": ("cuda",)}


class QuantizationError(ValueError):
    """A quantization scheme that is unknown or has no kernel on this device."""


def check_scheme(scheme: str, device: torch.device | str = "cpu") -> None:
    """Refuse, naming the fix, a scheme that does not exist or cannot run on `device`."""
    device = torch.device(device)
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization {scheme!r}: use one of {', '.join(SCHEMES)} "
                                "(model.quantize=... in a run config, --quantize on the command line)")
    if scheme == "none":
        return
    if scheme == "nf4" and device.type == "cpu":
        raise QuantizationError(
            "quantize=nf4 needs a CUDA GPU: plugtune's NF4 (QLoRA's 4-bit NormalFloat with double quantization) "
            "runs on bitsandbytes' CUDA kernels, and no NF4 backend is used on CPU. On CPU use quantize=int4 "
            "(4-bit groups of 64) or quantize=int8")
    if device.type not in KERNEL_DEVICES[scheme]:
        raise QuantizationError(
            f"quantize={scheme} has no kernel for device {device.type!r} (it runs on "
            f"{' and '.join(KERNEL_DEVICES[scheme])}); pick a device that has one (model.device=...), or "
            f"quantize={'/'.join(s for s, devs in KERNEL_DEVICES.items() if device.type in devs) or 'none'}")
    if scheme == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError("quantize=nf4 needs the bitsandbytes package: pip install 'plugtune[quantize]' "
                                "(or pip install bitsandbytes)")


class _QuantizedMatmul(torch.autograd.Function):
    """y = x W^T with the quantized W. The backward gives the gradient w.r.t. x only (the weight is
    frozen), from one layer's transiently dequantized weight: dL/dx = dL/dy W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = ctx.layer.dequantize(grad_out.dtype)  # (out, in), freed when backward of this layer ends
        return grad_out @ weight, None


def fingerprint_sample(weight: torch.Tensor) -> torch.Tensor:
    """The first FINGERPRINT_VALUES values of a weight in its stored layout, as bf16: what an adapter's base
    fingerprint hashes (adapters/io.base_fingerprint), kept so a quantized base fingerprints as the original."""
    return weight.detach().reshape(-1)[:FINGERPRINT_VALUES].to("cpu", torch.bfloat16).clone()


class QuantizedLinear(nn.Module):
    """Common part of the quantized layers: shapes, bias, forward, the read-only `weight` view."""

    scheme = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.weight_sample: torch.Tensor | None = None  # fingerprint_sample of the original weight (not saved)

    def fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        """What stands for this layer's original parameters in a base fingerprint."""
        return {"weight": self.weight_sample, **({} if self.bias is None else {"bias": self.bias})}

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) weight, computed now (one layer's worth of memory, not kept)."""
        return self.dequantize()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight in `dtype`. Abstract: Int8Linear, Int4Linear and NF4Linear each define it."""
        raise NotImplementedError(f"{type(self).__name__} must define dequantize()")

    def storage_bytes(self) -> int:
        """Bytes this layer keeps for its weight and bias (packed kernels' own forms included)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> x W^T (..., out)."""
        return F.linear(x, self.dequantize(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _QuantizedMatmul.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def fbgemm_available(device: torch.device) -> bool:
    """Whether PyTorch's fbgemm int8 kernels (x86 CPUs) can run the int8 layers on `device`."""
    return device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


class Int8Linear(QuantizedLinear):
    """Per-row symmetric int8: q = round(W / s), s = max|W_row| / 127; |W - q s| <= s / 2 elementwise.

    On x86 CPUs the weight is kept only in fbgemm's packed form and the forward is PyTorch's
    `quantized::linear_dynamic`: the activations are quantized to 8 bits per call (one scale per
    matrix) and the product runs in int8 with VNNI, 3-15x faster than fp32 here (bench/quant_kernels.py),
    at ~1% relative error instead of ~0.8% for the weight alone. Elsewhere: dequantize, fp32 GEMM."""

    scheme = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.weight_sample = fingerprint_sample(weight)
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (out,)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("scales", scales)
        self._packed = None
        if fbgemm_available(weight.device):
            zeros = torch.zeros(out_features, dtype=torch.long)
            with warnings.catch_warnings():  # PyTorch marks its quantized tensor types deprecated (still shipped)
                warnings.simplefilter("ignore")
                qt = torch._make_per_channel_quantized_tensor(q, scales.double(), zeros, 0)
                self._packed = torch.ops.quantized.linear_prepack(qt, None)  # the bias is added in fp32
            q = None
        self.register_buffer("_qweight", q)  # None when only the packed form is kept

    @property
    def qweight(self) -> torch.Tensor:
        """(out, in) int8 (unpacked on demand from fbgemm's form: one layer's worth, transient)."""
        if self._qweight is not None:
            return self._qweight
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def storage_bytes(self) -> int:
        packed = self.out_features * self.in_features if self._qweight is None else 0  # fbgemm's int8 copy
        return packed + super().storage_bytes()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(self.scales.device, dtype) * self.scales[:, None].to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            # fbgemm picks one activation scale per call from the whole matrix's min and max, so a row's
            # result would depend on the other rows of the batch (mixed batches, serving). Each row is
            # scaled to max |x| = 1 and an anchor row [1, -1, 0, ...] fixes the range at [-1, 1]: every
            # row gets the same grid (per-row 8-bit activations) whatever else is in the batch.
            flat = x.reshape(-1, self.in_features)
            amax = flat.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # (rows, 1)
            anchor = flat.new_zeros(1, self.in_features)
            anchor[0, 0], anchor[0, 1 % self.in_features] = 1.0, -1.0
            y = torch.ops.quantized.linear_dynamic(torch.cat([flat / amax, anchor]), self._packed)[:-1] * amax
            return y.view(*x.shape[:-1], self.out_features)
        return super().matmul(x)


class Int4Linear(QuantizedLinear):
    """Group-wise asymmetric int4 (groups of INT4_GROUP inputs): q = round((W - lo) / s), s = (hi - lo) / 15,
    so |W - (q s + lo)| <= s / 2 elementwise; two 4-bit values per byte (low nibble: even input column)."""

    scheme = "int4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = INT4_GROUP):
        out_features, in_features = weight.shape
        if in_features % group_size or group_size % 2:
            raise QuantizationError(f"int4 needs in_features ({in_features}) to be a multiple of the group size "
                                    f"({group_size}); use quantize=int8 for this model")
        super().__init__(in_features, out_features, bias)
        self.weight_sample = fingerprint_sample(weight)
        self.group_size = group_size
        g = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        lo = g.amin(dim=-1)
        scales = ((g.amax(dim=-1) - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)  # (out, groups)
        q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
        q = q.reshape(out_features, in_features)
        self.register_buffer("qweight", q[:, 0::2] | (q[:, 1::2] << 4))  # (out, in / 2) uint8
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", lo)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = torch.stack([self.qweight & 15, self.qweight >> 4], dim=-1)  # (out, in / 2, 2)
        q = q.reshape(self.out_features, -1, self.group_size).to(dtype)  # (out, groups, group)
        w = q * self.scales[..., None].to(dtype) + self.offsets[..., None].to(dtype)
        return w.reshape(self.out_features, self.in_features)


class NF4Linear(QuantizedLinear):
    """bitsandbytes' Linear4bit, NF4 with double quantization (QLoRA sec. 3: the per-block absmax
    constants quantized again to 8 bits), bf16 compute. CUDA only; unmeasured here (no GPU)."""

    scheme = "nf4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        check_scheme("nf4", weight.device)  # before the import: CPU code never needs bitsandbytes
        import bitsandbytes as bnb

        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.weight_sample = fingerprint_sample(weight)
        inner = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="cpu")
        inner.weight = bnb.nn.Params4bit(weight.detach().to("cpu", torch.float32), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
        self.inner = inner.to(weight.device)  # quantizes on the move to CUDA

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        import bitsandbytes as bnb

        w = self.inner.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)  # bitsandbytes' MatMul4Bit: its own backward w.r.t. the input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


LAYERS = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of nn.Linear or GPT-2's Conv1D (stored (in, out)); None for other modules."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":
        return module.weight.T
    return None


def quantize_model(model: nn.Module, scheme: str, *, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace, in place, every nn.Linear (and GPT-2 Conv1D) of `model` by its `scheme` quantized layer,
    one layer at a time (the fp32 weight of each is released once its quantized copy exists). A module
    is skipped when any dotted part of its name is in `skip` (default: the LM head, which is often tied
    to the input embeddings). Quantize the base BEFORE attaching adapters, or name the adapters' own
    parts in `skip` (e.g. ("lm_head", "lora_A", "lora_B")). Returns `model`."""
    check_scheme(scheme, next(model.parameters()).device)
    if scheme == "none":
        return model
    layer_cls = LAYERS[scheme]
    targets = [(name, module) for name, module in model.named_modules()
               if _linear_weight(module) is not None and not set(name.split(".")) & set(skip)]
    if not targets:
        raise QuantizationError(f"quantize={scheme}: this model has no linear layer to quantize outside {skip}")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            new = layer_cls(_linear_weight(module), module.bias)
        new.weight_sample = fingerprint_sample(module.weight)  # Conv1D: its own (in, out) layout
        setattr(parent, child, new)
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def quantization_of(model: nn.Module) -> str:
    """The scheme of a model's quantized layers ('none' when it has none)."""
    layers = quantized_layers(model)
    return layers[0][1].scheme if layers else "none"
