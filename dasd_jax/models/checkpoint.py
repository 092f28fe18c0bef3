"""Hugging Face checkpoints <-> NNX models placed on a mesh.

Consumes a Hugging Face folder (config.json, model.safetensors or sharded
model-XXXXX-of-YYYYY.safetensors + model.safetensors.index.json, tokenizer files) and produces
a model whose arrays already live on the mesh; `save_hf` writes a folder that transformers
loads (config.json, safetensors shards + index, generation_config.json, tokenizer files).

Loading reads one tensor at a time (memory-mapped) and builds each array with
`jax.make_array_from_callback`, so every device receives only its shard and the host holds at
most one parameter's layers at a time, never a full copy per device. `TENSOR_TABLE` is the one
declarative map between HF names/layouts and ours; every tensor's shape is checked against the
model before any device transfer, and a missing, unexpected or mis-shaped tensor fails with
the tensor's name and file; so does a safetensors file that cannot be read (truncated, corrupt).

Saving builds the folder under a temporary name beside it (`.<name>.tmp-<pid>-<random>`),
refuses a tensor holding NaN or inf (after the cast to the export dtype, so a float16 overflow
is caught too), reopens every file it wrote (names, shapes, dtypes; safetensors checks that the
data covers the file exactly), then renames the folder into place. Leftovers of a killed save
(gigabytes at full scale) are swept when the next save of the same folder starts: the
`.<name>.tmp-<pid>-*` folders whose process is gone.

Stacking: an HF name with `{l}` is one tensor per layer, stacked on our leading L dim; with
`{l}` and `{e}` (Qwen3-MoE's per-expert tensors) one per layer and expert, stacked on [L, E].
Each host reads every tensor it needs once and keeps only its devices' slices of it, so host
memory stays near its share of the parameter plus one HF tensor.

Quantised tensors: where a folder has `X_blocks` + `X_scales` (MXFP4, gpt-oss's experts) instead
of `X`, the reader also presents a tensor `X` decoded to the parameter dtype (exact: every
MXFP4 value is representable in bf16), in transformers' dequantised layout. A table entry
applies when the model has that parameter, so a model holding decoded experts reads `X` and
one holding them packed (`MoeOptions(expert_weights="mxfp4")`) reads the pair as stored.
Saving writes what the model holds: plain tensors, or the packed pair plus the
quantization_config.

`ARCHITECTURES` registers each model_type's config class, model class and key table.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dasd_jax.models import mxfp4
from dasd_jax.models.gpt_oss import GptOss, GptOssConfig
from dasd_jax.models.qwen3 import ModelOptions, Qwen3, Qwen3Config
from dasd_jax.models.qwen3_moe import Qwen3Moe, Qwen3MoeConfig
from dasd_jax.sharding import named_sharding

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

# --------------------------------------------------------------------------- key table


@dataclass(frozen=True)
class TensorSpec:
    """One HF tensor family <-> one of our parameters.

    `hf` may contain `{l}` (one tensor per layer, stacked on our leading L dim) and then `{e}`
    (one per layer and expert, stacked on our leading [L, E] dims).
    `to_ours(w, cfg)` maps one HF array to our layout (of one layer, one expert); `to_hf` is
    its inverse.
    """

    ours: str
    hf: str
    to_ours: Callable[[np.ndarray, Any], np.ndarray]
    to_hf: Callable[[np.ndarray, Any], np.ndarray]
    when: Callable[[Any], bool] = lambda cfg: True

    @property
    def per_layer(self) -> bool:
        return "{l}" in self.hf

    @property
    def stacked(self) -> tuple[str, ...]:
        """The placeholders, i.e. our leading stacked dims, in order: (), ("l",), ("l", "e")."""
        if "{e}" in self.hf and not self.per_layer:
            raise ValueError(f"{self.hf}: an expert index needs a layer index too")
        return tuple(p for p in ("l", "e") if "{" + p + "}" in self.hf)

    def names(self, stack_shape: tuple[int, ...]) -> dict[tuple[int, ...], str]:
        """HF name of every stacked index, e.g. {(0, 3): "model.layers.0....experts.3..."}."""
        return {
            idx: self.hf.format(**dict(zip(self.stacked, idx, strict=True)))
            for idx in itertools.product(*(range(n) for n in stack_shape))
        }


def _ident(w, c):
    return w


def _t(w, c):
    return w.T


def _heads_in(n_attr):  # HF [n*H, D] -> ours [D, n, H]
    return lambda w, c: w.T.reshape(w.shape[1], getattr(c, n_attr), c.head_dim)


def _heads_in_inv(w, c):  # ours [D, n, H] -> HF [n*H, D]
    return w.reshape(w.shape[0], -1).T


def _o_in(w, c):  # HF [D, N*H] -> ours [N, H, D]
    return w.T.reshape(c.num_attention_heads, c.head_dim, w.shape[0])


def _o_in_inv(w, c):
    return w.reshape(-1, w.shape[-1]).T


def _bias_in(n_attr):  # HF [n*H] -> ours [n, H]
    return lambda w, c: w.reshape(getattr(c, n_attr), c.head_dim)


def _flat(w, c):
    return w.reshape(-1)


def _bias(c):
    return c.attention_bias


_L = "model.layers.{l}."
QWEN3_TABLE: tuple[TensorSpec, ...] = (
    TensorSpec("embed_tokens", "model.embed_tokens.weight", _ident, _ident),
    TensorSpec("norm", "model.norm.weight", _ident, _ident),
    TensorSpec("lm_head", "lm_head.weight", _t, _t, lambda c: not c.tie_word_embeddings),
    TensorSpec(
        "layers.q_proj",
        _L + "self_attn.q_proj.weight",
        _heads_in("num_attention_heads"),
        _heads_in_inv,
    ),
    TensorSpec(
        "layers.k_proj",
        _L + "self_attn.k_proj.weight",
        _heads_in("num_key_value_heads"),
        _heads_in_inv,
    ),
    TensorSpec(
        "layers.v_proj",
        _L + "self_attn.v_proj.weight",
        _heads_in("num_key_value_heads"),
        _heads_in_inv,
    ),
    TensorSpec("layers.o_proj", _L + "self_attn.o_proj.weight", _o_in, _o_in_inv),
    TensorSpec("layers.q_norm", _L + "self_attn.q_norm.weight", _ident, _ident),
    TensorSpec("layers.k_norm", _L + "self_attn.k_norm.weight", _ident, _ident),
    TensorSpec("layers.input_layernorm", _L + "input_layernorm.weight", _ident, _ident),
    TensorSpec(
        "layers.post_attention_layernorm", _L + "post_attention_layernorm.weight", _ident, _ident
    ),
    TensorSpec("layers.gate_proj", _L + "mlp.gate_proj.weight", _t, _t),
    TensorSpec("layers.up_proj", _L + "mlp.up_proj.weight", _t, _t),
    TensorSpec("layers.down_proj", _L + "mlp.down_proj.weight", _t, _t),
    TensorSpec(
        "layers.q_bias", _L + "self_attn.q_proj.bias", _bias_in("num_attention_heads"), _flat, _bias
    ),
    TensorSpec(
        "layers.k_bias", _L + "self_attn.k_proj.bias", _bias_in("num_key_value_heads"), _flat, _bias
    ),
    TensorSpec(
        "layers.v_bias", _L + "self_attn.v_proj.bias", _bias_in("num_key_value_heads"), _flat, _bias
    ),
    TensorSpec("layers.o_bias", _L + "self_attn.o_proj.bias", _ident, _ident, _bias),
)

_QWEN3_MLP = ("layers.gate_proj", "layers.up_proj", "layers.down_proj")
_E = _L + "mlp.experts.{e}."
QWEN3_MOE_TABLE: tuple[TensorSpec, ...] = tuple(
    s for s in QWEN3_TABLE if s.ours not in _QWEN3_MLP
) + (
    TensorSpec("layers.router", _L + "mlp.gate.weight", _t, _t),
    TensorSpec("layers.gate_proj", _E + "gate_proj.weight", _t, _t),
    TensorSpec("layers.up_proj", _E + "up_proj.weight", _t, _t),
    TensorSpec("layers.down_proj", _E + "down_proj.weight", _t, _t),
)


def _pairs_in(w, c):  # HF interleaved gate/up [..., 2F] -> ours [..., F, 2]
    return w.reshape(*w.shape[:-1], -1, 2)


def _pairs_out(w, c):
    return w.reshape(*w.shape[:-2], -1)


_X = _L + "mlp.experts."
GPT_OSS_TABLE: tuple[TensorSpec, ...] = tuple(
    s for s in QWEN3_TABLE if s.ours not in _QWEN3_MLP + ("layers.q_norm", "layers.k_norm")
) + (
    TensorSpec("layers.sinks", _L + "self_attn.sinks", _ident, _ident),
    TensorSpec("layers.router", _L + "mlp.router.weight", _t, _t),
    TensorSpec("layers.router_bias", _L + "mlp.router.bias", _ident, _ident),
    # [E, D, 2F] (MXFP4 folders: decoded from gate_up_proj_blocks/_scales by the reader)
    TensorSpec("layers.gate_up_proj", _X + "gate_up_proj", _pairs_in, _pairs_out),
    TensorSpec("layers.gate_up_proj_bias", _X + "gate_up_proj_bias", _pairs_in, _pairs_out),
    TensorSpec("layers.down_proj", _X + "down_proj", _ident, _ident),  # [E, F, D]
    TensorSpec("layers.down_proj_bias", _X + "down_proj_bias", _ident, _ident),
    # expert weights held as MXFP4 (MoeOptions(expert_weights="mxfp4")): copied as stored
    TensorSpec("layers.gate_up_proj_blocks", _X + "gate_up_proj_blocks", _ident, _ident),
    TensorSpec("layers.gate_up_proj_scales", _X + "gate_up_proj_scales", _ident, _ident),
    TensorSpec("layers.down_proj_blocks", _X + "down_proj_blocks", _ident, _ident),
    TensorSpec("layers.down_proj_scales", _X + "down_proj_scales", _ident, _ident),
)
MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}

# model_type -> (config class, model class, key table).
ARCHITECTURES: dict[str, tuple[type, type, tuple[TensorSpec, ...]]] = {
    "qwen3": (Qwen3Config, Qwen3, QWEN3_TABLE),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3Moe, QWEN3_MOE_TABLE),
    "gpt_oss": (GptOssConfig, GptOss, GPT_OSS_TABLE),
}
# config.json `architectures` entry -> model_type, for folders without a model_type
ARCHITECTURE_NAMES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
}


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the model (names the tensor and file)."""


