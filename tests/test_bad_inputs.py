"""A table of bad inputs across the ops, both models, checkpoint loading and the CLI.

Every case asserts the exception type AND that the message names the offending argument and what
was expected. The whole table runs in-process under an alarm: a bad input must raise, never crash
the interpreter (a segfault would take pytest down), hang, or write outside a tensor (out-of-range
ids are refused on CPU before any kernel runs: see test_out_of_range_ids_touch_nothing, on both the
interpreted-Triton and the PyTorch-fallback paths).
"""
import contextlib
import io
import os
import signal

import pytest
import torch
from torch import nn

import mae_fast
from mae_fast import cli, ops
from mae_fast.train import pretrain
from mae_fast.io.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint


OFFICIAL = dict(img_size=(16, 24), patch_size=4, in_chans=3, embed_dim=32, depth=1, num_heads=4,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
VP_VIT = dict(image_size=(16, 24), patch_size=4, num_classes=10, dim=32, depth=1, heads=4, mlp_dim=64, dim_head=8)
SMALL = ["--model", "tiny", "--img-size", "16", "--batch-size", "8", "--samples-per-epoch", "32", "--quiet",
         "--vis-every", "100", "--epochs", "1"]


@pytest.fixture(autouse=True)
def _no_hang():
    """A bad input must fail fast: 60 s of wall time per case, then the test fails (no hang)."""
    def on_alarm(*_):
        raise TimeoutError("bad input made the call hang for 60 s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _fallback_for_cli(monkeypatch, request):
    """CLI cases run the ops' PyTorch fallback (speed; the kernels are tested elsewhere)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and str(callspec.params.get("name", "")).startswith("cli"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")


# ----------------------------------------------------------------------------- builders

def imgs(B=2, C=3, H=8, W=12, dtype=torch.float32):
    return torch.randn(B, C, H, W, dtype=dtype)


def u8(B=2, C=3, H=8, W=12):
    return torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8)


def ids(*rows, dtype=torch.int64):
    return torch.tensor(rows, dtype=dtype)


def official(**kw):
    return mae_fast.MaskedAutoencoderViT(**{**OFFICIAL, **kw})


def vit(**kw):
    return mae_fast.ViT(**{**VP_VIT, **kw})


def vp_mae(**kw):
    return mae_fast.MAE(**{"encoder": vit(), "decoder_dim": 16, "decoder_heads": 2, "decoder_dim_head": 8, **kw})


def pretrain_args(*argv):
    """parse_args; argparse's message (printed to stderr) becomes the SystemExit's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return pretrain.parse_args([*SMALL, *argv])
    except SystemExit as e:
        raise SystemExit(err.getvalue() or str(e)) from None


def cli_main(*argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return cli.main(list(argv))
    except SystemExit as e:
        raise SystemExit(err.getvalue() if isinstance(e.code, int) else str(e)) from None


def run_pretrain(tmp, *argv):
    return pretrain.main([*SMALL, "--output-dir", str(tmp / "run"), *argv])


def write(tmp, name, data: bytes):
    path = tmp / name
    path.write_bytes(data)
    return path


def torch_saved(tmp, name, obj):
    path = tmp / name
    torch.save(obj, path)
    return path

def tiny_ckpt(tmp, name="ckpt.pth", args=None, **top):
    """A checkpoint the CLI can rebuild (--model tiny at 16 px: 16 patches); top: more top-level entries."""
    from mae_fast.models.presets import build_model

    path = tmp / name
    save_checkpoint(path, {"model": build_model("tiny", 16).state_dict(),
                           "args": {"model": "tiny", "img_size": 16, **(args or {})}, **top})
    return str(path)


def flipped(tmp, name):
    """A file save_checkpoint wrote, then one bit of a tensor's bytes flipped."""
    t = torch.arange(64, dtype=torch.float32)
    path = tmp / name
    save_checkpoint(path, {"model": {"w": t}})
    data = bytearray(path.read_bytes())
    data[data.find(t.numpy().tobytes()) + 100] ^= 0x10
    path.write_bytes(bytes(data))
    return path



def state(**kw):
    return official(**kw).state_dict()


def f8(t, dtype=torch.float8_e4m3fn):
    """t in a float8 dtype: floating point to torch, computed in by none of the ops."""
    return t.to(dtype)


def double_backward(fn, *leaves):
    """The gradient of the gradient of fn(*leaves) with respect to its first argument."""
    leaves = [t.detach().requires_grad_() for t in leaves]
    (g,) = torch.autograd.grad(fn(*leaves).float().square().sum(), leaves[0], create_graph=True)
    g.sum().backward()


# ----------------------------------------------------------------------------- the table
# (id, call(tmp_path), exception type, regex that names the argument and what was expected)

X = torch.randn(2, 10, 8)
VIS = torch.randn(2, 3, 8)
MT = torch.randn(8)

CASES = [
    # --- patchify / unpatchify
    ("patchify 3-D imgs", lambda t: ops.patchify(imgs()[0], 4), ValueError, r"imgs must be 4-D \(B, C, H, W\), got shape \(3, 8, 12\)"),
    ("patchify int imgs", lambda t: ops.patchify(imgs().long(), 4), TypeError, r"imgs must be a floating-point tensor .*got torch.int64"),
    ("patchify numpy imgs", lambda t: ops.patchify(imgs().numpy(), 4), TypeError, r"imgs must be a torch.Tensor, got ndarray"),
    ("patchify patch 0", lambda t: ops.patchify(imgs(), 0), ValueError, r"patch_size must be positive, got 0"),
    ("patchify patch 3-tuple", lambda t: ops.patchify(imgs(), (4, 4, 4)), TypeError, r"patch_size must be an int or a pair of ints"),
    ("patchify patch float", lambda t: ops.patchify(imgs(), 4.0), TypeError, r"patch_size must be an int or a pair of ints, got 4.0"),
    ("patchify patch bool", lambda t: ops.patchify(imgs(), True), TypeError, r"patch_size must be an int or a pair of ints, got True"),
    ("patchify H", lambda t: ops.patchify(imgs(H=9), 4), ValueError, r"height H=9 must be a multiple of patch_size ph=4"),
    ("patchify rect W", lambda t: ops.patchify(imgs(), (4, 5)), ValueError, r"width W=12 must be a multiple of patch_size pw=5"),
    ("unpatchify 2-D x", lambda t: ops.unpatchify(torch.randn(6, 48), 4, (8, 12)), ValueError, r"x must have shape \(B, L=6, ph\*pw\*C\)"),
    ("unpatchify L", lambda t: ops.unpatchify(torch.randn(2, 5, 48), 4, (8, 12)), ValueError, r"x must have shape \(B, L=6, .*got \(2, 5, 48\)"),
    ("unpatchify P", lambda t: ops.unpatchify(torch.randn(2, 6, 47), 4, (8, 12)), ValueError, r"x must have shape .*ph\*pw=16, got \(2, 6, 47\)"),
    ("unpatchify image_size", lambda t: ops.unpatchify(torch.randn(2, 6, 48), 4, (9, 12)), ValueError, r"image_size \(9, 12\) must be multiples of patch_size"),
    ("unpatchify image_size 0", lambda t: ops.unpatchify(torch.randn(2, 6, 48), 4, (0, 12)), ValueError, r"image_size must be positive"),
    ("unpatchify int x", lambda t: ops.unpatchify(torch.zeros(2, 6, 48, dtype=torch.int32), 4, (8, 12)), TypeError, r"x must be a floating-point tensor"),
    ("patchify float8 imgs", lambda t: ops.patchify(f8(imgs()), 4), TypeError, r"imgs must be a floating-point tensor \(float32, float16, bfloat16 or float64\), got torch.float8_e4m3fn"),
    ("unpatchify float8 x", lambda t: ops.unpatchify(f8(torch.randn(2, 6, 48), torch.float8_e5m2), 4, (8, 12)), TypeError, r"x must be a floating-point tensor \(float32, float16, bfloat16 or float64\), got torch.float8_e5m2"),
    # --- patchify_gather
    ("gather ids = L", lambda t: ops.patchify_gather(imgs(), ids([0, 6], [1, 2]), 4), ValueError, r"ids must be patch indices in \[0, L=6\), got values in \[0, 6\]"),
    ("gather ids < 0", lambda t: ops.patchify_gather(imgs(), ids([0, -1], [1, 2]), 4), ValueError, r"ids must be patch indices in \[0, L=6\)"),
    ("gather ids 2**40", lambda t: ops.patchify_gather(imgs(), ids([0, 2**40], [1, 2]), 4), ValueError, r"ids must be patch indices in \[0, L=6\)"),
    ("gather ids int32 < 0", lambda t: ops.patchify_gather(imgs(), ids([0, -7], [1, 2], dtype=torch.int32), 4, norm_pix=True), ValueError, r"ids must be patch indices in \[0, L=6\)"),
    ("gather ids float", lambda t: ops.patchify_gather(imgs(), ids([0, 1], [1, 2]).float(), 4), TypeError, r"ids must have dtype int32 or int64, got torch.float32"),
    ("gather ids 1-D", lambda t: ops.patchify_gather(imgs(), ids(0, 1), 4), ValueError, r"ids must have shape \(B=2, K\) with 1 <= K <= L=6"),
    ("gather ids K > L", lambda t: ops.patchify_gather(imgs(), torch.zeros(2, 7, dtype=torch.long), 4), ValueError, r"ids must have shape \(B=2, K\) with 1 <= K <= L=6, got \(2, 7\)"),
    ("gather ids K = 0", lambda t: ops.patchify_gather(imgs(), torch.zeros(2, 0, dtype=torch.long), 4), ValueError, r"1 <= K <= L=6, got \(2, 0\)"),
    ("gather ids list", lambda t: ops.patchify_gather(imgs(), [[0, 1], [2, 3]], 4), TypeError, r"ids must be a torch.Tensor of int32 or int64, got list"),
    ("gather ids meta", lambda t: ops.patchify_gather(imgs(), ids([0, 1], [2, 3]).to("meta"), 4), ValueError, r"ids must be on cpu like imgs, got meta"),
    ("gather dup validate", lambda t: ops.patchify_gather(imgs(), ids([0, 0], [1, 2]), 4, validate=True), ValueError, r"ids must be distinct within each row"),
    ("gather dup ids CPU", lambda t: ops.patchify_gather(imgs(), ids([0, 0], [1, 2]), 4), ValueError, r"ids must be distinct within each row"),
    ("gather norm_pix P=1", lambda t: ops.patchify_gather(imgs(C=1, H=2, W=2), ids([0, 1], [2, 3]), 1, norm_pix=True), ValueError, r"norm_pix needs ph\*pw\*C >= 2 values per patch .*got P=1"),
    ("gather int16 imgs", lambda t: ops.patchify_gather(imgs().to(torch.int16), ids([0, 1], [2, 3]), 4), TypeError, r"imgs must be a floating-point tensor \(float32, .*\) or uint8 \(8-bit pixels\), got torch.int16"),
    ("gather uint8 mean length", lambda t: ops.patchify_gather(u8(), ids([0, 1], [2, 3]), 4, mean=(0.5, 0.5), std=(0.2, 0.2, 0.2)), ValueError, r"mean must hold one value per channel: 3, got 2"),
    ("gather uint8 std 0", lambda t: ops.patchify_gather(u8(), ids([0, 1], [2, 3]), 4, std=(0.2, 0.0, 0.2)), ValueError, r"std must be finite and > 0, got \(0.2, 0.0, 0.2\)"),
    ("gather uint8 std str", lambda t: ops.patchify_gather(u8(), ids([0, 1], [2, 3]), 4, std="abc"), TypeError, r"std must be a sequence of 3 floats"),
    ("gather uint8 1 channel default stats", lambda t: ops.patchify_gather(u8(C=1), ids([0, 1], [2, 3]), 4), ValueError, r"mean must hold one value per channel: 1, got 3"),
    ("gather float imgs with mean", lambda t: ops.patchify_gather(imgs(), ids([0, 1], [2, 3]), 4, mean=(0.5, 0.5, 0.5)), ValueError, r"mean and std apply to uint8 images only"),
    ("gather float8 imgs", lambda t: ops.patchify_gather(f8(imgs()), ids([0, 1], [2, 3]), 4), TypeError, r"imgs must be a floating-point tensor \(float32, .*\), got torch.float8_e4m3fn"),
    ("gather double backward", lambda t: double_backward(lambda x: ops.patchify_gather(x, ids([0, 1], [2, 3]), 4, norm_pix=True), imgs()),
     NotImplementedError, r"double backward of mae_fast.ops.patchify_gather .*is not supported"),
    # --- masked_mse_loss
    ("loss all-zero mask", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 48), imgs(), 4, mask=torch.zeros(2, 6)), ValueError, r"mask must mark at least one removed patch"),
    ("loss mask shape", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 48), imgs(), 4, mask=torch.ones(6)), ValueError, r"mask must have shape \(B=2, L=6\), got \(6,\)"),
    ("loss mask list", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 48), imgs(), 4, mask=[[1] * 6] * 2), TypeError, r"mask must be a torch.Tensor, got list"),
    ("loss mask and ids", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 48), imgs(), 4, mask=torch.ones(2, 6), ids=ids([0], [1])), ValueError, r"exactly one of mask= .* or ids= .*got both"),
    ("loss pred P", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 12), imgs(), 4, mask=torch.ones(2, 6)), ValueError, r"pred's last dim must be ph\*pw\*C = 4\*4\*3 = 48, got 12"),
    ("loss pred meta", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 48, device="meta"), imgs(), 4, mask=torch.ones(2, 6)), ValueError, r"pred must be on cpu like imgs, got meta"),
    ("loss pred list", lambda t: ops.masked_mse_loss([[0.0]], imgs(), 4, mask=torch.ones(2, 6)), TypeError, r"pred must be a torch.Tensor, got list"),
    ("loss ids = L", lambda t: ops.masked_mse_loss(torch.randn(2, 2, 48), imgs(), 4, ids=ids([0, 6], [1, 2])), ValueError, r"ids must be patch indices in \[0, L=6\)"),
    ("loss ids huge", lambda t: ops.masked_mse_loss(torch.randn(2, 2, 48), imgs(), 4, ids=ids([0, 2**33 + 1], [1, 2]), norm_pix=True), ValueError, r"ids must be patch indices in \[0, L=6\)"),
    ("loss imgs 5-D", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 48), imgs()[None], 4, mask=torch.ones(2, 6)), ValueError, r"imgs must be 4-D"),
    ("loss NaN mask", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 48), imgs(), 4, mask=torch.full((2, 6), float("nan"))), ValueError, r"mask must be finite .*got NaN or inf"),
    ("loss mask sums to 0", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 48), imgs(), 4, mask=torch.tensor([[1.0, -1, 0, 0, 0, 0]] * 2)), ValueError, r"mask must be non-negative"),
    ("loss empty batch", lambda t: ops.masked_mse_loss(torch.randn(0, 6, 48), imgs(B=0), 4, mask=torch.ones(0, 6)), ValueError, r"imgs has an empty batch \(B=0\)"),
    ("loss ids M = 0", lambda t: ops.masked_mse_loss(torch.randn(2, 0, 48), imgs(), 4, ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, r"ids must have shape \(B=2, K\) with 1 <= K <= L=6, got \(2, 0\)"),
    ("loss float8 pred", lambda t: ops.masked_mse_loss(f8(torch.randn(2, 6, 48)), imgs(), 4, mask=torch.ones(2, 6)), TypeError, r"pred must be a floating-point tensor \(float32, float16, bfloat16 or float64\), got torch.float8_e4m3fn"),
    ("loss int16 imgs", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 48), imgs().to(torch.int16), 4, mask=torch.ones(2, 6)), TypeError, r"imgs must be a floating-point tensor .* or uint8 \(8-bit pixels\), got torch.int16"),
    ("loss uint8 std length", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 48), u8(), 4, mask=torch.ones(2, 6), std=(0.2, 0.2, 0.2, 0.2)), ValueError, r"std must hold one value per channel: 3, got 4"),
    ("loss uint8 std nan", lambda t: ops.masked_mse_loss(torch.randn(2, 2, 48), u8(), 4, ids=ids([0, 1], [2, 3]), std=(0.2, float("nan"), 0.2)), ValueError, r"std must be finite and > 0"),
    ("loss float8 imgs", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 48), f8(imgs()), 4, mask=torch.ones(2, 6)), TypeError, r"imgs must be a floating-point tensor \(float32, .*\), got torch.float8_e4m3fn"),
    ("loss float8 mask", lambda t: ops.masked_mse_loss(torch.randn(2, 6, 48), imgs(), 4, mask=f8(torch.ones(2, 6))), TypeError, r"mask must be a float \(float32, float16, bfloat16 or float64\) or bool tensor, 1 = removed, got torch.float8_e4m3fn"),
    ("loss double backward", lambda t: double_backward(lambda p: ops.masked_mse_loss(p, imgs(), 4, mask=torch.ones(2, 6)), torch.randn(2, 6, 48)),
     NotImplementedError, r"double backward of mae_fast.ops.masked_mse_loss is not supported"),
    # --- add_layer_norm / attention
    ("layernorm float8 x", lambda t: ops.add_layer_norm(f8(X), X, torch.ones(8)), TypeError, r"x must be float32, float16, bfloat16 or float64, got torch.float8_e4m3fn"),
    ("layernorm double backward", lambda t: double_backward(lambda x: ops.add_layer_norm(x, X, torch.ones(8))[1], X),
     NotImplementedError, r"double backward of mae_fast.ops.add_layer_norm is not supported"),
    ("attention float8 qkv", lambda t: ops.attention(f8(torch.randn(2, 5, 24)), 2), TypeError, r"qkv must be float32, float16, bfloat16 or float64, got torch.float8_e4m3fn"),
    ("attention double backward", lambda t: double_backward(lambda q: ops.attention(q, 2), torch.randn(2, 5, 24)),
     NotImplementedError, r"double backward of mae_fast.ops.attention is not supported"),
    # --- gather_tokens / unshuffle_tokens
    ("tokens ids = L", lambda t: ops.gather_tokens(X, ids([0, 10], [1, 2])), IndexError, r"ids\[0, 1\] = 10 is out of range: indices must be in \[0, 10\)"),
    ("tokens ids 2**33", lambda t: ops.gather_tokens(X, ids([0, 2**33], [1, 2])), IndexError, r"ids\[0, 1\] = 8589934592 is out of range: indices must be in \[0, 10\)"),
    ("tokens ids int32 < 0", lambda t: ops.gather_tokens(X, ids([0, -5], [1, 2], dtype=torch.int32)), IndexError, r"ids\[0, 1\] = -5 is out of range"),
    ("tokens dup ids", lambda t: ops.gather_tokens(X, ids([3, 3], [1, 2])), ValueError, r"ids.*unique per row"),
    ("tokens x 2-D", lambda t: ops.gather_tokens(X[0], ids([0, 1], [1, 2])), ValueError, r"x must have shape \(B, L, D\), got \(10, 8\)"),
    ("tokens ids batch", lambda t: ops.gather_tokens(X, ids([0, 1])), ValueError, r"ids must have shape \(2, K\), got \(1, 2\)"),
    ("unshuffle ids_keep = N", lambda t: ops.unshuffle_tokens(VIS, ids([0, 10], [1, 2]), 10, MT, num_prefix=1), IndexError, r"ids_keep\[0, 1\] = 10 is out of range: indices must be in \[0, 10\)"),
    ("unshuffle dup ids_keep", lambda t: ops.unshuffle_tokens(VIS, ids([4, 4], [1, 2]), 10, MT, num_prefix=1), ValueError, r"ids_keep.*unique per row"),
    ("unshuffle mask_token None", lambda t: ops.unshuffle_tokens(VIS, ids([0, 1], [1, 2]), 10, None, num_prefix=1), TypeError, r"mask_token must be a torch.Tensor, got NoneType"),
    ("unshuffle num_prefix", lambda t: ops.unshuffle_tokens(VIS, ids([0, 1], [1, 2]), 10, MT, num_prefix=4), ValueError, r"num_prefix must be in \[0, visible.shape\[1\] = 3\], got 4"),
    ("unshuffle pos int", lambda t: ops.unshuffle_tokens(VIS, ids([0, 1], [1, 2]), 10, MT, torch.zeros(11, 8, dtype=torch.long), num_prefix=1), TypeError, r"pos must be float32, float16, bfloat16 or float64, got torch.int64"),
    ("unshuffle num_patches 2**31", lambda t: ops.unshuffle_tokens(VIS, ids([0, 1], [1, 2]), 2**31, MT, num_prefix=1),
     ValueError, r"num_patches must be .*< ?2\*\*31"),
    ("tokens int x", lambda t: ops.gather_tokens(X.long(), ids([0, 1], [1, 2])), TypeError, r"x must be float"),
    ("tokens float8 x", lambda t: ops.gather_tokens(f8(X), ids([0, 1], [1, 2])), TypeError, r"x must be float32, float16, bfloat16 or float64, got torch.float8_e4m3fn"),
    ("tokens ids K = 0", lambda t: ops.gather_tokens(X, torch.zeros(2, 0, dtype=torch.long)), ValueError, r"ids must select at least one row \(K >= 1\), got shape \(2, 0\)"),
    ("unshuffle K = 0", lambda t: ops.unshuffle_tokens(VIS, torch.zeros(2, 0, dtype=torch.long), 10, MT, num_prefix=3), ValueError,
     r"visible must hold at least one token after its num_prefix = 3 rows \(K >= 1\), got shape \(2, 3, 8\)"),
    # --- MaskedAutoencoderViT
    ("official patch_size 0", lambda t: official(patch_size=0), ValueError, r"patch_size must be a positive int .*got 0"),
    ("official patch_size tuple", lambda t: official(patch_size=(4, 4)), TypeError, r"patch_size must be a positive int .*got \(4, 4\)"),
    ("official img_size", lambda t: official(img_size=18), ValueError, r"img_size \(18, 18\) must be positive and divisible by patch_size 4"),
    ("official img_size 0", lambda t: official(img_size=0), ValueError, r"img_size \(0, 0\) must be positive"),
    ("official in_chans 0", lambda t: official(in_chans=0), ValueError, r"in_chans must be an int >= 1, got 0"),
    ("official heads", lambda t: official(embed_dim=30), ValueError, r"embed_dim \(30\) must be divisible by num_heads \(4\)"),
    ("official decoder heads", lambda t: official(decoder_num_heads=3), ValueError, r"decoder_embed_dim \(16\) must be divisible by decoder_num_heads \(3\)"),
    ("official decoder dim %4", lambda t: official(decoder_embed_dim=18), ValueError, r"decoder_embed_dim must be a multiple of 4 .*got 18"),
    ("official depth < 0", lambda t: official(depth=-1), ValueError, r"depth must be an int >= 0, got -1"),
    ("official norm_pix P=1", lambda t: official(img_size=8, patch_size=1, in_chans=1, norm_pix_loss=True), ValueError, r"norm_pix_loss needs at least 2 values per patch"),
    ("official imgs size", lambda t: official()(torch.randn(2, 3, 16, 16)), ValueError, r"imgs must be \(batch, 3, 16, 24\) .*got \(2, 3, 16, 16\)"),
    ("official mask_ratio str", lambda t: official()(torch.randn(1, 3, 16, 24), "0.5"), TypeError, r"mask_ratio must be a float in \(0, 1\), got '0.5'"),
    ("official mask_ratio 1", lambda t: official()(torch.randn(1, 3, 16, 24), 1.0), ValueError, r"mask_ratio must be in \(0, 1\), got 1.0"),
    ("official noise shape", lambda t: official()(torch.randn(2, 3, 16, 24), 0.75, torch.rand(2, 23)), ValueError, r"noise must be a \(batch, num_patches\) = \(2, 24\) tensor, got \(2, 23\)"),
    ("official forward_loss mask", lambda t: official().forward_loss(torch.randn(2, 3, 16, 24), torch.randn(2, 24, 48), torch.ones(2, 23)), ValueError, r"mask must have shape \(B=2, L=24\)"),
    # --- ViT / MAE
    ("vit patch_size 0", lambda t: vit(patch_size=0), ValueError, r"patch_size must be positive, got 0"),
    ("vit image_size str", lambda t: vit(image_size="16"), TypeError, r"image_size must be an int or a pair of ints"),
    ("vit channels 0", lambda t: vit(channels=0), ValueError, r"channels must be an int >= 1, got 0"),
    ("vit forward size", lambda t: vit()(torch.randn(2, 3, 16, 16)), ValueError, r"img must be \(batch, 3, 16, 24\) for this ViT .*got \(2, 3, 16, 16\)"),
    ("mae encoder Linear", lambda t: mae_fast.MAE(encoder=nn.Linear(3, 3), decoder_dim=16), TypeError, r"encoder must be a mae_fast.ViT or a vit_pytorch.ViT, got Linear"),
    ("mae masking_ratio str", lambda t: vp_mae(masking_ratio="0.5"), TypeError, r"masking_ratio must be a float in \(0, 1\)"),
    ("mae masking_ratio 1", lambda t: vp_mae(masking_ratio=1.0), ValueError, r"masking_ratio must be in \(0, 1\), got 1.0"),
    ("mae decoder_dim 0", lambda t: vp_mae(decoder_dim=0), ValueError, r"decoder_dim must be an int >= 1, got 0"),
    ("mae int16 img", lambda t: vp_mae()(torch.zeros(2, 3, 16, 24, dtype=torch.int16)), TypeError, r"img must be a floating-point tensor or uint8 pixels, got torch.int16"),
    ("mae uint8 std 0", lambda t: vp_mae(pixel_std=(0.2, 0.0, 0.2)), ValueError, r"std must be finite and > 0, got \(0.2, 0.0, 0.2\)"),
    ("official uint8 1 channel", lambda t: official(in_chans=1)(torch.zeros(2, 1, 16, 24, dtype=torch.uint8)), ValueError, r"uint8 images need the pixel statistics of this model's 1 channels .*set_pixel_stats"),
    ("official pixel stats length", lambda t: official().set_pixel_stats((0.5, 0.5), (0.2, 0.2, 0.2)), ValueError, r"mean must hold one value per channel: 3, got 2"),
    ("mae img size", lambda t: vp_mae()(torch.randn(2, 3, 16, 16)), ValueError, r"img must be \(batch, 3, H, W\) with 16x24; got \(2, 3, 16, 16\)"),
    # --- checkpoints
    ("ckpt missing", lambda t: load_checkpoint(official(), t / "nope.pth"), FileNotFoundError, r"checkpoint not found: '.*nope.pth'"),
    ("ckpt empty file", lambda t: read_checkpoint(write(t, "empty.pth", b"")), CheckpointError, r"'.*empty.pth': the file is empty"),
    ("ckpt garbage", lambda t: read_checkpoint(write(t, "junk.pth", b"garbage")), CheckpointError, r"cannot read checkpoint '.*junk.pth' \(corrupt, truncated or not a PyTorch checkpoint"),
    ("ckpt safetensors garbage", lambda t: read_checkpoint(write(t, "m.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")), CheckpointError, r"cannot read safetensors checkpoint '.*m.safetensors'"),
    ("ckpt list", lambda t: read_checkpoint(torch_saved(t, "list.pth", [torch.zeros(1)])), CheckpointError, r"'.*list.pth': expected a dict checkpoint, got list"),
    ("ckpt no state dict", lambda t: load_checkpoint(official(), torch_saved(t, "meta.pth", {"epoch": 3, "lr": 0.1})), CheckpointError, r"no state dict found: expected \{'model': state_dict\}"),
    ("ckpt shape mismatch", lambda t: load_checkpoint(official(), {"model": state(in_chans=1)}), ValueError, r"shape mismatch for 'patch_embed.proj.weight': checkpoint has \(32, 1, 4, 4\), model expects \(32, 3, 4, 4\)"),
    ("ckpt strict missing", lambda t: load_checkpoint(official(), {"cls_token": torch.zeros(1, 1, 32)}, strict=True), RuntimeError, r"strict load of state dict failed: missing \d+ \["),
    ("ckpt path int", lambda t: load_checkpoint(official(), 3), TypeError, r"path_or_state: expected a checkpoint path or a state dict, got int"),
    ("ckpt save no dir", lambda t: save_checkpoint(t / "no" / "x.pth", {"model": {}}), FileNotFoundError, r"directory of checkpoint '.*x.pth' does not exist"),
    ("ckpt save list", lambda t: save_checkpoint(t / "x.pth", [1]), TypeError, r"state must be a dict, got list"),
    ("ckpt flipped byte", lambda t: read_checkpoint(flipped(t, "f.pth")), CheckpointError, r"checkpoint '.*f.pth' is corrupt: its contents do not match the sha256 checksum"),
    ("ckpt safetensors flipped byte", lambda t: read_checkpoint(flipped(t, "f.safetensors")), CheckpointError, r"checkpoint '.*f.safetensors' is corrupt: its contents do not match the sha256 checksum"),
    ("cli export --out dir", lambda t: cli_main("export", tiny_ckpt(t), "--to", "timm", "--out", str(t)), SystemExit, r"--out '.*' is a directory; expected a file path such as .*encoder.pth"),
    ("cli export --out no dir", lambda t: cli_main("export", tiny_ckpt(t), "--to", "timm", "--out", str(t / "no" / "e.pth")), SystemExit, r"--out '.*e.pth': the directory '.*no' does not exist"),
    ("cli export --out checkpoint-N", lambda t: cli_main("export", tiny_ckpt(t), "--to", "timm", "--out", str(t / "checkpoint-7.pth")), SystemExit, r"--out '.*checkpoint-7.pth' is named like a training checkpoint \(checkpoint-<step>.pth\); expected another name"),
    ("cli export --out training ckpt", lambda t: cli_main("export", tiny_ckpt(t), "--to", "timm", "--force", "--out", tiny_ckpt(t, "run.pth", optimizer={"state": {}, "param_groups": []})), SystemExit, r"--out '.*run.pth' is a training checkpoint; expected another path"),
    ("cli export --out foreign file", lambda t: cli_main("export", tiny_ckpt(t), "--to", "timm", "--out", str(torch_saved(t, "w.pth", {"w": torch.zeros(1)}))), SystemExit, r"--out '.*w.pth' exists and is no export of mae-fast; expected a new path, or --force"),
    ("cli visualize --out x.txt", lambda t: cli_main("visualize", tiny_ckpt(t), str(write(t, "i.png", b"x")), "--out", str(t / "x.txt")), SystemExit, r"--out '.*x.txt': matplotlib cannot write '.txt' pictures; expected a name ending in .*\.png"),
    ("cli visualize --mask-ratio 0.999", lambda t: cli_main("visualize", tiny_ckpt(t), str(write(t, "i.png", b"x")), "--mask-ratio", "0.999"), SystemExit, r"--mask-ratio 0.999: mask_ratio 0.999 keeps 0 of 16 patches; at least one patch must stay visible and one be removed"),
    ("cli unknown preset", lambda t: cli_main("probe", tiny_ckpt(t, args={"model": "gigantic"})), SystemExit, r"its args name the model 'gigantic'; expected one of tiny, small, base, large, huge"),
    ("cli ckpt args img_size", lambda t: cli_main("probe", tiny_ckpt(t, args={"img_size": 18})), SystemExit, r"does not fit the model its args describe \(--model tiny\): img_size \(18, 18\) must be .*divisible by patch_size 4"),
    # --- CLI
    ("cli --epochs 0", lambda t: pretrain_args("--epochs", "0"), SystemExit, r"--epochs must be >= 1, got 0"),
    ("cli --img-size 0", lambda t: pretrain_args("--img-size", "0"), SystemExit, r"--img-size must be >= 1, got 0"),
    ("cli --img-size 18", lambda t: pretrain_args("--img-size", "18"), SystemExit, r"--img-size must be a multiple of the patch size 4 of --model tiny, got 18"),
    ("cli --samples-per-epoch 0", lambda t: pretrain_args("--samples-per-epoch", "0"), SystemExit, r"--samples-per-epoch must be >= 1, got 0"),
    ("cli --max-steps 0", lambda t: pretrain_args("--max-steps", "0"), SystemExit, r"--max-steps must be >= 1, got 0"),
    ("cli --lr -1", lambda t: pretrain_args("--lr", "-1"), SystemExit, r"--lr must be a finite number >= 0, got -1.0"),
    ("cli --blr nan", lambda t: pretrain_args("--blr", "nan"), SystemExit, r"--blr must be a finite number >= 0, got nan"),
    ("cli --weight-decay -1", lambda t: pretrain_args("--weight-decay", "-0.1"), SystemExit, r"--weight-decay must be a finite number >= 0"),
    ("cli --warmup-epochs -1", lambda t: pretrain_args("--warmup-epochs", "-1"), SystemExit, r"--warmup-epochs must be a finite number >= 0"),
    ("cli --num-workers -1", lambda t: pretrain_args("--num-workers", "-1"), SystemExit, r"--num-workers must be .*>= 0, got -1"),
    ("cli --mask-ratio 0", lambda t: pretrain_args("--mask-ratio", "0"), SystemExit, r"--mask-ratio must be in \(0, 1\), got 0.0"),
    ("cli --precision", lambda t: pretrain_args("--precision", "fp8"), SystemExit, r"argument --precision: invalid choice: 'fp8'"),
    ("cli --batch-size abc", lambda t: pretrain_args("--batch-size", "abc"), SystemExit, r"argument --batch-size: invalid int value: 'abc'"),
    ("cli --device bogus", lambda t: run_pretrain(t, "--device", "bogus"), SystemExit, r"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'bogus'"),
    pytest.param("cli --device cuda", lambda t: run_pretrain(t, "--device", "cuda"), SystemExit, r"--device cuda: CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    ("cli one batch", lambda t: run_pretrain(t, "--samples-per-epoch", "4"), SystemExit, r"--samples-per-epoch \(4\) must be at least one global batch \(8 x 1 processes\)"),
    ("cli --resume missing", lambda t: run_pretrain(t, "--resume", str(t / "nope.pth")), SystemExit, r"--resume: checkpoint not found: '.*nope.pth'"),
    ("cli --resume garbage", lambda t: run_pretrain(t, "--resume", str(write(t, "g.pth", b"garbage"))), SystemExit, r"--resume: cannot read checkpoint '.*g.pth' \(corrupt"),
    ("cli --resume weights only", lambda t: run_pretrain(t, "--resume", str(torch_saved(t, "w.pth", {"model": state()}))), SystemExit, r"--resume: .*w.pth is not a mae-fast training checkpoint \(no optimizer/position\)"),
    ("cli probe no checkpoint", lambda t: cli_main("probe", str(t)), SystemExit, r"no checkpoint-\*.pth in "),
    ("cli export --to onnx", lambda t: cli_main("export", "x.pth", "--to", "onnx"), SystemExit, r"argument --to: invalid choice: 'onnx' \(choose from .*timm.*hf"),
    ("cli probe missing arg", lambda t: cli_main("probe"), SystemExit, r"the following arguments are required: checkpoint"),
]


