"""mae_fast.ops.attention (self-attention read from a fused qkv projection) against SDPA and a
float64 reference, and the blocks' "triton" attention backend.

Both CPU dispatch paths run the parity tests: 'triton' (mae_fast.kernels.attention under the
interpreter, every buffer it allocates NaN-poisoned), also as 'triton-two-kernel-bwd' (the dq
kernel's backward even where one key block holds the sequence), and 'torch' (the PyTorch
fallback, TRITON_INTERPRET=0). fp32 is held to rtol 1e-5 against float64; fp16 to
flash-attention's own rule, max |out - ref64| <= 2 max |SDPA in fp16 - ref64| + atol (over the whole tensor: attention outputs
pass near 0 where an elementwise bound would hinge on torch's rounding there). bf16 arithmetic is
wrong under the interpreter (docs/design.md), so CPU bf16 takes the fallback on either path
(test_bf16_on_cpu_takes_the_fallback); the bf16 kernels are tested on the GPU.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _triton_ops import INTERPRET, OpLog, _nan_empty, runs_without_sync, take_path

import mae_fast
from mae_fast.models import blocks

A = importlib.import_module("mae_fast.ops.attention")  # the module (mae_fast.ops.attention is the function)

if INTERPRET:  # imported while TRITON_INTERPRET=1, so its kernels are the interpreted ones
    from mae_fast.kernels import attention as kat
else:
    kat = None

# B, N, heads, d: one token; several key/query blocks (N > 64) and N not a power of two; d not a
# power of two; MAE's head dims 32 and 64
SHAPES = [(1, 1, 1, 1), (2, 5, 2, 8), (1, 70, 2, 16), (2, 17, 1, 24), (1, 50, 2, 64), (2, 9, 3, 32)]


@pytest.fixture(params=["triton", "triton-two-kernel-bwd", "torch"])
def path(request, monkeypatch):
    """_triton_ops' dispatch paths, the triton one also with the two-kernel backward everywhere."""
    name = take_path(request.param.removesuffix("-two-kernel-bwd"), monkeypatch)
    if request.param == "triton-two-kernel-bwd":
        monkeypatch.setattr(kat, "ONE_PASS_BWD", False)
    return name


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    if kat is not None:
        monkeypatch.setattr(kat, "empty", _nan_empty)


def sdpa(qkv, heads):
    """The composite the op replaces: SDPA on the head views, heads merged back."""
    B, N, width = qkv.shape
    q, k, v = qkv.view(B, N, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, width // 3)


def fwd_bwd(fn, qkv, heads, grad, dtype=None):
    """(out, grad of qkv) of fn on a leaf copy of qkv (in dtype)."""
    x = qkv.detach().to(dtype or qkv.dtype).requires_grad_()
    out = fn(x, heads)
    (g,) = torch.autograd.grad(out, x, grad.to(out.dtype))
    return out.detach(), g


def close64(a, b, rtol=1e-5, atol=1e-6):
    assert not a.isnan().any()
    torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)


def assert_2x_max_rule(out, ref64, low, atol):
    assert out.dtype == low.dtype and not out.isnan().any()
    err, base = (out.double() - ref64).abs().max().item(), (low.double() - ref64).abs().max().item()
    assert err <= 2 * base + atol, f"max error {err} > 2 * {base} + {atol}"


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_float64(path, shape):
    B, N, H, d = shape
    qkv, grad = torch.randn(B, N, 3 * H * d), torch.randn(B, N, H * d)
    assert (A.kernels_for(qkv, H) is not None) == (path == "triton")
    out, g = fwd_bwd(mae_fast.ops.attention, qkv, H, grad)
    out64, g64 = fwd_bwd(sdpa, qkv, H, grad, torch.float64)
    assert out.dtype == g.dtype == torch.float32 and g.is_contiguous()
    close64(out, out64)
    close64(g, g64)


