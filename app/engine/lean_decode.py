"""A lean decode forward for the Llama family, exact to the transformers forward.

A decode step of the demo model (30 layers, hidden 576) is a chain of GEMVs on small
activations: what costs beside the weights' bytes is the Python and dispatch overhead of
transformers' modules (norm, rotary, cache update, mask handling, one call per linear layer)
and the weight layout. This forward runs the same maths with:

- q/k/v and gate/up fused into one matmul each, every weight stored once as `[in, out]`
  (contiguous): `x @ W` with that layout is what torch's CPU GEMM runs best for 1-16 rows
  here (bench/decode_step.py `--layouts`; ~2x faster than `F.linear` on `[out, in]` at 8 rows).
  The model's own `nn.Linear` weights become views (`W.t()`) into the fused tensors, so
  memory is not doubled and the transformers forward (prefill, other tools) still runs on
  them;
- each fused group's LoRA A-products as one matmul: the used slots' A factors of every
  member concatenated, their B factors block-diagonal, gathered once per batch (`BlendBatch.
  memo`) and reused by every decode step while the batch is unchanged; per-row weights as
  today (Eq. 9 in activation space, `blended_lora.py`);
- the new token's keys and values written straight into the KV pool's slot, attention by SDPA
  over each row's valid prefix (rows are left-aligned in their slots; GQA packed like
  transformers' `pack_gqa`: one query row per grouped head, no `repeat_kv`);
- rotary from a table of the model's own `rotary_emb` (so its rope type's maths), the LM head
  only on the rows sampled, no hooks and no per-layer lookups.

Anything this does not implement (other architectures, attention or MLP biases, sliding
windows, non-static rope types, Conv1D layers) keeps the transformers forward: `unsupported`
says why, once at load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.blended_lora import BlendBatch, BlendContext, BlendedLoRALinear

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM",)
_STATIC_ROPE = ("default", "linear", "llama3")  # position-only tables (no length-dependent)
_ROPE_CHUNK = 4096  # rotary table rows computed at a time (grown on demand)


def unsupported(model: nn.Module) -> str | None:
    """Why the lean forward cannot run `model` exactly, or None when it can."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        return f"architecture {name} (lean: {', '.join(ARCHITECTURES)})"
    config = model.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention or MLP biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _STATIC_ROPE:
        return f"rope type {rope_type}"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                       mlp.up_proj, mlp.down_proj):
            base = module.base if isinstance(module, BlendedLoRALinear) else module
            if type(base) is not nn.Linear or base.bias is not None:
                return f"a projection of type {type(base).__name__} or with a bias"
    return None


