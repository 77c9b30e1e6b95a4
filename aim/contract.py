"""The modulation contract: names and bounds of the inputs every modulated engine takes, and the
checks of their values. NumPy only: everything that runs an engine (runners, the Triton backend,
the decode loop) imports this and nothing heavier.

    logits' = logits + utility * n1 + focus * |n2|        n1, n2 ~ N(0, 1) per element
"""

from __future__ import annotations

import math

import numpy as np

from aim.errors import InvalidInputError

PREFIX = "aim_redistribution"  # every node of the subgraph: fp16 conversion keeps them in FP32
UTILITY = "utility"  # FP32 [B]: per-sample sigma in logit units, so a batch can mix service tiers
FOCUS = "focus"  # FP32 [B, C]: signed per-class strength (> 0 boosts, < 0 suppresses)
UTILITY_LEVEL = "utility_level"  # calibrated engines, FP32 [B]: 1 = the exact model, 0 = chance
NOISE_UTILITY = "noise_utility"  # verification flavour only: n1, shaped like the logits
NOISE_FOCUS = "noise_focus"  # verification flavour only: n2, shaped like the logits
MODULATION_INPUTS = (UTILITY, FOCUS)
NOISE_INPUTS = (NOISE_UTILITY, NOISE_FOCUS)
FLAVOURS = ("production", "verification")
NOISE_METHODS = ("box-muller", "normal")  # how the production flavour makes fresh N(0, 1)
# Where the production flavour's noise comes from: drawn afresh on every run, or keyed (a function of
# a secret key and of the request: the same request gets the same answer, so repeats average nothing).
NOISE_SOURCES = ("fresh", "keyed")
BATCH = "batch"  # the name of the batch dim in every exported graph (Triton batches on it)
LOGITS = "logits"  # the modulated output's name in the families' exports
# Largest |utility| or |focus| accepted, in logit units. Logit gaps of real models are tens of units,
# so every model is at chance long before this; beyond it the noise could overflow FP16 logits.
MAX_STRENGTH = 1e4


def _shown(values: np.ndarray, limit: int = 8) -> str:
    """At most `limit` values of an array for a message: a 10,000-row batch must not print them all."""
    flat = np.ravel(values)
    head = ", ".join(f"{v:g}" for v in flat[:limit].tolist())
    return f"[{head}{f', ... ({flat.size} values)' if flat.size > limit else ''}]"


def _per_sample(value, batch: int, name: str) -> np.ndarray:
    u = np.asarray(value, dtype=np.float32)
    if u.ndim == 0:
        u = np.full([batch], u, dtype=np.float32)
    if u.shape != (batch,):
        raise InvalidInputError(
            f"{name} must be a number or have one value per sample ({batch}), got shape {list(u.shape)}"
        )
    return u


def check_modulation(utility, focus, batch: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validates runtime knobs and returns them as FP32 `[B]` and `[B, C]` arrays.

    `utility`: a number (every sample) or one value per sample; finite and >= 0 (a sigma in logit
    units). `focus`: None (no focus), a `[C]` vector for every sample, or `[B, C]`; finite, any sign.
    """
    u = _per_sample(utility, batch, UTILITY)
    bad = ~np.isfinite(u)
    if np.any(bad):
        raise InvalidInputError(f"utility must be finite, got {_shown(u[bad])}: NaN and inf have no noise level")
    bad = (u < 0) | (u > MAX_STRENGTH)
    if np.any(bad):
        raise InvalidInputError(
            f"utility is a noise scale in logit units and must lie in [0, {MAX_STRENGTH:g}], got {_shown(u[bad])} "
            f"(0 = the original model)"
        )
    if focus is None:
        return u, np.zeros([batch, num_classes], dtype=np.float32)
    f = np.asarray(focus, dtype=np.float32)
    if f.ndim == 1 and f.shape[0] == num_classes:
        f = np.broadcast_to(f, (batch, num_classes)).copy()
    if f.shape != (batch, num_classes):
        raise InvalidInputError(
            f"focus must have one value per class ({num_classes}), or shape [{batch}, {num_classes}] for "
            f"one vector per sample; got shape {list(f.shape)}"
        )
    if not np.all(np.isfinite(f)):
        raise InvalidInputError("focus must be finite: it holds NaN or inf")
    if np.any(np.abs(f) > MAX_STRENGTH):
        raise InvalidInputError(
            f"focus strengths must lie in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], got up to {np.abs(f).max():g}"
        )
    return u, f


def check_level(level, batch: int) -> np.ndarray:
    """A calibrated utility level: a number or one per sample, each in [0, 1]."""
    u = _per_sample(level, batch, UTILITY_LEVEL)
    bad = ~np.isfinite(u) | (u < 0) | (u > 1)
    if np.any(bad):
        raise InvalidInputError(
            f"utility_level must lie in [0, 1] (1 = the exact model, 0 = chance), got {_shown(u[bad])}"
        )
    return u


def focus_vector(num_classes: int, boost: dict[int, float] | None = None, suppress: dict[int, float] | None = None):
    """A dense `[C]` focus vector from {class: strength}: boosts positive, suppressions negative."""
    f = np.zeros([num_classes], dtype=np.float32)
    for sign, chosen in ((1.0, boost or {}), (-1.0, suppress or {})):
        for index, strength in chosen.items():
            if not 0 <= index < num_classes:
                raise InvalidInputError(
                    f"class {index} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
                )
            if not math.isfinite(strength) or not 0 <= strength <= MAX_STRENGTH:
                raise InvalidInputError(
                    f"focus strength for class {index} must lie in [0, {MAX_STRENGTH:g}], got {strength}"
                )
            f[index] = sign * strength
    return f
