"""The gate: streams, policies, waivers, pins and first-bad detection.

``Gate`` (gate.service) is the entry point the front ends use.
"""
