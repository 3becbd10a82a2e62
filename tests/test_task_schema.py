import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.task import ColumnSpec, DataSchema, SchemaError, TaskLoadError, load_task

SCHEMA = DataSchema(
    features=(ColumnSpec("age", "int"), ColumnSpec("bmi", "float")),
    label=ColumnSpec("outcome", "binary"),
)


def test_round_trip() -> None:
    x = np.array([[40, 22.5], [61, 30.25]], dtype=np.float32)
    y = np.array([0, 1], dtype=np.float32)
    parsed_x, parsed_y = SCHEMA.parse_csv(SCHEMA.to_csv(x, y))
    np.testing.assert_array_equal(parsed_x, x)
    np.testing.assert_array_equal(parsed_y, y)


FLOATS = DataSchema(features=(ColumnSpec("a"), ColumnSpec("b")), label=ColumnSpec("y", "binary"))


@given(
    hnp.arrays(np.float32, (3, 2), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
)
@pytest.mark.slow
@settings(max_examples=200, deadline=None)
def test_float32_values_round_trip_exactly_through_csv(x: np.ndarray) -> None:
    y = np.array([0, 1, 0], dtype=np.float32)
    parsed_x, _ = FLOATS.parse_csv(FLOATS.to_csv(x, y))
    np.testing.assert_array_equal(parsed_x, x)


def test_csv_shows_float32_values_as_their_shortest_decimal() -> None:
    text = FLOATS.to_csv(np.array([[19.59, 0.1]], dtype=np.float32), np.array([1], dtype=np.float32))
    assert text.splitlines()[1] == "19.59,0.1,1"


def test_column_order_is_free() -> None:
    x, y = SCHEMA.parse_csv("outcome,bmi,age\n1,20.5,33\n")
    assert x.tolist() == [[33.0, 20.5]] and y.tolist() == [1.0]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "empty"),
        ("age,bmi\n1,2\n", "missing columns: outcome"),
        ("age,bmi,outcome,zip\n1,2,0,5\n", "unexpected columns: zip"),
        ("age,bmi,outcome\n", "no data rows"),
        ("age,bmi,outcome\nabc,2,0\n", "column 'age'"),
        ("age,bmi,outcome\n1.5,2,0\n", "not an integer"),
        ("age,bmi,outcome\n1,2,3\n", "must be 0 or 1"),
        ("age,bmi,outcome\n1,nan,0\n", "not a finite number"),
        ("age,bmi,outcome\n1,2\n", "row 2: expected 3 values"),
    ],
)
def test_rejections_name_the_problem(content: str, fragment: str) -> None:
    with pytest.raises(SchemaError, match=fragment):
        SCHEMA.parse_csv(content)


def test_binary_content_rejected() -> None:
    with pytest.raises(SchemaError, match=r"not UTF-8|binary"):
        SCHEMA.parse_csv(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")


def test_row_limit() -> None:
    small = DataSchema(features=SCHEMA.features, label=SCHEMA.label, max_rows=2)
    with pytest.raises(SchemaError, match="too many rows"):
        small.parse_csv("age,bmi,outcome\n1,2,0\n1,2,0\n1,2,0\n")


def test_load_task_errors() -> None:
    with pytest.raises(TaskLoadError, match="cannot import"):
        load_task("no_such_module_xyz:task")
    with pytest.raises(TaskLoadError, match="no attribute"):
        load_task("fedveil.task:nothing_here")
    with pytest.raises(TaskLoadError, match="not a fedveil Task"):
        load_task("fedveil.task:ColumnSpec")


def test_describe_margin_is_symmetric_and_ordered() -> None:
    from fedveil.task import describe_margin

    # 86 % risk (log-odds 1.85) must not read as "uncertain" beside a "very high" risk level.
    assert describe_margin(1.85).startswith("moderately confident")
    assert describe_margin(-1.85) == describe_margin(1.85)
    assert describe_margin(0.1).startswith("uncertain")
    assert describe_margin(2.5) == "fairly confident"
    assert describe_margin(6.0).startswith("confident")
