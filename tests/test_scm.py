"""The causal graph: validation, invertible mechanisms, abduction-action-prediction on the non-image nodes."""

import json
from pathlib import Path

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
            "affine, logistic or flow",
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


def test_a_categorical_parent_enters_one_hot_and_names_map_to_classes():
    graph = CausalGraph(
        [
            Node("color", "categorical", classes=("red", "green", "blue")),
            Node("size", "continuous", ("color",), range=(0.0, 20.0),
                 mechanism=Mechanism("affine", {"color": (5.0, 1.0, 9.0)}, scale=1.0)),
            Node("image", "image", ("color", "size")),
        ]
    )  # fmt: skip
    values = graph.counterfactual({"color": ["red"], "size": [6.0]}, {"color": "blue"})
    assert values["color"].tolist() == [2] and values["size"].tolist() == [10.0], "5 + 1 = 6 -> 9 + 1"
    green = graph.counterfactual({"color": ["red"], "size": [6.0]}, {"color": "green"})
    assert green["size"].tolist() == [2.0], "green's weight is its own, not between red's and blue's"
    assert graph.nodes["color"].value_name(2) == "blue"
    with pytest.raises(ValueError, match="no class 'purple'"):
        graph.check_value("color", "purple")


def test_fit_takes_the_range_from_the_data_and_chooses_the_mechanism_by_held_out_likelihood():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, 2000)
    b = 60 + 180 / (1 + np.exp(-(np.array([-2.0, 0.0, 2.0])[a] + 0.5 * rng.standard_normal(2000))))
    config = {"nodes": [
        {"name": "a", "type": "categorical", "classes": ["x", "y", "z"]},
        {"name": "b", "type": "continuous", "parents": ["a"], "range": [60, 240]},
        {"name": "c", "type": "continuous"},
        {"name": "image", "type": "image", "parents": ["a", "b", "c"]},
    ]}  # fmt: skip
    unfitted = CausalGraph.from_config(config, fitted=False)
    assert not unfitted.fitted
    with pytest.raises(ValueError, match="affine, logistic or flow mechanism|needs a range"):
        CausalGraph.from_config(config)  # a pipeline's graph is fitted
    c = rng.uniform(2, 5, 2000)
    train = {"a": a[:1500], "b": b[:1500], "c": c[:1500]}
    heldout = {"a": a[1500:], "b": b[1500:], "c": c[1500:]}
    graph, report = unfitted.fit(train, heldout)
    assert graph.fitted and graph.nodes["c"].range == (c[:1500].min(), c[:1500].max())
    assert report["b"]["kind"] == "logistic", "the data were drawn by a logistic mechanism"
    weights = graph.nodes["b"].mechanism.weights["a"]
    assert weights[0] < weights[1] < weights[2] and abs(graph.nodes["b"].mechanism.scale - 0.5) < 0.05
    assert CausalGraph.from_config(graph.to_config()).to_config() == graph.to_config(), "saved and loaded as is"


@pytest.mark.parametrize(
    "node, message",
    [
        ({"name": "a", "type": "continuous", "range": [0, float("inf")]}, "Node 'a': \"range\" must be finite"),
        ({"name": "a", "type": "continuous", "range": "0-1"}, "Node 'a': \"range\" is \\[low, high\\]"),
        ({"name": "a", "type": "categorical", "classes": "rgb"}, "Node 'a': \"classes\" is a list"),
        ({"name": "a", "type": "categorical", "classes": ["r", "r"]}, "lists a name twice"),
        ({"name": "a", "type": "categorical", "num_classes": "3"}, "Node 'a': \"num_classes\" is an integer"),
        ({"name": "a", "type": "categorical", "num_classes": 2.5}, "Node 'a': \"num_classes\" is an integer"),
        ({"name": "a", "type": "categorical", "num_classes": 10**9}, "Node 'a': \"num_classes\" .* more than"),
        ({"name": "a", "type": "continuous", "range": [0, 1, 2]}, "Node 'a': \"range\" is \\[low, high\\]"),
        (
            {"name": "a", "type": "continuous", "range": [0, 1], "mechanism": {"kind": "affine", "slope": 2}},
            "Node 'a': \"mechanism\" has unknown fields \\['slope'\\]; it takes \\['kind', 'weights'",
        ),
        (
            {"name": "a", "type": "continuous", "range": [0, 1], "mechanism": {"kind": "affine", "weights": "b"}},
            "Node 'a': 'mechanism weights' must be",
        ),
        ({"name": "a", "type": "categorical", "num_classes": 2, "parents": "b"}, "Node 'a': 'parents' must be"),
        ({"name": "a", "type": "continuous", "range": [0, 1], "mechanism": "affine"}, "Node 'a': 'mechanism'"),
        ({"name": "a", "type": "continuous", "range": [0, 1], "mechanism": {"kind": "spline"}}, "Node 'a'.*spline"),
        ({"name": "a", "type": "continuous", "range": [0, 1], "classes": ["x", "y"]}, "only categorical nodes"),
    ],
)
def test_a_bad_graph_file_names_the_node_and_the_field(node, message, tmp_path):
    path = tmp_path / "graph.json"
    path.write_text(json.dumps({"nodes": [node, {"name": "image", "type": "image", "parents": ["a"]}]}))
    with pytest.raises(ValueError, match=message):
        CausalGraph.load(str(path))