def _ids(case):
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("name,call,exc,match", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_input(name, call, exc, match, tmp_path):
    with pytest.raises(exc, match=match):
        call(tmp_path)


def test_the_table_is_big_enough():
    live = [c for c in CASES if not hasattr(c, "marks") or not c.marks]
    groups = {_ids(c).split()[0] for c in live}
    assert len(live) >= 30
    assert {"patchify", "gather", "loss", "tokens", "unshuffle", "official", "vit", "mae", "ckpt", "cli"} <= groups


# ----------------------------------------------------------------------------- no stray writes

def _bad_id_sets(L):
    return [torch.tensor([[0, L], [1, 2]]), torch.tensor([[0, 1], [-1, 2]]), torch.tensor([[0, 2**40], [1, 2]]),
            torch.tensor([[0, -(2**31)], [1, 2]], dtype=torch.int32), torch.tensor([[0, 2**31 - 1], [1, 2]], dtype=torch.int32)]


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["triton-interpreted", "fallback"])
def test_out_of_range_ids_touch_nothing(interpret, monkeypatch):
    """Out-of-range ids (just past the end, negative, past 2**32, int32 extremes) are refused on CPU
    by every op that takes ids, on both dispatch paths, before anything is written: the inputs are
    unchanged afterwards and no output is produced."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    im = imgs()
    tok = torch.randn(2, 6, 8)
    vis = torch.randn(2, 3, 8)
    mt = torch.randn(8)
    before = [t.clone() for t in (im, tok, vis, mt)]
    for bad in _bad_id_sets(6):
        calls = [
            (lambda: ops.patchify_gather(im, bad, 4), ValueError),
            (lambda: ops.patchify_gather(im, bad, 4, norm_pix=True, validate=True), ValueError),
            (lambda: ops.masked_mse_loss(torch.randn(2, 2, 48), im, 4, ids=bad), ValueError),
            (lambda: ops.gather_tokens(tok, bad), IndexError),
            (lambda: ops.unshuffle_tokens(vis, bad, 6, mt, num_prefix=1), IndexError),
        ]
        for fn, exc in calls:
            with pytest.raises(exc, match=r"ids|\[0, "):
                fn()
    for t, b in zip((im, tok, vis, mt), before):
        assert torch.equal(t, b)


def test_bad_input_in_a_subprocess_does_not_crash_the_interpreter():
    """The out-of-range cases above, in a fresh interpreter on the compiled extension + interpreted
    Triton: the process must end with a Python exception (exit 0 after catching), never a signal."""
    import subprocess
    import sys

    code = (
        "import torch, mae_fast\n"
        "from mae_fast import ops\n"
        "n = 0\n"
        "for bad in ([[0, 6], [1, 2]], [[0, -1], [1, 2]], [[0, 2**40], [1, 2]]):\n"
        "    b = torch.tensor(bad)\n"
        "    for fn in (lambda: ops.patchify_gather(torch.randn(2, 3, 8, 12), b, 4),\n"
        "               lambda: ops.gather_tokens(torch.randn(2, 6, 8), b),\n"
        "               lambda: ops.unshuffle_tokens(torch.randn(2, 3, 8), b, 6, torch.randn(8), num_prefix=1),\n"
        "               lambda: ops.masked_mse_loss(torch.randn(2, 2, 48), torch.randn(2, 3, 8, 12), 4, ids=b)):\n"
        "        try:\n"
        "            fn()\n"
        "        except (IndexError, ValueError):\n"
        "            n += 1\n"
        "print('refused', n)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused 12" in proc.stdout


def test_resume_auto_ignores_foreign_and_temp_files(tmp_path):
    """checkpoint-best.pth (a user's copy) crashed `--resume auto` (int('best')); the hidden temp file
    of an interrupted save and a '.pth.tmp' must never be picked either."""
    for name in ("checkpoint-4.pth", "checkpoint-12.pth", "checkpoint-best.pth", ".checkpoint-16.pth.abc.tmp",
                 "checkpoint-16.pth.tmp", "checkpoint-8.pth~", "checkpoint--3.pth"):
        (tmp_path / name).write_bytes(b"x")
    assert [os.path.basename(p) for p in pretrain.checkpoints_in(str(tmp_path))] == ["checkpoint-4.pth",
                                                                                      "checkpoint-12.pth"]
