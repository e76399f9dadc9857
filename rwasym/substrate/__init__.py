"""Deprecated (moved in 0.2; removed in 0.3): the study's pairs and language are in `rwasym.studies`,
the training loops in `rwasym.train`. Each old module here is an alias that warns."""
