"""A model directory that reads a checkpoint with YaRN RoPE scaling, for evaluating past its training length
without training: the config gets ``rope_parameters`` of type yarn (factor, original length; the indexer's
RoPE shares them), and the weights and tokenizer are linked, not copied.

    python scripts/rope_extend.py MODEL_DIR OUT_DIR --factor 2 --original 16384

The bundled model's rope (theta 1e4, 16 rotary dims) has its slowest wavelength near 20K tokens, so a
model trained at 16K meets angles it has never seen past that; YaRN interpolates those slow dimensions by
``factor`` and leaves the fast ones as trained.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from indexcache.config import DSAConfig  # noqa: E402


def extend(model_dir: Path, out_dir: Path, factor: float, original: int) -> Path:
    """Write ``out_dir``: ``model_dir``'s config with YaRN (``factor``, ``original``), its other files linked."""
    cfg = json.loads((model_dir / "config.json").read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg.pop("rope_scaling", None)  # transformers lets rope_scaling win: one place holds the rope
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                              "original_max_position_embeddings": original}
    cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings", 0)), int(factor * original))
    DSAConfig.from_dict(cfg)  # refuse a config the model would not read, before anything is written
    out_dir.mkdir(parents=True, exist_ok=False)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not f.name.startswith("."):  # not the toolkit's output manifest
            os.symlink(f.resolve(), out_dir / f.name)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--original", type=int, default=16384, help="the length the model was trained at")
    a = ap.parse_args()
    if a.out.exists():
        sys.exit(f"rope_extend: {a.out} exists; give a new directory")
    print(extend(a.model, a.out, a.factor, a.original))


if __name__ == "__main__":
    main()
