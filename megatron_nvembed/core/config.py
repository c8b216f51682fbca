"""Typed configuration for the embedding model, one small dataclass per concern.

Each component receives only its own slice (the backbone `ModelConfig`, the head `PoolingConfig`,
the parallel layout `ParallelConfig`, the query format `PromptConfig`). `validate()` checks fields
and cross-field constraints and raises `ValueError` naming the setting (as its command-line flag
where there is one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from megatron_nvembed.utils.options import check_options, option

MaskType = Literal["bidirectional", "causal"]
AttentionBackend = Literal["auto", "te", "sdpa", "local"]
PoolingType = Literal["latent", "mean", "eos", "self-attention"]

POOLING_TYPES = ("latent", "mean", "eos", "self-attention")
MASK_TYPES = ("bidirectional", "causal")
ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")


VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Rows allocated for the token embedding.

    Padded to a multiple of 128 (as Megatron-LM's `--make-vocab-size-divisible-by` default), so
    the global shape is the same at every TP size that divides it and checkpoints reshard; a TP
    size that does not divide it pads further (such checkpoints reshard only to compatible sizes).
    Extra rows are zero and never indexed; exports strip them.
    """
    rows = -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    return (
        rows if rows % tp == 0 else -(-rows // (VOCAB_PAD_MULTIPLE * tp)) * VOCAB_PAD_MULTIPLE * tp
    )


@dataclass
class ModelConfig:
    """The decoder backbone (Mistral/Llama/Qwen2/Qwen3 family: RoPE, RMSNorm, SwiGLU, GQA)."""

    vocab_size: int = 32000
    """Tokenizer vocabulary size (padded internally to a multiple of the TP size)."""
    hidden_size: int = 4096
    """Model width d."""
    ffn_hidden_size: int = 14336
    """SwiGLU inner width."""
    num_layers: int = 32
    """Decoder layers."""
    num_attention_heads: int = 32
    """Query heads."""
    num_query_groups: int = 8
    """Key/value heads (GQA); equal to num_attention_heads for plain multi-head attention."""
    kv_channels: int | None = None
    """Head width; None means hidden_size // num_attention_heads."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    max_position_embeddings: int = 32768
    """Positions the backbone was trained for (its config's `max_position_embeddings`; with
    Llama 3.x scaling, the scaled context): the longest `--seq-length` / `--max-length` taken."""
    rope_scaling_factor: float | None = None
    """Llama 3.x RoPE frequency scaling (transformers' `rope_type: llama3`): the factor that
    low frequencies are divided by; None means plain RoPE (the three settings below unused)."""
    rope_scaling_low_freq_factor: float = 1.0
    """Llama 3.x scaling: wavelengths above original_max_position_embeddings / this are scaled."""
    rope_scaling_high_freq_factor: float = 4.0
    """Llama 3.x scaling: wavelengths below original_max_position_embeddings / this are kept;
    those in between are interpolated."""
    rope_scaling_original_max_position_embeddings: int = 8192
    """Llama 3.x scaling: the context length the model was pre-trained with."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon (also of the per-head Q/K norms with `qk_layernorm`)."""
    add_qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2 / Qwen2.5); the output projection and
    the MLP stay bias-free."""
    qk_layernorm: bool = False
    """RMSNorm over each head's width on the queries and keys, before RoPE (Qwen3)."""
    mask_type: MaskType = "bidirectional"
    """`bidirectional` (NV-Embed: causal mask removed) or `causal` (ablations)."""
    attention_backend: AttentionBackend = option(
        "auto",
        "--attention-backend",
        "te (Transformer Engine), sdpa (torch scaled_dot_product_attention), local "
        "(megatron-core's reference attention) or auto (TE on CUDA when installed, else sdpa)",
        choices=ATTENTION_BACKENDS,
        runtime=True,
    )
    hidden_dropout: float = option(
        0.0, "--hidden-dropout", "dropout after attention and MLP", min=0.0, below=1.0, runtime=True
    )
    attention_dropout: float = option(
        0.0,
        "--attention-dropout",
        "dropout on the attention probabilities",
        min=0.0,
        below=1.0,
        runtime=True,
    )
    init_method_std: float = 0.02
    """Std of the normal initialisation (weights are normally loaded from a checkpoint)."""
    bf16: bool = option(
        False,
        "--bf16",
        "bfloat16 parameters and compute (GPU; CPU runs stay float32)",
        negative="--fp32",
        runtime=True,
    )
    recompute_granularity: Literal["full", "selective"] | None = option(
        None,
        "--recompute-granularity",
        "activation recompute: full or selective",
        choices=("full", "selective"),
        runtime=True,
    )
    recompute_num_layers: int = option(
        1,
        "--recompute-num-layers",
        "layers per recomputed chunk with --recompute-granularity full",
        min=1,
        runtime=True,
    )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


def _validate_rope_scaling(m: ModelConfig) -> None:
    """The Llama 3.x RoPE scaling settings; raises ValueError naming the field."""
    defaults = ModelConfig.__dataclass_fields__
    others = (
        "rope_scaling_low_freq_factor",
        "rope_scaling_high_freq_factor",
        "rope_scaling_original_max_position_embeddings",
    )
    if m.rope_scaling_factor is None:
        for name in others:
            if getattr(m, name) != defaults[name].default:
                raise ValueError(
                    f"{name} is set ({getattr(m, name)!r}) but rope_scaling_factor is None "
                    "(no RoPE scaling): set rope_scaling_factor too, or leave it out"
                )
        return
    for name in ("rope_scaling_factor", "rope_scaling_low_freq_factor"):
        value = getattr(m, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    high = m.rope_scaling_high_freq_factor
    if (
        isinstance(high, bool)
        or not isinstance(high, int | float)
        or not high > m.rope_scaling_low_freq_factor
    ):
        raise ValueError(
            f"rope_scaling_high_freq_factor must be a number > rope_scaling_low_freq_factor "
            f"({m.rope_scaling_low_freq_factor}), got {high!r}"
        )
    orig = m.rope_scaling_original_max_position_embeddings
    if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
        raise ValueError(
            f"rope_scaling_original_max_position_embeddings must be an integer >= 1, got {orig!r}"
        )


@dataclass
class PoolingConfig:
    """The pooling head that turns token states into one embedding per sequence."""

    type: PoolingType = "latent"
    """`latent` (NV-Embed), `mean`, `eos` (last token) or `self-attention` (paper's ablation)."""
    num_latents: int = 512
    """Latent array rows r (latent pooling)."""
    num_heads: int = 8
    """Attention heads of the head's attention (latent and self-attention pooling)."""
    head_dim: int | None = None
    """Width of each head; None means the model width (as NV-Embed: each head is d wide)."""
    ff_mult: int = 4
    """GEGLU feed-forward inner width as a multiple of d."""
    layernorm_eps: float = 1e-5
    """Epsilon of the head's LayerNorms."""
    normalize: bool = True
    """L2-normalise the output embedding."""


DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: "
"""NV-Embed's query prefix; `{instruction}` is the task definition."""
QWEN3_EMBEDDING_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery:"
"""Qwen3-Embedding's query prefix (no space after "Query:")."""


def check_query_template(template) -> str:
    """`template` if it is a string holding `{instruction}` exactly once and no other field.

    Raises:
        ValueError: naming `--query-template`.
    """
    import string

    if not isinstance(template, str):
        raise ValueError(f"--query-template must be a string, got {template!r}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"--query-template {template!r}: {err}") from None
    if fields != ["instruction"]:
        raise ValueError(
            f"--query-template {template!r} must hold the field {{instruction}} exactly once and "
            f"no other (found {fields}); write literal braces as {{{{ }}}}"
        )
    return template


@dataclass
class PromptConfig:
    """How a query is written for this model (saved with it, as sentence-transformers' prompts)."""

    query_template: str | None = option(
        None,
        "--query-template",
        "the model's query prefix, {instruction} replaced by the task definition (default: the "
        "checkpoint's; NV-Embed's 'Instruct: {instruction}\\nQuery: ' for a new model); saved with "
        "the model and written into exports' prompts",
    )
    """None until resolved: a run from a checkpoint keeps the checkpoint's template, a new model
    gets NV-Embed's (`DEFAULT_QUERY_TEMPLATE`); `validate()` and `from_dict()` resolve it, so a
    saved or validated config always holds a string."""

    def validate(self) -> PromptConfig:
        """Resolves None to NV-Embed's template and checks the template; returns self.

        Raises:
            ValueError: naming `--query-template`.
        """
        if self.query_template is None:
            self.query_template = DEFAULT_QUERY_TEMPLATE
        check_query_template(self.query_template)
        return self


@dataclass
class ParallelConfig:
    """Model-parallel layout (data parallel is whatever is left of the world size)."""

    tensor_model_parallel_size: int = option(
        1, "--tensor-model-parallel-size", "ranks splitting each layer", min=1, runtime=True
    )
    pipeline_model_parallel_size: int = option(
        1, "--pipeline-model-parallel-size", "pipeline stages", min=1, runtime=True
    )
    sequence_parallel: bool = option(
        False,
        "--sequence-parallel",
        "split the norm, dropout and residual activations along the sequence over the "
        "tensor-parallel group (about 1/TP of their memory); needs TP > 1",
        runtime=True,
    )
    context_parallel_size: int = option(
        1,
        "--context-parallel-size",
        "ranks splitting each sequence in the attention (Transformer Engine backend only)",
        min=1,
        runtime=True,
    )

    def validate(self) -> ParallelConfig:
        """Each size a positive integer; raises ValueError naming the flag.

        `--sequence-parallel` at TP=1 has nothing to split: as Megatron-LM, it is turned off
        with a warning."""
        check_options(self)
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            msg = "--sequence-parallel: nothing to split at --tensor-model-parallel-size 1; off"
            __import__("warnings").warn(msg, stacklevel=2)
            self.sequence_parallel = False
        return self


@dataclass
class EmbeddingModelConfig:
    """Everything that defines the embedding model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)

    def validate(self) -> EmbeddingModelConfig:
        """Checks every field and cross-field constraint.

        Returns:
            self, for chaining.

        Raises:
            ValueError: naming the offending setting.
        """
        m, p, par = self.model, self.pooling, self.parallel
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        for name, value in (
            ("vocab_size", m.vocab_size),
            ("hidden_size", m.hidden_size),
            ("ffn_hidden_size", m.ffn_hidden_size),
            ("num_layers", m.num_layers),
            ("num_attention_heads", m.num_attention_heads),
            ("num_query_groups", m.num_query_groups),
            ("max_position_embeddings", m.max_position_embeddings),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        par.validate()
        self.prompts.validate()
        check_options(m)
        if m.kv_channels is not None and (
            not isinstance(m.kv_channels, int)
            or isinstance(m.kv_channels, bool)
            or m.kv_channels < 1
        ):
            raise ValueError(
                f"kv_channels must be a positive integer or None, got {m.kv_channels!r}"
            )
        for name, value in (("add_qkv_bias", m.add_qkv_bias), ("qk_layernorm", m.qk_layernorm)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        _validate_rope_scaling(m)
        if m.mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {m.mask_type!r}")
        if p.type not in POOLING_TYPES:
            raise ValueError(f"pooling type must be one of {POOLING_TYPES}, got {p.type!r}")
        if m.num_attention_heads % m.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({m.num_attention_heads}) must be divisible by "
                f"num_query_groups ({m.num_query_groups})"
            )
        if m.num_attention_heads % tp:
            raise ValueError(
                f"num_attention_heads ({m.num_attention_heads}) must be divisible by "
                f"--tensor-model-parallel-size ({tp})"
            )
        if m.num_query_groups % tp:
            raise ValueError(
                f"num_query_groups ({m.num_query_groups}) must be divisible by "
                f"--tensor-model-parallel-size ({tp})"
            )
        if m.ffn_hidden_size % tp:
            raise ValueError(
                f"ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by "
                f"--tensor-model-parallel-size ({tp})"
            )
        cp = par.context_parallel_size
        if cp > 1 and m.attention_backend in ("sdpa", "local"):
            raise ValueError(
                f"--context-parallel-size {cp} needs the Transformer Engine backend "
                f"(--attention-backend te); --attention-backend is {m.attention_backend}"
            )
        if m.num_layers % pp:
            raise ValueError(
                f"num_layers ({m.num_layers}) must be divisible by "
                f"--pipeline-model-parallel-size ({pp})"
            )
        if p.type in ("latent", "self-attention"):
            if p.num_heads < 1 or p.num_heads % tp:
                raise ValueError(
                    f"pooling num_heads ({p.num_heads}) must be >= 1 and divisible by "
                    f"--tensor-model-parallel-size ({tp})"
                )
            if (p.ff_mult * m.hidden_size) % tp:
                raise ValueError(
                    f"pooling ff_mult x hidden_size ({p.ff_mult * m.hidden_size}) must be "
                    f"divisible by --tensor-model-parallel-size ({tp})"
                )
        if p.type == "latent" and p.num_latents < 1:
            raise ValueError(f"pooling num_latents must be >= 1, got {p.num_latents}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EmbeddingModelConfig:
        """Builds a config from `to_dict()` output; unknown keys raise ValueError naming them."""
        sections = {
            "model": ModelConfig,
            "pooling": PoolingConfig,
            "parallel": ParallelConfig,
            "prompts": PromptConfig,
        }
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"unknown config section(s): {sorted(unknown)}")
        kwargs = {}
        for key, klass in sections.items():
            values = dict(d.get(key, {}))
            bad = set(values) - set(klass.__dataclass_fields__)
            if bad:
                raise ValueError(f"unknown key(s) in config section {key!r}: {sorted(bad)}")
            kwargs[key] = klass(**values)
        cfg = cls(**kwargs)
        cfg.prompts.validate()  # a config without a template (or an old one) reads as NV-Embed's
        return cfg


@dataclass(frozen=True)
class Matryoshka:
    """Prefix widths and their weights (`--matryoshka-dims`, `--matryoshka-weights`)."""

    dims: tuple[int, ...]
    """Prefix widths, each in [1, embedding width]; distinct."""
    weights: tuple[float, ...] = ()
    """One weight per width, finite and > 0 (empty: 1.0 each)."""

    def validate(self, width: int | None = None) -> Matryoshka:
        """Checks the widths (against the embedding `width` when given) and weights; returns
        self, with the default weights filled in.

        Raises:
            ValueError: naming --matryoshka-dims or --matryoshka-weights.
        """
        dims = tuple(self.dims)
        if not dims:
            raise ValueError("--matryoshka-dims needs at least one width")
        for k in dims:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"--matryoshka-dims: widths must be integers >= 1, got {k!r}")
            if width is not None and k > width:
                raise ValueError(
                    f"--matryoshka-dims: width {k} exceeds the embedding width {width}"
                )
        if len(set(dims)) != len(dims):
            raise ValueError(f"--matryoshka-dims: widths must be distinct, got {list(dims)}")
        weights = tuple(self.weights) or (1.0,) * len(dims)
        if len(weights) != len(dims):
            raise ValueError(
                f"--matryoshka-weights: {len(weights)} weight(s) for {len(dims)} width(s) in "
                "--matryoshka-dims; give one per width"
            )
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, int | float):
                raise ValueError(f"--matryoshka-weights: weights must be numbers, got {w!r}")
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"--matryoshka-weights: weights must be finite and > 0, got {w}")
        return Matryoshka(dims, tuple(float(w) for w in weights))

    def terms(self) -> list[tuple[int, float]]:
        """(width, weight) of every term of the loss."""
        weights = self.weights or (1.0,) * len(self.dims)
        return list(zip(self.dims, weights))
