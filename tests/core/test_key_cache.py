"""vllm_sink.core.key_cache: batched key reads, writes and rotations over a stack of layers,
against the one-layer-one-block reference, on every KV layout vLLM's backends use.

Layouts are built the way vLLM 0.32 allocates them: one buffer for all layers, each
layer a logical ``[blocks, H, N, 2D]`` view (K in the first D of the last dim) with a
physical dim order (NHD, HND, block-outermost with layers interleaved, head-outermost),
plus the CPU ``vec`` layout (K transposed per head), layers in separate allocations, and
a scrambled (non-affine) block layout."""

from __future__ import annotations

import pytest
import torch

from vllm_sink.core.key_cache import KeyCache, fit_strides
from vllm_sink.core.rotary import rope_table
from vllm_sink.reference.key_cache import read_block, rotate_reference

L, NB, N, H, D = 3, 6, 4, 2, 8

# physical dim order of [layer, block, head, token, content] (vLLM's KVCacheLayout)
PHYSICAL = {
    "NHD": (0, 1, 3, 2, 4),
    "HND": (0, 1, 2, 3, 4),
    "block_outer": (1, 0, 3, 2, 4),
    "head_outer": (0, 2, 1, 3, 4),
}
LAYOUTS = [*PHYSICAL, "cpu_vec", "separate", "scrambled"]


def _logical_views(order, dtype, device):
    """One buffer, per-layer logical [NB, H, N, 2D] views with physical dim ``order``."""
    logical = (L, NB, H, N, 2 * D)
    phys = torch.randn([logical[i] for i in order], dtype=torch.float32).to(dtype).to(device)
    inverse = [order.index(i) for i in range(5)]
    full = phys.permute(*inverse)  # logical [L, NB, H, N, 2D]
    return [full[i] for i in range(L)]


def _rel_of_view(kv):
    """In-block offsets of the keys of a logical [NB, H, N, 2D] view, (n, h, d) order."""
    addr = torch.arange(kv.untyped_storage().nbytes() // kv.element_size())
    addr = addr.as_strided(kv.shape, kv.stride(), kv.storage_offset())
    return (addr[0, :, :, :D].permute(1, 0, 2) - kv.storage_offset()).reshape(-1)


def make_layout(kind, dtype=torch.float32, device="cpu"):
    """(layer tensors with blocks on dim 0, key offset table rel)."""
    torch.manual_seed(hash(kind) % 1000)
    if kind in PHYSICAL:
        views = _logical_views(PHYSICAL[kind], dtype, device)
        return views, _rel_of_view(views[0])
    if kind == "separate":
        views = [_logical_views(PHYSICAL["NHD"], dtype, device)[0].clone() for _ in range(L)]
        return views, _rel_of_view(views[0])
    slab = H * N * 2 * D
    buf = torch.randn(L, NB, slab).to(dtype).to(device)
    n, h, d = torch.meshgrid(torch.arange(N), torch.arange(H), torch.arange(D), indexing="ij")
    if kind == "cpu_vec":  # per head: K^T [D, N] then V [N, D]
        rel = (h * 2 * N * D + d * N + n).reshape(-1)
    else:  # any bijection: keys scattered through the slab
        rel = torch.randperm(slab)[: N * H * D]
    return [buf[i] for i in range(L)], rel


def _table():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 6, 2).float() / 6))  # partial rotary
    return rope_table(inv_freq, 64, mscale=1.2)


@pytest.mark.cpu
@pytest.mark.parametrize(
    "kind, mode",
    [
        ("NHD", "stacked"),
        ("HND", "stacked"),
        ("block_outer", "stacked"),
        ("head_outer", "stacked"),
        ("cpu_vec", "stacked"),
        ("separate", "strided"),
        ("scrambled", "tabled"),
    ],
)
def test_layout_modes(kind, mode):
    layers, rel = make_layout(kind)
    cache = KeyCache(layers, rel, N, H, D, _table(), True)
    assert cache.mode == mode
    assert (fit_strides(rel, N, H, D) is None) == (mode == "tabled")
    blocks = torch.tensor([4, 1])
    got = cache.read(blocks)
    for layer in range(L):
        for i, b in enumerate(blocks.tolist()):
            assert torch.equal(got[layer, i], read_block(layers[layer], rel, b, N, H, D))