@pytest.mark.parametrize("shape", [(2, 37, 2, 16), (2, 50, 2, 64)], ids=str)
def test_fp16_two_x_rule(path, shape):
    """(50, 64): the encoder's one-pass backward, two query blocks per key block."""
    B, N, H, d = shape
    qkv, grad = torch.randn(B, N, 3 * H * d).half(), torch.randn(B, N, H * d).half()
    out, g = fwd_bwd(mae_fast.ops.attention, qkv, H, grad)
    low, glow = fwd_bwd(sdpa, qkv, H, grad)
    out64, g64 = fwd_bwd(sdpa, qkv, H, grad, torch.float64)
    assert_2x_max_rule(out, out64, low, 1e-4)
    assert_2x_max_rule(g, g64, glow, 1e-4)


def test_bf16_on_cpu_takes_the_fallback(path):
    """The interpreter computes bf16 tl.dot wrongly (outputs near 8e8 for a true 2): CPU bf16 runs the
    fallback, held to flash-attention's rule against SDPA in bf16."""
    B, N, H, d = 2, 37, 2, 16
    qkv, grad = torch.randn(B, N, 3 * H * d).bfloat16(), torch.randn(B, N, H * d).bfloat16()
    assert A.kernels_for(qkv, H) is None
    out, g = fwd_bwd(mae_fast.ops.attention, qkv, H, grad)
    low, glow = fwd_bwd(sdpa, qkv, H, grad)
    out64, g64 = fwd_bwd(sdpa, qkv, H, grad, torch.float64)
    assert_2x_max_rule(out, out64, low, 1e-3)
    assert_2x_max_rule(g, g64, glow, 1e-3)


def test_double_backward_is_refused(path):
    """A gradient of the gradient names the op, on the kernel path (_AttentionEager, whose kernels
    would otherwise leave it silently disconnected) and the custom op's alike."""
    qkv = torch.randn(2, 5, 3 * 2 * 8, requires_grad=True)
    (g,) = torch.autograd.grad(mae_fast.ops.attention(qkv, 2).square().sum(), qkv, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"double backward of mae_fast.ops.attention is not supported"):
        g.sum().backward()


def test_head_dim_past_the_kernels_takes_the_fallback():
    qkv, grad = torch.randn(2, 3, 3 * 130), torch.randn(2, 3, 130)
    assert A.kernels_for(qkv, 1) is None
    out, g = fwd_bwd(mae_fast.ops.attention, qkv, 1, grad)
    out64, g64 = fwd_bwd(sdpa, qkv, 1, grad, torch.float64)
    close64(out, out64)
    close64(g, g64)


def test_gradcheck_float64():
    qkv = torch.randn(2, 6, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mae_fast.ops.attention(t, 2), (qkv,))


@pytest.mark.parametrize("layout", ["column-slice", "batch-strided", "grad-expanded"])
def test_non_contiguous_qkv_and_grad(path, layout):
    B, N, H, d = 2, 11, 2, 8
    W = 3 * H * d
    qkv, grad = torch.randn(B, N, W), torch.randn(B, N, H * d)
    if layout == "column-slice":  # rows of a wider tensor: row stride > width
        qkv = torch.randn(B, N, W + 5)[..., 2:W + 2]
    elif layout == "batch-strided":
        qkv = torch.randn(N, B, W).transpose(0, 1)
    else:  # the gradient of a sum: stride 0 everywhere but the last dim
        grad = torch.randn(1, 1, H * d).expand(B, N, H * d)
    out, g = fwd_bwd(mae_fast.ops.attention, qkv, H, grad)
    out64, g64 = fwd_bwd(sdpa, qkv, H, grad, torch.float64)
    close64(out, out64)
    close64(g, g64)


