"""What users run: the command line (`cli`, every argparse parser), the paper's experiments
(`experiments`), the companion reports (`spectra`), the demo and the report/figure writers."""
