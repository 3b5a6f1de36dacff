"""The tracking tests' shared store."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> str:
    """One sqlite store for the tracking tests (creating one runs MLflow's schema migrations: ~5 s)."""
    return "sqlite:///" + str(tmp_path_factory.mktemp("store") / "mlflow.db")
