"""Demo helper: export a simulated client's test images as PNG files, and score classify answers.

The exported images are the very ones the client was evaluated on: the same plan, the same
style and the same per-image style noise (`style_seed`) as training.

    python scripts/demo_images.py export RUN_DIR PARTITION OUT_DIR N
    promptfolio classify OUT_DIR --json | python scripts/demo_images.py score OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

from training.data import DataPlan, load_split, style_seed


def export(run_dir: str, partition: int, out_dir: str, n: int) -> None:
    plan = DataPlan.read(Path(run_dir) / "plan.json")
    test = plan.clients[partition].test
    first = test.model_copy(update={k: getattr(test, k)[:n] for k in ("paths", "labels", "styles")})
    images = load_split(first, style_seed(plan.seed, partition, "test"))  # style noise is seeded per position
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i, image in enumerate(images):
        name = f"{i:03d}.png"
        Image.fromarray(image).save(out / name)
        labels[name] = plan.classes[test.labels[i]]
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    style = plan.clients[partition].style
    print(f"{len(labels)} test images of client-{partition} (style {style[0]} at strength {style[1]}) in {out}")


def score(out_dir: str) -> None:
    answer = json.load(sys.stdin)
    labels = json.loads((Path(out_dir) / "labels.json").read_text())
    hits = [p["top"][0]["label"] == labels[Path(p["file"]).name] for p in answer["predictions"]]
    local = answer["local_version"]
    print(f"tenant {answer['tenant']}: global prompt v{answer['global_version']}, "
          f"local prompt {'v' + str(local) if local else 'none'}, θ={answer['theta']:.2f} -> "
          f"top-1 accuracy {100 * sum(hits) / len(hits):.1f}% on {len(hits)} images")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "export" and len(sys.argv) == 6:
        export(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    elif len(sys.argv) == 3 and sys.argv[1] == "score":
        score(sys.argv[2])
    else:
        sys.exit(__doc__)
