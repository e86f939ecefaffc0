"""Reading and writing checkpoint files, safely.

Pickles are always read with `torch.load(..., map_location='cpu', weights_only=True)`: a file that
would need arbitrary code to unpickle is refused, never run. `.safetensors` files are read and
written with safetensors. `save_checkpoint` writes atomically (temp file in the same directory,
fsync, os.replace), so an interrupted save never destroys the previous good checkpoint.

Every file `save_checkpoint` writes carries a sha256 of its contents, checked on every read: torch's
zip reader checks no CRC, so without it a flipped bit in a tensor would load silently. The checksum
covers every tensor's dtype, shape and bytes and every other value and key of the checkpoint, in
order; it costs one sha256 pass over the tensor bytes on each save and read (hashlib: about a
second per GB on one core). It is stored where readers that do not know it never see it: in a .pth
file as an attribute of the saved top-level OrderedDict (pickled with it and restored by
torch.load, weights_only included, yet no key, so `load_state_dict(torch.load(f))` works as
before); in a .safetensors file in the header's `__metadata__`. Files without one (the official
releases, Hugging Face) load as before.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Mapping

import torch

__all__ = ["CheckpointError", "read_checkpoint", "read_state_dict", "save_checkpoint", "checkpoint_metadata"]

# Containers in which training scripts store the model's weights, tried in this order.
_STATE_DICT_CONTAINERS = ("model", "state_dict", "model_state_dict")

# Prefixes added by DistributedDataParallel / torch.compile wrappers; stripped when every key has one.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Where our metadata (the checksum, what an export is for) lives: the attribute of a .pth file's
# top-level OrderedDict, and the prefix of its keys in a .safetensors header.
METADATA_ATTR = "mae_fast"
_SAFETENSORS_PREFIX = "mae_fast."


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read (corrupt, truncated, unsafe, or of an unknown layout)."""



# ----------------------------------------------------------------------------- reading files

