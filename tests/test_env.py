"""deltaserve/env.py: one on/off vocabulary for every switch, clear errors, read at call time."""

from __future__ import annotations

import pytest

from deltaserve import env


@pytest.mark.parametrize("value, expected", [("on", True), ("1", True), ("TRUE", True), ("yes", True),
                                             ("off", False), ("0", False), ("False", False), ("no", False)])
def test_switches_share_one_vocabulary(monkeypatch, value, expected):
    monkeypatch.setenv("DELTASERVE_NATIVE", value)
    monkeypatch.setenv("DELTASERVE_BF16_DOT", value)
    monkeypatch.setenv("DELTASERVE_AMX_SHORT", value)
    assert env.native_kernels() is expected
    assert env.bf16_dot() is expected
    assert env.amx_short() is expected


def test_defaults_and_auto(monkeypatch):
    for name in ("DELTASERVE_NATIVE", "DELTASERVE_BF16_DOT", "DELTASERVE_LARGE_BATCH_LINEAR", "DELTASERVE_CACHE",
                 "DELTASERVE_STEP_TRACE", "DELTASERVE_API_KEY", "DELTASERVE_AMX_SHORT"):
        monkeypatch.delenv(name, raising=False)
    assert env.native_kernels() is True and env.amx_short() is True
    assert env.bf16_dot() is None and env.large_batch_linear() is None
    assert env.cache_dir() is None and env.step_trace() is None and env.api_key() is None
    monkeypatch.setenv("DELTASERVE_BF16_DOT", "auto")
    monkeypatch.setenv("DELTASERVE_LARGE_BATCH_LINEAR", "Auto")
    assert env.bf16_dot() is None and env.large_batch_linear() is None
    monkeypatch.setenv("DELTASERVE_LARGE_BATCH_LINEAR", "FP32")
    assert env.large_batch_linear() == "fp32"
    monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "Matmul")
    assert env.span_attn() == "matmul"
    monkeypatch.setenv("DELTASERVE_CACHE", "~/x")
    assert env.cache_dir() is not None and "~" not in str(env.cache_dir())


def test_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("DELTASERVE_NATIVE", "auto")  # NATIVE is on/off only
    with pytest.raises(env.EnvError, match="DELTASERVE_NATIVE='auto': expected on\\|off$"):
        env.native_kernels()
    monkeypatch.setenv("DELTASERVE_BF16_DOT", "maybe")
    with pytest.raises(env.EnvError, match="DELTASERVE_BF16_DOT='maybe': expected on\\|off\\|auto"):
        env.bf16_dot()
    monkeypatch.setenv("DELTASERVE_LARGE_BATCH_LINEAR", "fp16")
    with pytest.raises(env.EnvError, match="bf16\\|fp32\\|auto"):
        env.large_batch_linear()
