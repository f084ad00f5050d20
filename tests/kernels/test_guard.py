"""The first-call check of the triton kernels (``kernels/guard``), on the interpreter path: the check runs on
CPU here because the test adds ``cpu`` to the guarded device types (on a real run only CUDA is checked)."""

from __future__ import annotations

import warnings

import pytest
import torch

from mf_lightning.kernels import dispatch, guard
from mf_lightning.nn import MemoryLayer

CPU = torch.device("cpu")


@pytest.fixture
def guarded_cpu(monkeypatch) -> list[int]:
    """CPU counts as a guarded device, with a fresh record of checks; returns the list of triton calls made
    by the check (one entry per call of the triton function it was given)."""
    monkeypatch.setattr(guard, "GUARDED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(guard, "RESULTS", {})
    monkeypatch.setattr(guard, "WARNED", set())
    calls: list[int] = []
    real = dispatch.backend_function

    def counting(backend: str):
        function = real(backend)
        if backend != "triton":
            return function

        def triton(*args, **kwargs):
            calls.append(1)
            return function(*args, **kwargs)

        return triton

    monkeypatch.setattr(dispatch, "backend_function", counting)
    return calls


def broken_triton(monkeypatch, scale: float = 1.01) -> None:
    """Make the triton backend's output off by ``scale`` (a kernel that miscomputes on unseen hardware)."""
    real = dispatch.backend_function

    def wrong(*args, **kwargs):
        y, buckets = real("triton")(*args, **kwargs)
        return y * scale, buckets

    monkeypatch.setattr(dispatch, "backend_function", lambda backend: wrong if backend == "triton" else real(backend))


def test_agreeing_kernels_are_checked_once_and_kept(guarded_cpu):
    layer = MemoryLayer(24, 10, code_bits=4, backend="triton")
    x = torch.randn(6, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x).sum().backward()
        layer(x).sum().backward()
    assert guard.RESULTS["cpu"].agrees
    assert len(guarded_cpu) == 3, "one check (its triton call) and then the layer's two calls"


def test_disagreeing_kernels_warn_once_and_fall_back_to_embedding_bag(guarded_cpu, monkeypatch):
    broken_triton(monkeypatch)
    layer = MemoryLayer(24, 10, code_bits=4, backend="triton")
    x = torch.randn(6, 24)
    with pytest.warns(
        RuntimeWarning,
        match=r"disagree with embedding_bag on cpu: worst (output|grad x|grad tables|grad bias) error 1\.\de-02",
    ):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = layer(x)
    layer.backend = "embedding_bag"
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    torch.testing.assert_close(again, y, rtol=0, atol=0)


def test_fatal_check_raises_and_off_skips_it(guarded_cpu, monkeypatch):
    broken_triton(monkeypatch)
    x = torch.randn(6, 24)
    with pytest.raises(guard.KernelDisagreement, match="worst .* error .*kernel_check: fatal"):
        MemoryLayer(24, 10, code_bits=4, backend="triton", kernel_check="fatal")(x)
    monkeypatch.setattr(guard, "RESULTS", {})
    off = MemoryLayer(24, 10, code_bits=4, backend="triton", kernel_check="off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = off(x)
    assert not guard.RESULTS, "kernel_check: off runs no check"
    off.backend = "embedding_bag"
    torch.testing.assert_close(y, off(x) * 1.01)


def test_a_wrong_gradient_is_caught_too(guarded_cpu, monkeypatch):
    """The check runs the backward: a kernel whose forward is right and table gradient wrong disagrees."""
    real = dispatch.backend_function

    class ScaledGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, tables):
            return tables.view_as(tables)

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    def wrong_gradient(x, tables, *args, **kwargs):
        return real("triton")(x, ScaledGradient.apply(tables), *args, **kwargs)

    monkeypatch.setattr(dispatch, "backend_function", lambda b: wrong_gradient if b == "triton" else real(b))
    with pytest.warns(RuntimeWarning, match="worst grad tables error"):
        MemoryLayer(24, 10, code_bits=4, backend="triton")(torch.randn(3, 24))


def test_the_check_runs_eagerly_under_torch_compile(guarded_cpu, monkeypatch):
    broken_triton(monkeypatch)
    layer = MemoryLayer(24, 10, code_bits=4, backend="triton")
    x = torch.randn(6, 24)
    with pytest.warns(RuntimeWarning, match="disagree with embedding_bag"):
        y = torch.compile(layer, fullgraph=True)(x)
    layer.backend = "embedding_bag"
    torch.testing.assert_close(y, layer(x))


def test_unguarded_devices_and_other_backends_run_no_check(monkeypatch):
    monkeypatch.setattr(guard, "RESULTS", {})
    broken_triton(monkeypatch)
    MemoryLayer(24, 10, code_bits=4, backend="triton")(torch.randn(3, 24))
    monkeypatch.setattr(guard, "GUARDED_DEVICE_TYPES", ("cuda", "cpu"))
    MemoryLayer(24, 10, code_bits=4, backend="embedding_bag")(torch.randn(3, 24))
    assert not guard.RESULTS