def test_the_protocol_intervenes_on_every_parent_with_another_value_and_descendants_follow():
    from diffscm.evaluation.protocol import intervention_values

    graph = CausalGraph.morphomnist()
    factual = {"thickness": np.array([1.0, 2.0, 3.0, 4.0]), "intensity": np.array([100.0, 150.0, 200.0, 250.0]),
               "digit": np.array([0, 3, 7, 9])}  # fmt: skip
    requests = intervention_values(graph, factual, seed=1)
    assert set(requests) == {"thickness", "intensity", "digit"}
    assert np.all(requests["digit"]["digit"] != factual["digit"])
    moved = requests["thickness"]["thickness"]
    assert np.all((moved >= 0.5) & (moved <= 6.0)) and np.all(moved != factual["thickness"]), "within its range"
    assert not np.allclose(requests["thickness"]["intensity"], factual["intensity"]), "intensity follows"
    assert np.array_equal(requests["intensity"]["thickness"], factual["thickness"]), "thickness is no descendant"


def test_a_flow_is_fitted_where_affine_and_logistic_do_not_fit_and_inverts_exactly():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, 2000)
    b = np.where(rng.random(2000) < 0.5, -3.0, 3.0) + 0.3 * rng.standard_normal(2000) + 2 * a  # bimodal given a
    graph = CausalGraph.from_config({"nodes": [
        {"name": "a", "type": "categorical", "num_classes": 3},
        {"name": "b", "type": "continuous", "parents": ["a"]},
        {"name": "image", "type": "image", "parents": ["a", "b"]},
    ]}, fitted=False)  # fmt: skip
    fitted, report = graph.fit({"a": a[:1500], "b": b[:1500]}, {"a": a[1500:], "b": b[1500:]})
    assert report["b"]["kind"] == "flow"
    mechanism = fitted.nodes["b"].mechanism
    noise = mechanism.abduct({"a": a[1500:]}, b[1500:])
    assert np.abs(mechanism({"a": a[1500:]}, noise) - b[1500:]).max() < 1e-4, "abduction inverts the flow"
    assert abs(noise.std() - 1) < 0.2, "the abducted noise is standard normal on held-out data"
    loaded = CausalGraph.from_config(json.loads(json.dumps(fitted.to_config())))
    factual = {"a": a[1500:][a[1500:] == 0], "b": b[1500:][a[1500:] == 0]}
    moved = loaded.counterfactual(factual, {"a": 2})["b"]
    assert np.allclose(moved, fitted.counterfactual(factual, {"a": 2})["b"]), "saved and loaded, the same flow"
    assert np.median(moved - factual["b"]) == pytest.approx(4.0, abs=0.5), "do(a = 2) moves b by 2 x 2"
    assert np.mean(np.sign(moved - 4) == np.sign(factual["b"])) > 0.95, "each value keeps its mode"


CELEBA_GRAPH = Path(__file__).resolve().parents[1] / "docs" / "graphs" / "celeba-age-gender-beard-bald.json"


def _beards(size: int = 4000) -> dict:
    """Young, Male -> No_Beard, Bald (the benchmark's CelebA graph): only men have beards (young men fewer), old men
    go bald more often."""
    rng = np.random.default_rng(0)
    young, male = rng.integers(0, 2, size), rng.integers(0, 2, size)
    beard = rng.random(size) < np.where(male == 1, 0.5 - 0.3 * young, 0.0)
    bald = rng.random(size) < np.where(male == 1, 0.3 - 0.25 * young, 0.01)
    return {"Young": young, "Male": male, "No_Beard": (~beard).astype(np.int64), "Bald": bald.astype(np.int64)}


