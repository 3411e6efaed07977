"""pyproject's warning filters silence named third-party warnings only: a DeprecationWarning of
our own still reaches the test report."""

import warnings

import pytest
from _pytest.config import parse_warning_filter


def caught_under_pyproject_filters(request, *calls):
    """The warnings that pass pyproject's filterwarnings (as pytest applies them, whatever -W says)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        for line in request.config.getini("filterwarnings"):
            warnings.filterwarnings(*parse_warning_filter(line, escape=False))
        for message, category, module in calls:
            warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", 1, module=module)
    return [(str(w.message), w.category) for w in caught]


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
def test_a_deprecation_warning_of_our_own_is_not_ignored(request, category):
    assert caught_under_pyproject_filters(request, ("an old API", category, "lit_latent.module")) == [("an old API", category)]
    assert caught_under_pyproject_filters(request, ("an old API", category, "callbacks.rewards")) == [("an old API", category)]


def test_the_named_third_party_warnings_are_ignored(request):
    assert caught_under_pyproject_filters(
        request,
        ("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, "lightning.pytorch.utilities._pytree"),
        ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, "transformers.modeling_utils"),
        ("Found 31 module(s) in eval mode at the start of training.", UserWarning, "lightning.pytorch.loops.fit_loop"),
    ) == []
    # a transformers deprecation not named in pyproject still shows
    assert caught_under_pyproject_filters(request, ("x is deprecated", DeprecationWarning, "transformers.utils")) != []
