"""megatron_nvembed/core/flops.py against hand counts (exact integer equality); the module imports
nothing but the standard library, so this runs in well under a second."""

from megatron_nvembed.core import flops

SHAPE = flops.FlopShape(
    hidden=8,
    ffn=12,
    layers=2,
    heads=2,
    groups=1,
    head_dim=4,
    lora_rank=2,
    pool_latents=3,
    pool_heads=1,
    pool_head_dim=8,
    pool_ff_mult=2,
)


def test_hand_count_tiny_config():
    # One call of 2 rows x width 5 (t = 10 token positions); 1 query with 2 candidates in the loss.
    # Per layer, forward, frozen bases (2 t in out): qkv 8->16: 2560, proj 8->8: 1280,
    # fc1 8->24: 3840, fc2 12->8: 1920  => 9600.
    # LoRA r=2 (A: in->2, B: 2->out): qkv 320 + 640, proj 320 + 320, fc1 320 + 960,
    # fc2 480 + 320 => 3680.
    # Attention: 4 * rows * w^2 * dh * heads = 4 * 2 * 25 * 4 * 2 = 1600.
    layer_fwd = 9600 + 3680 + 1600
    # Backward, layer 1: bases' input gradients 9600, LoRA 2 x 3680, attention 2 x 1600.
    layer1_bwd = 9600 + 2 * 3680 + 2 * 1600
    # Layer 0: no input gradient for QKV (base 2560, adapter A 320).
    layer0_bwd = (9600 - 2560) + (2 * 3680 - 320) + 2 * 1600
    # Head (d 8, inner 1 x 8, ff 16): to_q 1280, scores + context 2 x (2 * 10 * 8 * 3) = 960,
    # to_out 1280, GEGLU in 8->32: 5120, out 16->8: 2560 => 11200; backward 2x.
    head_fwd = 1280 + 960 + 1280 + 5120 + 2560
    # Latent K/V: 2 * 3 latents * 8 * 16 = 768, once.  Loss: own 2*1*8*2 = 32, pool 32.
    kv_fwd, loss_fwd = 768, 64
    want_fwd = 2 * layer_fwd + head_fwd + kv_fwd + loss_fwd
    want_bwd = layer0_bwd + layer1_bwd + 2 * head_fwd + 2 * kv_fwd + 2 * loss_fwd
    got = flops.train_step_flops(SHAPE, [(2, 5)], queries=1, candidates_per_query=2)
    assert (got.forward, got.backward) == (want_fwd, want_bwd) == (41792, 61504)
    assert got.total == 103296


def test_calls_add_up_and_model_count_uses_real_lengths():
    shape = SHAPE
    one = flops.train_step_flops(shape, [(1, 3)], 1, 2, latent_kv_calls=0)
    two = flops.train_step_flops(shape, [(1, 5)], 1, 2, latent_kv_calls=0)
    loss = flops.loss_flops(shape, 1, 2)
    kv = flops.latent_kv_flops(shape)
    model = flops.model_step_flops(shape, [3, 5], 1, 2)
    assert model == one + two + kv + flops.FlopCount(-loss.forward, -loss.backward)
    # Padding costs: the same rows padded to the longer width cost more.
    padded = flops.train_step_flops(shape, [(2, 5)], 1, 2, latent_kv_calls=1)
    assert padded.total > model.total
    # Each extra forward call projects the latents again.
    split = flops.train_step_flops(shape, [(1, 3), (1, 5)], 1, 2)
    assert split.total - model.total == kv.total


def test_attention_and_split_adapter_parts():
    # Attention: decoder 2 layers x 1600 + head 960 (see the hand count above), x3 with backward.
    att = flops.attention_flops(SHAPE, [(2, 5)])
    assert (att.forward, att.backward) == (2 * 1600 + 960, 2 * (2 * 1600 + 960))
    assert flops.attention_flops(SHAPE, [(2, 5)], head=False).forward == 2 * 1600
    assert flops.attention_flops(SHAPE, [(2, 5)], decoder=False).forward == 960
    # Split adapters: one extra A is 2 * 10 * 8 * 2 = 320 forward; 3 per layer, 2 layers.
    # Backward: 2 x 320 each (dX + dW), except layer 0's two extra QKV A's (dW only).
    extra = flops.split_adapter_flops(SHAPE, [(2, 5)])
    assert (extra.forward, extra.backward) == (6 * 320, 12 * 320 - 2 * 320)


