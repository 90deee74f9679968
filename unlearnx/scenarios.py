"""Shift scenarios: deletion requests that leave the retained data shifted along an
attribute, on the vendored datasets and the synthetic generator.

- [`group_deletion`][unlearnx.scenarios.group_deletion]: forget most of one group;
- [`label_group_deletion`][unlearnx.scenarios.label_group_deletion]: forget most of one
  group's positives (the group's base rate shifts);
- [`feature_with_proxies`][unlearnx.scenarios.feature_with_proxies]: remove a feature
  while the features that proxy it stay.

Each returns a [`Scenario`][unlearnx.scenarios.Scenario] `(name, request, attribute,
description)`; the attribute is what to check the predictions against
(`ux.hsic_test`) and to correct for (`ux.independence`, `ux.reweight`).

Example:
    ```python
    import unlearnx as ux
    adult = ux.datasets.adult()
    for s in (ux.scenarios.group_deletion(adult, "sex", "Female", 0.8),
              ux.scenarios.feature_with_proxies(adult, "sex")):
        print(s.name, "|", s.description)
    ```
"""

from ._scenarios import (
    Scenario as Scenario,
    feature_with_proxies as feature_with_proxies,
    group_deletion as group_deletion,
    label_group_deletion as label_group_deletion,
)

__all__ = ["Scenario", "feature_with_proxies", "group_deletion", "label_group_deletion"]