class _Group:
    """One fused projection: the base weight `[in, out]` and the blended layers it holds,
    each with its columns `[start, stop)` of the output."""

    def __init__(self, modules: list[nn.Module]) -> None:
        bases = [m.base if isinstance(m, BlendedLoRALinear) else m for m in modules]
        weight = torch.cat([b.weight.detach().t() for b in bases], dim=1).contiguous()
        self.weight = weight
        self.members: list[tuple[BlendedLoRALinear, int, int]] = []
        start = 0
        for module, base in zip(modules, bases, strict=True):
            stop = start + base.out_features
            # The module keeps working for the transformers forward, on a view of the fused
            # weight: no second copy.
            base.weight = nn.Parameter(weight[:, start:stop].t(), requires_grad=False)
            if isinstance(module, BlendedLoRALinear):
                self.members.append((module, start, stop))
            start = stop
        self.out_features = start
        self.key = ("lean", id(self))

    def __call__(self, x: torch.Tensor, batch: BlendBatch | None) -> torch.Tensor:
        y = torch.mm(x, self.weight)
        if batch is not None and self.members:
            self._add_lora(x, y, batch)
        return y

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor, batch: BlendBatch) -> None:
        """y[t] += sum_u mix[t, u] * B_u (A_u x[t]) for every member, as ONE A-product and
        one B-product over the group (B block-diagonal: a member's ranks write its columns)."""
        memo = batch.memo.get(self.key)
        if memo is None:
            memo = batch.memo[self.key] = self._gather(batch)
        a, bt, scale, dense = memo
        if a is not None:
            h = torch.mm(x, a)  # [tokens, R]
            h.mul_(scale)
            y.addmm_(h, bt)
        for u, delta, start, stop in dense:  # a non-linear merge's dense virtual slot
            rows = batch.mix[:, u].nonzero().flatten()
            part = torch.mm(x.index_select(0, rows), delta.t())  # [n, out_m]
            part.mul_(batch.mix.index_select(0, rows)[:, u, None])
            y[:, start:stop].index_add_(0, rows, part)

    def _gather(self, batch: BlendBatch) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                 torch.Tensor | None, list]:
        """The group's factors for the used slots: A^T [in, R], block-diagonal B^T [R, out]
        and the per-row weight of each of the R hidden units [rows, R]; dense virtual slots
        apart."""
        a_parts, b_parts, scales, dense = [], [], [], []
        for layer, start, stop in self.members:
            if layer.A is not None and layer.Bt is not None:
                rank = layer.A.shape[1]
                used = batch.used.shape[0]
                a_parts.append(layer.A.index_select(0, batch.used).reshape(used * rank, -1))
                b_parts.append((layer.Bt.index_select(0, batch.used).reshape(used * rank, -1),
                                start, stop))
                scales.append(batch.mix.repeat_interleave(rank, dim=1))
            for u, slot in enumerate(batch.used_slots):
                part = layer.side.get(slot)
                if part is None:
                    continue
                if isinstance(part, tuple):  # factors (A [r, in], Bt [r, out]) of any rank
                    a_parts.append(part[0])
                    b_parts.append((part[1], start, stop))
                    scales.append(batch.mix[:, u : u + 1].expand(-1, part[0].shape[0]))
                else:
                    dense.append((u, part, start, stop))
        if not a_parts:
            return None, None, None, dense
        a = torch.cat(a_parts, dim=0).t().contiguous()
        ranks = a.shape[1]
        bt = a.new_zeros(ranks, self.out_features)
        r0 = 0
        for part, start, stop in b_parts:
            bt[r0 : r0 + part.shape[0], start:stop] = part
            r0 += part.shape[0]
        return a, bt, torch.cat(scales, dim=1).contiguous(), dense


@dataclass
class _Layer:
    norm1: torch.Tensor
    qkv: _Group
    o: _Group
    norm2: torch.Tensor
    gate_up: _Group
    down: _Group
    eps1: float
    eps2: float