class NonFiniteWeights(CheckpointError):
    """A model to be saved holds NaN or inf (names the tensor)."""


def _open_safetensors(f: Path):
    """A safetensors handle; an unreadable file is a CheckpointError naming it."""
    try:
        return safe_open(f, framework="numpy")
    except (SafetensorError, OSError) as e:
        size = f.stat().st_size if f.exists() else 0
        raise CheckpointError(
            f"{f}: cannot read this safetensors file ({size} bytes): {e}. It looks truncated "
            f"or corrupt (an interrupted copy or download?): copy it again"
        ) from None


# --------------------------------------------------------------------------- reading


def read_config(path: str | Path):
    """The architecture config of an HF folder, dispatched on config.json's model_type."""
    path = Path(path)
    f = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: is {path} a Hugging Face model folder?")
    d = json.loads(f.read_text())
    model_type = d.get("model_type")
    if model_type is None:
        known = [
            ARCHITECTURE_NAMES[a] for a in d.get("architectures") or () if a in ARCHITECTURE_NAMES
        ]
        model_type = known[0] if known else None
        d = {**d, "model_type": model_type}
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{f}: unsupported model_type {d.get('model_type')!r} (architectures "
            f"{d.get('architectures')}); supported: {sorted(ARCHITECTURES)} "
            f"({', '.join(sorted(ARCHITECTURE_NAMES))})"
        )
    return ARCHITECTURES[model_type][0].from_hf_dict(d, source=str(f))


