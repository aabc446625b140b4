"""What the poses give: reconstruction, FSC, evaluation against the truth, coverage, plots."""
