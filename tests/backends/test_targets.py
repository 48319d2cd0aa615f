"""Targets as data: consistent limits and tables, detection, and the flags that choose a backend."""

from __future__ import annotations

import os
import sys
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch

from einflash import knobs
from einflash.backends import INTERPRETER, SM80, SM90, TARGETS, detect, get_target
from einflash.errors import BackendError, FlagError, LoweringError

GPUS = [t for t in TARGETS.values() if not t.is_interpreter]
HEAD_DIMS = (16, 40, 64, 80, 96, 128, 256)  # docs/design.md §7's edge cases, padded up to a bucket


def power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@pytest.mark.parametrize("target", TARGETS.values(), ids=lambda t: t.name)
def test_limits_and_rates_are_positive(target):
    assert TARGETS[target.name] is target
    for rate in (target.tensor_flops, target.fp32_flops, target.sfu_ops, target.hbm_bandwidth):
        assert rate > 0
    limits = (target.smem_per_block, target.regs_per_sm, target.regs_per_thread, target.sm_count)
    if target.is_interpreter:
        assert limits == (None, None, None, None)
    else:
        assert all(isinstance(x, int) and x > 0 for x in limits)
        assert target.regs_per_sm >= target.regs_per_thread * target.gpu.warp_size * 4  # a 4-warp program fits
        # Tensor cores are what make attention fast: they outrun the plain fp32 and special-function units.
        assert target.tensor_flops > target.fp32_flops > target.sfu_ops


def test_gpu_capabilities_follow_the_architecture():
    for target in GPUS:
        caps, arch = target.caps, target.gpu.arch
        assert caps.tensor_core_dot and caps.bf16
        assert caps.wgmma == caps.tma == (arch >= 90)
        assert caps.fp8 == (arch >= 89)
    assert not any(getattr(INTERPRETER.caps, f.name) for f in fields(INTERPRETER.caps))


def test_hopper_limits_are_the_ones_cross_compilation_checks():
    assert (SM90.gpu.arch, SM90.smem_per_block, SM80.gpu.arch, SM80.smem_per_block) == (90, 232_448, 80, 166_912)
    assert SM90.smem_per_block > SM80.smem_per_block


@pytest.mark.parametrize("target", TARGETS.values(), ids=lambda t: t.name)
@pytest.mark.parametrize("family", ["forward", "decode"])
def test_defaults_lie_in_the_search_space_and_cover_every_head_dim(target, family):
    tuning = getattr(target, family)
    buckets = [largest for largest, _ in tuning.defaults]
    assert buckets == sorted(set(buckets))
    for _, cfg in tuning.defaults:
        assert tuning.space.contains(cfg), cfg
    for d in HEAD_DIMS:
        assert tuning.default(d) in [cfg for _, cfg in tuning.defaults]
    with pytest.raises(LoweringError, match="head dimension 512"):
        tuning.default(512)


@pytest.mark.parametrize("target", TARGETS.values(), ids=lambda t: t.name)
def test_search_spaces_hold_values_triton_accepts(target):
    for space in (target.forward.space, target.decode.space):
        # tl.dot needs tiles of at least 16 in each dimension; Triton wants powers of two.
        assert all(power_of_two(b) and b >= 16 for b in space.block_m + space.block_n)
        assert all(power_of_two(w) for w in space.num_warps)
        assert all(s >= 1 for s in space.num_stages) and 1 in space.splits
    assert target.forward.space.splits == (1,) and len(target.decode.space.splits) > 1


def test_get_target_names_the_valid_backends_when_it_does_not_know_one():
    assert get_target("sm90") is SM90
    with pytest.raises(BackendError, match=r"'tpu'.*interpreter, sm80, sm90"):
        get_target("tpu")


# -- detection, with torch.cuda replaced by a fake GPU where one is needed ------------------------


@pytest.fixture
def no_flags(monkeypatch):
    for name in ("EINFLASH_BACKEND", "EINFLASH_DEBUG", "EINFLASH_DEPLOY"):
        monkeypatch.setenv(name, "")
    return monkeypatch


def fake_gpu(monkeypatch, capability, name, sms=132, smem=232_448):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    props = SimpleNamespace(name=name, multi_processor_count=sms, shared_memory_per_block_optin=smem)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def test_detect_without_cuda_is_the_interpreter(no_flags):
    no_flags.setattr(torch.cuda, "is_available", lambda: False)
    assert detect() is INTERPRETER


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_detect_on_this_cpu_only_machine_is_the_interpreter(no_flags):
    assert detect().is_interpreter


