"""Pooling heads: token states [s, b, h] and a pool mask -> embeddings [b, d].

* `AttentionPooling(kind="latent")` is NV-Embed's latent-attention head (nvembed-format.md):
  Q from the token states, K/V from a trainable latent array, GEGLU feed-forward, both residuals,
  masked mean, L2 normalisation. Heads are split over tensor-parallel ranks: `to_q`, `to_kv` and
  the first feed-forward projection are column-parallel, `to_out` and the second projection
  row-parallel. The latents' K/V do not depend on the input: computed once per forward call,
  or once per training step inside `latent_kv_once_per_step`.
* `AttentionPooling(kind="self")` is the paper's self-attention ablation: the same block with
  K/V from the (padding-masked) token states instead of the latents.
* `MeanPooling` and `EOSPooling` have no parameters.

All heads pool with the pool mask (instruction tokens out) and attend with nothing but the
padding mask; only `kind="self"` mixes tokens at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import nn

from megatron_nvembed.core.config import PoolingConfig
from megatron_nvembed.utils.sharding import shard


def masked_mean(hidden_bsh: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where `pool_mask` is 1.

    Args:
        hidden_bsh: [b, s, h].
        pool_mask: [b, s], 1 for pooled tokens.

    Returns:
        [b, h]. A row with an empty pool mask gives zeros (not NaN).
    """
    m = pool_mask.to(hidden_bsh.dtype).unsqueeze(-1)  # [b, s, 1]
    total = (hidden_bsh * m).sum(dim=1)  # [b, h]
    count = m.sum(dim=1).clamp(min=1.0)  # [b, 1]
    return total / count


def segment_mean(
    tokens: torch.Tensor, text: torch.Tensor, n: int, pool: torch.Tensor
) -> torch.Tensor:
    """`masked_mean` for packed tokens: the mean of each text's pooled tokens.

    Args:
        tokens: [t, h] token states (THD: the texts' real tokens, one after another).
        text: [t] int64, the text each token belongs to (0..n-1).
        n: number of texts.
        pool: [t], 1 for pooled tokens.

    Returns:
        [n, h] in the tokens' dtype (summed in fp32). A text with an empty pool mask gives zeros.
    """
    w = pool.float().unsqueeze(-1)  # [t, 1]
    total = tokens.new_zeros(n, tokens.shape[-1], dtype=torch.float32)
    total = total.index_add(0, text, tokens.float() * w)
    count = w.new_zeros(n, 1).index_add(0, text, w).clamp(min=1.0)
    return (total / count).to(tokens.dtype)


def _finish(emb: torch.Tensor, normalize: bool) -> torch.Tensor:
    # Normalise in at least fp32: bf16 norms of 4096-wide vectors lose several digits (and a
    # float64 model keeps float64).
    if normalize:
        wide = torch.promote_types(emb.dtype, torch.float32)
        return F.normalize(emb.to(wide), p=2, dim=-1).to(emb.dtype)
    return emb


class MeanPooling(nn.Module):
    """Masked mean of the final token states."""

    token_wise = True
    """Pools packed (THD) tokens directly: see `forward_packed`."""

    def __init__(self, cfg: PoolingConfig):
        super().__init__()
        self.normalize = cfg.normalize

    def forward(self, hidden_sbh, attention_mask, pool_mask):  # noqa: ARG002 - same signature
        return _finish(masked_mean(hidden_sbh.transpose(0, 1), pool_mask), self.normalize)

    def forward_packed(self, hidden_t1h, text, ends, pool):  # noqa: ARG002 - same signature
        """Packed texts in the THD layout: hidden_t1h [t, 1, h]; text [t] (text of each token);
        ends [n] (index of each text's last token); pool [t]. Returns [n, h]."""
        return _finish(segment_mean(hidden_t1h[:, 0], text, ends.numel(), pool), self.normalize)


