"""The per-direction table and its rows: what one rank sends is what every rank writes back, bit for bit."""
from __future__ import annotations

import dataclasses

import numpy as np

from hfvolume.volume.radius import RadiusSearchResult
from hfvolume.volume.results import DirectionFlag, VolumeResult
from hfvolume.volume.table import WIRE_COLUMNS, DirectionTable


def _filled(n: int) -> DirectionTable:
    g = np.random.default_rng(0)
    table = DirectionTable.empty(n)
    idx = np.arange(n)
    flags = np.array([list(DirectionFlag)[i % len(DirectionFlag)] for i in idx], dtype=object)
    found = RadiusSearchResult(radius=g.lognormal(size=n), delta=g.normal(size=n), flag=flags,
                               evaluations=g.integers(1, 64, size=n), nonfinite=g.integers(0, 3, size=n))
    table.record_search(idx, found, g.normal(size=n) * 1e4)
    table.log_estimates[idx] = -np.abs(g.normal(size=n)) * 1e9
    table.log_estimates[n - 1] = -np.inf  # a direction whose radius is 0 has log f = −∞
    return table


def test_rows_round_trip_through_an_empty_table():
    n = 11
    sent = _filled(n)
    mine = np.array([7, 2, 9, 0, 10])
    got = DirectionTable.empty(n)
    written = got.update_from_rows(sent.rows(mine))
    np.testing.assert_array_equal(written, mine)
    for f in dataclasses.fields(DirectionTable):
        a, b = getattr(sent, f.name)[mine], getattr(got, f.name)[mine]
        assert a.dtype == b.dtype, f.name
        assert a.tobytes() == b.tobytes() if a.dtype != object else list(a) == list(b), f.name


def test_rows_have_one_named_column_per_field_and_an_index():
    table = _filled(4)
    assert WIRE_COLUMNS == ("index", *(f.name for f in dataclasses.fields(DirectionTable)))
    rows = table.rows(np.array([3, 1]))
    assert rows.shape == (2, len(WIRE_COLUMNS)) and rows.dtype == np.float64
    assert rows[:, WIRE_COLUMNS.index("index")].tolist() == [3.0, 1.0]
    assert rows[:, WIRE_COLUMNS.index("radii")].tolist() == table.radii[[3, 1]].tolist()
    assert table.rows(np.array([], dtype=np.int64)).shape == (0, len(WIRE_COLUMNS))


def test_result_fields_are_the_results_per_direction_fields():
    table = _filled(5)
    fields = table.result_fields()
    assert set(fields) <= {f.name for f in dataclasses.fields(VolumeResult)}
    assert set(fields) == {f.name for f in dataclasses.fields(DirectionTable)}
    assert fields["flags"] == tuple(DirectionFlag(f).value for f in table.flags)
    assert all(type(x) is int for x in fields["evaluations"] + fields["nonfinite"])
    assert all(type(x) is float for x in fields["log_estimates"] + fields["radii"])