def test_detect_picks_the_architecture_and_the_part_by_name(no_flags):
    fake_gpu(no_flags, (9, 0), "NVIDIA H200", sms=132)
    h200 = detect()
    assert (h200.name, h200.device, h200.hbm_bandwidth) == ("sm90", "NVIDIA H200", 4.3e12)
    fake_gpu(no_flags, (9, 0), "NVIDIA H100 80GB HBM3", sms=132)
    assert detect().hbm_bandwidth == SM90.hbm_bandwidth < h200.hbm_bandwidth
    # An Ampere part that is not an A100: the driver's SM count and shared memory win over the table's.
    fake_gpu(no_flags, (8, 6), "NVIDIA RTX A6000", sms=84, smem=101_376)
    a6000 = detect()
    assert (a6000.name, a6000.sm_count, a6000.smem_per_block) == ("sm80", 84, 101_376)


@pytest.mark.parametrize("capability", [(7, 5), (10, 0)])
def test_detect_refuses_architectures_without_a_target(no_flags, capability):
    fake_gpu(no_flags, capability, "some GPU")
    with pytest.raises(BackendError, match=rf"{capability[0]}\.{capability[1]}.*EINFLASH_BACKEND=interpreter"):
        detect()


def test_backend_flag_overrides_detection(no_flags):
    fake_gpu(no_flags, (9, 0), "NVIDIA H200")
    no_flags.setenv("EINFLASH_BACKEND", "interpreter")
    assert detect() is INTERPRETER
    no_flags.setenv("EINFLASH_BACKEND", "sm80")
    assert detect() is SM80
    no_flags.setenv("EINFLASH_BACKEND", "SM90")  # this machine's own Hopper, with its name and rates
    assert detect().device == "NVIDIA H200"
    no_flags.setattr(torch.cuda, "is_available", lambda: False)
    assert detect() is SM90  # cross-compiling for Hopper from a CPU-only machine
    no_flags.setenv("EINFLASH_BACKEND", "gpu")
    with pytest.raises(BackendError, match=r"'gpu'.*interpreter, sm80, sm90"):
        detect()


@pytest.mark.gpu
def test_detect_on_this_gpu_machine_reports_its_device():
    target = detect()
    major, _ = torch.cuda.get_device_capability(0)
    props = torch.cuda.get_device_properties(0)
    assert (target.gpu.arch // 10, target.device, target.sm_count) == (major, props.name, props.multi_processor_count)
    assert target.smem_per_block >= 99 * 1024


# -- the other flags ---------------------------------------------------------------------------------


def test_flags_are_read_at_call_time_and_bad_values_are_refused(no_flags, tmp_path):
    assert (knobs.backend(), knobs.deploy(), knobs.debug_level()) == (None, False, knobs.Debug.OFF)
    no_flags.setenv("EINFLASH_DEPLOY", "yes")
    no_flags.setenv("EINFLASH_DEBUG", "2")
    no_flags.setenv("EINFLASH_CACHE_DIR", str(tmp_path))
    no_flags.setenv("EINFLASH_KERNEL_DIR", "")
    assert (knobs.deploy(), knobs.debug_level(), knobs.kernel_dir()) == (True, knobs.Debug.SOURCE, tmp_path / "kernels")
    no_flags.setenv("EINFLASH_DEBUG", "4")
    with pytest.raises(FlagError, match=r"EINFLASH_DEBUG must be one of 0, 1, 2, 3.*got '4'"):
        knobs.debug_level()
    no_flags.setenv("EINFLASH_DEPLOY", "maybe")
    with pytest.raises(FlagError, match=r"EINFLASH_DEPLOY.*'maybe'"):
        knobs.deploy()


def test_use_interpreter_turns_it_on_only_where_kernels_cannot_run_on_a_gpu(no_flags):
    no_flags.setenv("TRITON_INTERPRET", "")
    no_flags.delitem(sys.modules, "triton", raising=False)  # as before anything imported triton
    fake_gpu(no_flags, (9, 0), "NVIDIA H100 80GB HBM3")
    assert not knobs.use_interpreter() and os.environ["TRITON_INTERPRET"] == ""
    no_flags.setenv("EINFLASH_BACKEND", "interpreter")
    assert knobs.use_interpreter() and os.environ["TRITON_INTERPRET"] == "1"
    no_flags.setenv("EINFLASH_BACKEND", "")
    no_flags.setenv("TRITON_INTERPRET", "")
    no_flags.setattr(torch.cuda, "is_available", lambda: False)
    assert knobs.use_interpreter() and os.environ["TRITON_INTERPRET"] == "1"


def test_use_interpreter_refuses_once_triton_was_imported_without_it(no_flags):
    no_flags.setenv("TRITON_INTERPRET", "")
    no_flags.setitem(sys.modules, "triton", sys.modules.get("triton", SimpleNamespace()))
    no_flags.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match=r"use_interpreter.*before anything imports triton"):
        knobs.use_interpreter()
