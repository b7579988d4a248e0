"""tools/profile_decode.py's reading of a profiler trace: which events are the device's, how kernels group,
and the busy time as the union of intervals (a synthetic trace: CPU runs record no device kernels)."""

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "profile_decode.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("profile_decode", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEMV = "std::enable_if<true, void>::type gemvx::kernel<int, float>(cublasGemvParams)"


def _trace():
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}}]
    host = [{"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 500.0, "name": "$python dispatch"}]
    device = [{"ph": "X", "pid": 2, "tid": 7, "ts": 0.0, "dur": 10.0, "name": "loop_fusion.12"},
              {"ph": "X", "pid": 2, "tid": 8, "ts": 5.0, "dur": 10.0, "name": "loop_fusion.7"},  # overlaps
              {"ph": "X", "pid": 2, "tid": 7, "ts": 30.0, "dur": 5.0, "name": GEMV},
              {"ph": "X", "pid": 2, "tid": 7, "ts": 40.0, "dur": 30.0, "name": "quant_matmul_gemv_2"}]
    return {"traceEvents": meta + host + device}


def test_only_device_events_are_read(tool):
    events = tool.device_events(_trace())
    assert [e["name"] for e in events] == ["loop_fusion.12", "loop_fusion.7", GEMV, "quant_matmul_gemv_2"]


def test_kernels_group_by_name_without_numbers_and_templates(tool):
    assert tool.group_name("loop_fusion.12") == tool.group_name("loop_fusion.7") == "loop_fusion"
    assert tool.group_name("quant_matmul_gemv_2") == "quant_matmul_gemv"
    assert tool.group_name("std::enable_if<true, void>::type gemvx::kernel<int>(p)") == "std::enable_if"
    assert (tool.group_name("void (anonymous namespace)::gemv8_kernel<16, 1, 8, true, 1, false>(int const*, float)")
            == "gemv8_kernel<16, 1, 8, true, 1, false>")


def test_summary_per_step(tool):
    rows, summary = tool.summarize(tool.device_events(_trace()), steps=2, top=10)
    assert [(r["kernel"], r["us_per_step"], r["launches_per_step"]) for r in rows] == [
        ("quant_matmul_gemv", 15.0, 0.5), ("loop_fusion", 10.0, 1.0), ("std::enable_if", 2.5, 0.5)]
    # busy: [0, 15) + [30, 35) + [40, 70) = 50 us over 2 steps; span 70 us
    assert summary["busy_us_per_step"] == 25.0 and summary["span_us_per_step"] == 35.0
    assert summary["kernel_us_per_step"] == 27.5 and summary["launches_per_step"] == 2.0
