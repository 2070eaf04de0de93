"""The notebooks' parameter guard: unknown names and bad values fail fast with one clear message."""

import pytest

from csa.notebook.guard import ParameterGuard
from csa.validation import CSAInputError


def _run(injected: dict, **rules):
    ns = {"np": object()}
    guard = ParameterGuard(ns)
    ns.update({"epochs": 3, "device": "auto", "lr": 0.1})  # the parameters cell
    ns.update(injected)  # papermill's injected cell
    return guard.check(ns, **rules)


RULES = dict(epochs=int, device=("auto", "cpu", "cuda"), lr=float)


def test_known_parameters_pass_and_are_returned():
    assert _run({"epochs": 5, "lr": 1}, **RULES) == {"epochs": 5, "device": "auto", "lr": 1}


def test_unknown_parameter_names_the_closest_known_one():
    with pytest.raises(CSAInputError, match=r"unknown parameter 'epoch' \(did you mean 'epochs'\?\)"):
        _run({"epoch": 5}, **RULES)


@pytest.mark.parametrize(
    "injected, message",
    [
        ({"epochs": "5"}, r"epochs='5' is invalid: expected int"),
        ({"epochs": True}, r"epochs=True is invalid"),
        ({"device": "tpu"}, r"device='tpu' is invalid: expected one of 'auto', 'cpu', 'cuda'"),
        ({"lr": "0.1"}, r"lr='0.1' is invalid: expected float"),
    ],
)
def test_bad_values_are_rejected(injected, message):
    with pytest.raises(CSAInputError, match=message):
        _run(injected, **RULES)


def test_all_problems_are_reported_together():
    with pytest.raises(CSAInputError) as err:
        _run({"epoch": 1, "device": "tpu"}, **RULES)
    text = str(err.value)
    assert "unknown parameter 'epoch'" in text and "device='tpu'" in text and "Known parameters" in text


def test_parse_pairs_splits_on_the_first_colon_and_rejects_malformed_items():
    from csa.notebook.guard import parse_pairs

    assert parse_pairs("a:x.pth, b:/p/c:d.pth,") == {"a": "x.pth", "b": "/p/c:d.pth"}
    for bad in ("a", "a:", ":x"):
        with pytest.raises(CSAInputError, match="dataset:path pairs"):
            parse_pairs(bad)


def test_list_parameters_must_name_something():
    from csa.notebook.guard import parse_names, positive_int

    assert parse_names(" a, b ,", "trainsets") == ["a", "b"]
    for empty in ("", " , "):
        with pytest.raises(CSAInputError, match="trainsets"):
            parse_names(empty, "trainsets")
    assert positive_int(3) and not positive_int(0) and not positive_int(-1) and not positive_int(True)
