"""Evaluation: fixed-seed sampling, scoring, paired win rates, grids and the HTML report."""
