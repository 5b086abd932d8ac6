"""A lean decode forward for the Llama family, exact to the transformers forward (to fp32
summation order: logits within 1e-4, tests/test_lean_decode.py).

A decode step of the demo model (30 layers, hidden 576) is a chain of GEMVs on small
activations: what costs beside the weights' bytes is the Python and dispatch overhead of
transformers' modules (norm, rotary, cache update, mask handling, one call per linear layer)
and the weight layout. This forward runs the same maths with:

- q/k/v and gate/up fused into one matmul each, every weight stored once as `[in, out]`
  (contiguous): `x @ W` with that layout is what torch's CPU GEMM (MKL) runs best here for
  4-16 rows, as fast for one (bench/decode_step.py `--layouts`: 0.75-0.89x `F.linear` on
  `[out, in]` at 4-16 rows; docs/benchmarks.md, "Decode step").
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
- ragged rows (`forward_rows`): each row a chunk of tokens at its own positions against its
  own slot, so that a joining prompt's chunk could share a decode step (not wired into the
  scheduler yet: prefill keeps transformers' forward and its per-row cache);
- rotary from a table of the model's own `rotary_emb` (so its rope type's maths), the LM head
  only on the rows sampled, no hooks and no per-layer lookups.

Anything this does not implement (other architectures, attention or MLP biases, sliding
windows, non-static rope types, Conv1D layers) keeps the transformers forward: `unsupported`
says why, once at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.blended_lora import BlendBatch, BlendContext, BlendedLoRALinear

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

    def __call__(self, x: torch.Tensor, batch: BlendBatch | None,
                 token_rows: torch.Tensor | None) -> torch.Tensor:
        y = torch.mm(x, self.weight)
        if batch is not None and self.members:
            self._add_lora(x, y, batch, token_rows)
        return y

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor, batch: BlendBatch,
                  token_rows: torch.Tensor | None) -> None:
        """y[t] += sum_u mix[row(t), u] * B_u (A_u x[t]) for every member, as ONE A-product
        and one B-product over the group (B block-diagonal: a member's ranks write its
        columns). `token_rows`: each token's row of the batch (None: one token per row)."""
        memo = batch.memo.get(self.key)
        if memo is None:
            memo = batch.memo[self.key] = self._gather(batch)
        a, bt, scale, dense = memo
        if a is not None:
            h = torch.mm(x, a)  # [tokens, R]
            h.mul_(scale if token_rows is None else scale.index_select(0, token_rows))
            y.addmm_(h, bt)
        if dense:
            mix = batch.mix if token_rows is None else batch.mix.index_select(0, token_rows)
        for u, delta, start, stop in dense:  # a non-linear merge's dense virtual slot
            rows = mix[:, u].nonzero().flatten()  # only the tokens that use it pay for it
            part = torch.mm(x.index_select(0, rows), delta.t())  # [n, out_m]
            part.mul_(mix.index_select(0, rows)[:, u, None])
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
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        groups = heads // kv_heads

        def attend(slot, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if hi == 1:  # a plain copy: cheaper than an indexed write
                slot.pool_k[0, :, width - 1] = k[0]
                slot.pool_v[0, :, width - 1] = v[0]
            else:
                slot.pool_k[rows, :, lens] = k
                slot.pool_v[rows, :, lens] = v
            # GQA packed as transformers' `pack_gqa`: each KV head's query heads as rows.
            out = F.scaled_dot_product_attention(
                q.reshape(hi, kv_heads, groups, dim), slot.pool_k[:hi, :, :width],
                slot.pool_v[:hi, :, :width], attn_mask=mask, scale=self.scaling)
            return out.reshape(hi, heads * dim)

        return self._run(input_ids, positions, pool_layers, blend, None, attend, sampled)

    @torch.inference_mode()
    def forward_rows(
        self,
        input_ids: torch.Tensor,
        pool_layers: list,
        rows: list[tuple[int, int, int]],
        blend: BlendBatch | None,
        sampled: list[int] | None = None,
    ) -> torch.Tensor:
        """Ragged rows: each row a chunk of tokens at its own positions, against its slot.

        Row r is `(slot, start, n)`: its n tokens (consecutive in `input_ids`, rows in
        order) sit at positions and columns start..start+n-1 of its slot, whose columns
        0..start-1 already hold its states; they attend to those and causally to each other,
        and their states are written into the slot. A prompt chunk and a decode token
        (n = 1) are the same thing here, so joining rows' prefill could share a decode step.
        The caller keeps the pool's bookkeeping (`lens`).

        Args:
            input_ids: [tokens] long, the rows' chunks one after another.
            blend: one mix per row (None: base for every row).
            sampled: tokens (indices into input_ids) whose logits are wanted (None: all).

        Returns: logits [len(sampled), vocab].
        """
        device = input_ids.device
        positions = torch.cat([torch.arange(start, start + n, device=device)
                               for _, start, n in rows])
        token_rows = torch.cat([torch.full((n,), r, dtype=torch.long, device=device)
                                for r, (_, _, n) in enumerate(rows)])
        spans, t0 = [], 0
        for slot_index, start, n in rows:
            mask = None
            if n > 1:  # causal within the chunk, the whole prefix before it
                cols = torch.arange(start + n, device=device)
                keep = cols[None, :] <= torch.arange(start, start + n, device=device)[:, None]
                mask = torch.zeros(n, start + n, dtype=self.embed.dtype, device=device
                                   ).masked_fill_(~keep, float("-inf"))
            spans.append((slot_index, start, n, t0, mask))
            t0 += n
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim

        def attend(slot, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = torch.empty(q.shape[0], heads * dim, dtype=q.dtype, device=q.device)
            for s, start, n, t, mask in spans:
                slot.pool_k[s, :, start : start + n] = k[t : t + n].transpose(0, 1)
                slot.pool_v[s, :, start : start + n] = v[t : t + n].transpose(0, 1)
                o = F.scaled_dot_product_attention(
                    q[t : t + n].transpose(0, 1)[None], slot.pool_k[s : s + 1, :, : start + n],
                    slot.pool_v[s : s + 1, :, : start + n], attn_mask=mask,
                    scale=self.scaling, enable_gqa=heads != kv_heads)  # [1, heads, n, dim]
                out[t : t + n] = o[0].transpose(0, 1).reshape(n, heads * dim)
            return out

        return self._run(input_ids, positions, pool_layers, blend, token_rows, attend,
                         sampled)

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, pool_layers: list,
             blend: BlendBatch | None, token_rows: torch.Tensor | None, attend,
             sampled: list[int] | None) -> torch.Tensor:
        """The layers over tokens [N, hidden]; `attend(pool layer, q [N, heads, dim],
        k, v [N, kv heads, dim])` writes the states and returns [N, heads * dim]."""
        n = input_ids.shape[0]
        if int(positions.max()) >= self._cos.shape[0]:
            self._grow_rope(int(positions.max()) + 1)
        cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]  # [N, 1, d]
        q_width, kv_width, half = self.q_width, self.kv_width, self.head_dim // 2
        qk_heads, inter = self.heads + self.kv_heads, self.intermediate
        x = F.embedding(input_ids, self.embed)  # [N, hidden]
        self.context.batch = blend
        try:
            for layer, slot in zip(self.layers, pool_layers, strict=True):
                h = _rms_norm(x, layer.norm1, layer.eps1)
                qkv = layer.qkv(h, blend, token_rows)  # [N, q + k + v]
                qk = qkv[:, : q_width + kv_width].view(n, qk_heads, self.head_dim)
                qk = qk * cos + qk.roll(half, dims=-1) * sin  # rotary on q and k at once
                v = qkv[:, q_width + kv_width :].view(n, self.kv_heads, self.head_dim)
                attn = attend(slot, qk[:, : self.heads], qk[:, self.heads :], v)
                x.add_(layer.o(attn, blend, token_rows))
                h = _rms_norm(x, layer.norm2, layer.eps2)
                gu = layer.gate_up(h, blend, token_rows)  # [N, 2 * intermediate]
                act = F.silu(gu[:, :inter])
                act.mul_(gu[:, inter:])
                x.add_(layer.down(act, blend, token_rows))
            every = sampled is None or sampled == list(range(n))
            if blend is not None and isinstance(self.head, BlendedLoRALinear) and (
                    self.head.A is not None or self.head.side):
                if token_rows is None:  # the head's rows are the batch's
                    logits = self.head(_rms_norm(x, self.norm, self.norm_eps))
                    return logits if every else logits[sampled]
                # Ragged rows: the sampled tokens as the rows of a batch of their own mixes.
                chosen = torch.arange(n) if sampled is None else torch.tensor(sampled)
                chosen = chosen.to(x.device)
                self.context.batch = BlendBatch(blend.used, blend.used_slots, blend.mix
                                                .index_select(0, token_rows[chosen]))
                return self.head(_rms_norm(x.index_select(0, chosen), self.norm,
                                           self.norm_eps))
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