class LeanDecoder:
    """Decode steps of a Llama-family model over the KV pool's slots (see the module doc).

    Build it once, after the blended layers are installed (`install_blended_layers`): it
    fuses the base weights in place (the model's modules then hold views of them).
    """

    def __init__(self, model: nn.Module, context: BlendContext) -> None:
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"the lean decode forward does not support {reason}")
        config = model.config
        self.context = context
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                layer.input_layernorm.weight.detach(),
                _Group([attn.q_proj, attn.k_proj, attn.v_proj]), _Group([attn.o_proj]),
                layer.post_attention_layernorm.weight.detach(),
                _Group([mlp.gate_proj, mlp.up_proj]), _Group([mlp.down_proj]),
                float(layer.input_layernorm.variance_epsilon),
                float(layer.post_attention_layernorm.variance_epsilon),
            ))
        self.norm = inner.norm.weight.detach()
        self.norm_eps = float(inner.norm.variance_epsilon)
        self.head = model.lm_head
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None)
                            or config.hidden_size // config.num_attention_heads)
        self.q_width = self.heads * self.head_dim
        self.kv_width = self.kv_heads * self.head_dim
        self.intermediate = int(config.intermediate_size)
        self.scaling = self.head_dim ** -0.5
        self._rotary = inner.rotary_emb
        self._cos = self._sin = torch.empty(0, self.head_dim)
        self._grow_rope(min(_ROPE_CHUNK, int(getattr(config, "max_position_embeddings", 2048))))

    @torch.inference_mode()
    def _grow_rope(self, positions: int) -> None:
        """cos and sin for positions 0..n-1, from the model's own rotary module (its rope
        type's maths, bit for bit); `sin` is stored signed for `rotate_half` as one roll:
        rotate_half(x) * sin == roll(x, d/2) * [-sin_1, sin_2]."""
        n = max(positions, 2 * self._cos.shape[0])
        ids = torch.arange(n, device=self.embed.device)[None]
        cos, sin = self._rotary(self.embed[:1][None], ids)
        half = self.head_dim // 2
        self._cos = cos[0].contiguous()
        self._sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).contiguous()

    @torch.inference_mode()
    def decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        pool_layers: list,
        lens: torch.Tensor,
        blend: BlendBatch | None,
        sampled: list[int] | None = None,
    ) -> torch.Tensor:
        """One token for each of the slots `0..hi-1` (hi = len(input_ids)).

        Args:
            input_ids, positions: [hi] long, each slot's input token and its position.
            pool_layers: the KV pool's layers (`SlotLayer`: `pool_k`, `pool_v` [slots, kv
                heads, tokens, dim]); the new token's states go to column `lens[row]`.
            lens: [hi] long, tokens already in each slot; row b attends to columns
                0..lens[b] (a free slot in between: to its column 0, its output ignored).
            blend: the rows' adapter mix (None: base for every row).
            sampled: rows whose logits are wanted (None: all).

        Returns: logits [len(sampled), vocab].
        """
        hi = input_ids.shape[0]
        width = int(lens.max()) + 1
        rows = torch.arange(hi, device=lens.device)
        # Row b attends to its columns 0..lens[b]; one row alone sees every column. An
        # additive mask, built once per step (SDPA would convert a boolean one per layer).
        mask = None
        if hi > 1:
            hidden = torch.arange(width, device=lens.device)[None, :] > lens[:, None]
            mask = torch.zeros(hi, 1, 1, width, dtype=self.embed.dtype, device=lens.device
                               ).masked_fill_(hidden[:, None, None, :], float("-inf"))
        if positions.max() >= self._cos.shape[0]:
            self._grow_rope(int(positions.max()) + 1)
        cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]  # [hi, 1, d]
        q_width, kv_width, half = self.q_width, self.kv_width, self.head_dim // 2
        qk_heads, groups = self.heads + self.kv_heads, self.heads // self.kv_heads
        inter = self.intermediate
        x = F.embedding(input_ids, self.embed)  # [hi, hidden]
        self.context.batch = blend
        try:
            for layer, slot in zip(self.layers, pool_layers, strict=True):
                h = _rms_norm(x, layer.norm1, layer.eps1)
                qkv = layer.qkv(h, blend)  # [hi, q + k + v]
                qk = qkv[:, : q_width + kv_width].view(hi, qk_heads, self.head_dim)
                qk = qk * cos + qk.roll(half, dims=-1) * sin  # rotary on q and k at once
                k = qk[:, self.heads :]
                v = qkv[:, q_width + kv_width :].view(hi, self.kv_heads, self.head_dim)
                if hi == 1:  # a plain copy: cheaper than an indexed write
                    slot.pool_k[0, :, width - 1] = k[0]
                    slot.pool_v[0, :, width - 1] = v[0]
                else:
                    slot.pool_k[rows, :, lens] = k
                    slot.pool_v[rows, :, lens] = v
                q = qk[:, : self.heads].reshape(hi, self.kv_heads, groups, self.head_dim)
                attn = F.scaled_dot_product_attention(
                    q, slot.pool_k[:hi, :, :width], slot.pool_v[:hi, :, :width],
                    attn_mask=mask, scale=self.scaling)  # [hi, kv heads, groups, d]
                x.add_(layer.o(attn.reshape(hi, q_width), blend))
                h = _rms_norm(x, layer.norm2, layer.eps2)
                gu = layer.gate_up(h, blend)  # [hi, 2 * intermediate]
                act = F.silu(gu[:, :inter])
                act.mul_(gu[:, inter:])
                x.add_(layer.down(act, blend))
            every = sampled is None or sampled == list(range(hi))
            if isinstance(self.head, BlendedLoRALinear) and (self.head.A is not None
                                                             or self.head.side):
                logits = self.head(_rms_norm(x, self.norm, self.norm_eps))  # rows = batch
                return logits if every else logits[sampled]
            if not every:  # the LM head on the sampled rows only
                x = x[sampled]
            return F.linear(_rms_norm(x, self.norm, self.norm_eps), _base(self.head).weight)
        finally:
            self.context.batch = None


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, BlendedLoRALinear) else module


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's maths in its order (in fp32; `.float()` of fp32 is no copy)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
