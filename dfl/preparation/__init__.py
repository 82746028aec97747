"""Dataset downloads, safe archive extraction and preparation (``dfl-prepare``)."""
