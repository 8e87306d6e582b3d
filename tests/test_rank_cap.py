"""The rank cap (i2l_ext.worker.rank_cap) against the truncated SVD of the full ΔW, on random
factors on the CPU: the same best rank-R approximation (Eckart-Young) and the same energy."""
import pytest

torch = pytest.importorskip("torch")

from i2l_ext.worker.rank_cap import cap_rank  # noqa: E402

A = "transformer_blocks.{}.{}.lora_A.default.weight"
B = "transformer_blocks.{}.{}.lora_B.default.weight"


def random_lora(shapes, dtype=torch.float32, seed=0):
    """A LoRA with one module per ``(rank, in, out)``; A carries a 1/n scale as the merge's does."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for i, (r, d_in, d_out) in enumerate(shapes):
        lora[A.format(i, "attn.to_q")] = (torch.randn(r, d_in, generator=gen) / 3).to(dtype)
        lora[B.format(i, "attn.to_q")] = torch.randn(d_out, r, generator=gen).to(dtype)
    return lora


def delta(lora, i):
    return lora[B.format(i, "attn.to_q")].double() @ lora[A.format(i, "attn.to_q")].double()


def svd_truncation(dw, r):
    """ΔW's best rank-r approximation and its squared singular values, from the full matrix."""
    u, s, vh = torch.linalg.svd(dw)
    return (u[:, :r] * s[:r]) @ vh[:r], s.square()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cap_at_or_above_the_rank_changes_nothing(dtype):
    lora = random_lora([(12, 96, 80), (12, 64, 200)], dtype)
    for cap in (12, 20):
        out, energy = cap_rank(lora, cap)
        assert energy == 1.0
        for i in range(2):
            torch.testing.assert_close(delta(out, i), delta(lora, i), rtol=0, atol=0)


def test_a_cap_below_the_rank_is_the_truncated_svd():
    # several modules of one shape go through one batch (the second and third), one of another shape
    # beside them, and one already under the cap that stays as it is but counts in the energy
    shapes = [(12, 96, 80), (12, 64, 200), (12, 64, 200), (3, 40, 40)]
    lora = random_lora(shapes)
    out, energy = cap_rank(lora, 5)
    kept = total = 0.0
    for i, (r, d_in, d_out) in enumerate(shapes):
        a, b = out[A.format(i, "attn.to_q")], out[B.format(i, "attn.to_q")]
        assert a.dtype == b.dtype == torch.float32
        assert a.shape == (min(r, 5), d_in) and b.shape == (d_out, min(r, 5))
        want, s2 = svd_truncation(delta(lora, i), min(r, 5))
        torch.testing.assert_close(delta(out, i), want, rtol=0, atol=1e-5 * want.abs().max().item())
        kept += s2[:5].sum().item()
        total += s2.sum().item()
    assert energy == pytest.approx(kept / total, rel=1e-5)
    assert 0 < energy < 1
    torch.testing.assert_close(out[A.format(3, "attn.to_q")], lora[A.format(3, "attn.to_q")], rtol=0, atol=0)


def test_bf16_factors_come_back_in_bf16_and_keep_their_scale():
    lora = random_lora([(20, 384, 512)], torch.bfloat16)
    out, _ = cap_rank(lora, 8)
    a, b = out[A.format(0, "attn.to_q")], out[B.format(0, "attn.to_q")]
    assert a.dtype == b.dtype == torch.bfloat16
    want, _ = svd_truncation(delta(lora, 0), 8)
    # bf16: 8 significant bits in each factor
    torch.testing.assert_close(delta(out, 0), want, rtol=0, atol=2 ** -6 * want.abs().max().item())
    # sqrt(S) on each side: row i of A and column i of B have the same norm
    torch.testing.assert_close(a.double().norm(dim=1), b.double().norm(dim=0), rtol=2 ** -6, atol=0)
