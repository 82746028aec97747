"""The CPU speed code, behind one entry point."""
