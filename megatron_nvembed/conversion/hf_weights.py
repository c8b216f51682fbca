"""transformers weight files: read lazily, one tensor at a time, and written as safetensors shards.

Weights are read with safetensors (or `torch.load(weights_only=True)` for `.bin` files): loading
never unpickles code. `import_hf` reads a source through `LazyHFState`; `export_hf` writes with
`write_safetensors_shards`, which writes each file's header first and then its tensors one at a
time (the safetensors format: an 8-byte little-endian header length, a JSON header of dtypes,
shapes and byte ranges, the bytes), so an export never holds more than one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch


class LazyHFState(Mapping):
    """Read-only mapping over a transformers checkpoint directory, one tensor at a time.

    Supports `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, and
    `pytorch_model.bin` (loaded with `weights_only=True`). Only the tensors asked for are read, so
    mapping a 7B model holds one tensor of the source at a time.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        self._where: dict[str, Path] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        self.source = index if index.is_file() else single  # named in messages
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index ({err})") from err
            for key, fname in weight_map.items():
                self._where[key] = self.dir / fname
            for f in set(self._where.values()):
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: shard named in {index} is missing")
        elif single.is_file():
            self._where = {k: single for k in safetensors_header(single)}
        elif (self.dir / "pytorch_model.bin").is_file():
            self.source = self.dir / "pytorch_model.bin"
            self._bin = torch.load(
                self.dir / "pytorch_model.bin", map_location="cpu", weights_only=True
            )
        else:
            raise FileNotFoundError(
                f"{self.dir}: no model.safetensors, model.safetensors.index.json or "
                "pytorch_model.bin"
            )

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[key]
        from safetensors import safe_open

        if key not in self._where:
            raise KeyError(key)
        with safe_open(str(self._where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._bin if self._bin is not None else self._where)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], Path]]:
        """key -> (shape, the file holding it), from the safetensors files' headers (no tensor
        data is read; a `pytorch_model.bin` is already loaded, its tensors give theirs).

        Raises:
            ValueError: naming the file (and key) whose header is not a safetensors header or
                whose byte ranges lie outside the file; a key the index names that its shard
                lacks, naming the index and the key.
        """
        if self._bin is not None:
            name = self.dir / "pytorch_model.bin"
            return {k: (tuple(t.shape), name) for k, t in self._bin.items()}
        headers = {f: safetensors_header(f) for f in set(self._where.values())}
        out = {}
        for key, f in self._where.items():
            if key not in headers[f]:
                index = self.dir / "model.safetensors.index.json"
                raise ValueError(f"{index}: weight_map names {key!r} in {f.name}, which lacks it")
            out[key] = (headers[f][key], f)
        return out

    def __len__(self) -> int:
        return len(self._bin if self._bin is not None else self._where)


_ST_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


def safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """key -> shape from a safetensors file's header, reading only the header; each tensor's
    byte range is checked against its shape, dtype and the file's size, so a header cannot
    claim tensors the file does not hold.

    Raises:
        ValueError: one line naming the file (and the key) at fault.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(
                f"{path}: not a safetensors file (shorter than its 8-byte header size)"
            )
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: header size {n} exceeds the file's {size} bytes")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: safetensors header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    data = size - 8 - n
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            shape, dtype, (begin, end) = entry["shape"], entry["dtype"], entry["data_offsets"]
            ok = all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or dtype not in _ST_ITEMSIZE or not isinstance(begin, int):
            raise ValueError(f"{path}: header entry {key!r} is not a safetensors tensor entry")
        numel = 1
        for d in shape:
            numel *= d
        if not (isinstance(end, int) and 0 <= begin <= end <= data) or (
            end - begin != numel * _ST_ITEMSIZE[dtype]
        ):
            raise ValueError(
                f"{path}: {key!r} of shape {shape} ({dtype}) has byte range [{begin}, {end}] "
                f"that does not match its size or lies outside the file's {data} data bytes"
            )
        out[key] = tuple(shape)
    return out


def backbone_prefix(state: Mapping, hf_dir: Path, default: str) -> str:
    """The key prefix of the decoder's weights in `state`: `default` (what the source's config
    suggests) if it holds them, else the first of "", "model.", "embedding_model." that does.

    Raises:
        KeyError: naming `hf_dir`: no `embed_tokens.weight` under any of those prefixes.
    """
    for prefix in (default, "", "model.", "embedding_model."):
        if f"{prefix}embed_tokens.weight" in state:
            return prefix
    raise KeyError(f"{hf_dir}: no embed_tokens.weight under any known prefix")


SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}


def write_safetensors_shards(
    state: Mapping[str, torch.Tensor],
    out: Path,
    max_bytes: int,
    produce: Callable[[str], torch.Tensor] | None = None,
) -> None:
    """Writes `state` into `out` as `model.safetensors`, or, past `max_bytes` per file, as
    `model-0000i-of-0000n.safetensors` shards with a `model.safetensors.index.json` (keys in
    sorted order, a shard closed before the tensor that would take it past `max_bytes`).

    Args:
        state: name -> tensor; with `produce`, tensors that only give their shape and dtype (meta
            tensors), the values coming from `produce(name)` one at a time as each is written,
            so a file of any size is written holding one tensor.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    get = produce or state.__getitem__
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", shards[0], state, get)
        return
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / name, keys, state, get)
        for k in keys:
            weight_map[k] = name
            total += state[k].numel() * state[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_safetensors(
    path: Path,
    keys: list[str],
    layout: Mapping[str, torch.Tensor],
    get: Callable[[str], torch.Tensor],
) -> None:
    """One safetensors file: the header (every tensor's dtype, shape and byte range, from
    `layout`), then each tensor's bytes in `keys` order, produced by `get` as it is written."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        t = layout[key]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: dtype {t.dtype} has no safetensors name here")
        nbytes = t.numel() * t.element_size()
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the byte buffer starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for key in keys:
            value = get(key)
            want = layout[key]
            if value.shape != want.shape or value.dtype != want.dtype:
                raise ValueError(
                    f"{key}: produced {tuple(value.shape)} {value.dtype} for a header of "
                    f"{tuple(want.shape)} {want.dtype}"
                )
            flat = value.detach().contiguous().reshape(-1).view(torch.uint8)
            fh.write(memoryview(flat.numpy()))
            del value, flat  # one tensor at a time
