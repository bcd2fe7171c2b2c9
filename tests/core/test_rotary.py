"""vllm_sink.core.rotary: moving post-RoPE keys equals rotating the raw key at the target."""

import pytest
import torch

from vllm_sink.core.rotary import (
    Rotations,
    rope_table,
    rotate,
    rotate_full,
    rotation_for_delta,
    rotations_for_deltas,
)

pytestmark = pytest.mark.cpu


def _rope_at(x, table, pos, is_neox):
    half = table.shape[-1] // 2
    return rotate(
        x, table[pos, :half] / table[0, :half], table[pos, half:] / table[0, :half], is_neox
    )


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim, head", [(64, 64), (32, 64)])  # full and partial
@pytest.mark.parametrize("mscale", [1.0, 1.3])  # YaRN-style magnitude
def test_move_equals_direct(is_neox, rotary_dim, head, mscale):
    torch.manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    table = rope_table(inv_freq, 4096, mscale)
    k = torch.randn(5, 3, head)
    for p, delta in [(7, 100), (3000, -2900), (0, 4095), (500, -500)]:
        stored = _rope_at(k, table, p, is_neox)
        moved = rotate(stored, *rotation_for_delta(table, delta), is_neox)
        direct = _rope_at(k, table, p + delta, is_neox)
        assert torch.allclose(moved, direct, atol=2e-4), (p, delta)
        assert torch.equal(moved[..., rotary_dim:], k[..., rotary_dim:])  # untouched dims


def test_rotation_keeps_norm_and_inverts():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    table = rope_table(inv_freq, 1024, 1.7)
    k = torch.randn(4, 64)
    there = rotate(k, *rotation_for_delta(table, 777), True)
    back = rotate(there, *rotation_for_delta(table, -777), True)
    assert torch.allclose(there.norm(dim=-1), k.norm(dim=-1), atol=1e-4)
    assert torch.allclose(back, k, atol=1e-5)


def test_bf16_rotation_is_one_rounding():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    table = rope_table(inv_freq, 2048)
    k = torch.randn(8, 64).to(torch.bfloat16)
    out = rotate(k, *rotation_for_delta(table, 1000), True)
    assert out.dtype == torch.bfloat16
    exact = rotate(k.float(), *rotation_for_delta(table, 1000), True)
    assert (out.float() - exact).abs().max() <= exact.abs().max() * 2**-8


def test_delta_beyond_table_refused():
    table = rope_table(torch.ones(2), 10)
    with pytest.raises(ValueError, match="row 10"):
        rotation_for_delta(table, -10)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim, head", [(64, 64), (32, 64)])  # full and partial
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_width_rotations_equal_the_pairwise_ones(is_neox, rotary_dim, head, dtype):
    """The batched op's formula (Rotations + rotate_full) is the pairwise one, to the bit
    (up to the sign of zero), for positive, negative and zero deltas."""
    torch.manual_seed(1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    table = rope_table(inv_freq, 2048, mscale=1.3)
    deltas = [0, 5, -5, 2047, -1999, 1]
    k = torch.randn(3, len(deltas), 4, 2, head).to(dtype)  # [L, n, N, H, D]
    rot = Rotations(table, head, is_neox)
    m = torch.from_numpy(rot.multipliers(deltas)).view(len(deltas), 2, 1, 1, head)
    got = rotate_full(k, m[:, 0], m[:, 1], rot.perm)
    cos, sin = rotations_for_deltas(table, deltas)
    want = rotate(k, cos[:, None, None, :], sin[:, None, None, :], is_neox)
    assert got.dtype == dtype
    assert torch.equal(got, want)  # == treats -0.0 and +0.0 as equal
    assert torch.equal(got[..., rotary_dim:], k[..., rotary_dim:])
    assert torch.equal(got[:, 0], k[:, 0])  # delta 0: as is


def test_full_width_rotations_refuse_rows_beyond_the_table():
    rot = Rotations(rope_table(torch.ones(2), 10), 8, True)
    with pytest.raises(ValueError, match="row 10"):
        rot.multipliers([3, -10])
    with pytest.raises(ValueError, match="exceeds head size"):
        Rotations(rope_table(torch.ones(8), 10), 8, True)
