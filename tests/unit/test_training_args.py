"""Command line of the training entry point: recipes, overrides, errors naming the flag."""

from pathlib import Path

import pytest

from megatron_nvembed.training.arguments import parse_args
from megatron_nvembed.training.recipes import RECIPES, get_recipe


def test_paper_recipes_carry_table5_values():
    s1, s2 = get_recipe("nvembed_mistral_7b_stage1"), get_recipe("nvembed_mistral_7b_stage2")
    for cfg in (s1, s2):
        assert cfg.data.global_batch_size == 128 and cfg.data.num_negatives == 7
        assert cfg.optimizer.lr_warmup_iters == 500 and cfg.optimizer.lr_decay_style == "linear"
        assert cfg.optimizer.weight_decay == 0.03 and cfg.data.seq_length == 512
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (16, 32.0, 0.1)
        assert cfg.model.pooling.num_latents == 512 and cfg.model.pooling.num_heads == 8
        assert cfg.model.model.bf16 and cfg.model.model.mask_type == "bidirectional"
    assert (s1.optimizer.lr, s1.optimizer.train_iters, s1.loss.in_batch_negatives) == (
        2e-5,
        20000,
        True,
    )
    assert (s2.optimizer.lr, s2.optimizer.train_iters, s2.loss.in_batch_negatives) == (
        1.5e-5,
        18000,
        False,
    )
    assert set(RECIPES) >= {"nvembed_mistral_7b_stage1", "nvembed_mistral_7b_stage2", "tiny"}


def test_llama3_recipes_are_table5_on_llama_3_1_8b():
    """The Llama recipes differ from the Mistral ones in the backbone only (Llama 3.1 8B's
    config.json: 128256 tokens, RoPE theta 500000, llama3 scaling 8 / 1 / 4 / 8192); both
    stages validate and `--stage` picks between them."""
    for stage in (1, 2):
        mistral = get_recipe("nvembed_mistral_7b", stage)
        llama = get_recipe("nvembed_llama3_8b", stage)
        assert llama.recipe == f"nvembed_llama3_8b_stage{stage}"
        m = llama.model.model
        assert (m.vocab_size, m.hidden_size, m.ffn_hidden_size, m.num_layers) == (
            128256, 4096, 14336, 32,
        )  # fmt: skip
        assert (m.num_attention_heads, m.num_query_groups, m.rotary_base) == (32, 8, 500000.0)
        assert (
            m.rope_scaling_factor, m.rope_scaling_low_freq_factor,
            m.rope_scaling_high_freq_factor, m.rope_scaling_original_max_position_embeddings,
        ) == (8.0, 1.0, 4.0, 8192)  # fmt: skip
        llama.model.validate()
        for section in ("lora", "data", "loss", "optimizer", "checkpoint", "logging"):
            assert getattr(llama, section) == getattr(mistral, section), section
        assert llama.model.pooling == mistral.model.pooling


def _model(cfg):
    """The model a run of `cfg` from scratch trains (`training/start.py`)."""
    from megatron_nvembed.training.start import StartingPoint, model_config

    return model_config(cfg, StartingPoint("scratch"))


def test_qwen3_embedding_recipe_is_causal_eos_with_its_query_format():
    """The Qwen3-Embedding fine-tuning recipe: Qwen3-8B's shape (Q/K norms, head width 128 !=
    4096 / 32), causal mask, normalised eos pooling, Qwen3-Embedding's query prefix (no space
    after "Query:") on the model and as the run's template, query-query and document-document
    terms on, LoRA; it validates, and the template reaches the model of a run from the recipe."""
    cfg = parse_args(["--recipe", "qwen3_embedding_8b", "--train-data", "a.jsonl"])
    m, p = cfg.model.model, cfg.model.pooling
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups) == (
        4096, 36, 32, 8,
    )  # fmt: skip
    assert m.kv_channels == 128 and m.qk_layernorm and not m.add_qkv_bias
    assert m.mask_type == "causal" and p.type == "eos" and p.normalize
    assert cfg.loss.query_query and cfg.loss.document_document
    assert cfg.lora.rank == 16 and cfg.loss.temperature == 0.05
    template = "Instruct: {instruction}\nQuery:"
    assert cfg.model.prompts.query_template == template
    assert _model(cfg).prompts.query_template == template


def test_query_template_flag_reaches_the_model_and_is_checked():
    """`--query-template` sets the model's template (saved with it); a template without
    `{instruction}`, with it twice or with another field is refused naming the flag."""
    cfg = parse_args(
        ["--recipe", "tiny", "--train-data", "a", "--query-template", "Q: {instruction} |"]
    )
    assert _model(cfg).prompts.query_template == "Q: {instruction} |"
    default = _model(parse_args(["--recipe", "tiny", "--train-data", "a"]))
    assert default.prompts.query_template == "Instruct: {instruction}\nQuery: "
    for bad in ("Instruct: \nQuery: ", "{instruction} {instruction}", "{instruction} {task}", "{"):
        with pytest.raises(ValueError, match="--query-template"):
            parse_args(["--recipe", "tiny", "--train-data", "a", "--query-template", bad])


