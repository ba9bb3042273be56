"""Fixtures shared by unit test modules, found by pytest here instead of imported by each module
(an imported fixture is shadowed by the test's parameter of the same name: ruff F811)."""

from tests.unit.model_registry_fixtures import demo_weights, model_dir, models_base, two_versions  # noqa: F401
