"""The metrics panel: deletion / insertion of the map shown, computed on demand (tiny models)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
import xarray as xr
from _tiny_models import tiny_model, write_images

from scorecam_explorer.cache import save_cache
from scorecam_explorer.compose import scorecam
from scorecam_explorer.engine import compute_cache
from scorecam_explorer.explorer.metrics_panel import STEP_FRACTION, MetricsPanel, forward_pass_cost
from scorecam_explorer.explorer.model_link import ModelLink
from scorecam_explorer.explorer.state import ExplorerState
from scorecam_explorer.figures.curves import causal_curves_spec
from scorecam_explorer.metrics import average_drop_increase, deletion_insertion
from scorecam_explorer.metrics.causal import DEFAULT_STEP_FRACTION

LAYERS = ["features.1", "features.4"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def cache(model, tmp_path_factory) -> xr.DataTree:
    images = [str(path) for path in write_images(tmp_path_factory.mktemp("pictures"), 2)]
    return compute_cache(model, images, LAYERS, progress=False, batch_size=8)


def make_panel(cache: xr.DataTree, model) -> MetricsPanel:
    return MetricsPanel(ExplorerState(cache), ModelLink(model, cache.attrs.get("weights_fingerprint")))


@pytest.fixture
def images_forwarded(model) -> Iterator[list[int]]:
    """The batch size of every forward call of the model while the test runs."""
    seen: list[int] = []
    handle = model.module.register_forward_pre_hook(lambda _module, args: seen.append(int(args[0].shape[0])))
    yield seen
    handle.remove()


def cached_input(cache: xr.DataTree, image: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(cache["input"].isel(image=[image]).transpose("image", "c", "h", "w").values))


def stated_cost(panel: MetricsPanel) -> int:
    """The number of forward passes the button's label announces."""
    label = panel.button.description
    return int(label.split("(")[1].split()[0])


# ---- the figure and the numbers are the metrics' own -----------------------------------------


def test_button_shows_what_deletion_insertion_returns_for_the_map_shown(cache, model) -> None:
    panel = make_panel(cache, model)
    panel.state.update(image=1, layer="features.1", target=2, preset="torchcam")
    panel.state.update(switched_off={1}, top_k=3)
    panel.button.click()
    assert panel.message.value == ""

    on = np.ones(cache["features.1"].sizes["channel"], dtype=bool)
    on[1] = False
    saliency = scorecam(cache, "features.1", 2, preset="torchcam", image=1, channels=on, top_k=3)
    deletion, insertion = deletion_insertion(model, cached_input(cache, 1), saliency, 2)
    confidence = average_drop_increase(model, cached_input(cache, 1), saliency, 2)

    shown = panel.figure.widget.data
    for trace, expected in zip(shown, (deletion, insertion)):
        assert np.array_equal(trace.x, expected["fraction"].values)
        np.testing.assert_allclose(trace.y, expected["curve"].values[0], rtol=1e-6, atol=1e-9)
    titles = [note.text for note in panel.figure.widget.layout.annotations]
    assert f"AUC {float(deletion['auc'][0]):.3f}" in titles[1]
    assert f"AUC {float(insertion['auc'][0]):.3f}" in titles[2]
    numbers = panel.numbers.value
    assert f"{float(deletion['auc'][0]):.4f}" in numbers
    assert f"{float(insertion['auc'][0]):.4f}" in numbers
    assert f"{confidence.attrs['average_drop']:.2f} %" in numbers
    assert "1% of the pixels" in numbers and "blur" in numbers and "normalisation mean colour" in numbers
    result = panel.results[(1, "features.1", 2, "torchcam", 3, frozenset({1}))]
    xr.testing.assert_allclose(result.deletion, deletion)
    xr.testing.assert_allclose(result.insertion, insertion)
    channels = cache["features.1"].sizes["channel"]
    assert f"top 3 of {channels} channels, 1 switched off" in panel.figure.widget.layout.annotations[0].text


def test_before_computing_words_say_what_the_button_does_instead_of_empty_plots(cache, model) -> None:
    panel = make_panel(cache, model)
    intro = panel.intro.value
    assert panel.body.layout.display == "none" and panel.intro.layout.display is None
    assert f"runs the model {stated_cost(panel)} times" in intro
    assert "Deletion removes the pixels the map ranks highest first" in intro and "insertion" in intro
    assert "Average drop" in intro
    panel.button.click()
    assert panel.body.layout.display is None and panel.intro.layout.display == "none"
    panel.state.update(top_k=2)  # another map: the grey curves of the first stay, no words
    assert panel.body.layout.display is None and panel.intro.layout.display == "none"


