"""pytest-benchmark suite: the Cat-DPO loss per backend at a few fixed shapes.

Outside ``tests/`` (pytest's ``testpaths``), so CI does not collect it. Run::

    python -m pytest benchmarks -m benchmark                 # CPU: reference vs torch
    python -m pytest benchmarks -m benchmark --benchmark-compare   # against a saved run
    python -m pytest benchmarks -m benchmark -k linear_loss  # the fused LM head only

On a CUDA machine the triton backend is added and the shapes are GPU-sized.
Each benchmark group is one ``(shape, dtype, mode)``, so pytest-benchmark's
table lines the backends up side by side; the naive ``reference`` row is the
baseline. Inputs and variants come from ``catdpo_kernels.bench.cases`` (the
same ones ``catdpo-bench`` times, with ``check_inputs=False``). For ratios,
memory and the performance targets use ``catdpo-bench``.

``test_linear_loss`` times the fused LM head (``linear_loss`` from hidden
states, trainable and frozen head) per backend, with the inputs of
``catdpo-bench --head`` (``catdpo_kernels.bench.head_cases``).
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from catdpo_kernels.bench import cases as C  # noqa: E402
from catdpo_kernels.bench import head_cases as H  # noqa: E402

pytestmark = pytest.mark.benchmark

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
if HAS_CUDA:
    SHAPES, DTYPE, ROUNDS = ("8x1024x32000", "8x2048x128256"), torch.bfloat16, 10
    BACKENDS = ("reference", "torch", "triton")
else:
    SHAPES, DTYPE, BACKENDS, ROUNDS = ("8x128x8000", "8x256x16000"), torch.float32, ("reference", "torch"), 3


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=SHAPES)
def inputs(request):
    shape = C.Shape.parse(request.param)
    inp = C.make_logits_inputs(shape, DTYPE, DEVICE, seed=0)[0]
    yield shape, inp
    del inp
    if HAS_CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", ("fwd_bwd", "fwd"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss(benchmark, inputs, backend, mode):
    shape, inp = inputs
    (variant,) = C.logits_variants([backend], device=DEVICE, inplace=False, triton_configs=None)
    forward = variant.build()

    def fwd_bwd():
        loss, targets = forward(inp)
        torch.autograd.grad(loss, targets)
        _sync()

    def fwd():
        forward(inp)
        _sync()

    step = fwd_bwd if mode == "fwd_bwd" else fwd
    step()  # Triton JIT / first-touch allocations outside the measurement
    benchmark.group = f"{shape} {C.dtype_name(DTYPE)} {mode}"
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu",
        shape=str(shape),
        dtype=C.dtype_name(DTYPE),
        backend=backend,
        mode=mode,
        torch=torch.__version__,
    )
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)


# ------------------------------------------------------------------ the fused LM head (linear_loss)
if HAS_CUDA:
    HEAD_SHAPES, HEAD_DTYPE, HEAD_BACKENDS = ("8x2048x4096x128256",), torch.bfloat16, ("reference", "torch", "triton")
else:
    HEAD_SHAPES, HEAD_DTYPE, HEAD_BACKENDS = ("8x256x256x16000",), torch.float32, ("reference", "torch")


@pytest.fixture(scope="module", params=HEAD_SHAPES)
def head_inputs(request):
    shape = H.HeadShape.parse(request.param)
    inp = H.make_head_inputs(shape, HEAD_DTYPE, DEVICE, seed=0)
    yield shape, inp
    del inp
    if HAS_CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("frozen", (False, True), ids=("trainable", "frozen"))
@pytest.mark.parametrize("backend", HEAD_BACKENDS)
def test_linear_loss(benchmark, head_inputs, backend, frozen):
    """``linear_loss`` fwd+bwd from hidden states (the fused LM head); ``reference`` builds all logits.

    The same inputs and call as ``catdpo-bench --head`` (rows naive / ours-<backend>, ``-frozen`` with
    ``weight.requires_grad=False``). For the peers, ratios, memory and TFLOP/s use ``catdpo-bench --head``.
    """
    shape, inp = head_inputs
    forward = H._linear_loss_forward(backend, frozen)

    def fwd_bwd():
        loss, targets = forward(inp)
        torch.autograd.grad(loss, targets)
        _sync()

    fwd_bwd()  # Triton JIT / first-touch allocations outside the measurement
    benchmark.group = f"linear_loss {shape} {C.dtype_name(HEAD_DTYPE)} fwd_bwd {'frozen' if frozen else 'trainable'}"
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu",
        shape=str(shape),
        shape_format="2BxTxHxV",
        dtype=C.dtype_name(HEAD_DTYPE),
        backend=backend,
        frozen=frozen,
        counted_tokens=shape.counted_tokens,
        torch=torch.__version__,
    )
    benchmark.pedantic(fwd_bwd, rounds=ROUNDS, iterations=1, warmup_rounds=1)
