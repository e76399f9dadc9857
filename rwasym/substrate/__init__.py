"""rwasym's own small models: the procedural language and its preference pairs (`language`), the
training loops (`train`), the cached default pair (`default_pair`) and the TRL backend."""