# numpy warnings of the interpreter for values that are dropped: tl.where evaluates both branches
# (the dq kernel's masked exp2), and the dk/dv kernel's padded keys overflow in rows it never stores
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_very_negative_scores_stay_finite(path):
    """Every score of a row near -200 (natural log units): the padded keys' exp2(0 - lse) would
    overflow if it were not masked (the sequence, 5, is shorter than the smallest key block)."""
    B, N, H, d = 1, 5, 1, 8
    u = torch.randn(d)
    u = u / u.norm() * (200 * d ** 0.5) ** 0.5
    qkv = torch.zeros(B, N, 3, H, d)
    qkv[:, :, 0] = -u
    qkv[:, :, 1] = u + 0.01 * torch.randn(B, N, H, d)
    qkv[:, :, 2] = torch.randn(B, N, H, d)
    qkv, grad = qkv.reshape(B, N, 3 * H * d), torch.randn(B, N, H * d)
    out, g = fwd_bwd(mae_fast.ops.attention, qkv, H, grad)
    out64, g64 = fwd_bwd(sdpa, qkv, H, grad, torch.float64)
    # scores of ~-290 (log2 units) keep ~2e-5 relative accuracy in fp32 and the gradient scales
    # with |q|, |k| ~ 38: a loose bound (SDPA's fp32 errs by 4e-5); the point is no inf or NaN
    close64(out, out64, rtol=1e-4, atol=1e-4)
    close64(g, g64, rtol=1e-3, atol=1e-3)


def test_deterministic(path):
    qkv, grad = torch.randn(2, 70, 3 * 2 * 16), torch.randn(2, 70, 2 * 16)
    (o1, g1), (o2, g2) = [fwd_bwd(mae_fast.ops.attention, qkv, 2, grad) for _ in range(2)]
    assert torch.equal(o1, o2) and torch.equal(g1, g2)


@pytest.mark.parametrize("B,N", [(0, 4), (2, 0)])
def test_empty(path, B, N):
    qkv = torch.randn(B, N, 3 * 2 * 8, requires_grad=True)
    out = mae_fast.ops.attention(qkv, 2)
    assert out.shape == (B, N, 16)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


# ----------------------------------------------------------------------------- torch.library / compile

def test_opcheck():
    qkv = torch.randn(2, 5, 3 * 2 * 8)
    out, lse = torch.ops.mae_fast.attention(qkv, 2)
    torch.library.opcheck(torch.ops.mae_fast.attention.default, (qkv.clone().requires_grad_(), 2))
    torch.library.opcheck(torch.ops.mae_fast.attention_backward.default,
                          (torch.randn_like(out), qkv, out, lse, 2))


