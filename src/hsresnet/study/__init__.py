"""Controlled comparisons declared in YAML (``hsresnet study``): plan, run and report. See docs/study.md."""
