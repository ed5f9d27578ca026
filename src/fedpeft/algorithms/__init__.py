"""Federated methods, one file (or folder) each, on the contract in base.py; registry.py builds them."""
