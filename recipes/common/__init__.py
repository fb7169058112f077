"""Helpers shared by the recipes, one job per module (arguments, data, metrics, reporting)."""