def _tensor_index(path: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise FileNotFoundError(f"{index} names {f.name}, which does not exist")
        return files
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with _open_safetensors(single) as fh:
        return {name: single for name in fh.keys()}


class _Reader:
    """Memory-mapped safetensors handles, opened once per file.

    `files` maps every tensor name the folder offers to the file that holds it, including
    virtual MXFP4 tensors: `X` (decoded) for a pair `X_blocks` + `X_scales`. A model holding
    decoded experts reads `X`, one holding MXFP4 reads the pair as stored.
    """

    def __init__(self, files: dict[str, Path]):
        self.stored = files
        self._handles: dict[Path, Any] = {}
        self._mxfp4: dict[str, tuple[str, str]] = {}
        for name in files:
            base = name.removesuffix("_blocks")
            if base != name and base + "_scales" in files and base not in files:
                self._mxfp4[base] = (name, base + "_scales")
        self.files = dict(files)
        self.files.update({base: files[blocks] for base, (blocks, _) in self._mxfp4.items()})

    def covers(self, name: str) -> tuple[str, ...]:
        """The stored tensors that reading `name` consumes."""
        return self._mxfp4.get(name, (name,))

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._mxfp4:
            return mxfp4.hf_layout_shape(self._shape(self._mxfp4[name][0]))
        return self._shape(name)

    def read(self, name: str, dtype=None) -> np.ndarray:
        """The tensor; MXFP4 ones decoded straight into `dtype` (default float32)."""
        if name in self._mxfp4:
            blocks, scales = (self._handle(n).get_tensor(n) for n in self._mxfp4[name])
            return mxfp4.hf_layout_dequantize(blocks, scales, dtype or np.float32)
        return self._handle(name).get_tensor(name)

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def _handle(self, name: str):
        f = self.stored[name]
        if f not in self._handles:
            self._handles[f] = _open_safetensors(f)
        return self._handles[f]


def _has_path(obj, dotted: str) -> bool:
    try:
        _get_path(obj, dotted)
    except AttributeError:
        return False
    return True


def _get_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set_value(module, dotted: str, value):
    *parents, leaf = dotted.split(".")
    owner = _get_path(module, ".".join(parents)) if parents else module
    getattr(owner, leaf).set_value(value)


def _expected_hf_shape(spec: TensorSpec, our_shape, cfg) -> tuple[int, ...]:
    dummy = np.empty(our_shape[len(spec.stacked) :], np.int8)
    return spec.to_hf(dummy, cfg).shape


def load_hf(
    path: str | Path,
    mesh: Mesh,
    opts: ModelOptions = ModelOptions(),
):
    """Build the model of an HF folder with its weights, every array already on `mesh`."""
    path = Path(path)
    cfg = read_config(path)
    _, model_cls, table = ARCHITECTURES[cfg.model_type]
    abstract = nnx.eval_shape(lambda: model_cls(cfg, opts, rngs=nnx.Rngs(0), mesh=mesh))
    reader = _Reader(_tensor_index(path))
    specs = [s for s in table if s.when(cfg) and _has_path(abstract, s.ours)]
    wanted = {}
    for spec in specs:
        var = _get_path(abstract, spec.ours)
        names = spec.names(tuple(var.shape[: len(spec.stacked)]))
        want = _expected_hf_shape(spec, var.shape, cfg)
        for name in names.values():
            if name not in reader.files:
                raise CheckpointError(f"{path}: tensor {name} is missing (needed for {spec.ours})")
            got = reader.shape(name)
            if got != want:
                raise CheckpointError(
                    f"{reader.files[name]}: tensor {name} has shape {got}, "
                    f"config.json implies {want}"
                )
        wanted[spec.ours] = (spec, names, var)
    expected = {
        stored
        for _, names, _ in wanted.values()
        for n in names.values()
        for stored in reader.covers(n)
    }
    if getattr(cfg, "tie_word_embeddings", False):
        expected.add("lm_head.weight")  # some tied checkpoints still store it; unused
    unexpected = sorted(set(reader.stored) - expected)
    if unexpected:
        f = reader.files[unexpected[0]]
        raise CheckpointError(
            f"{f}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all: "
            f"{unexpected[:5]}); is config.json right for these weights?"
        )

    model = abstract
    for ours, (spec, names, var) in wanted.items():
        sharding = named_sharding(var.logical_axes, var.shape, mesh)
        # packed (integer) parameters keep their dtype; float ones take param_dtype
        dtype = var.dtype if jnp.issubdtype(var.dtype, jnp.integer) else opts.param_dtype
        arr = _build_array(spec, names, var.shape, jnp.dtype(dtype), sharding, reader, cfg)
        _set_value(model, ours, arr)
    return model


def _build_array(spec, names, shape, dtype, sharding, reader, cfg) -> jax.Array:
    """One parameter from its HF tensors; each device gets only its index.

    Every HF tensor is read (and decoded) once; only the slices this host's devices hold are
    kept, so a stacked [L, E, ...] parameter never needs a full host copy.
    """
    shape = tuple(shape)
    n_stack = len(spec.stacked)
    np_dtype = np.dtype(dtype)
    index_map = sharding.addressable_devices_indices_map(shape)
    key = lambda index: tuple(sl.indices(n) for sl, n in zip(index, shape, strict=True))  # noqa: E731
    pieces: dict[tuple, tuple[tuple[range, ...], tuple[slice, ...], np.ndarray]] = {}
    for index in index_map.values():
        k = key(index)
        if k not in pieces:
            ranges = tuple(range(*k[d]) for d in range(n_stack))
            local = tuple(len(r) for r in ranges) + tuple(len(range(*t)) for t in k[n_stack:])
            pieces[k] = (ranges, tuple(index[n_stack:]), np.empty(local, np_dtype))
    for idx, name in names.items():
        holders = [
            p for p in pieces.values() if all(i in r for i, r in zip(idx, p[0], strict=True))
        ]
        if not holders:
            continue
        t = spec.to_ours(reader.read(name, np_dtype), cfg)
        for ranges, rest, buf in holders:
            at = tuple(r.index(i) for i, r in zip(idx, ranges, strict=True))
            buf[at] = t[rest]
        del t
    return jax.make_array_from_callback(shape, sharding, lambda index: pieces[key(index)][2])


# --------------------------------------------------------------------------- writing


def _to_host(arr: jax.Array) -> np.ndarray:
    if getattr(arr, "is_fully_addressable", True):
        return np.asarray(jax.device_get(arr))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(arr, tiled=True))


