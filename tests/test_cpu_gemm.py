"""oneDNN's GEMMs for the expert FFN on CPU (experts/cpu_gemm.py) against aten's, and against float64.

The products in every orientation the FFN's forward and backward use them (transposed operands, ``out=``, bias,
accumulation), the row padding that keeps oneDNN's kernel cache warm, and the whole grouped FFN on the oneDNN path:
outputs and every gradient as accurate as aten's float32 against a float64 computation of the same function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from types import SimpleNamespace

import pytest
import torch

from dynmoe_dist import MoELayer
from dynmoe_dist.errors import ConfigError
from dynmoe_dist.experts import ExpertBank, cpu_gemm, grouped
from dynmoe_dist.experts.cpu_gemm import ATEN, ONEDNN, Gemm, onednn_usable
from dynmoe_dist.experts.grouped import ACTIVATIONS, cpu_kernel
from dynmoe_dist.experts.segment_ffn import pad_segments

GEN = torch.Generator().manual_seed(7)


@contextlib.contextmanager
def mkldnn_disabled():
    """``torch.backends.mkldnn.enabled = False`` for a while (``flags()`` also toggles TF32 and warns about it)."""
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def test_onednn_serves_float32_on_this_cpu_and_nothing_else():
    # the project's machines are x86 with torch's oneDNN build: there the fast path must be on, or `auto` silently
    # loses its speed
    assert platform.machine() in ("x86_64", "AMD64")
    assert onednn_usable(torch.zeros(2, 2))
    assert not onednn_usable(torch.zeros(2, 2, dtype=torch.float64))
    assert not onednn_usable(torch.zeros(2, 2, dtype=torch.bfloat16))
    with mkldnn_disabled():
        assert not onednn_usable(torch.zeros(2, 2))


@pytest.mark.parametrize(
    "a_shape, b_shape, transpose_a, transpose_b",
    [
        ((37, 24), (24, 40), False, False),  # forward: rows @ w_in
        ((40, 37), (40, 24), True, False),  # weight gradient: rows.t() @ grad
        ((37, 40), (24, 40), False, True),  # input gradient: grad @ w.t()
        ((1, 24), (24, 40), False, False),  # one row
    ],
)
def test_products_equal_aten_in_every_orientation(a_shape, b_shape, transpose_a, transpose_b):
    a = randn(*a_shape)
    b = randn(*b_shape)
    a = a.t() if transpose_a else a
    b = b.t() if transpose_b else b
    want = a.double() @ b.double()
    bias = randn(b.shape[1])
    for got in (ONEDNN.mm(a, b), ONEDNN.mm(a, b, out=torch.empty(a.shape[0], b.shape[1]))):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, ATEN.mm(a, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ONEDNN.addmm(bias, a, b).double(), bias.double() + want, rtol=1e-5, atol=1e-5)
    c = randn(a.shape[0], b.shape[1])
    want_c = c.double() + want
    ONEDNN.addmm_(c, a, b)
    torch.testing.assert_close(c.double(), want_c, rtol=1e-5, atol=1e-5)


def test_rows_rounds_up_to_sixteen_sizes_per_power_of_two():
    sizes = {ONEDNN.rows(n) for n in range(1, 1 << 14)}
    for n in range(1, 1 << 14):
        r = ONEDNN.rows(n)
        assert r >= n and ONEDNN.rows(r) == r
        assert r - n < max(16, n / 16), n  # at most 1/16 more rows (16 below 256)
        assert ATEN.rows(n) == n
    for octave in range(9, 14):  # [256, 512), ... : 16 sizes each, so the kernel cache sees few shapes
        assert len([s for s in sizes if 1 << (octave - 1) < s <= 1 << octave]) == 16


def test_pad_segments_places_each_segment_at_the_start_of_its_padded_block():
    segments = [(2, 3), (0, 0), (1, 17), (2, 40)]
    index, padded = pad_segments(segments, ONEDNN)
    assert padded == [(2, 16), (0, 0), (1, 32), (2, 48)]
    assert index.tolist() == [*range(0, 3), *range(16, 33), *range(48, 88)]
    assert pad_segments(segments, ATEN) == (None, segments)


def bank(activation: str, bias: bool, d: int = 24, d_ff: int = 40) -> ExpertBank:
    b = ExpertBank(d, d_ff, list(range(5)), activation, seed=3, bias=bias)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(randn(*p.shape) * 0.3)
    return b


@dataclasses.dataclass(frozen=True)
class CountingOneDNN(Gemm):
    """oneDNN's products, each one's row count recorded: proves the loop used the kernel it was given, padded."""

    rows_seen: list = dataclasses.field(default_factory=list)

    def addmm(self, bias, a, b, out=None):
        self.rows_seen.append(a.shape[0])
        return super().addmm(bias, a, b, out)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grouped_ffn_on_onednn_is_as_accurate_as_aten_against_float64(activation, bias, monkeypatch):
    counting = CountingOneDNN("onednn")
    monkeypatch.setattr(grouped, "ONEDNN", counting)
    segments = [(2, 40), (0, 33), (4, 0), (2, 51), (1, 2), (0, 17)]  # slot 3 has no rows; 2 and 0 twice
    b = bank(activation, bias)
    n = sum(k for _, k in segments)
    rows = randn(n, b.d_model)
    grad = randn(n, b.d_model)

    def run(gemm: str, dtype: torch.dtype) -> list[torch.Tensor]:
        b64 = bank(activation, bias)
        b64.load_state_dict(b.state_dict())
        b64.to(dtype).gemm = gemm
        x = rows.to(dtype).requires_grad_()
        y = b64(x, segments)
        return [y.detach(), *torch.autograd.grad(y, [x, *b64.weights().values()], grad.to(dtype))]

    want = run("loop", torch.float64)
    aten = run("loop", torch.float32)
    fast = run("onednn", torch.float32)
    names = ["output", "rows", *b.weights()]
    for name, w, a, f in zip(names, want, aten, fast):
        scale = float(w.abs().max()) or 1.0
        aten_err = float((a.double() - w).abs().max()) / scale
        fast_err = float((f.double() - w).abs().max()) / scale
        assert fast_err <= max(4 * aten_err, 1e-6), f"{name}: oneDNN error {fast_err:.2e}, aten {aten_err:.2e}"
    assert all(float(g[3].abs().sum()) == 0 for g in fast[2:])  # the expert with no rows: zero, not garbage
    # every product went through oneDNN, on each slot's rows (merged: 50, 2 and 91) padded to multiples of 16
    # (a weight gradient's left operand is transposed: its first dimension is a width, 24 or 40, not a row count)
    assert {ONEDNN.rows(n) for n in (50, 2, 91)} == {64, 16, 96}
    assert {64, 16, 96} <= set(counting.rows_seen)
    assert not {50, 2, 91} & set(counting.rows_seen)


@pytest.fixture
def probe(monkeypatch):
    """``probe.ratio = r``: the probe measures oneDNN at r times aten's time (no timing); the cached choices are
    dropped before and after."""
    state = SimpleNamespace(ratio=1.0, calls=0)

    def fake(d, d_ff, *args, **kwargs):
        state.calls += 1
        return state.ratio

    monkeypatch.setattr(cpu_gemm, "probe_ratio", fake)
    cpu_gemm.auto_choice.cache_clear()
    yield state
    cpu_gemm.auto_choice.cache_clear()


@pytest.mark.parametrize(
    "ratio,capability,expected",
    [
        (0.5, "AVX2", ONEDNN),
        (0.85, "AVX2", ATEN),
        (1.2, "AVX2", ATEN),
        (0.85, "AVX512", ONEDNN),
        (0.95, "AVX512", ATEN),
    ],
)
def test_auto_takes_the_kernel_the_probe_measured_faster_by_the_cpus_margin(
    probe, monkeypatch, ratio, capability, expected
):
    monkeypatch.setattr(cpu_gemm, "cpu_capability", lambda: capability)
    probe.ratio = ratio
    x = torch.zeros(4, 4)
    assert cpu_kernel("auto", x, 16) is expected
    assert cpu_kernel("onednn", x) is ONEDNN
    assert cpu_kernel("loop", x) is ATEN
    assert cpu_kernel("auto", x.double()) is ATEN  # oneDNN serves float32 only: not even probed
    with mkldnn_disabled():
        assert cpu_kernel("auto", x, 16) is ATEN
    # one probe per shape class and thread count, cached
    cpu_kernel("auto", torch.zeros(3, 3), 15)
    assert probe.calls == 1
    cpu_kernel("auto", torch.zeros(3, 5), 16)
    assert probe.calls == 2


def test_the_rule_never_takes_onednn_unmeasured_or_not_clearly_faster():
    assert cpu_gemm.decide("AVX512", None).kernel is ATEN
    for capability in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR"):
        margin = cpu_gemm.margin_for(capability)
        assert margin < 1.0
        assert cpu_gemm.decide(capability, margin).kernel is ONEDNN
        assert cpu_gemm.decide(capability, margin + 1e-6).kernel is ATEN
        assert cpu_gemm.decide(capability, 1.0).kernel is ATEN
    assert cpu_gemm.margin_for("AVX2") < cpu_gemm.margin_for("AVX512")  # stricter where oneDNN is not expected to win


def test_the_probe_takes_the_median_of_interleaved_rounds():
    """Each run reads the clock twice; scripted durations: oneDNN half of aten's but one round disturbed (a loaded
    machine): the median holds."""
    durations = [9.0, 9.0]  # warm-up: oneDNN, aten
    rounds = [(1.0, 2.0), (1.0, 2.0), (7.0, 1.0), (1.1, 2.0), (1.0, 2.2), (0.9, 2.0), (1.0, 2.0)]
    for onednn, aten in rounds:
        durations += [onednn, aten]
    ticks = [0.0]
    for d in durations:
        ticks += [ticks[-1], ticks[-1] + d]
    clock = iter(ticks[1:]).__next__
    assert cpu_gemm.probe_ratio(8, 16, rounds=len(rounds), clock=clock) == pytest.approx(0.5)


def test_shape_classes_are_powers_of_two():
    assert cpu_gemm.shape_class(256, 1024) == (256, 1024)
    assert cpu_gemm.shape_class(384, 768) == (512, 1024)
    assert cpu_gemm.shape_class(1, 3) == (1, 4)


def test_onednn_asked_for_where_it_cannot_serve_names_the_fix():
    b = bank("gelu", False).double()
    b.gemm = "onednn"
    with pytest.raises(ConfigError, match="float32 rows on a CPU"):
        b(torch.zeros(3, b.d_model, dtype=torch.float64), [(0, 3)])


def test_layer_on_onednn_matches_the_layer_on_aten():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 24)
    outs = []
    for gemm in ("onednn", "loop"):
        layer = MoELayer(24, 40, 6, router={"kind": "top_k", "k": 2}, seed=5, gemm=gemm)
        xi = x.clone().requires_grad_()
        y, aux = layer(xi)
        (y.square().mean() + aux.loss).backward()
        outs.append([y.detach(), xi.grad, *(p.grad for p in layer.experts.parameters())])
    assert layer.experts.gemm == "loop"
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