def test_curve_axes_are_padded_so_that_0_and_0_percent_do_not_meet(cache, model) -> None:
    layout = causal_curves_spec(None, None)["layout"]
    for suffix in ("", "2"):
        x_range, y_range = layout[f"xaxis{suffix}"]["range"], layout[f"yaxis{suffix}"]["range"]
        assert x_range[0] < 0.0 and x_range[1] >= 1.0
        assert y_range[0] < 0.0 and y_range[1] >= 1.0


def test_the_cost_stated_is_the_forward_passes_made(cache, model, images_forwarded) -> None:
    panel = make_panel(cache, model)
    announced = stated_cost(panel)
    result = panel.compute()
    assert result is not None
    assert sum(images_forwarded) == announced == result.forward_passes
    assert f"Forward passes</td><td style='padding:1px 0'>{announced} " in panel.numbers.value
    assert STEP_FRACTION == DEFAULT_STEP_FRACTION


@pytest.mark.parametrize(("height", "width", "fraction"), [(32, 32, 0.01), (7, 5, 0.01), (224, 224, 0.01), (32, 32, 0.05)])
def test_forward_pass_cost_follows_the_metrics_protocol(height, width, fraction) -> None:
    inputs = torch.zeros(1, 3, height, width)
    saliency = torch.rand(height, width, generator=torch.Generator().manual_seed(0))
    module = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))
    seen: list[int] = []
    module.register_forward_pre_hook(lambda _module, args: seen.append(int(args[0].shape[0])))
    deletion, insertion = deletion_insertion(module, inputs, saliency, 0, step_fraction=fraction, batch_size=64)
    cost = forward_pass_cost(height, width, fraction)
    assert cost["deletion"] == deletion.attrs["forward_passes"] and cost["insertion"] == insertion.attrs["forward_passes"]
    assert cost["deletion"] + cost["insertion"] == sum(seen)


# ---- remembered per map; another map's result is marked -------------------------------------


def test_results_are_remembered_per_map_and_a_stale_one_is_marked(cache, model, images_forwarded) -> None:
    panel = make_panel(cache, model)
    first = panel.compute()
    first_curve = np.array(panel.figure.widget.data[0].y)
    passes = sum(images_forwarded)

    panel.state.update(top_k=2)  # another map: the old curves stay, greyed and titled as another map's
    assert "ANOTHER map" in panel.figure.widget.layout.title.text
    assert "Not computed for the map shown" in panel.status.value and "all channels" in panel.status.value
    assert panel.figure.widget.data[0].line.dash == "dot"
    assert np.array_equal(panel.figure.widget.data[0].y, first_curve)
    assert sum(images_forwarded) == passes  # changing the selection runs nothing

    second = panel.compute()
    assert second is not None and second is not first
    assert "ANOTHER" not in panel.figure.widget.layout.title.text
    passes = sum(images_forwarded)

    panel.state.update(top_k=None)  # back to the first map: its curves, no forward pass
    assert np.array_equal(panel.figure.widget.data[0].y, first_curve)
    assert panel.figure.widget.data[0].line.dash == "solid"
    assert "remembered" in panel.status.value
    assert panel.compute() is first
    assert sum(images_forwarded) == passes


def test_a_new_picture_layer_class_or_preset_is_another_map(cache, model, images_forwarded) -> None:
    panel = make_panel(cache, model)
    panel.compute()
    for change in ({"image": 1}, {"layer": "features.1"}, {"target": 7}, {"preset": "official"}, {"switched_off": {0}}):
        panel.state.update(**change)
        assert "ANOTHER map" in panel.figure.widget.layout.title.text, change
    assert len(panel.results) == 1


# ---- no model, failures: said in place -------------------------------------------------------


def test_without_a_model_the_panel_says_how_to_attach_one(cache) -> None:
    panel = MetricsPanel(ExplorerState(cache), ModelLink(None, None))
    assert "Explorer.from_model" in panel.status.value and "Explorer(cache, model=" in panel.status.value
    assert panel.button.layout.display == "none" and panel.body.layout.display == "none"
    assert panel.intro.layout.display == "none"  # no button, so nothing to explain
    panel.state.update(layer="features.1", top_k=2)  # following the selection raises nothing
    assert panel.compute() is None
    assert "no model is attached" in panel.message.value
    assert panel.results == {}