def test_kernel_calls_skip_the_dispatcher_and_match_the_custom_op(path):
    """As add_layer_norm: eager calls that run the kernels go through _AttentionEager, not
    torch.library's dispatch; the results are bitwise the custom op's."""
    qkv, grad = torch.randn(2, 9, 3 * 2 * 8), torch.randn(2, 9, 16)
    with OpLog() as log:
        out, g = fwd_bwd(mae_fast.ops.attention, qkv, 2, grad)
    names = {f"{f.namespace}.{f.overloadpacket.__name__}" for f in log.ops}
    via_op = {"mae_fast.attention", "mae_fast.attention_backward"}
    assert names & via_op == (via_op if path == "torch" else set()), names
    out2, g2 = fwd_bwd(lambda t, h: torch.ops.mae_fast.attention(t, h)[0], qkv, 2, grad)
    assert torch.equal(out, out2) and torch.equal(g, g2)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    def f(qkv):
        return mae_fast.ops.attention(qkv * 1.5, 2).sin().sum()

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    a = torch.randn(2, 7, 3 * 2 * 8, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    l1, l2 = compiled(a), f(b)
    torch.testing.assert_close(l1, l2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------- the blocks' backend

@pytest.fixture
def triton_attention():
    before = mae_fast.attention_backend()
    mae_fast.set_attention_backend("triton")
    yield
    mae_fast.set_attention_backend(before)


def test_attend_takes_the_op_where_its_kernels_run(path, triton_attention):
    """With the "triton" backend the blocks' attention is the op where its kernels run (here:
    interpreted) and SDPA elsewhere (the op's fallback would only be slower); "sdpa" is SDPA."""
    qkv = torch.randn(2, 5, 3 * 2 * 8)

    def sdpa_ran():
        with OpLog() as log:
            blocks.attend(qkv, 2)
        return any("scaled_dot_product" in f.overloadpacket.__name__ for f in log.ops)

    assert sdpa_ran() == (path == "torch")
    mae_fast.set_attention_backend("sdpa")
    assert sdpa_ran()


def test_model_with_triton_attention_matches_sdpa(path, triton_attention):
    """A whole MAE training step (loss and every gradient) with the blocks on the op equals the
    SDPA blocks'."""
    torch.manual_seed(0)
    model = mae_fast.MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                          decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                          norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)

    def step():
        model.zero_grad()
        loss, pred, mask = model(imgs, 0.75, noise)
        loss.backward()
        return loss.detach(), pred.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}

    ours = step()
    mae_fast.set_attention_backend("sdpa")
    ref = step()
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-5)
    assert ours[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(ours[2][name], ref[2][name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiling_first_needs_no_import_while_tracing():
    """A fresh process that compiles the model before any eager call: the kernels were imported
    when the backend was set (dynamo cannot trace an import; fullgraph would fail, and a graph
    break would split the CUDA graphs)."""
    code = ("import torch, mae_fast\n"
            "mae_fast.set_attention_backend('triton')\n"
            "m = mae_fast.MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,"
            " decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)\n"
            "ops = []\n"
            "def backend(gm, example):\n"
            "    ops.extend(str(n.target) for n in gm.graph.nodes if n.op == 'call_function')\n"
            "    return gm\n"
            "torch.compile(m, fullgraph=True, backend=backend)(torch.randn(2, 3, 16, 16), 0.75, torch.rand(2, 16))\n"
            "print(sum('mae_fast.attention' in t for t in ops))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) == (2 if INTERPRET else 0)  # one per block where the kernels run


def test_model_with_triton_attention_compiles_whole(triton_attention):
    """torch.compile(fullgraph=True) of the model with the blocks on the op: no graph break, and
    the same loss and gradients as eager (on the kernels here when interpreted, else the op is not
    taken and this is the SDPA model)."""
    torch.manual_seed(0)
    model = mae_fast.MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                          decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(imgs, 0.75, noise, return_pred=False)[0]
    closs = torch.compile(model, fullgraph=True, backend="aot_eager")(imgs, 0.75, noise, return_pred=False)[0]
    torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-6)
    for g, cg in zip(torch.autograd.grad(loss, params), torch.autograd.grad(closs, params)):
        torch.testing.assert_close(cg, g, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- bad input

BAD = [
    ("qkv list", lambda: mae_fast.ops.attention([[1.0]], 1), TypeError, r"qkv must be a torch.Tensor, got list"),
    ("qkv int", lambda: mae_fast.ops.attention(torch.ones(1, 2, 6, dtype=torch.long), 1), TypeError,
     r"qkv must be float32, float16, bfloat16 or float64, got torch.int64"),
    ("qkv 2-D", lambda: mae_fast.ops.attention(torch.randn(2, 6), 1), ValueError,
     r"qkv must have shape \(B, N, 3 \* num_heads \* d\) .*got \(2, 6\)"),
    ("width", lambda: mae_fast.ops.attention(torch.randn(1, 2, 8), 2), ValueError,
     r"\(num_heads = 2\), got \(1, 2, 8\)"),
    ("heads 0", lambda: mae_fast.ops.attention(torch.randn(1, 2, 6), 0), ValueError, r"num_heads must be >= 1, got 0"),
    ("heads float", lambda: mae_fast.ops.attention(torch.randn(1, 2, 6), 1.0), TypeError,
     r"num_heads must be an int, got float"),
    ("heads bool", lambda: mae_fast.ops.attention(torch.randn(1, 2, 6), True), TypeError,
     r"num_heads must be an int, got bool"),
    ("backend", lambda: mae_fast.set_attention_backend("flash"), ValueError,
     r"name must be one of 'sdpa', 'triton', got 'flash'"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_environment_variable_names_it_where_it_is_used():
    """A bad value does not break `import mae_fast` (so --help and info still run): info shows it,
    and the blocks raise it, naming the variable, when they attend."""
    env = dict(os.environ, MAE_FAST_ATTENTION="cudnn")
    message = "MAE_FAST_ATTENTION must be one of 'sdpa', 'triton', got 'cudnn'"
    info = subprocess.run([sys.executable, "-m", "mae_fast.info"], env=env, capture_output=True, text=True)
    assert info.returncode == 0 and message in info.stdout, info.stderr
    use = "import mae_fast, torch; mae_fast.models.blocks.attend(torch.randn(1, 4, 6), 1)"
    r = subprocess.run([sys.executable, "-c", use], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and message in r.stderr


# ----------------------------------------------------------------------------- GPU (compiled kernels)

# (B, N, heads, d): ViT-B/16 MAE at batch 256, encoder (49 kept patches + cls) and decoder; ViT-L's
# encoder at batch 128
GPU_CASES = {"vit_b-encoder": (256, 50, 12, 64), "vit_b-decoder": (256, 197, 16, 32),
             "vit_l-encoder": (128, 50, 16, 64)}


@pytest.mark.gpu
def test_gpu_sequence_first_qkv_past_int32_offsets():
    """A sequence-first (N, B, 3 * H * d) tensor transposed to (B, N, ...): the row stride B * width
    puts in-sample offsets past 2**31, where the kernels' 32-bit row arithmetic would wrap."""
    N, B, H, d = 197, 60_000, 1, 64
    qkv = torch.randn(N, B, 3 * H * d, device="cuda", dtype=torch.bfloat16).transpose(0, 1).requires_grad_()
    out = mae_fast.ops.attention(qkv, H)
    tail = qkv[-2:].detach().contiguous().requires_grad_()
    want = mae_fast.ops.attention(tail, H)
    torch.testing.assert_close(out[-2:], want)
    g = torch.randn_like(want)
    (out[-2:] * g).sum().backward()
    want.backward(g)
    torch.testing.assert_close(qkv.grad[-2:], tail.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_bf16_mae_shapes(case):
    B, N, H, d = GPU_CASES[case]
    qkv = torch.randn(B, N, 3 * H * d, device="cuda").bfloat16()
    grad = torch.randn(B, N, H * d, device="cuda").bfloat16()
    out, g = fwd_bwd(mae_fast.ops.attention, qkv, H, grad)
    low, glow = fwd_bwd(sdpa, qkv, H, grad)  # torch's own choice of backend (cuDNN on an H200)
    out64, g64 = fwd_bwd(sdpa, qkv, H, grad, torch.float64)
    assert_2x_max_rule(out, out64, low, 1e-3)
    assert_2x_max_rule(g, g64, glow, 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,H,d", [(8, 197, 16, 32), (4200, 3, 16, 16)], ids=["decoder", "67200-heads"])
def test_gpu_fp32_matches_float64(B, N, H, d):
    """fp32 (IEEE products) at the decoder's shape, and with B * H = 67,200 > 65,535, the limit of a
    CUDA grid's second dimension: every head is computed."""
    qkv, grad = torch.randn(B, N, 3 * H * d, device="cuda"), torch.randn(B, N, H * d, device="cuda")
    out, g = fwd_bwd(mae_fast.ops.attention, qkv, H, grad)
    out64, g64 = fwd_bwd(sdpa, qkv, H, grad, torch.float64)
    close64(out, out64)
    close64(g, g64, atol=1e-5)


@pytest.mark.gpu
def test_gpu_deterministic_and_no_sync():
    qkv = torch.randn(64, 197, 3 * 16 * 32, device="cuda").bfloat16()
    grad = torch.randn(64, 197, 16 * 32, device="cuda").bfloat16()
    outs = runs_without_sync(lambda: fwd_bwd(mae_fast.ops.attention, qkv, 16, grad))
    for out, g in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(g, outs[0][1])


def test_module_env_is_consistent():
    if INTERPRET:
        from mae_fast.ops._common import is_interpreted

        assert is_interpreted(kat)
    else:
        assert os.environ.get("TRITON_INTERPRET") != "1"