class EOSPooling(nn.Module):
    """State of the last real token (the EOS with right padding)."""

    token_wise = True

    def __init__(self, cfg: PoolingConfig):
        super().__init__()
        self.normalize = cfg.normalize

    def forward(self, hidden_sbh, attention_mask, pool_mask):  # noqa: ARG002
        last = attention_mask.long().sum(dim=1) - 1  # [b]
        batch = torch.arange(hidden_sbh.shape[1], device=hidden_sbh.device)
        return _finish(hidden_sbh[last.clamp(min=0), batch], self.normalize)  # [b, h]

    def forward_packed(self, hidden_t1h, text, ends, pool):  # noqa: ARG002 - same signature
        """See `MeanPooling.forward_packed`: each text's last token."""
        return _finish(hidden_t1h[ends, 0], self.normalize)


class AttentionPooling(MegatronModule):
    """Latent-attention (kind="latent") or self-attention (kind="self") pooling, TP-sharded.

    Parameter layout per TP rank (H heads of width dh, inner = H * dh, d model width):
    `to_kv` rows are [K rows of this rank's heads ; V rows of the same heads], and `ff_in` rows
    are [value half ; gate half] of this rank's slice of the 4d hidden units. Conversions to
    and from NV-Embed's layout live in `megatron_nvembed.conversion`.
    """

    def __init__(
        self,
        hidden_size: int,
        cfg: PoolingConfig,
        config: TransformerConfig,
        tp_group: torch.distributed.ProcessGroup | None,
        kind: str = "latent",
    ):
        super().__init__(config=config)
        if kind not in ("latent", "self"):
            raise ValueError(f"kind must be 'latent' or 'self', got {kind!r}")
        tp = 1 if tp_group is None else tp_group.size()
        self.kind = kind
        self.normalize = cfg.normalize
        self.head_dim = cfg.head_dim or hidden_size
        inner = cfg.num_heads * self.head_dim
        ff_inner = cfg.ff_mult * hidden_size
        self.heads_per_partition = divide(cfg.num_heads, tp)
        self.ff_per_partition = divide(ff_inner, tp)
        dtype = config.params_dtype
        init = config.init_method
        common = dict(config=config, init_method=init, tp_group=tp_group)

        if kind == "latent":
            self.latents = nn.Parameter(torch.empty(cfg.num_latents, hidden_size, dtype=dtype))
            with torch.no_grad():
                # NV-Embed initialises the latent array from a standard normal.
                self.latents.normal_(0.0, 1.0)
            self.norm_context = nn.LayerNorm(hidden_size, eps=cfg.layernorm_eps, dtype=dtype)
        self.norm = nn.LayerNorm(hidden_size, eps=cfg.layernorm_eps, dtype=dtype)
        self.to_q = tensor_parallel.ColumnParallelLinear(
            hidden_size, inner, bias=False, gather_output=False, **common
        )
        self.to_kv = tensor_parallel.ColumnParallelLinear(
            hidden_size, 2 * inner, bias=False, gather_output=False, **common
        )
        self.to_out = tensor_parallel.RowParallelLinear(
            inner, hidden_size, bias=False, input_is_parallel=True, skip_bias_add=False, **common
        )
        self.ff_norm = nn.LayerNorm(hidden_size, eps=cfg.layernorm_eps, dtype=dtype)
        self.ff_in = tensor_parallel.ColumnParallelLinear(
            hidden_size, 2 * ff_inner, bias=True, gather_output=False, **common
        )
        self.ff_out = tensor_parallel.RowParallelLinear(
            ff_inner, hidden_size, bias=True, input_is_parallel=True, skip_bias_add=False, **common
        )
        self._step_kv: _StepKV | None = None  # set by `latent_kv_once_per_step`
        self._init_pair_layouts(config, tp_group)
        if torch.cuda.is_available() and not self.to_q.weight.is_meta:  # meta: a conversion's plan
            self.to(torch.cuda.current_device())
        for p in self.parameters():
            # Replicated over TP ranks (megatron-core marks its sharded weights itself).
            if not hasattr(p, "tensor_model_parallel"):
                tensor_parallel.set_tensor_model_parallel_attributes(p, False, -1, 1)
                p.tensor_model_parallel = False

    @torch.no_grad()
    def _init_pair_layouts(self, config: TransformerConfig, tp_group) -> None:
        """Re-initialises `to_kv` and `ff_in` from one full weight cut in the [first_r ; second_r]
        layout, so a fresh head is the same function at every TP size (megatron-core's CPU
        initialisation cuts the full weight into contiguous rows, which for these two layouts
        would depend on the TP size)."""
        tp = 1 if tp_group is None else tp_group.size()
        rank = 0 if tp_group is None else tp_group.rank()
        for layer in (self.to_kv, self.ff_in):
            full = torch.empty(
                layer.weight.shape[0] * tp, layer.weight.shape[1], dtype=layer.weight.dtype
            )
            config.init_method(full)
            layer.weight.copy_(shard("pair", [full], rank, tp))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Distributed-checkpoint layout: the [first ; second] per-rank halves of `to_kv` and
        `ff_in` are saved as two separately sharded tensors (as megatron-core does for SwiGLU's
        `linear_fc1`), so checkpoints reshard to any TP size."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        singleton = (metadata or {}).get("singleton_local_shards", False)
        for key in (f"{prefix}to_kv.weight", f"{prefix}ff_in.weight", f"{prefix}ff_in.bias"):
            sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets, singleton)
        return sd

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [s, b, H_r*dh] -> [b, H_r, s, dh]
        s, b, _ = x.shape
        return x.view(s, b, self.heads_per_partition, self.head_dim).permute(1, 2, 0, 3)

    def _project_latents(self) -> torch.Tensor:
        """`to_kv(norm_context(latents))`: [r, 1, 2*H_r*dh], K columns then V columns."""
        ctx = self.norm_context(self.latents).unsqueeze(1)  # [r, 1, d]
        kv, _ = self.to_kv(ctx)  # [r, 1, 2*H_r*dh]
        return kv

    def latent_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the latent array, [1, H_r, r, dh] each; input-independent.

        Projected on every call, except with grad enabled inside `latent_kv_once_per_step`,
        where the step's one projection is reused through a leaf tensor."""
        if self._step_kv is not None and torch.is_grad_enabled():
            kv = self._step_kv.get(self._project_latents)
        else:
            kv = self._project_latents()
        k, v = kv.chunk(2, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    @property
    def token_wise(self) -> bool:
        """The latent head maps every token on its own until the mean (its keys are the
        latents), so it pools packed (THD) tokens directly; self-attention mixes a text's tokens
        and needs them unpacked."""
        return self.kind == "latent"

    def _token_states(
        self, hidden_sbh: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention + GEGLU block with both residuals: [s, b, d] -> [s, b, d] (before the
        mean). `attention_mask` [b, s] is used by kind="self" only."""
        s, b, d = hidden_sbh.shape
        q, _ = self.to_q(self.norm(hidden_sbh))  # [s, b, H_r*dh]
        q = self._split_heads(q)  # [b, H_r, s, dh]
        if self.kind == "latent":
            k, v = self.latent_kv()  # [1, H_r, r, dh]
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
            mask = None  # every token attends to every latent
        else:
            kv, _ = self.to_kv(self.norm(hidden_sbh))  # [s, b, 2*H_r*dh]
            k, v = (self._split_heads(t) for t in kv.chunk(2, dim=-1))
            mask = attention_mask.bool()[:, None, None, :]  # [b, 1, 1, s], True = attend
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [b, H_r, s, dh]
        o = o.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, H_r*dh]
        out, _ = self.to_out(o)  # [s, b, d], all-reduced over TP
        x1 = hidden_sbh + out
        ff, _ = self.ff_in(self.ff_norm(x1))  # [s, b, 2*ff_r]
        a, g = ff.chunk(2, dim=-1)
        ff_out, _ = self.ff_out(a * F.gelu(g))  # exact (erf) GELU
        return x1 + ff_out  # [s, b, d]

    def forward(
        self, hidden_sbh: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor
    ) -> torch.Tensor:
        """Args: hidden_sbh [s, b, d]; attention_mask, pool_mask [b, s]. Returns [b, d]."""
        x2 = self._token_states(hidden_sbh, attention_mask)
        return _finish(masked_mean(x2.transpose(0, 1), pool_mask), self.normalize)

    def forward_packed(
        self, hidden_t1h: torch.Tensor, text: torch.Tensor, ends: torch.Tensor, pool: torch.Tensor
    ) -> torch.Tensor:
        """Latent pooling of packed texts in the THD layout, padding never computed.

        Args: hidden_t1h [t, 1, d]; text [t] (text of each token); ends [n] (each text's last
        token); pool [t]. Returns [n, d]."""
        if not self.token_wise:
            raise ValueError("self-attention pooling needs the texts unpacked (unpack_hidden)")
        x2 = self._token_states(hidden_t1h, None)  # [t, 1, d]
        return _finish(segment_mean(x2[:, 0], text, ends.numel(), pool), self.normalize)


class _StepKV:
    """One step's latent K/V: the projection `kv` (with its graph) and a detached fp32 leaf copy
    that every forward call reads, so each micro-batch's backward stops at the leaf and
    accumulates into `leaf.grad` (fp32, like megatron-core's main grads)."""

    def __init__(self) -> None:
        self.kv: torch.Tensor | None = None  # [r, 1, 2*H_r*dh], parameter dtype, with graph
        self.leaf: torch.Tensor | None = None  # same shape, fp32, requires_grad

    def get(self, project) -> torch.Tensor:
        """The step's K/V [r, 1, 2*H_r*dh], projected (by `project()`) on first use."""
        if self.kv is None:
            self.kv = project()
            self.leaf = self.kv.detach().float().requires_grad_(True)
        return self.leaf.to(self.kv.dtype)

    def backward(self) -> None:
        """Sends the accumulated `leaf.grad` through the projection once (to the latents,
        `norm_context` and `to_kv`; `to_kv` all-reduces its input gradient over TP here), then
        forgets the step. Nothing to do if K/V were not computed, got no gradient, or come from
        frozen parameters."""
        kv, leaf = self.kv, self.leaf
        self.kv = self.leaf = None
        if kv is not None and kv.requires_grad and leaf.grad is not None:
            torch.autograd.backward(kv, leaf.grad.to(kv.dtype))


@contextlib.contextmanager
def latent_kv_once_per_step(model_chunks: Sequence[nn.Module]) -> Iterator[None]:
    """Within this context the latent-attention heads in `model_chunks` (possibly wrapped in
    megatron-core DDP / Float16Module) project their latent K/V once, not once per forward call.

    Grad-enabled forward calls share one projection through a detached leaf; the leaf's
    accumulated gradient goes back through the projection when the schedule calls
    `config.finalize_model_grads_func` (wrapped here so this happens before the data-parallel
    gradient reduction), or at the end of the context if no such function is set. Parameters
    get the same gradients as without the context. No-grad calls (GradCache's first pass,
    evaluation) project per call as usual. Meant to enclose one step's grad-enabled schedule.
    """
    from megatron.core.utils import get_model_config

    heads = [
        m
        for chunk in model_chunks
        for m in chunk.modules()
        if isinstance(m, AttentionPooling) and m.kind == "latent"
    ]
    if not heads:
        yield
        return
    states = [_StepKV() for _ in heads]

    def flush() -> None:
        for state in states:
            state.backward()

    configs = {id(c): c for c in (get_model_config(chunk) for chunk in model_chunks)}
    wrapped = {}
    for key, config in configs.items():
        original = config.finalize_model_grads_func
        if original is None:
            continue

        def finalize(*args, _original=original, **kwargs):
            flush()
            return _original(*args, **kwargs)

        wrapped[key] = original
        config.finalize_model_grads_func = finalize
    for head, state in zip(heads, states):
        head._step_kv = state
    try:
        yield
        flush()  # no-op when the finalize function already ran
    finally:
        for head in heads:
            head._step_kv = None
        for key, original in wrapped.items():
            configs[key].finalize_model_grads_func = original


def build_pooling(
    hidden_size: int,
    cfg: PoolingConfig,
    config: TransformerConfig,
    tp_group: torch.distributed.ProcessGroup | None,
) -> nn.Module:
    """The pooling head named by `cfg.type`.

    Raises:
        ValueError: unknown pooling type.
    """
    if cfg.type == "latent":
        return AttentionPooling(hidden_size, cfg, config, tp_group, kind="latent")
    if cfg.type == "self-attention":
        return AttentionPooling(hidden_size, cfg, config, tp_group, kind="self")
    if cfg.type == "mean":
        return MeanPooling(cfg)
    if cfg.type == "eos":
        return EOSPooling(cfg)
    raise ValueError(f"unknown pooling type {cfg.type!r}; choose latent, mean, eos, self-attention")
