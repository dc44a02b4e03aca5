"""kernels/cpu_probe.py: the bf16-vs-fp32 product rate probe and its override."""

from __future__ import annotations

import torch

from deltaserve.kernels import cpu_probe, load


def test_speed_is_measured_where_the_instructions_exist():
    r = cpu_probe.bf16_dot_speed()
    assert r == cpu_probe.bf16_dot_speed()  # measured once per process
    has = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    if load("cpu_probe") is None or not has:
        assert r == 0.0
    else:
        # a real instruction rate: bf16 pairs are somewhere between a tenth and 4x of fp32 FMA's FLOPs
        assert 0.1 < r < 4.0


def test_env_overrides_the_measurement(monkeypatch):
    monkeypatch.setenv("DELTASERVE_BF16_DOT", "on")
    assert cpu_probe.bf16_dot_fast() is True
    monkeypatch.setenv("DELTASERVE_BF16_DOT", "off")
    assert cpu_probe.bf16_dot_fast() is False
    monkeypatch.setenv("DELTASERVE_BF16_DOT", "auto")
    assert cpu_probe.bf16_dot_fast() is (cpu_probe.bf16_dot_speed() > 1.0)
