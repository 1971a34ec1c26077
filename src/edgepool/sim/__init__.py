"""Simulation of a Plan: ``lower(plan)`` and (issue 3) the discrete-event simulator. No torch."""
