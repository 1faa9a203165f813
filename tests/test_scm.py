"""The causal graph: validation, invertible mechanisms, abduction-action-prediction on the non-image nodes."""

import numpy as np
import pytest

from diffscm import CausalGraph, Mechanism, Node


def morpho_intensity(thickness, noise):
    """The data set's own formula (data/morphomnist/README.md)."""
    return 64 + 191 / (1 + np.exp(-(0.5 * noise + 2 * thickness - 5)))


def test_morphomnist_graph_orders_causes_first_and_round_trips_its_config():
    graph = CausalGraph.morphomnist()
    assert graph.order.index("thickness") < graph.order.index("intensity") < graph.order.index("image")
    assert set(graph.image_parents) == {"thickness", "intensity", "digit"}
    assert graph.descendants("thickness") == {"intensity", "image"}
    again = CausalGraph.from_config(graph.to_config())
    assert again.to_config() == graph.to_config() and again.order == graph.order


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (
            [
                {"name": "a", "type": "continuous", "range": [0, 1], "parents": ["b"],
                 "mechanism": {"kind": "affine", "weights": {"b": 1.0}}},
                {"name": "b", "type": "continuous", "range": [0, 1], "parents": ["a"],
                 "mechanism": {"kind": "affine", "weights": {"a": 1.0}}},
                {"name": "image", "type": "image", "parents": ["a"]},
            ],
            "cycle",
        ),
        ([{"name": "image", "type": "image", "parents": ["ghost"]}], "unknown parent 'ghost'"),
        ([{"name": "a", "type": "categorical", "num_classes": 2}], "exactly one image"),
        (
            [{"name": "a", "type": "categorical", "num_classes": 2}, {"name": "image", "type": "image"}],
            "at least one parent",
        ),
        (
            [{"name": "a", "type": "colour"}, {"name": "image", "type": "image", "parents": ["a"]}],
            "unknown type",
        ),
        (
            [{"name": "a", "type": "continuous"}, {"name": "image", "type": "image", "parents": ["a"]}],
            "needs a range",
        ),
        (
            [
                {"name": "a", "type": "categorical", "num_classes": 2},
                {"name": "image", "type": "image", "parents": ["a"]},
                {"name": "b", "type": "categorical", "num_classes": 2, "parents": ["image"]},
            ],
            "must be a sink",
        ),
        (
            [
                {"name": "a", "type": "continuous", "range": [0, 1]},
                {"name": "b", "type": "continuous", "range": [0, 1], "parents": ["a"]},
                {"name": "image", "type": "image", "parents": ["b"]},
            ],
            "affine or logistic",
        ),
        (
            [
                {"name": "a", "type": "continuous", "range": [0, 1]},
                {"name": "b", "type": "continuous", "range": [0, 1], "parents": ["a"],
                 "mechanism": {"kind": "affine", "weights": {"z": 1.0}}},
                {"name": "image", "type": "image", "parents": ["b"]},
            ],
            "weighs",
        ),
        (
            [
                {"name": "a", "type": "categorical", "num_classes": 2},
                {"name": "a", "type": "categorical", "num_classes": 2},
                {"name": "image", "type": "image", "parents": ["a"]},
            ],
            "twice",
        ),
        ([{"name": "image", "type": "image", "colour": "red"}], "unknown fields"),
        ([{"name": "digit"}, {"name": "image", "type": "image", "parents": ["digit"]}], "'digit' needs type"),
    ],
)  # fmt: skip
def test_invalid_graphs_are_refused_with_the_reason(nodes, message):
    with pytest.raises(ValueError, match=message):
        CausalGraph(nodes)


@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    [
        ("width", 1.0, ValueError, "Unknown variable 'width'"),
        ("image", 1.0, ValueError, "Unknown variable"),
        ("thickness", 9.0, ValueError, "range"),
        ("thickness", float("nan"), ValueError, "finite"),
        ("intensity", "bright", TypeError, "numbers"),
        ("digit", 2.5, ValueError, "class indices"),
        ("digit", 10, ValueError, "class indices"),
        ("digit", True, TypeError, "real numbers"),
        ("thickness", [[1.0]], ValueError, "one value per image"),
    ],
)
def test_bad_values_are_refused(name, value, error, message):
    with pytest.raises(error, match=message):
        CausalGraph.morphomnist().check_value(name, value)