def test_flags_override_only_what_is_given():
    cfg = parse_args(
        [
            "--recipe",
            "nvembed_mistral_7b_stage1",
            "--train-data",
            "a.jsonl",
            "--lr",
            "1e-5",
            "--tensor-model-parallel-size",
            "2",
            "--lora-rank",
            "0",
            "--no-grad-cache",
            "--hidden-dropout",
            "0.1",
            "--fp32",
        ]
    )
    assert (
        cfg.optimizer.lr == 1e-5
        and cfg.optimizer.min_lr == 0.0
        and cfg.optimizer.train_iters == 20000
    )
    assert cfg.model.parallel.tensor_model_parallel_size == 2
    assert cfg.lora.rank == 0 and cfg.lora.alpha == 32.0
    assert cfg.grad_cache is False and cfg.model.model.hidden_dropout == 0.1
    assert cfg.model.model.bf16 is False
    blend = parse_args(
        ["--recipe", "tiny", "--stage", "2", "--train-data", "0.3", "a.jsonl", "0.7", "b.jsonl"]
    )
    assert blend.recipe == "tiny_stage2" and blend.stage == 2 and not blend.loss.in_batch_negatives
    assert blend.data.train_data == ["0.3", "a.jsonl", "0.7", "b.jsonl"]
    off = parse_args(["--recipe", "tiny", "--train-data", "a", "--no-in-batch-negatives"])
    assert (
        off.stage == 1
        and not off.loss.in_batch_negatives
        and off.optimizer.lr == get_recipe("tiny").optimizer.lr
    )
    on = parse_args(
        ["--recipe", "tiny", "--stage", "2", "--train-data", "a", "--in-batch-negatives"]
    )
    assert on.stage == 2 and on.loss.in_batch_negatives


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "nope", "--train-data", "a"], "--recipe 'nope' is unknown"),
        (
            ["--recipe", "nvembed_mistral_7b_stage1", "--stage", "2", "--train-data", "a"],
            "stage-1 recipe but --stage is 2",
        ),
        (["--recipe", "tiny"], "--train-data is required"),
        (
            ["--train-data", "a", "--lr-warmup-iters", "100", "--train-iters", "50"],
            "--lr-warmup-iters (100) must be below",
        ),
        (
            ["--train-data", "a", "--global-batch-size", "10", "--micro-batch-size", "4"],
            "--global-batch-size (10) must be a multiple of --micro-batch-size (4)",
        ),
        (["--train-data", "a", "--lora-dropout", "1.5"], "--lora-dropout"),
        (["--train-data", "a", "--temperature", "0"], "--temperature"),
        (["--train-data", "a", "--eval-interval", "5"], "--eval-interval needs --eval-data"),
        (["--train-data", "a", "--hidden-dropout", "1.0"], "--hidden-dropout"),
        (["--train-data", "a", "--recompute-granularity", "most"], "--recompute-granularity"),
    ],
)
def test_bad_settings_name_the_flag(argv, message):
    with pytest.raises(ValueError) as err:
        parse_args(argv)
    assert message in str(err.value)


def test_lora_picks_sdpa_and_refuses_transformer_engine():
    cfg = parse_args(["--recipe", "tiny", "--train-data", "a", "--lora-rank", "4"])
    assert _model(cfg).model.attention_backend == "sdpa"
    cfg = parse_args(
        ["--recipe", "tiny", "--train-data", "a", "--lora-rank", "4", "--attention-backend", "te"]
    )
    with pytest.raises(ValueError, match="--attention-backend te with --lora-rank"):
        _model(cfg)


def test_batch_composition_reaches_the_data(monkeypatch, tmp_path):
    """--batch-composition is handed to the data pipeline as its composition (the sampler's
    behaviour is tested in test_data_records_and_blending.py); the data is built before any
    model, so a stand-in pipeline that stops the build sees it first."""
    import megatron_nvembed.core.parallel as parallel
    import megatron_nvembed.data.pipeline as pipeline
    from megatron_nvembed.testing import build_word_tokenizer
    from megatron_nvembed.training import setup
    from megatron_nvembed.training.arguments import parse_args

    class _Group:
        def size(self):
            return 1

        def rank(self):
            return 0

    class _Stop(Exception):
        pass

    def fake_data(*args, **kwargs):
        raise _Stop(kwargs["composition"])

    tok = tmp_path / "tok"
    build_word_tokenizer(["a b c"]).save_pretrained(tok)
    monkeypatch.setattr(pipeline, "build_train_data", fake_data)
    monkeypatch.setattr(
        parallel, "initialize_model_parallel", lambda *a, **k: type("PG", (), {"dp": _Group()})
    )
    for value in ("homogeneous", "multinomial"):
        cfg = parse_args(["--train-data", "x.jsonl", "--tokenizer", str(tok),
                          "--batch-composition", value])  # fmt: skip
        with pytest.raises(_Stop, match=value):
            setup.build(cfg)


def test_matryoshka_widths_are_checked_against_the_checkpoints_model(monkeypatch):
    """With --pretrained-checkpoint the model's width is the checkpoint's, not the recipe's: a
    width the recipe allows but the checkpoint's model does not is refused when the checkpoint's
    config is read, naming the flag and the checkpoint, before anything else is built."""
    import megatron_nvembed.core.parallel as parallel
    from megatron_nvembed.testing import tiny_model_config
    from megatron_nvembed.training import setup
    from megatron_nvembed.training.start import StartingPoint

    narrow = tiny_model_config(pooling="mean")
    narrow.model.hidden_size = 32
    start = StartingPoint("pretrained", Path("ckpt/base"), 0, narrow)
    monkeypatch.setattr(setup, "resolve_start", lambda cfg: start)

    def never(*args, **kwargs):
        raise AssertionError("process groups initialised before the widths were checked")

    monkeypatch.setattr(parallel, "initialize_model_parallel", never)
    cfg = parse_args(["--train-data", "x.jsonl", "--pretrained-checkpoint", "ckpt/base",
                      "--matryoshka-dims", "64", "16"])  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"--matryoshka-dims: width 64 exceeds .* 32 \(the model of ckpt/base/iter_0000000/",
    ):
        setup.build(cfg)
