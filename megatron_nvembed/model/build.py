"""Builds `NVEmbedModel` from the project's config: the TransformerConfig and the stage's model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_nvembed.core.config import EmbeddingModelConfig
from megatron_nvembed.core.cpu_support import cpu_mode


def transformer_config(
    cfg: EmbeddingModelConfig, *, params_dtype: torch.dtype | None = None
) -> TransformerConfig:
    """The megatron-core TransformerConfig for a Mistral/Llama/Qwen-style embedding backbone.

    Qwen2's Q/K/V biases are megatron-core's `add_qkv_bias` (no bias elsewhere); Qwen3's per-head
    Q/K RMSNorm is `qk_layernorm` (megatron-core normalises each head of the queries and keys over
    `kv_channels`, with `layernorm_epsilon`, before applying RoPE, as Qwen3 does); the layer spec
    supplies the norm modules (`specs.get_layer_spec`).
    """
    m, par = cfg.model, cfg.parallel
    dtype = params_dtype or (torch.bfloat16 if m.bf16 else torch.float32)
    on_cpu = cpu_mode()
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        sequence_parallel=par.sequence_parallel and par.tensor_model_parallel_size > 1,
        context_parallel_size=par.context_parallel_size,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        # Sliding windows are never set: megatron-core would turn them into a causal mask.
        window_size=None,
        # Embedding batches are padded per micro-batch, so pipeline stages exchange shapes.
        variable_seq_lengths=True,
        # Dense model: the MoE dispatcher is unused, but megatron-core rejects variable sequence
        # lengths together with its default (allgather) dispatcher.
        moe_token_dispatcher_type="alltoall",
        # The fused CUDA kernels below do not exist on CPU.
        masked_softmax_fusion=not on_cpu,
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # CPU initialisation creates each full weight from one seeded stream and then slices it,
        # so a model initialises identically at every TP size.
        use_cpu_initialization=True,
    )
    if m.recompute_granularity is not None:
        kwargs["recompute_granularity"] = m.recompute_granularity
        if m.recompute_granularity == "full":
            kwargs["recompute_method"] = "uniform"
            kwargs["recompute_num_layers"] = m.recompute_num_layers
    return TransformerConfig(**kwargs)


def build_model(
    cfg: EmbeddingModelConfig,
    pg_collection=None,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    params_dtype: torch.dtype | None = None,
):
    """Validates `cfg` and builds this rank's `NVEmbedModel` stage.

    Args:
        cfg: the embedding model config.
        pg_collection: megatron-core process groups; default: those of `parallel_state`.
        pre_process, post_process: stage role; default: from this rank's pipeline position.
        params_dtype: override of the parameter dtype (default from `cfg.model.bf16`).

    Returns:
        `NVEmbedModel` on the current device.

    Raises:
        ValueError: invalid configuration, or one that does not match the initialised groups.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_nvembed.model.nvembed_model import NVEmbedModel
    from megatron_nvembed.model.specs import resolve_backend

    cfg.validate()
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    tp, pp = pg_collection.tp.size(), pg_collection.pp.size()
    par = cfg.parallel
    if tp != par.tensor_model_parallel_size or pp != par.pipeline_model_parallel_size:
        raise ValueError(
            f"config asks for --tensor-model-parallel-size {par.tensor_model_parallel_size} and "
            f"--pipeline-model-parallel-size {par.pipeline_model_parallel_size}, but the "
            f"initialised groups have TP={tp}, PP={pp}"
        )
    cp = par.context_parallel_size
    if pg_collection.cp.size() != cp:
        raise ValueError(
            f"config asks for --context-parallel-size {cp}, but the initialised groups have "
            f"CP={pg_collection.cp.size()}"
        )
    if cp > 1 and resolve_backend(cfg.model) != "te":
        raise ValueError(
            f"--context-parallel-size {cp} needs the Transformer Engine backend, but this run's "
            f"attention backend is {resolve_backend(cfg.model)} (Transformer Engine on CUDA "
            "is not available)"
        )
    pp_rank = pg_collection.pp.rank()
    if pre_process is None:
        pre_process = pp_rank == 0
    if post_process is None:
        post_process = pp_rank == pp - 1
    model = NVEmbedModel(
        transformer_config(cfg, params_dtype=params_dtype),
        cfg,
        pg_collection,
        pre_process=pre_process,
        post_process=post_process,
    )
    if not cpu_mode():
        model.cuda(torch.cuda.current_device())
    return model