@pytest.mark.parametrize(
    "mechanism",
    [
        Mechanism("affine", {"a": 0.7, "b": -1.2}, bias=0.3, scale=0.4),
        Mechanism("logistic", {"a": 2.0, "b": 0.5}, bias=-1.0, scale=0.5, low=10.0, high=20.0),
    ],
)
def test_mechanisms_abduct_the_noise_that_reproduces_the_value(mechanism):
    rng = np.random.default_rng(0)
    parents = {"a": rng.normal(size=50), "b": rng.normal(size=50)}
    noise = rng.normal(size=50)
    value = mechanism(parents, noise)
    np.testing.assert_allclose(mechanism.abduct(parents, value), noise, atol=1e-6)


def test_fitted_mechanism_recovers_the_morphomnist_intensity_formula():
    rng = np.random.default_rng(0)
    thickness = 0.5 + rng.gamma(10, 1 / 5, size=4000)
    intensity = morpho_intensity(thickness, rng.normal(size=4000))
    fitted = Mechanism.fit("logistic", intensity, {"thickness": thickness}, low=64.0, high=255.0)
    assert fitted.weights["thickness"] == pytest.approx(2.0, abs=0.05)
    assert fitted.bias == pytest.approx(-5.0, abs=0.15)
    assert fitted.scale == pytest.approx(0.5, abs=0.03)


def test_do_thickness_propagates_to_intensity_with_the_abducted_noise():
    graph = CausalGraph.morphomnist()
    thickness, noise = np.array([1.5, 2.5, 4.0]), np.array([-1.0, 0.2, 1.3])
    factual = {"thickness": thickness, "intensity": morpho_intensity(thickness, noise), "digit": [1, 7, 3]}
    counterfactual = graph.counterfactual(factual, {"thickness": 3.0})
    np.testing.assert_allclose(counterfactual["thickness"], 3.0)
    np.testing.assert_allclose(counterfactual["intensity"], morpho_intensity(3.0, noise), rtol=1e-6)
    assert counterfactual["digit"].tolist() == [1, 7, 3]


def test_do_on_a_child_or_a_root_leaves_the_other_variables_alone():
    graph = CausalGraph.morphomnist()
    factual = {"thickness": [2.0, 3.0], "intensity": [120.0, 200.0], "digit": [4, 5]}
    by_intensity = graph.counterfactual(factual, {"intensity": [90.0, 250.0]})
    np.testing.assert_allclose(by_intensity["thickness"], [2.0, 3.0])
    np.testing.assert_allclose(by_intensity["intensity"], [90.0, 250.0])
    by_digit = graph.counterfactual(factual, {"digit": 0})
    np.testing.assert_allclose(by_digit["intensity"], [120.0, 200.0], rtol=1e-9)
    assert by_digit["digit"].tolist() == [0, 0]
    nothing = graph.counterfactual(factual, {})
    np.testing.assert_allclose(nothing["intensity"], [120.0, 200.0], rtol=1e-9)


def test_counterfactual_needs_the_factual_values_it_abducts_from():
    graph = CausalGraph.morphomnist()
    with pytest.raises(ValueError, match=r"\['intensity'\] are needed to abduct the noise of 'intensity'"):
        graph.counterfactual({"thickness": 2.0, "digit": 1}, {"thickness": 3.0})
    assert graph.counterfactual({"thickness": 2.0, "digit": 1}, {"digit": 3}) == {
        "thickness": pytest.approx([2.0]),
        "digit": [3],
    }


def test_single_parent_graph_is_the_one_edge_case():
    graph = CausalGraph.single_parent("digit", 10)
    assert graph.image_parents == ("digit",) and graph.nodes["digit"].num_classes == 10
    assert isinstance(graph.nodes["digit"], Node)
