"""Ahead-of-time kernels on a machine without a GPU: what ``einflash aot`` writes, and what the loader refuses.

Calls here run on CPU tensors: a call that a stored binary fits gets as far as the launch, which
needs a GPU and raises DeviceError; the binary each kernel would have run is in ``op.kernels.last``.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import triton
from catalogue import EXAMPLES, load_example

import einflash as ef
from einflash import cli
from einflash.compiler.aot.build import declared_inputs, record
from einflash.compiler.aot.manifest import MANIFEST, read_manifest
from einflash.compiler.aot.specialise import first_misfit, specialise
from einflash.compiler.codegen.combine import lower_combine
from einflash.compiler.codegen.forward import lower
from einflash.errors import AOTError, AOTMismatchError, DeviceError
from einflash.ir.reference import bind_extents, bind_params

F16 = torch.float16


@pytest.fixture(scope="module")
def softmax_dir(built_root):
    return built_root / "softmax"


@pytest.fixture(scope="module")
def softmax(softmax_dir):
    return ef.load_aot(softmax_dir)


def _qkv(B=1, Hq=4, Hkv=2, M=64, N=64, E=64, F=64, dtype=F16):
    return (
        torch.randn(B, Hq, M, E, dtype=dtype),
        torch.randn(B, Hkv, N, E, dtype=dtype),
        torch.randn(B, Hkv, N, F, dtype=dtype),
    )


def _chosen(op, *args, **kwargs) -> list[tuple[str, str]]:
    """The (kernel, lengths) of each binary a call that fits would launch."""
    with pytest.raises(DeviceError, match="run on a CUDA GPU"):
        op(*args, **kwargs)
    return op.kernels.last


# -- what the CLI writes ------------------------------------------------------------------------------


def test_cli_writes_sources_binaries_and_a_manifest_for_sm90(softmax_dir):
    m = read_manifest(softmax_dir)
    assert json.loads((softmax_dir / MANIFEST).read_text()) == m.to_json()  # the file round-trips
    op = load_example("softmax").softmax
    assert (m.variant, m.key) == ("softmax", op.cascade.key)
    assert m.target == {"name": "sm90", "backend": "cuda", "arch": 90, "warp_size": 32}
    assert set(m.versions) == {"einflash", "triton", "torch", "python"}
    fused, split = m.entries
    assert fused.schedule.splits == 1 and len(fused.launches) == 1
    assert split.schedule.splits > 1 and split.schedule.pack and split.launches[1].startswith("attn_combine__")
    assert split.grids[0][2] == split.schedule.splits
    for kernel in m.kernels.values():
        assert sorted(b.lengths for b in kernel.binaries) == ["any", "exact"]
        for b in kernel.binaries:
            cubin, meta = (softmax_dir / b.cubin).read_bytes(), json.loads((softmax_dir / b.metadata).read_text())
            assert cubin[:4] == b"\x7fELF" and meta["name"] == kernel.name
            assert meta["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}
            # the manifest records what the compile reported (head dim 64's default spills a few bytes on sm_90)
            assert (meta["num_warps"], meta["shared"]) == (b.num_warps, b.shared_bytes) and 0 <= b.spill_bytes <= 64
            assert [a.name for a in b.args] == kernel.interface["arguments"]


def test_sources_are_what_the_jit_path_renders(softmax_dir):
    """One generator: the stored sources are the kernels the JIT path writes for the same specialisation."""
    fwd = load_example("softmax").softmax.forward
    dims = {"e": 64, "e_extent": 64, "f": 64, "f_extent": 64}
    for src in (
        lower(fwd.rewritten, dims, "float16"),
        lower(fwd.rewritten, dims, "float16", split=True),
        lower_combine(fwd.rewritten, dims, "float16"),
    ):
        assert (softmax_dir / "sources" / f"{src.name}.py").read_text() == src.text


def test_exact_binaries_specialise_as_the_jit_and_any_binaries_drop_what_lengths_change(softmax_dir, built_root):
    m = read_manifest(softmax_dir)
    fused, split = (m.kernels[e.launches[0]] for e in m.entries)

    def spec(kernel, lengths):
        return {a.name: a for a in next(b for b in kernel.binaries if b.lengths == lengths).args}

    exact, loose = spec(fused, "exact"), spec(fused, "any")
    assert exact["M"].divisible and exact["N"].divisible and not loose["M"].divisible and not loose["N"].divisible
    for args in (exact, loose):  # what holds for every contiguous call stays
        assert args["stride_q_3"].value == 1 and args["q_ptr"].divisible and args["stride_k_2"].divisible
        assert args["BLOCK_M"].value == 64 and args["visits_ptr"].value is None
    exact, loose = spec(split, "exact"), spec(split, "any")
    assert exact["M"].value == 1 and loose["M"].type == "i32"  # decoding one query: M is built in, or not
    window = read_manifest(built_root / "sliding_window").kernels
    (kernel,) = window.values()
    assert spec(kernel, "exact")["p_window"].divisible and not spec(kernel, "any")["p_window"].divisible


def test_any_binaries_fit_every_length(softmax_dir):
    """The any-lengths binaries' assumptions hold at random M and N (and the exact ones' at the built shape)."""
    op = load_example("softmax").softmax
    m = read_manifest(softmax_dir)
    rng = random.Random(0)
    for entry in m.entries:
        for M, N in [(entry.shape.M, entry.shape.N)] + [(rng.randint(1, 300), rng.randint(1, 3000)) for _ in range(12)]:
            shape = ef.Shape(entry.shape.B, entry.shape.Hq, M, N, 64, 64, entry.shape.Hkv)
            inputs = declared_inputs(op.cascade, shape, F16)
            extents = bind_extents(op.forward.rewritten, inputs, {})
            values = bind_params(op.forward.rewritten, {}, extents)
            for src, call in record(op.forward, inputs, values, entry.schedule, extents):
                binaries = {b.lengths: b for b in m.kernels[src.name].binaries}
                assert first_misfit(binaries["any"].args, call.args) is None, (M, N)
                if (M, N) == (entry.shape.M, entry.shape.N):
                    assert binaries["exact"].args == specialise(call.args, src.signature.constexpr)


# -- what the loader picks and refuses ------------------------------------------------------------------


def test_loader_picks_the_most_specialised_binary_that_fits(softmax):
    (fused,), (split, combine) = (e.launches for e in softmax.manifest.entries)
    assert _chosen(softmax, *_qkv()) == [(fused, "exact")]
    assert _chosen(softmax, *_qkv(M=37, N=45)) == [(fused, "any")]
    assert _chosen(softmax, *_qkv(B=3, Hq=8, M=1, N=256)) == [(split, "exact"), (combine, "exact")]
    assert _chosen(softmax, *_qkv(B=1, Hq=8, M=3, N=1000)) == [(split, "any"), (combine, "any")]


def test_loader_refuses_a_non_contiguous_last_dimension(softmax):
    q, k, v = _qkv()
    k = torch.randn(1, 2, 64, 128, dtype=F16)[..., ::2]  # last-dimension stride 2
    with pytest.raises(
        AOTMismatchError,
        match=r"k's last dimension must be contiguous \(stride 1\); got stride 2: "
        r"call \.contiguous\(\) on it",
    ):
        softmax(q, k, v)
    assert _chosen(softmax, q, k.contiguous(), v)


def test_loader_refuses_misaligned_and_oddly_strided_tensors(softmax):
    q, k, v = _qkv()
    shifted = torch.empty(q.numel() + 1, dtype=F16)[1:].view(q.shape).copy_(q)
    with pytest.raises(AOTMismatchError, match="q must start at a 16-byte aligned address; got one 2 bytes past"):
        softmax(shifted, k, v)
    transposed = k.transpose(2, 3).contiguous().transpose(2, 3)  # keys along the last dim, stride 1 along n
    with pytest.raises(
        AOTMismatchError,
        match=r"k's stride along dimension 2 was compiled for multiples of 16; "
        r"got 1: call \.contiguous\(\) on k",
    ):
        softmax(q, transposed, v)


def test_loader_names_what_the_directory_holds_for_a_dtype_or_head_dim_it_lacks(softmax):
    with pytest.raises(
        AOTMismatchError,
        match=r"has no softmax kernels for float32.*it holds float16 B=1 Hq=4 Hkv=2 "
        r"M=64 N=64 E=64 F=64 \(fused, 64×128 tiles\); float16 .*split-KV",
    ):
        softmax(*_qkv(dtype=torch.float32))
    with pytest.raises(AOTMismatchError, match=r"no softmax kernels for float16, .* E=32 F=64"):
        softmax(*_qkv(E=32))


def test_loader_refuses_gradients_and_bad_arguments_as_the_declared_op_does(softmax):
    q, k, v = _qkv()
    with pytest.raises(ef.errors.CallError, match="forward kernels only"):
        softmax(q.requires_grad_(), k, v)
    with pytest.raises(ef.errors.MissingInputError, match="missing input"):
        softmax(q, k)
    offsets = torch.tensor([0, 30, 64])
    with pytest.raises(ef.errors.CallError, match=r"jagged batches .* are not built ahead of time"):
        softmax(q.detach(), k, v, cu_seqlens_q=offsets, cu_seqlens_k=offsets)


def test_parameters_reach_the_any_binary(built_root):
    op = ef.load_aot(built_root / "sliding_window")
    q, k, v = _qkv(Hq=2, Hkv=2, M=48, N=48, E=32, F=32)
    assert [b for _, b in _chosen(op, q, k, v)] == ["exact"]  # window 256, as built
    assert [b for _, b in _chosen(op, q, k, v, window=7)] == ["any"]


# -- corrupt and mismatched directories -------------------------------------------------------------------


@pytest.fixture
def copy(softmax_dir, tmp_path):
    shutil.copytree(softmax_dir, tmp_path / "d")
    return tmp_path / "d"


def _edit(directory, change):
    raw = json.loads((directory / MANIFEST).read_text())
    change(raw)
    (directory / MANIFEST).write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / MANIFEST).write_text("{not json"), "is corrupt \\(not JSON"),
        (lambda d: (d / MANIFEST).unlink(), "is not an einflash AOT directory: it has no manifest.json"),
        (lambda d: _edit(d, lambda m: m.update(format_version=99)), "format version 99; this einflash reads version 1"),
        (
            lambda d: _edit(d, lambda m: m["versions"].update(triton="9.9.9")),
            f"built with Triton 9.9.9, this process has Triton {triton.__version__}",
        ),
        (lambda d: _edit(d, lambda m: m["entries"][0].pop("schedule")), "is malformed \\(KeyError: 'schedule'\\)"),
        (
            lambda d: next((d / "binaries").glob("*.cubin")).write_bytes(b"\x7fELF garbage"),
            "does not match its checksum in the manifest",
        ),
        (lambda d: next((d / "sources").glob("*.py")).unlink(), "lacks files its manifest names: sources/"),
        (
            lambda d: _edit(d, lambda m: m.update(key="0" * 16)),
            "traces to cascade 64b3e8b55472857a, but the kernels were built for 0000000000000000",
        ),
    ],
)
def test_corrupt_or_mismatched_directories_are_reported(copy, damage, message):
    damage(copy)
    with pytest.raises(AOTError, match=message):
        ef.load_aot(copy)


def test_a_kernel_whose_interface_changed_is_refused_at_the_call(copy):
    _edit(copy, lambda m: next(iter(m["kernels"].values()))["interface"].update(params=["other"]))
    with pytest.raises(AOTError, match="another calling interface than the one compiled into"):
        ef.load_aot(copy)(*_qkv())


def test_cli_refuses_the_interpreter_target_and_a_foreign_folder(tmp_path, capsys):
    softmax = str(EXAMPLES / "softmax.py")
    assert (
        cli.main(["aot", softmax, "--shape", "1,2,64,64,64", "--target", "interpreter", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "BackendError: target 'interpreter' runs kernels in Triton's interpreter" in capsys.readouterr().err
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "notes.txt").write_text("mine")
    assert cli.main(["aot", softmax, "--shape", "1,2,64,64,64", "--out", str(tmp_path / "y")]) == 2
    assert "is not empty and holds no manifest.json" in capsys.readouterr().err
    assert (tmp_path / "y" / "notes.txt").read_text() == "mine"