def _twins(kind, layers):
    """An independent copy of ``layers`` with the same views (and so the same layout)."""
    if kind == "separate":
        return [t.clone() for t in layers]
    # one buffer: clone the whole storage, rebuild the same views
    first = layers[0]
    base = torch.empty(0, dtype=first.dtype, device=first.device)
    base = base.set_(first.untyped_storage()).clone()
    return [base.as_strided(t.shape, t.stride(), t.storage_offset()) for t in layers]


def _check_rotate(kind, dtype, device, with_source):
    layers, rel = make_layout(kind, dtype, device)
    twins = _twins(kind, layers)
    table = _table()
    blocks, deltas = [5, 0, 3, 2], [7, -12, 0, 40]
    source = None
    if with_source:
        source = torch.randn(L, len(blocks), N, H, D).to(dtype).to(device)
    KeyCache(layers, rel, N, H, D, table, kind != "HND").rotate(blocks, deltas, source)
    rotate_reference(twins, rel, N, H, D, table, kind != "HND", blocks, deltas, source)
    tol = 0 if dtype == torch.float32 else 1e-2
    for a, b in zip(layers, twins):
        torch.testing.assert_close(a, b, rtol=tol, atol=1e-6 if tol == 0 else tol)


@pytest.mark.cpu
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_source", [False, True])
def test_rotate_matches_reference_cpu(kind, dtype, with_source):
    _check_rotate(kind, dtype, "cpu", with_source)


@pytest.mark.cpu
@pytest.mark.parametrize("with_source", [False, True])
def test_rotate_chunks_long_batches(monkeypatch, with_source):
    """A rebase of a long window, or many streams' sinks from their snapshots, is done in
    chunks of blocks (bounded float32 scratch); the result does not depend on it."""
    import vllm_sink.core.key_cache as kc

    layers, rel = make_layout("NHD")
    twins = [t.clone() for t in layers]
    monkeypatch.setattr(kc, "MAX_SCRATCH_ELEMENTS", 2 * L * N * H * D)  # 2 blocks a chunk
    blocks, deltas = list(range(NB)), [(-3) * i + 5 for i in range(NB)]
    source = torch.randn(L, NB, N, H, D) if with_source else None
    cache = KeyCache(layers, rel, N, H, D, _table(), True)
    assert cache.blocks_per_chunk == 2 < NB
    calls = []
    real = cache._rotate
    monkeypatch.setattr(cache, "_rotate", lambda *a: (calls.append(len(a[0])), real(*a)))
    cache.rotate(blocks, deltas, source)
    assert max(calls) == 2 and sum(calls) == NB
    rotate_reference(twins, rel, N, H, D, _table(), True, blocks, deltas, source)
    for a, b in zip(layers, twins):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.cpu
