"""Picking stop points from the curves logged in MLflow."""
