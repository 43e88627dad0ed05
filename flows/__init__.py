"""Prefect flows: wiring only. Stages run through DVC; gate, package and promote call tasks/."""
