"""Whatever legitimate pickle a client writes, the data-only decoder reads as ``pickle.loads`` would.

Hypothesis draws payloads of the kinds clients send (arrays of every plain dtype, layout and
shape, structured and datetime ones among them, numpy scalars, dtypes, text, bytes, numbers and
nested containers), pickles them at every protocol with numpy 2 or 1.x names, and checks the
decoder's result against plain ``pickle.loads`` of the same bytes, value by value."""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.wire.safe_pickle import decode_general
from tests.core.test_safe_pickle import assert_same
from tests.hostile_pickles import numpy1

PLAIN = st.one_of(
    hnp.boolean_dtypes(), hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(),
    hnp.floating_dtypes(), hnp.complex_number_dtypes(),
    hnp.byte_string_dtypes(min_len=1, max_len=8), hnp.unicode_string_dtypes(min_len=1, max_len=8),
    hnp.datetime64_dtypes(), hnp.timedelta64_dtypes(),
)
# field titles are refused (README: "How a pickle is read"), so structured dtypes here have none
STRUCTURED = hnp.array_dtypes(PLAIN, min_size=1, max_size=4).filter(
    lambda dtype: all(len(field) == 2 for field in dtype.fields.values()))
DTYPES = st.one_of(PLAIN, STRUCTURED)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    array = draw(hnp.arrays(DTYPES, SHAPES))
    layout = draw(st.sampled_from(["c", "fortran", "strided"]))
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "strided" and array.ndim:
        return array[::2]
    return array


def scalars() -> st.SearchStrategy[Any]:
    return hnp.arrays(PLAIN, ()).map(lambda a: a[()])


LEAVES = st.one_of(
    arrays(), scalars(), PLAIN, st.text(max_size=8), st.binary(max_size=8), st.integers(),
    st.floats(allow_nan=False), st.booleans(), st.none(), st.complex_numbers(allow_nan=False),
)
KEYS = st.one_of(st.text(max_size=6), st.integers(-5, 5))
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(KEYS, inner, max_size=4),
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.dictionaries(st.text(max_size=6), VALUES, min_size=1, max_size=5),
       protocol=st.sampled_from([0, 2, 3, 4, 5]), old_numpy=st.booleans())
def test_the_decoder_reads_what_pickle_loads_reads(payload: dict[str, Any], protocol: int,
                                                    old_numpy: bool) -> None:
    data = pickle.dumps(payload, protocol=protocol)
    if old_numpy and protocol >= 2:
        data = numpy1(data)
    with warnings.catch_warnings():  # numpy warns when pickle.loads imports numpy.core names
        warnings.simplefilter("ignore", DeprecationWarning)
        reference = pickle.loads(data)
    assert_same(decode_general(data), reference)
