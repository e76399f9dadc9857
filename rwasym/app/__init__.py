"""What users run: the command line (`cli`, every argparse parser) and the companion reports
(`spectra`). The study's experiments, demo and reports are in `rwasym.studies`, tables and
figures in `rwasym.report`."""
