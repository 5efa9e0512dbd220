"""How often the compositional toy's base model draws what its caption says (docs/compositional.md).

    python benchmarks/compose_base.py OUT [--kind sd3]   # builds OUT/model_compose(_sd3) once, then measures

Exact-scene accuracy (compose_toy.read_scenes) at guidance 1 and 3, 20 DDIM (or flow Euler) steps, 2 samples per
caption from sampling seed 0: on the first 48 trained captions and on the 24 held-out ones. Prints one JSON line.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import startup  # noqa: E402,F401  (before diffusers: quiets two start-up warnings)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--kind", choices=["sdxl", "sd3"], default="sdxl")
    args = parser.parse_args()

    import compose_toy
    import toy_task

    started = time.perf_counter()
    folder = compose_toy.build_model(toy_task.model_folder(args.out_dir, "compose" if args.kind == "sdxl" else
                                                           "compose_sd3"), kind=args.kind)
    built = time.perf_counter() - started
    pipe = toy_task.load_pipeline(folder)
    trained, heldout = compose_toy.split_captions()
    row = {"kind": args.kind, "build_seconds": round(built, 1)}
    for split, scenes in (("trained", trained[:48]), ("heldout", heldout)):
        for guidance in (1.0, 3.0):
            row[f"{split}_g{guidance:g}"] = compose_toy.accuracy(pipe, scenes, 2, guidance_scale=guidance)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