def test_shared_layers_rotate_once():
    """Two layers bound to one cache (KV sharing) must not be rotated twice."""
    layers, rel = make_layout("NHD")
    shared = [layers[0], layers[0], layers[1]]
    twins = [t.clone() for t in layers[:2]]
    KeyCache(shared, rel, N, H, D, _table(), True).rotate([2], [9])
    rotate_reference(twins, rel, N, H, D, _table(), True, [2], [9])
    torch.testing.assert_close(layers[0], twins[0], rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_source", [False, True])
def test_rotate_matches_reference_cuda(kind, dtype, with_source):
    _check_rotate(kind, dtype, "cuda", with_source)


def _check_save_restore(kind, device):
    """BlockStack.save copies whole blocks out in chunks, restore writes them into other
    blocks; on CUDA neither synchronizes (the copies are queued on the stream, so a
    kernel queued after save that overwrites the blocks does not reach the copies) and
    the host chunks are pinned."""
    from vllm_sink.core.key_cache import BlockStack

    layers, _ = make_layout(kind, torch.bfloat16, device)
    stack = BlockStack(layers)
    stack.chunk_blocks = 2  # three blocks: two chunks
    src, dst = [4, 1, 5], [0, 2, 3]
    want = torch.stack([kv[src] for kv in stack.layers]).clone()
    reuse = torch.tensor(src, device=device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronization raises
    try:
        saved = stack.save(src)
        for kv in stack.layers:  # the blocks are reused
            kv.index_fill_(0, reuse, -1.0)
        stack.restore(dst, saved)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    assert [c.shape[1] for c in saved] == [2, 1]
    assert all(c.device.type == "cpu" and c.is_pinned() == cuda for c in saved)
    got = torch.stack([kv[dst] for kv in stack.layers])
    assert torch.equal(got.cpu(), want.cpu())
    with pytest.raises(ValueError):
        stack.restore(dst[:2], saved)


@pytest.mark.cpu
@pytest.mark.parametrize("kind", LAYOUTS)
def test_block_stack_save_restore_cpu(kind):
    _check_save_restore(kind, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["NHD", "block_outer", "separate"])
def test_block_stack_save_restore_cuda(kind):
    _check_save_restore(kind, "cuda")


@pytest.mark.gpu
def test_snapshot_round_trip_through_host_cuda():
    """A preempted stream's sink-key snapshot goes to pinned host memory and back
    (to_host / to_device) without synchronizing, and a kernel queued after the move
    that overwrites the device tensor does not reach the host copy."""
    from vllm_sink.core.key_cache import to_device, to_host

    snap = torch.randn(4, 16, 2, 8, dtype=torch.bfloat16, device="cuda")
    want = snap.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        host = to_host(snap)
        snap.fill_(-1.0)  # the device memory is reused
        back = to_device(host, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert host.device.type == "cpu" and host.is_pinned()
    assert back.device.type == "cuda" and torch.equal(back, want)


@pytest.mark.cpu
def test_snapshot_stays_put_on_cpu():
    """On the CPU backend the snapshot already lives in host memory: no copy."""
    from vllm_sink.core.key_cache import to_device, to_host

    snap = torch.randn(3, 4)
    assert to_host(snap) is snap and to_device(snap, torch.device("cpu")) is snap


STACKED = ["NHD", "HND", "block_outer", "head_outer", "cpu_vec"]


def _check_fused(kind, dtype, device, with_source, fused):
    """The fused Triton kernel against the reference, on every stacked layout. float32:
    the same products (an FMA on a GPU may differ in the last place). bf16: within one
    bf16 unit in the last place (a wrong angle or partner is off by far more); on a GPU
    the cast rounds to nearest like torch's, so keys differ only where an FMA moved a
    product across a rounding boundary; Triton's interpreter truncates the cast."""
    layers, rel = make_layout(kind, dtype, device)
    twins = _twins(kind, layers)
    table = _table()
    blocks, deltas = [5, 0, 3, 2], [7, -12, 0, 40]
    source = torch.randn(L, len(blocks), N, H, D).to(dtype).to(device) if with_source else None
    cache = KeyCache(layers, rel, N, H, D, table, kind != "HND", fused=fused)
    assert cache.mode == "stacked"
    cache.rotate(blocks, deltas, source)
    rotate_reference(twins, rel, N, H, D, table, kind != "HND", blocks, deltas, source)
    for a, b in zip(layers, twins):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=2e-7, atol=1e-6)
        else:
            diff = (a.float() - b.float()).abs()
            ulp = b.float().abs() * 2**-7 + 1e-30
            assert bool((diff <= ulp).all()), f"max {diff.max()}"
            if fused is True:
                assert float((diff > 0).float().mean()) < 0.01


@pytest.mark.cpu
@pytest.mark.parametrize("kind", STACKED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_source", [False, True])
def test_fused_rotate_matches_reference_interpreted(kind, dtype, with_source):
    _check_fused(kind, dtype, "cpu", with_source, "interpret")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", STACKED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_source", [False, True])
def test_fused_rotate_matches_reference_cuda(kind, dtype, with_source):
    _check_fused(kind, dtype, "cuda", with_source, True)


@pytest.mark.cpu
def test_fused_rotate_needs_a_stacked_cache():
    layers, rel = make_layout("separate")
    with pytest.raises(ValueError, match="one stacked view; this cache is strided"):
        KeyCache(layers, rel, N, H, D, _table(), True, fused=True)


@pytest.mark.cpu
def test_key_op_setting(monkeypatch):
    from vllm_sink.core import key_rotate_fused

    monkeypatch.delenv("VLLM_SINK_KEY_OP", raising=False)
    assert key_rotate_fused.requested() is False
    monkeypatch.setenv("VLLM_SINK_KEY_OP", "fused")
    assert key_rotate_fused.requested() is True
    monkeypatch.setenv("VLLM_SINK_KEY_OP", "triton")
    with pytest.raises(ValueError, match="'torch' or 'fused'"):
        key_rotate_fused.requested()
