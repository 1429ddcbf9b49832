"""Kept empty on purpose. pytest-attn adds its bundled suite (pytest_attn/suite) to other
projects' runs by path, and pytest then loads every conftest.py above that path, this one too when
pytest-attn is installed from a checkout (pip install -e .): anything here would act on those
runs. This project's own test configuration is in pyproject.toml and tests/conftest.py."""
