"""Float32 values shown as the shortest decimal that reads back as the same float32.

A meter's float32 register holding 229.8 holds 229.8000030517578; people, and the JSON encoding, mean and
write 229.8. Finding that decimal costs more than anything else the agent does per reading, so it is done
only where a decimal is shown (the JSON encoding, tools), a poll at a time where possible, and never for the
compact encoding, which sends the float32's 4 bytes (agent.model.Float32).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from itertools import compress, count
from operator import ne


def shortest_float32_many(values: Sequence[float]) -> list[float]:
    """`shortest_float32` of each value, in C loops a batch at a time instead of one Python step per value:
    every value formatted to 7 significant digits in one step and read back in one; one round trip through
    float32 finds the values that need 8 or 9 digits, which are tried the same way. Only the values whose
    7 digits may hide a shorter decimal (ending in 1 or 9, or in exponent form: see shortest_float32), and
    batches holding a NaN or an infinity, go value by value. A test holds it equal to shortest_float32."""
    if not values:
        return []
    float32 = struct.Struct(f">{len(values)}f")
    try:
        exact = float32.unpack(float32.pack(*values))  # each as the float32 it stands for
        text = ",".join(["%.7g"] * len(values)) % exact
        if "n" in text:  # "nan" or "inf"
            return [shortest_float32(value) for value in values]
        texts = text.split(",")
        shortest = list(map(float, texts))
        back = float32.unpack(float32.pack(*shortest))
    except OverflowError:  # beyond the largest float32, or 7 digits rounded past it
        return [shortest_float32(value) for value in values]
    longer = list(compress(count(), map(ne, back, exact)))
    if longer:
        _more_digits(longer, exact, shortest)
    # 7 digits ending in 1 or 9, or in exponent form, may hide a shorter decimal; fewer than 7 characters
    # cannot be 7 significant digits, %g dropped the trailing zeros: already the shortest.
    for i, digits in enumerate(texts):
        if ((digits[-1] in "19" and len(digits) >= 7) or "e" in digits) and back[i] == exact[i]:
            shortest[i] = shortest_float32(exact[i])
    return shortest


_F32 = struct.Struct(">f")
_FLT_MIN = 1.1754943508222875e-38  # the smallest normal float32


def shortest_float32(value: float, _pack: Callable[[float], bytes] = _F32.pack) -> float:
    """The shortest decimal that reads back as the same float32: a register holding 229.8 gives 229.8,
    not 229.8000030517578 (the exact binary value, which no meter means).

    This runs for the float32 values a batch cannot settle at once (`shortest_float32_many`) and for every
    scaled one, among the agent's largest costs per reading at scale, so it starts at 7 significant
    digits, which nearly always gives the shortest decimal when 7 or fewer digits are enough (%g drops
    trailing zeros): one try for most values, two or three for 8 or 9 digits. Reading back is monotonic in
    the number of digits (if k digits read back, k + 1 do), so when 7 digits may hide a shorter form,
    shorter ones are tried until one does not read back. Subnormal values start at 6. A test compares it
    with the digit-by-digit search over random float32 bit patterns."""
    exact = _pack(value)
    try:
        if -_FLT_MIN < value < _FLT_MIN:
            for digits in (6, 7, 8):
                candidate = float(f"{value:.{digits}g}")
                if _pack(candidate) == exact:
                    return candidate
        else:
            text = f"{value:.7g}"
            candidate = float(text)
            if _pack(candidate) == exact:
                # Where half an ulp is wider than half a step of the seventh digit (about 1 value in 25,000),
                # 7 digits ending in 1 or 9 can sit next to a shorter decimal that also reads back.
                if text[-1] in "19" or "e" in text:
                    mantissa = text.partition("e")[0]
                    if mantissa[-1] in "19" and len(mantissa.lstrip("-0.").replace(".", "")) == 7:
                        for digits in (6, 5, 4, 3, 2, 1):
                            shorter = float(f"{value:.{digits}g}")
                            if _pack(shorter) != exact:
                                break
                            candidate = shorter
                return candidate
            candidate = float(f"{value:.8g}")
            if _pack(candidate) == exact:
                return candidate
        candidate = float(f"{value:.9g}")  # 9 digits always identify a normal float32
        if _pack(candidate) == exact:
            return candidate
    except OverflowError:  # a candidate rounded past the largest float32
        pass
    return _F32.unpack(exact)[0]


def _more_digits(indices: list[int], values: Sequence[float], shortest: list[float]) -> None:
    """For the values 7 digits do not identify: 8 digits, then 9 for those 8 do not, a batch at a time."""
    for digits in (8, 9):
        batch = tuple(values[i] for i in indices)
        candidates = list(map(float, (",".join([f"%.{digits}g"] * len(batch)) % batch).split(",")))
        float32 = struct.Struct(f">{len(batch)}f")
        back = float32.unpack(float32.pack(*candidates))
        left = []
        for i, candidate, read_back, value in zip(indices, candidates, back, batch, strict=True):
            if read_back == value:
                shortest[i] = candidate
            else:
                left.append(i)
        if not left:
            return
        indices = left
    for i in indices:  # 9 digits identify every float32: a guard, not a path
        shortest[i] = shortest_float32(values[i])
