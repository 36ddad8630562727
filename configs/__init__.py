"""Recipes (YAML), shipped inside the package as `treetune.configs` so library calls can find them."""