def _np_dtype(name: str):
    return {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[name]


def save_hf(
    model,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 4 * 2**30,
) -> Path:
    """Write `model` as an HF folder loadable by transformers (and vLLM).

    Tensors are written in `dtype` (default: the config's dtype). The folder is assembled
    under a temporary name, checked (`write_hf`) and renamed into place, so a killed or
    failed save never leaves a folder that looks complete; the leftovers of killed saves of
    the same folder are swept first. A gs:// `out_dir` is built locally (under
    `storage.local_dir`), then uploaded file by file (`storage.upload_dir`): the old objects
    are deleted first, config.json first, and config.json is uploaded last, so the folder is
    complete once its config.json exists. In a multi-process run every process must call
    this (arrays are gathered collectively); only process 0 writes.
    """
    from dasd_jax import storage

    if storage.is_remote(out_dir):
        remote = os.fspath(out_dir)
        local = Path(storage.local_dir(remote))
        save_hf(
            model,
            local,
            dtype=dtype,
            tokenizer_dir=tokenizer_dir,
            max_shard_bytes=max_shard_bytes,
        )
        if jax.process_index() == 0:
            old = storage.glob(storage.join(remote, "*"))
            for f in sorted(old, key=lambda f: not f.endswith("/config.json")):
                storage.unlink(f)
            storage.upload_dir(local, remote, last="config.json")
            shutil.rmtree(local)  # the weights live in the bucket now
        return storage.as_path(remote)
    out_dir = Path(out_dir)
    tmp = None
    if jax.process_index() == 0:
        sweep_staging(out_dir)
        tmp = staging_dir(out_dir)
    try:
        write_hf(
            model,
            tmp,
            dtype=dtype,
            tokenizer_dir=tokenizer_dir,
            max_shard_bytes=max_shard_bytes,
            name=out_dir,
        )
    except BaseException:
        if tmp is not None:
            discard_staging(tmp)
        raise
    return publish_dir(tmp, out_dir) if tmp is not None else out_dir


def write_hf(
    model,
    folder: Path | None,
    *,
    dtype: str | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 4 * 2**30,
    name: Path | None = None,
) -> None:
    """Write the HF files of `model` into the empty local `folder` (None on the processes
    other than 0, which only take part in the gathers), then check what was written.

    Refuses (`NonFiniteWeights`, before any file is written) a tensor holding NaN or inf in
    `dtype`; then reopens every safetensors file (tensor names, shapes, dtypes; safetensors
    itself checks that the data covers the file exactly), config.json and the copied
    tokenizer files (sizes). `name` is the folder the messages name (the final one).
    """
    cfg = model.cfg
    dtype = dtype or cfg.dtype
    np_dt = _np_dtype(dtype)
    name = name or folder
    _, _, table = ARCHITECTURES[cfg.model_type]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for spec in table:
        if not spec.when(cfg) or not _has_path(model, spec.ours):
            continue
        var = _get_path(model, spec.ours)
        names = spec.names(tuple(var.shape[: len(spec.stacked)]))
        # gather one layer at a time (all its experts at once), never the whole parameter
        n_layers = var.shape[0] if spec.stacked else 1
        for i in range(n_layers):
            host = _to_host(var[...][i] if spec.stacked else var[...])
            for idx, hf_name in names.items():
                if spec.stacked and idx[0] != i:
                    continue
                value = host[idx[1:]] if spec.stacked else host
                t = spec.to_hf(value, cfg)
                if not np.issubdtype(t.dtype, np.integer):
                    # every process checks (all hold the gathered layer), so all stop together
                    with np.errstate(over="ignore"):  # an overflow is reported just below
                        cast = t.astype(np_dt)
                    t = _finite_or_raise(cast, t, hf_name, dtype, name)
                if folder is None:
                    continue
                t = np.ascontiguousarray(t)
                if size and size + t.nbytes > max_shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][hf_name] = t
                size += t.nbytes
    if folder is None:
        return
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({hf_name: fname for hf_name in shard})
    if n > 1:
        total = sum(t.nbytes for s in shards for t in s.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    hf = cfg.to_hf_dict()
    hf["dtype"] = dtype
    if any(hf_name.endswith("_blocks") for hf_name in weight_map):  # experts written as MXFP4
        hf["quantization_config"] = cfg.extra.get("quantization_config") or dict(
            MXFP4_QUANTIZATION_CONFIG
        )
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    src = Path(tokenizer_dir) if tokenizer_dir else None
    gen = src / "generation_config.json" if src else None
    copied = []
    if gen is not None and gen.exists():
        shutil.copy(gen, folder / "generation_config.json")
        copied.append(gen)
    else:
        (folder / "generation_config.json").write_text(
            json.dumps(
                {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2
            )
        )
    if src is not None:
        for fname in TOKENIZER_FILES:
            if (src / fname).exists():
                shutil.copy(src / fname, folder / fname)
                copied.append(src / fname)
    _check_written(folder, shards, copied, name)


def _finite_or_raise(t: np.ndarray, raw: np.ndarray, hf_name: str, dtype: str, name) -> np.ndarray:
    if np.isfinite(t).all():
        return t
    bad = int(np.size(t) - np.count_nonzero(np.isfinite(t)))
    why = (
        f"finite before the cast: values beyond {dtype}'s range; export in bfloat16 or float32"
        if np.isfinite(raw).all()
        else "the model itself holds them: it diverged"
    )
    raise NonFiniteWeights(
        f"{name}: tensor {hf_name} has {bad} NaN/inf values of {np.size(t)} as {dtype} ({why}); "
        "refusing to write non-finite weights"
    )


def _check_written(folder: Path, shards: list[dict], copied: list[Path], name) -> None:
    """Reopen what `write_hf` wrote: every tensor with its shape and dtype, config.json, the
    copied files' sizes. A difference (a full disk, a bad filesystem) is a CheckpointError."""
    for k, shard in enumerate(shards):
        n = len(shards)
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        with _open_safetensors(folder / fname) as fh:
            got = {
                t: (tuple(fh.get_slice(t).get_shape()), fh.get_slice(t).get_dtype())
                for t in fh.keys()
            }
        want = {t: (a.shape, _SAFETENSORS_DTYPES.get(a.dtype.name)) for t, a in shard.items()}
        if set(got) != set(want) or any(
            got[t][0] != want[t][0] or want[t][1] not in (None, got[t][1]) for t in want
        ):
            raise CheckpointError(
                f"{name}: {fname} does not read back as written (tensors, shapes or dtypes "
                "differ): is the disk full?"
            )
    read_config(folder)
    for src in copied:
        if (folder / src.name).stat().st_size != src.stat().st_size:
            raise CheckpointError(f"{name}: {src.name} was not copied whole from {src}")


_SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "uint8": "U8",
    "int8": "I8",
    "int32": "I32",
}


# --------------------------------------------------------------------------- staging

_STAGED: set[str] = set()  # staging folders this process made (a pid recurs after a restart)


def staging_dir(out_dir: Path) -> Path:
    """A new empty folder beside `out_dir` to build it in: `.<name>.tmp-<pid>-<random>`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the folder keeps its name once published, and mkdtemp's mode 0700
    # would hide it from the other users the umask lets read it
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    _STAGED.add(os.path.abspath(tmp))
    return tmp


def discard_staging(tmp: Path) -> None:
    _STAGED.discard(os.path.abspath(tmp))
    shutil.rmtree(tmp, ignore_errors=True)


def sweep_staging(out_dir: Path) -> list[Path]:
    """Delete what killed saves of `out_dir` left beside it: the `.<name>.tmp-<pid>-*` (and
    older `.<name>.old-<pid>`) entries whose process is gone, or is this one but the entry is
    not one it made. Returns what was deleted."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(?:tmp|old)-(\d+)(?:-|$)")
    swept = []
    for p in out_dir.parent.iterdir():
        m = pattern.match(p.name)
        if not m or os.path.abspath(p) in _STAGED or _other_process_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        swept.append(p)
    if swept:
        log.warning("%s: removed %d leftovers of killed saves: %s", out_dir, len(swept), swept)
    return swept


def _other_process_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def publish_dir(tmp: Path, out_dir: Path) -> Path:
    """Rename the finished, checked folder `tmp` to `out_dir`, replacing an older one (moved
    aside under a staging name first, so a kill in between leaves only sweepable folders)."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    if out_dir.exists():
        old = tmp.with_name(tmp.name + "-old")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    _STAGED.discard(os.path.abspath(tmp))
    return out_dir


# --------------------------------------------------------------------------- creating


def state_shardings(abstract_state, mesh: Mesh):
    """NamedSharding per variable, from its `logical_axes` metadata."""
    return jax.tree.map(
        lambda v: named_sharding(v.logical_axes, v.shape, mesh),
        abstract_state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def init_model(cfg, mesh: Mesh, opts: ModelOptions = ModelOptions(), seed: int = 0):
    """A randomly initialised model whose parameters are created already sharded."""
    model_cls = ARCHITECTURES[cfg.model_type][1]
    make = lambda: model_cls(cfg, opts, rngs=nnx.Rngs(seed), mesh=mesh)  # noqa: E731
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)
