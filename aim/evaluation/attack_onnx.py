"""The perturbed averaging attack on a user's own ONNX, modulated as a user does it
(`aim modulate --noise keyed`): a small MLP on scikit-learn's digits (raw pixel values 0..16 in, ten
scores out), trained and exported here, its keyed engine and its fresh one side by side.

For each of `--keys` keys: sigma where one query agrees with the clean answer half the time (theory,
G(sigma) = 0.5), then every test input sent K = 1..64 times with every pixel moved by +-L/255 of the
input range (L = 1, 4, 16), the client answering with the argmax of the mean of the K answers. The gain
of 64 queries over one is reported per key and pooled (mean over keys; its standard error from the
spread over keys and the paired binomial error of each key's gain). One query's agreement (every test
input sent once, as is) is measured under each key and reported over keys against the theory, its
standard error from the key-to-key spread (attack_keys.py).

    python -m aim.evaluation.attack_onnx --out build/user-mlp [--keys 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from aim.evaluation.attack import QUERIES, TARGET, curves
from aim.evaluation.attack_keys import OverKeys

LEVELS = (1, 4, 16)
RANGE = 16.0  # the digits' pixel values: 0..16


def train_and_export(folder: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """The user's model as ONNX (logits output "scores") and its test inputs."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    train, test, labels, _ = train_test_split(x.astype(np.float32), y, test_size=0.4, random_state=seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    optimiser = torch.optim.Adam(net.parameters(), 1e-3)
    inputs, targets = torch.tensor(train / RANGE), torch.tensor(labels)
    for _ in range(1500):
        chosen = torch.randint(0, len(inputs), (64,))
        loss = torch.nn.functional.cross_entropy(net(inputs[chosen]), targets[chosen])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    class Scores(torch.nn.Module):  # raw pixel values in, as the user's pipeline sends them
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, pixels):
            return self.net(pixels / RANGE)

    model = Scores().eval()
    path = folder / "user_mlp.onnx"
    torch.onnx.export(
        model,
        (torch.tensor(test[:2]),),
        str(path),
        input_names=["x"],
        output_names=["scores"],
        dynamic_axes={"x": {0: "batch"}, "scores": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path, test


def modulate(source: Path, target: Path, noise: str, key: Path | None = None) -> Path:
    """`aim modulate` as a user runs it."""
    command = [sys.executable, "-m", "aim.cli", "modulate", str(source), "-o", str(target), "--logits", "scores"]
    command += ["--noise", noise] + (["--noise-key", str(key)] if key else [])
    subprocess.run(command, check=True, capture_output=True, text=True)
    return target


def variants(x: np.ndarray, level: int, count: int, seed: int):
    rng = np.random.default_rng(seed)
    step = np.float32(RANGE * level / 255)
    for _ in range(count):
        yield {"x": x + rng.choice(np.float32([-step, step]), size=x.shape)}


def main(argv=None) -> int:
    from aim.evaluation.theory import agreement_curve, invert_agreement
    from aim.runtime.onnxruntime import OnnxRuntimeEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keys", type=int, default=8, help="keys (keyed engines), each a fresh one (default 8)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    source, x = train_and_export(args.out)
    fresh = OnnxRuntimeEngine(modulate(source, args.out / "fresh.onnx", "fresh"))
    clean = fresh.run({"x": x}, 0.0, None).astype(np.float64)
    top = clean.argmax(1)
    sigma = float(invert_agreement(clean, np.array([TARGET]), class_axis=1)[0][0])
    expected = float(agreement_curve(clean, np.array([sigma]))[0])
    print(f"user MLP: {len(x)} test inputs, sigma {sigma:.4g} (G = {expected:.4f})", flush=True)
    found = {"sigma": sigma, "rows": len(x), "gains": {}}
    one_query = []
    for key in range(args.keys):
        key_file = args.out / f"key{key}.key"
        key_file.unlink(missing_ok=True)
        keyed = OnnxRuntimeEngine(modulate(source, args.out / f"keyed{key}.onnx", "keyed", key_file))
        one_query.append(float(np.mean(keyed.run({"x": x}, sigma, None).argmax(1) == top)))
        print(f"  key {key} one query (as is): {one_query[-1]:.3f}", flush=True)
        for level in LEVELS:
            for noise, engine in (("keyed", keyed), ("fresh", fresh)):
                if noise == "fresh" and key:
                    continue  # fresh noise has no key: measured once
                mean = curves(engine, variants(x, level, max(QUERIES), seed=key), top, sigma, len(x))["mean"]
                gain = mean[64] - mean[1]
                found["gains"].setdefault(f"{noise} levels-{level}", []).append([mean[1], mean[64]])
                print(f"  key {key} {noise:5} +-{level:2}/255: K=1 {mean[1]:.3f} K=64 {mean[64]:.3f} ({gain:+.3f})")
    summary = {}
    for name, pairs in found["gains"].items():
        pairs = np.array(pairs)
        gains = pairs[:, 1] - pairs[:, 0]
        spread = gains.std(ddof=1) / np.sqrt(len(gains)) if len(gains) > 1 else 0.0
        binomial = np.sqrt(np.mean(pairs * (1 - pairs), axis=0).sum() / len(x) / len(gains))
        summary[name] = {
            "one_query": float(pairs[:, 0].mean()),
            "gain_of_64": float(gains.mean()),
            "standard_error": float(max(spread, binomial)),
            "per_key": gains.round(4).tolist(),
        }
        print(
            f"{name}: one query {pairs[:, 0].mean():.3f}, gain of 64 {gains.mean():+.3f} +- {max(spread, binomial):.3f}"
        )
    found["summary"] = summary
    over = OverKeys(one_query, expected, len(x))
    found["one_query_over_keys"] = over.as_dict()
    print(over.describe())
    (args.out / "attack_onnx.json").write_text(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
