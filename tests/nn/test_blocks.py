"""MemoryBlock (SPEC §2) and the GPTNeoXBlock baseline (Pythia)."""

import math

import torch
from torch import nn

from mf_lightning.config import ModelConfig
from mf_lightning.nn.attention import KVCache, rotary_cos_sin
from mf_lightning.nn.blocks import GPTNeoXBlock, MemoryBlock
from mf_lightning.nn.memory_layer import MemoryLayer


def rotary(config: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary_cos_sin(torch.arange(length), config.rotary_dims, config.rotary_base)


def test_memory_block_has_only_memory_layers_no_output_projection() -> None:
    config = ModelConfig.from_preset("debug")
    block = MemoryBlock(config)
    assert not any(isinstance(module, nn.Linear) for module in block.modules())
    layers = [module for module in block.modules() if isinstance(module, MemoryLayer)]
    assert [(m.in_features, m.out_features, m.code_bits) for m in layers] == [(64, 192, 8), (64, 80, 8), (80, 64, 10)]
    assert block.ffn_out.tables.shape == (8, 1024, 64)
    assert isinstance(block.ffn_mid_norm, nn.LayerNorm) and block.ffn_mid_norm.elementwise_affine


def test_memory_block_init_follows_authors_code() -> None:
    config = ModelConfig.from_preset("debug", n_embd=128)
    block = MemoryBlock(config)
    assert math.isclose(block.qkv.tables.std().item(), math.sqrt(2 / (5 * 128)), rel_tol=0.02)
    for layer in (block.ffn_in, block.ffn_out):
        assert math.isclose(layer.tables.std().item(), 0.02, rel_tol=0.02)
        assert math.isclose(layer.bias.std().item(), 1e-3, rel_tol=0.2)


def test_q_k_v_share_one_hash() -> None:
    """Q, K and V each read, in every table, the bucket of the one hash of the normed input (SPEC §2)."""
    config = ModelConfig.from_preset("debug")
    block, d = MemoryBlock(config), config.n_embd
    tables = block.qkv.num_tables
    with torch.no_grad():
        block.qkv.tables.zero_()
        block.qkv.bias.zero_()
        for part in range(3):
            for table in range(tables):
                block.qkv.tables[table, :, part * d + table] = torch.arange(1.0, block.qkv.tables.shape[1] + 1)
                block.qkv.tables[table, :, part * d + tables + table] = 1.0
    captured = []
    block.attention.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    x = torch.randn(2, 5, d)
    block(x, *rotary(config, 5))
    qkv = captured[0]
    used = [
        (qkv[..., part * d : part * d + tables] / qkv[..., part * d + tables : part * d + 2 * tables]).round().long()
        - 1
        for part in range(3)
    ]
    hashed = block.qkv.bucket_indices(block.attn_norm(x))
    assert all(torch.equal(buckets, hashed) for buckets in used)


def test_memory_block_forward_backward_reaches_every_parameter() -> None:
    config = ModelConfig.from_preset("debug")
    block, x = MemoryBlock(config), torch.randn(2, 5, 64, requires_grad=True)
    y = block(x, *rotary(config, 5))
    assert y.shape == x.shape
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    assert x.grad.abs().sum() > 0


def test_transformer_block_is_pythia_shaped_with_gpt_neox_init() -> None:
    config = ModelConfig.from_preset("debug", arch="transformer", n_embd=256, n_head=4)
    block, d = GPTNeoXBlock(config), config.n_embd
    assert sum(p.numel() for p in block.parameters()) == 12 * d * d + 9 * d + 4 * d
    assert all(isinstance(norm, nn.LayerNorm) and norm.eps == 1e-5 for norm in (block.attn_norm, block.ffn_norm))
    x = torch.randn(2, 5, d)
    assert block(x, *rotary(config, 5)).shape == x.shape
    wang, small = 2 / config.n_layer / math.sqrt(d), math.sqrt(2 / (5 * d))
    for layer, std in ((block.proj, wang), (block.ffn_out, wang), (block.qkv, small), (block.ffn_in, small)):
        assert math.isclose(layer.weight.std().item(), std, rel_tol=0.05)
        assert not layer.bias.any()


def test_blocks_with_cache_match_full_sequence() -> None:
    for arch, block_class in (("memoryformer", MemoryBlock), ("transformer", GPTNeoXBlock)):
        config = ModelConfig.from_preset("debug", arch=arch)
        block, x = block_class(config).eval(), torch.randn(1, 6, 64)
        full = block(x, *rotary(config, 6))
        cache = KVCache(6)
        prefix = block(x[:, :4], *rotary(config, 4), cache)
        cos, sin = rotary(config, 6)
        rest = block(x[:, 4:], cos[4:], sin[4:], cache)
        torch.testing.assert_close(torch.cat([prefix, rest], dim=1), full)
