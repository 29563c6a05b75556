"""Vision self-attention that exports without N x N buffers: onnxruntime's fused `MultiHeadAttention`.

Written as matmul-softmax-matmul, the attention of one image of N patches holds (heads, N, N) float scores,
and with several frames in one run an (N, N) block mask too: quadratic in the patches, gigabytes at full
resolution. onnxruntime's contrib `com.microsoft::MultiHeadAttention` computes the same softmax without
keeping the scores: on CPU (fp32, no mask, no bias) it runs MLAS flash attention in L2-sized tiles, on
CUDA its fused kernels, so memory grows linearly with the patches.

A mask would send the CPU kernel back to full score matrices, so the fused op is taken only when all
patches of the run belong to one frame, which is what the ONNX runtime sends (one vision run per image).
Several frames in one run (images packed together, a video's frames) take the masked plain-op path, whose
block mask is (N, N). The choice is an ONNX `If` on the frame ids: one graph serves both.

TensorRT's ONNX parser knows no contrib ops: `export tensorrt` lowers the op back to plain ops
(export/tensorrt/lower.py), which TensorRT fuses into its own attention kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.onnx import register_custom_op_symbolic, symbolic_helper

CONTRIB_DOMAIN = "com.microsoft"
FUSED_OP = "MultiHeadAttention"


@torch.library.custom_op("sparc::fused_attention", mutates_args=())
def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    """Unmasked attention in MultiHeadAttention's layout: (1, N, heads * d) each -> (1, N, heads * d).

    In torch (what the tracer runs) it is SDPA; in the ONNX graph, the contrib op (`_fused_symbolic`).
    """
    n = q.shape[1]
    q, k, v = (t.reshape(1, n, num_heads, -1).transpose(1, 2) for t in (q, k, v))  # (1, h, N, d)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(1, n, -1)


def _fused_symbolic(g, q, k, v, num_heads, scale):  # the TorchScript exporter's graph context and values
    return g.op(
        f"{CONTRIB_DOMAIN}::{FUSED_OP}",
        q,
        k,
        v,
        num_heads_i=symbolic_helper._get_const(num_heads, "i", "num_heads"),
        scale_f=symbolic_helper._get_const(scale, "f", "scale"),
    ).setType(q.type())


register_custom_op_symbolic("sparc::fused_attention", _fused_symbolic, 1)


# Scripted while tracing, so that the branch on the frame ids stays in the graph as an ONNX `If`.
@torch.jit.script_if_tracing
def frame_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_ids: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    """Self-attention of N patches that attend only within their frame: (N, h, d) each -> (N, h * d)."""
    n = q.shape[0]
    if bool(frame_ids.min() == frame_ids.max()):  # one frame: no mask at all
        q, k, v = q.reshape(1, n, -1), k.reshape(1, n, -1), v.reshape(1, n, -1)
        return torch.ops.sparc.fused_attention(q, k, v, num_heads, scale)[0]
    same_frame = frame_ids[:, None] == frame_ids[None, :]  # (N, N): the block-diagonal mask
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (h, N, d)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # (h, N, N)
    scores = scores.masked_fill(~same_frame, float("-inf"))  # a row always keeps its own frame
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # fp16 graphs: the softmax in fp32
    return torch.matmul(weights, v).transpose(0, 1).reshape(n, -1)