def test_a_categorical_node_with_parents_gets_a_gumbel_max_mechanism_whose_counterfactuals_follow_the_data():
    data = _beards()
    fitted, report = CausalGraph.load(str(CELEBA_GRAPH)).fit(data)
    assert report["No_Beard"]["kind"] == report["Bald"]["kind"] == "gumbel_max"
    assert report["No_Beard"]["heldout_accuracy"] > 0.8
    graph = CausalGraph.from_config(json.loads(json.dumps(fitted.to_config())))  # recorded and read back
    null = graph.counterfactual(data, {"Male": data["Male"]})
    assert np.array_equal(null["No_Beard"], data["No_Beard"]), "the factual parents give the factual class back"
    bearded = {name: values[data["No_Beard"] == 0] for name, values in data.items()}  # all of them men
    assert graph.counterfactual(bearded, {"Male": "no"})["No_Beard"].mean() > 0.95, "as women, no beard"
    women = {name: values[data["Male"] == 0] for name, values in data.items()}
    as_men = graph.counterfactual(women, {"Male": "yes"})
    expected = np.mean(0.5 - 0.3 * women["Young"])  # the data's beard rate of men of the same ages
    assert abs((1 - as_men["No_Beard"].mean()) - expected) < 0.05
    assert np.array_equal(as_men["Young"], women["Young"]), "a non-descendant keeps its value"
    again = graph.counterfactual(women, {"Male": "yes"})
    assert np.array_equal(again["No_Beard"], as_men["No_Beard"]), "the posterior draw is seeded"


def test_gumbel_max_noise_is_drawn_from_its_posterior():
    """Abducted Gumbel noise reproduces the observed class under the factual parents, whatever the draw."""
    mechanism = Mechanism("gumbel_max", {"a": ((0.0, 1.0, -1.0), (2.0, 0.0, 0.0))}, (0.5, 0.0, -0.5))
    parents, observed = {"a": np.array([0, 1, 0, 1] * 50)}, np.array([0, 1, 2, 2] * 50)
    for seed in range(3):
        noise = mechanism.abduct(parents, observed, seed=seed)
        assert noise.shape == (200, 3) and np.array_equal(mechanism(parents, noise), observed)
    assert mechanism.log_likelihood(parents, observed) < 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mechanism": {"kind": "affine", "weights": {"Young": [0.0, 1.0], "Male": [0.0, 1.0]}}}, "gumbel_max"),
        ({"mechanism": {"kind": "gumbel_max", "weights": {"Young": [[0, 1], [1, 0]], "Male": [[0, 1]]},
                        "bias": [0, 0]}}, "weight of 'Male' is 2 rows"),
        ({"mechanism": {"kind": "gumbel_max", "weights": {"Young": [[0, 1], [1, 0]], "Male": [[0, 1], [1, 0]]},
                        "bias": [0, 0, 0]}}, "bias is 2 logits"),
        ({"mechanism": {"kind": "gumbel_max", "weights": {"Young": [[0, 1], [1, 0]]}, "bias": [0, 0]}}, "weighs"),
        ({"mechanism": {"kind": "gumbel_max", "weights": {"Young": [[0, 1], [1, 0]]}, "bias": 0.0}}, "one bias"),
    ],
)  # fmt: skip
def test_a_bad_categorical_mechanism_names_the_node_and_what_to_change(change, message):
    nodes = json.loads(CELEBA_GRAPH.read_text())["nodes"]
    nodes[2] |= change
    with pytest.raises(ValueError, match=message):
        CausalGraph.from_config(nodes)


def test_a_factual_value_just_outside_the_range_is_clipped_and_an_intervention_there_refused():
    """A range taken from the training split need not hold every held-out value; an intervention must lie in it."""
    graph = CausalGraph.morphomnist()
    low, high = graph.nodes["thickness"].range
    outside = high + 0.05 * (high - low)
    out = graph.counterfactual({"thickness": outside, "intensity": 200.0, "digit": 3}, {"digit": 5})
    assert out["thickness"][0] == high and out["intensity"][0] == 200.0
    with pytest.raises(ValueError, match="a factual one up to"):
        graph.counterfactual({"thickness": high + (high - low), "intensity": 200.0, "digit": 3}, {"digit": 5})
    with pytest.raises(ValueError, match="must lie in its range"):
        graph.counterfactual({"thickness": 2.0, "intensity": 200.0, "digit": 3}, {"thickness": outside})
