"""Every constructor keyword of every registered method refuses a wrongly typed or out-of-range value with
a TypeError / ValueError naming the class and the keyword, before any tensor is built -- and accepts the
NumPy scalars a user passes from a config file, normalized to Python types (so config() stays JSON-able).

The bad values per kind are those the issue's fuzz found accepted or failing deep inside torch: seeds
"1", 2.5, True, 2**64, -1; floats "0.1", None, nan, inf, 1e39 (overflows float32), True; bools "yes", 2,
None; ints "3", 2.5, True, 0 below the range; choices "nope", 3.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_theory import adapters

BAD = {
    "seed": ["1", 2.5, True, 2**64, -1],
    "float": ["0.1", None, float("nan"), float("inf"), 1e39, True],
    "bool": ["yes", 2, None, 1.0],
    "int": ["3", 2.5, True, None],
    "ints": ["3", 2.5, True, [], [2, "x"]],
    "choice": ["nope", 3, None],
    "shape2": [(4,), (4, "x"), "44", (0, 3)],
    "tensor": [[1.0, 2.0], "t"],
    "instance": [3, "shared"],
}


def _cases():
    for name in adapters.names():
        cls = adapters.get(name)
        for key, spec in cls.params.items():
            for bad in BAD[spec.kind]:
                if bad is None and spec.none_ok:
                    continue
                yield pytest.param(name, key, bad, id=f"{name}-{key}-{bad!r}")


def _size(name):
    return (3, 3) if name == "flora_conv2d" else (12, 20)


@pytest.mark.parametrize(("name", "key", "bad"), list(_cases()))
def test_bad_keyword_value_is_named(name, key, bad):
    with pytest.raises((TypeError, ValueError)) as info:
        adapters.create(name, *_size(name), **{key: bad})
    msg = str(info.value)
    assert key in msg, msg


def test_fuzz_covers_every_keyword_kind():
    kinds = {spec.kind for n in adapters.names() for spec in adapters.get(n).params.values()}
    assert kinds <= set(BAD)
    assert len(list(_cases())) > 400  # 27 methods x their keywords x the bad values of each kind


@pytest.mark.parametrize("name", [n for n in adapters.names() if "seed" in adapters.get(n).params])
def test_numpy_scalars_are_accepted_and_normalized(name):
    fits = {"fourierft": {"n_frequency": 20}, "randlora": {"rank": 4}, "unilora": {"d": 64}}.get(name, {})
    ad = adapters.create(name, *_size(name), seed=np.int64(3), **fits)
    seed = ad.config()["seed"]
    assert seed == 3 and type(seed) is int


def test_numpy_float_and_bool_are_normalized():
    ad = adapters.create("lora", 12, 20, rank=np.int32(2), alpha=np.float32(4.0), rslora=np.bool_(True))
    cfg = ad.config()
    assert (cfg["rank"], cfg["alpha"], cfg["rslora"]) == (2, 4.0, True)
    assert (type(cfg["rank"]), type(cfg["alpha"]), type(cfg["rslora"])) == (int, float, bool)
    assert ad.scale == pytest.approx(4.0 / np.sqrt(2))
