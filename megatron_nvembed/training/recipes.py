"""Training recipes: functions returning a `TrainingConfig`; flags override any field.

`nvembed_mistral_7b_stage1` / `nvembed_mistral_7b_stage2` carry the NV-Embed paper's Table 5
settings: global batch 128 queries, 7 hard negatives, Adam with weight decay 0.03, 500 linear
warm-up steps then linear decay, LoRA rank 16 / alpha 32 / dropout 0.1, latent pooling with 512
latents and 8 heads, bf16, texts cut at 512 tokens, right padding; stage 1 lr 2e-5 for 20k steps
with in-batch negatives, stage 2 lr 1.5e-5 for 18k steps without them. Stage 2 starts from the
stage-1 weights (`--pretrained-checkpoint STAGE1_SAVE`: adapters are merged into the base, new
adapters are trained) with a different `--train-data` blend.

`nvembed_llama3_8b_stage1` / `_stage2`: the same two stages and Table 5 settings on a Llama 3.1 8B
backbone (grouped-query attention, RoPE theta 500000 with the llama3 frequency scaling), the
shape of its public config.json. As for every recipe, a run from `--pretrained-checkpoint` takes
the architecture from that checkpoint (`import-hf` of the Llama folder); the recipe's shape is
what `--help --recipe` shows and what a run from scratch builds.

`qwen3_embedding_8b`: fine-tuning a released Qwen3-Embedding model (or a Qwen3 backbone) the way
it was built: causal attention, last-token (`eos`) pooling of the `<|endoftext|>` its tokenizer
appends, L2-normalised, Qwen3-Embedding's query prefix `"Instruct: {instruction}\nQuery:"`, and
the query-query and document-document terms beside query-document in the InfoNCE denominator;
LoRA rank 16 / alpha 32, lr 1e-5 for 2000 steps (100 warm-up, linear decay), temperature 0.05
(sentence-transformers' MultipleNegativesRankingLoss default scale 20), 7 hard negatives, global
batch 128, texts cut at 512 tokens. These are fine-tuning settings of this project, not the values
Qwen3-Embedding was trained with. The shape is Qwen3-8B's public config.json (Q/K RMSNorm, head
width 128); import the checkpoint with `import-hf` (a sentence-transformers folder such as
Qwen3-Embedding's gives the eos head, causal mask and query template by itself; a base Qwen3 needs
`--pooling eos --mask-type causal`).

`nvembed_mistral_7b_long`: a long-document stage after stage 1 (8192-token packed rows, TP=2 with
sequence parallelism, full recompute; see its docstring).

`tiny` / `tiny_stage2` run on a laptop CPU in seconds (the quickstart and the tests).
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_nvembed.core.config import (
    QWEN3_EMBEDDING_QUERY_TEMPLATE,
    EmbeddingModelConfig,
    ModelConfig,
    PoolingConfig,
    PromptConfig,
)
from megatron_nvembed.data.config import DataConfig
from megatron_nvembed.loss.config import ContrastiveLossConfig
from megatron_nvembed.training.config import (
    CheckpointConfig,
    LoggingConfig,
    LoRAConfig,
    OptimizerConfig,
    TrainingConfig,
)


def _mistral_7b() -> EmbeddingModelConfig:
    return EmbeddingModelConfig(
        model=ModelConfig(
            vocab_size=32000,
            hidden_size=4096,
            ffn_hidden_size=14336,
            num_layers=32,
            num_attention_heads=32,
            num_query_groups=8,
            rotary_base=10000.0,
            norm_epsilon=1e-5,
            mask_type="bidirectional",
            bf16=True,
        ),
        pooling=PoolingConfig(type="latent", num_latents=512, num_heads=8, head_dim=None),
    )


def _llama3_8b() -> EmbeddingModelConfig:
    """The Mistral-7B recipe's model with Llama 3.1 8B's vocabulary and RoPE (same widths, layers
    and heads)."""
    cfg = _mistral_7b()
    m = cfg.model
    m.vocab_size, m.rotary_base, m.rope_scaling_factor = 128256, 500000.0, 8.0
    m.rope_scaling_low_freq_factor, m.rope_scaling_high_freq_factor = 1.0, 4.0
    m.rope_scaling_original_max_position_embeddings = 8192
    m.max_position_embeddings = 131072
    return cfg


def _qwen3_8b_embedding() -> EmbeddingModelConfig:
    """Qwen3-8B's shape (Qwen3-Embedding-8B's backbone), causal, eos pooling, Qwen3-Embedding's
    query template."""
    return EmbeddingModelConfig(
        model=ModelConfig(
            vocab_size=151936,
            hidden_size=4096,
            ffn_hidden_size=12288,
            num_layers=36,
            num_attention_heads=32,
            num_query_groups=8,
            kv_channels=128,
            rotary_base=1000000.0,
            norm_epsilon=1e-6,
            qk_layernorm=True,
            max_position_embeddings=40960,
            mask_type="causal",
            bf16=True,
        ),
        pooling=PoolingConfig(type="eos", normalize=True),
        prompts=PromptConfig(query_template=QWEN3_EMBEDDING_QUERY_TEMPLATE),
    )


def nvembed_mistral_7b_stage1(model: EmbeddingModelConfig | None = None) -> TrainingConfig:
    """NV-Embed stage 1 (Table 5): retrieval data, in-batch + 7 mined hard negatives."""
    return TrainingConfig(
        recipe="nvembed_mistral_7b_stage1",
        stage=1,
        grad_cache=True,
        model=model or _mistral_7b(),
        lora=LoRAConfig(rank=16, alpha=32.0, dropout=0.1),
        data=DataConfig(num_negatives=7, seq_length=512, micro_batch_size=4, global_batch_size=128),
        loss=ContrastiveLossConfig(temperature=0.02, in_batch_negatives=True),
        optimizer=OptimizerConfig(
            train_iters=20000,
            lr=2e-5,
            min_lr=0.0,
            lr_warmup_iters=500,
            lr_decay_style="linear",
            weight_decay=0.03,
            clip_grad=1.0,
        ),
        checkpoint=CheckpointConfig(save_interval=1000),
        logging=LoggingConfig(log_interval=10),
    )


def _stage2(cfg: TrainingConfig, name: str) -> TrainingConfig:
    """Stage 2 of a recipe: the same settings with in-batch negatives off."""
    cfg.recipe, cfg.stage, cfg.loss.in_batch_negatives = name, 2, False
    return cfg


def nvembed_mistral_7b_stage2() -> TrainingConfig:
    """NV-Embed stage 2 (Table 5): retrieval + classification + clustering + STS blend, no
    in-batch negatives, from the stage-1 weights."""
    cfg = _stage2(nvembed_mistral_7b_stage1(), "nvembed_mistral_7b_stage2")
    cfg.optimizer.train_iters, cfg.optimizer.lr = 18000, 1.5e-5
    return cfg


def nvembed_mistral_7b_long() -> TrainingConfig:
    """A long-document stage on top of NV-Embed stage 1 (this project's settings, not the
    paper's): from the stage-1 weights (`--pretrained-checkpoint`), texts up to 8192 tokens
    packed into 8192-token rows, TP=2 with sequence parallelism, full activation recompute (one
    layer per chunk), one micro-batch row per forward with GradCache, global batch 32 queries
    with 3 hard negatives, lr 1e-5 for 1000 steps (50 warm-up). docs/training.md, "Long inputs",
    has its memory."""
    cfg = nvembed_mistral_7b_stage1()
    cfg.recipe = "nvembed_mistral_7b_long"
    d, m, par = cfg.data, cfg.model.model, cfg.model.parallel
    d.seq_length, d.pack_sequences, d.num_negatives = 8192, True, 3
    d.micro_batch_size, d.global_batch_size = 1, 32
    par.tensor_model_parallel_size, par.sequence_parallel = 2, True
    m.recompute_granularity, m.recompute_num_layers = "full", 1
    opt = cfg.optimizer
    opt.train_iters, opt.lr, opt.lr_warmup_iters = 1000, 1e-5, 50
    cfg.checkpoint.save_interval = 200
    return cfg


def nvembed_llama3_8b_stage1() -> TrainingConfig:
    """NV-Embed stage 1 (Table 5) on Llama 3.1 8B."""
    cfg = nvembed_mistral_7b_stage1(_llama3_8b())
    cfg.recipe = "nvembed_llama3_8b_stage1"
    return cfg


def nvembed_llama3_8b_stage2() -> TrainingConfig:
    """NV-Embed stage 2 (Table 5) on Llama 3.1 8B, from the stage-1 weights."""
    cfg = nvembed_mistral_7b_stage2()
    cfg.recipe, cfg.model = "nvembed_llama3_8b_stage2", _llama3_8b()
    return cfg


def qwen3_embedding_8b() -> TrainingConfig:
    """Fine-tuning Qwen3-Embedding (see the module docstring): the Mistral stage-1 recipe with
    what differs. Its query template is set in the model section, so it replaces a checkpoint's
    (a base Qwen3 imported without one gets Qwen3-Embedding's)."""
    cfg = nvembed_mistral_7b_stage1(_qwen3_8b_embedding())
    cfg.recipe = "qwen3_embedding_8b"
    opt = cfg.optimizer
    opt.train_iters, opt.lr, opt.lr_warmup_iters, opt.weight_decay = 2000, 1e-5, 100, 0.01
    cfg.loss.temperature, cfg.checkpoint.save_interval = 0.05, 500
    cfg.loss.query_query = cfg.loss.document_document = True
    return cfg


def tiny() -> TrainingConfig:
    """A 2-layer width-64 model trained from scratch in full fine-tuning (CPU, seconds)."""
    return TrainingConfig(
        recipe="tiny",
        stage=1,
        grad_cache=True,
        model=EmbeddingModelConfig(
            model=ModelConfig(
                vocab_size=256,
                hidden_size=64,
                ffn_hidden_size=128,
                num_layers=2,
                num_attention_heads=4,
                num_query_groups=2,
                attention_backend="auto",
            ),
            pooling=PoolingConfig(type="latent", num_latents=16, num_heads=2, head_dim=32),
        ),
        lora=LoRAConfig(rank=0, alpha=16.0, dropout=0.0),
        data=DataConfig(num_negatives=3, seq_length=64, micro_batch_size=4, global_batch_size=16),
        loss=ContrastiveLossConfig(temperature=0.05, in_batch_negatives=True),
        optimizer=OptimizerConfig(
            train_iters=80,
            lr=2e-3,
            min_lr=2e-4,
            lr_warmup_iters=4,
            weight_decay=0.01,
            clip_grad=1.0,
        ),
        logging=LoggingConfig(log_interval=5),
    )


def tiny_stage2() -> TrainingConfig:
    """Stage 2 of the tiny recipe: LoRA (rank 8) on the stage-1 weights, in-batch negatives off."""
    cfg = _stage2(tiny(), "tiny_stage2")
    cfg.lora = LoRAConfig(rank=8, alpha=16.0, dropout=0.0)
    opt = cfg.optimizer
    opt.train_iters, opt.lr, opt.min_lr, opt.lr_warmup_iters = 20, 5e-4, 5e-5, 2
    return cfg


RECIPES: dict[str, Callable[[], TrainingConfig]] = {
    "nvembed_mistral_7b_stage1": nvembed_mistral_7b_stage1,
    "nvembed_mistral_7b_stage2": nvembed_mistral_7b_stage2,
    "nvembed_mistral_7b_long": nvembed_mistral_7b_long,
    "nvembed_llama3_8b_stage1": nvembed_llama3_8b_stage1,
    "nvembed_llama3_8b_stage2": nvembed_llama3_8b_stage2,
    "qwen3_embedding_8b": qwen3_embedding_8b,
    "tiny": tiny,
    "tiny_stage1": tiny,
    "tiny_stage2": tiny_stage2,
}


def get_recipe(name: str, stage: int | None = None) -> TrainingConfig:
    """The recipe `name`; `name` without a stage suffix plus `stage` picks `{name}_stage{stage}`.

    Raises:
        ValueError: unknown name, or a stage that contradicts the recipe's.
    """
    key = name
    if stage is not None and f"{name}_stage{stage}" in RECIPES:
        key = f"{name}_stage{stage}"
    if key not in RECIPES:
        raise ValueError(f"--recipe {name!r} is unknown; choose one of {sorted(RECIPES)}")
    cfg = RECIPES[key]()
    if stage is not None and stage != cfg.stage:
        raise ValueError(f"--recipe {name} is a stage-{cfg.stage} recipe but --stage is {stage}")
    return cfg