def test_a_model_with_other_weights_is_refused_in_place(cache) -> None:
    panel = make_panel(cache, tiny_model(seed=1))
    assert panel.compute() is None
    assert "not the ones the cache was made with" in panel.message.value
    assert panel.button.layout.display == "none"


def test_a_model_that_fails_to_load_is_refused_in_place(cache) -> None:
    def missing_weights():
        raise FileNotFoundError("weights.pth missing")

    panel = make_panel(cache, missing_weights)
    assert panel.compute() is None
    assert "FileNotFoundError: weights.pth missing" in panel.message.value
    assert panel.button.layout.display == "none"  # the model is unusable: no button to press again
    panel.state.update(top_k=2)
    assert "FileNotFoundError" in panel.status.value and panel.results == {}


def test_an_error_inside_the_computation_is_shown_in_place(cache) -> None:
    broken = tiny_model(seed=0)

    def fail(_module, _args):
        raise RuntimeError("out of memory (test)")

    handle = broken.module.register_forward_pre_hook(fail)
    panel = make_panel(cache, broken)
    assert panel.compute() is None
    assert "RuntimeError: out of memory (test)" in panel.message.value
    assert panel.results == {} and not panel.button.disabled
    handle.remove()

    broken.module.register_forward_hook(lambda _module, _args, output: output * float("nan"))
    assert panel.compute() is None
    assert "NaN" in panel.message.value


def test_exploring_without_a_model_imports_no_torch(cache, tmp_path) -> None:
    path = save_cache(cache, tmp_path / "tiny.zarr")
    code = textwrap.dedent(
        f"""
        import sys
        from scorecam_explorer.cache import load_cache
        from scorecam_explorer.explorer.metrics_panel import MetricsPanel
        from scorecam_explorer.explorer.model_link import ModelLink
        from scorecam_explorer.explorer.state import ExplorerState
        panel = MetricsPanel(ExplorerState(load_cache({str(path)!r})), ModelLink(None, None))
        panel.state.update(layer="features.1", top_k=2)
        panel.compute()
        print("torch" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


# ---- the figure on its own --------------------------------------------------------------------


def test_curves_spec_draws_the_datasets_and_an_empty_placeholder(cache, model) -> None:
    saliency = scorecam(cache, "features.4", None, image=0)
    deletion, insertion = deletion_insertion(model, cached_input(cache, 0), saliency, step_fraction=0.05)
    spec = causal_curves_spec(deletion, insertion, class_name="class 3")
    figure = go.Figure(spec)  # Plotly accepts it
    assert [trace.name for trace in figure.data] == ["deletion", "insertion"]
    assert np.array_equal(figure.data[1].y, insertion["curve"].values[0])
    assert figure.data[0].xaxis == "x" and figure.data[1].xaxis == "x2"
    assert figure.layout.yaxis.title.text == "p(class 3)"

    empty = go.Figure(causal_curves_spec(None, None))
    assert [len(trace.x) for trace in empty.data] == [0, 0]
    assert "not computed" in empty.layout.annotations[1].text

    stale = causal_curves_spec(deletion, insertion, stale=True)
    assert {trace["line"]["color"] for trace in stale["data"]} == {"#9e9e9e"}


def test_in_the_explorer_each_change_sends_at_most_one_figure_update(cache, model) -> None:
    from scorecam_explorer.explorer import Explorer

    explorer = Explorer(cache, model=model)
    panel = MetricsPanel(explorer.state, explorer.model)
    panel.compute()
    updates = []

    def record(data=None, buffers=None, **_kwargs):
        state = (data or {}).get("state", {})
        if state.get("_py2js_update") or state.get("_py2js_restyle") or state.get("_py2js_relayout"):
            updates.append(1)

    panel.figure.widget.comm.send = record
    changes = [
        lambda: setattr(explorer.controls.target, "value", 5),  # the curves turn grey: one update
        lambda: setattr(explorer.recomposer.top_k, "value", 2),  # still the same stale curves: none
        lambda: setattr(explorer.controls.preset, "value", "torchcam"),
    ]
    counts = []
    for change in changes:
        updates.clear()
        change()
        counts.append(len(updates))
    assert counts[0] == 1 and max(counts) == 1, counts