def test_packed_calls_count_what_each_layout_runs():
    # THD (te / sdpa backends): the decoder runs the real tokens and each text's own square, so
    # texts of 3 and 5 packed into one row of 8 cost exactly what they cost alone.
    thd = flops.packed_call([3, 5], rows=1, width=8, thd=True)
    assert (thd.tokens, thd.attention_pairs) == (8, 9 + 25)
    alone = flops.call_decoder_flops(SHAPE, flops.dense_call(1, 3)) + flops.call_decoder_flops(
        SHAPE, flops.dense_call(1, 5)
    )
    assert flops.call_decoder_flops(SHAPE, thd) == alone
    # Block mask (local backend): the whole padded row and its full square.
    block = flops.packed_call([3, 5], rows=1, width=8, thd=False)
    assert flops.call_decoder_flops(SHAPE, block) == flops.decoder_flops(SHAPE, 1, 8)
    # The latent head pools THD tokens as they are; on the block-mask layout, and for the
    # self-attention head, the texts are unpacked one per row, padded to the longest.
    assert thd.head_tokens == 8 and block.head_tokens == 2 * 5
    assert flops.call_head_flops(SHAPE, block) == flops.head_flops(SHAPE, 2, 5)
    self_attn = flops.packed_call([3, 5], rows=1, width=8, thd=True, pool="self-attention")
    assert (self_attn.head_tokens, self_attn.head_pairs) == (2 * 5, 2 * 25)


def test_full_fine_tuning_adds_weight_gradients():
    full = flops.FlopShape(**{**SHAPE.to_dict(), "lora_rank": 0, "base_trainable": True})
    frozen = flops.FlopShape(**{**SHAPE.to_dict(), "lora_rank": 0})
    call = flops.dense_call(2, 5)
    f, z = flops.call_decoder_flops(full, call), flops.call_decoder_flops(frozen, call)
    assert f.forward == z.forward == 2 * 9600 + 2 * 1600  # bases + attention, 2 layers
    # Every linear: dW + dX (2x forward), layer 0's QKV included; attention 2x forward.
    assert f.backward == 2 * f.forward
    # Frozen: dX only, none for layer 0's QKV (2560 forward FLOPs).
    assert z.backward == (2 * 9600 - 2560) + 2 * 2 * 1600


def test_pooling_types():
    mean = flops.FlopShape(**{**SHAPE.to_dict(), "pool": "mean"})
    call = flops.dense_call(2, 5)
    assert flops.call_head_flops(mean, call) == flops.ZERO
    assert flops.latent_kv_flops(mean) == flops.ZERO
    # Self-attention head, t = 10, d = 8, inner = 8, ff = 16, 2 x 25 pairs: to_q 1280, to_kv 2560,
    # scores + context 2 * 2 * 50 * 8 = 1600, to_out 1280, GEGLU 5120 + 2560.
    self_attn = flops.FlopShape(**{**SHAPE.to_dict(), "pool": "self-attention"})
    got = flops.call_head_flops(self_attn, call)
    assert (got.forward, got.backward) == (14400, 28800)
    assert flops.attention_flops(self_attn, [(2, 5)], decoder=False).forward == 1600
    bad = flops.FlopShape(**{**SHAPE.to_dict(), "pool": "max"})
    try:
        flops.call_head_flops(bad, call)
    except ValueError as e:
        assert "max" in str(e)
    else:
        raise AssertionError("an unknown pooling type must be refused")


def test_flop_shape_from_model_config():
    from megatron_nvembed.core.config import EmbeddingModelConfig, ModelConfig, PoolingConfig

    cfg = EmbeddingModelConfig(
        model=ModelConfig(
            num_layers=2,
            hidden_size=8,
            ffn_hidden_size=12,
            num_attention_heads=2,
            num_query_groups=1,
            vocab_size=32,
        ),
        pooling=PoolingConfig(type="latent", num_latents=3, num_heads=1, head_dim=8, ff_mult=2),
    )
    assert flops.flop_shape(cfg, lora_rank=2) == SHAPE
    assert flops.flop_shape(cfg, lora_rank=0).base_trainable