def _is_safetensors_file(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    # safetensors: 8-byte little-endian header length, then a JSON object.
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = os.path.getsize(path)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") <= size - 8


def _load_safetensors(path: str, lazy: bool = False):
    """(tensors, our metadata) of a safetensors file; lazy: (None, metadata), no tensor read."""
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - safetensors is a test dependency
        raise ImportError(
            f"reading {path!r} needs the 'safetensors' package: pip install safetensors") from e
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = None if lazy else {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ...
        raise CheckpointError(f"cannot read safetensors checkpoint {path!r} (corrupt or truncated?): {e}") from e
    meta = {k[len(_SAFETENSORS_PREFIX):]: v for k, v in header.items() if k.startswith(_SAFETENSORS_PREFIX)}
    return tensors, meta


def _torch_load(path: str, mmap: bool = False):
    try:
        # argparse.Namespace is what the official main_pretrain.py stores under 'args'.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        lines = [ln.strip() for ln in msg.splitlines() if "global" in ln.lower() and ln.strip()]
        if lines:  # a pickle that names a global (a class or function) outside the allow-list
            raise CheckpointError(
                f"refusing to load {path!r}: it holds objects that torch.load(weights_only=True) does not "
                f"allow (unpickling it could run arbitrary code). Only tensors, containers, numbers, strings "
                f"and argparse.Namespace are accepted. Detail: {lines[0]}") from e
        # anything else (e.g. "Unsupported operand 103") is bytes that are no pickle we can read
        detail = [ln.strip() for ln in msg.splitlines() if ln.strip().lower().startswith("unsupported")]
        raise CheckpointError(f"cannot read checkpoint {path!r} (corrupt, truncated or not a PyTorch "
                              f"checkpoint; nothing in it was run): "
                              f"{detail[0] if detail else msg.strip().splitlines()[-1] if msg.strip() else 'UnpicklingError'}"
                              ) from e
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, AttributeError, TypeError,
            IndexError, KeyError, UnicodeDecodeError) as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise CheckpointError(f"cannot read checkpoint {path!r} (corrupt or truncated?): "
                              f"{type(e).__name__}: {e}") from e


def _strip_wrapper_prefixes(sd: dict) -> dict:
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _extract_state_dict(obj, where: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object ({'model': sd}, {'state_dict': sd} or sd)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a dict, got {type(obj).__name__}")
    for name in _STATE_DICT_CONTAINERS:
        inner = obj.get(name)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        raise CheckpointError(
            f"{where}: no state dict found: expected {{'model': state_dict}} or a flat dict of tensors; "
            f"top-level keys are {sorted(map(str, obj.keys()))[:12]}")
    return _strip_wrapper_prefixes(dict(obj))


def _digest(obj) -> str:
    """sha256 over every tensor's dtype, shape and bytes and every other key and value, in order."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            if t.layout == torch.strided and not t.is_quantized and t.device.type != "meta" and t.numel():
                t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
                h.update(t.numpy())
        elif isinstance(x, Mapping):  # dict and OrderedDict alike: torch.load may return either
            h.update(b"{%d;" % len(x))
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(b"%s%d;" % (b"[" if isinstance(x, list) else b"(", len(x)))
            for v in x:
                walk(v)
        elif isinstance(x, argparse.Namespace):
            walk(vars(x))
        else:  # numbers, strings, None, dtypes: their repr survives the pickle round trip
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def _verify(path: str, obj, meta: Mapping) -> None:
    expected = meta.get("sha256")
    if expected is not None and _digest(obj) != expected:
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt: its contents do not match the sha256 checksum saved in it "
            f"(a changed byte on disk or in a copy; or the file was edited and re-saved with torch.save, "
            f"which keeps the old checksum: re-save it with mae_fast.save_checkpoint)")


def _our_metadata(obj) -> dict:
    meta = getattr(obj, METADATA_ATTR, None)
    return dict(meta) if isinstance(meta, Mapping) else {}


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected a checkpoint path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{path!r} is a directory; pass a checkpoint file (for a Hugging Face save_pretrained folder "
            f"use MaskedAutoencoderViT.from_hf / mae_fast.io.hf.from_hf)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"cannot read checkpoint {path!r}: the file is empty (0 bytes; an interrupted copy?)")
    return path


def read_checkpoint(path) -> dict:
    """The whole checkpoint object of a file (e.g. {'model', 'optimizer', 'epoch', 'scaler', 'args'}),
    read safely (weights_only=True; safetensors files give their flat tensor dict) and checked
    against the checksum `save_checkpoint` stores in it. Missing file: FileNotFoundError; corrupt,
    truncated or code-carrying file: CheckpointError naming the path."""
    path = _check_path(path)
    if _is_safetensors_file(path):
        obj, meta = _load_safetensors(path)
        _verify(path, dict(sorted(obj.items())), meta)
        return obj
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path!r}: expected a dict checkpoint, got {type(obj).__name__}")
    _verify(path, obj, _our_metadata(obj))
    # the checksum stays with the file: an object edited and re-saved with torch.save must not carry it
    getattr(obj, "__dict__", {}).pop(METADATA_ATTR, None)
    return obj


def checkpoint_metadata(path) -> tuple[dict[str, str], list]:
    """(the metadata `save_checkpoint` stored, the top-level keys) of a checkpoint file, read without
    its tensor data and unverified: enough to tell an export from a training checkpoint. The
    metadata is {} for files that other tools wrote."""
    path = _check_path(path)
    if _is_safetensors_file(path):
        _, meta = _load_safetensors(path, lazy=True)
        return meta, []
    obj = _torch_load(path, mmap=True)
    return _our_metadata(obj), list(obj) if isinstance(obj, Mapping) else []


def read_state_dict(path_or_state) -> dict[str, torch.Tensor]:
    """The raw state dict of a checkpoint file or object, keys as stored (wrapper prefixes removed)."""
    if isinstance(path_or_state, Mapping):
        return _extract_state_dict(path_or_state, "state dict argument")
    if not isinstance(path_or_state, (str, os.PathLike)):
        raise TypeError(f"expected a path or a state dict, got {type(path_or_state).__name__}")
    return _extract_state_dict(read_checkpoint(path_or_state), repr(os.fspath(path_or_state)))


# ----------------------------------------------------------------------------- saving

def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, state: dict, metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write `state` (e.g. {'model': sd, 'optimizer': ..., 'epoch': e}) to path, with a
    sha256 checksum of it that `read_checkpoint` verifies (see the module docstring).

    The data goes to a temp file in the same directory, is flushed and fsync'ed, then os.replace'd
    over path, so a crash or error mid-write leaves the previous file intact. A path ending in
    `.safetensors` is written with safetensors (state must then be a flat dict of tensors, or
    {'model': sd} with nothing else). metadata: strings stored beside the checksum, read back by
    `checkpoint_metadata`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory of checkpoint {path!r} does not exist")
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    use_safetensors = path.endswith(".safetensors")
    if use_safetensors:
        try:
            from safetensors.torch import save as st_save
        except ImportError as e:  # pragma: no cover
            raise ImportError(f"writing {path!r} needs the 'safetensors' package: pip install safetensors") from e
        tensors = state["model"] if set(state) == {"model"} else state
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"a .safetensors file holds tensors only; non-tensor entries: {bad[:8]}")
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        meta["sha256"] = _digest(dict(sorted(tensors.items())))  # the file keeps no order
        payload = st_save(tensors, metadata={_SAFETENSORS_PREFIX + k: v for k, v in meta.items()})
    else:
        obj = OrderedDict(state)
        obj.__dict__.update(getattr(state, "__dict__", {}))  # a state_dict's _metadata (module versions)
        meta["sha256"] = _digest(obj)
        setattr(obj, METADATA_ATTR, meta)

    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if use_safetensors:
                f.write(payload)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
